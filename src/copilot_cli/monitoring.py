"""`copilot monitoring`: the SRE signals written once in deploy/monitoring/slos.yaml — render the generated files,
or run a local Prometheus (the Debian package) over the local mesh with those rules."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from typing import Annotated

import typer
import yaml

from copilot.runtime.config import DEFAULT_METRICS_PORTS, data_dir
from copilot_cli.common import out

monitoring = typer.Typer(no_args_is_help=True, help="SLOs, alerts and the dashboard (deploy/monitoring/slos.yaml)")


@monitoring.command()
def render(
    runbook_url: Annotated[
        str, typer.Option(help="URL of docs/runbook.md the alerts link to (default: the source's)")
    ] = "",
) -> None:
    """Write the rules, their promtool tests, the dashboard and the Kubernetes component from the source."""
    from copilot import monitoring as signals

    for path in signals.write(signals.rendered(runbook_url=runbook_url or None)):
        out.print(f"wrote {path.relative_to(signals.ROOT)}")


@monitoring.command()
def prometheus(
    port: Annotated[int, typer.Option(help="Prometheus web port")] = 9090,
    host: Annotated[str, typer.Option(help="where the mesh's /metrics listen")] = "127.0.0.1",
) -> None:
    """Run Prometheus over the local mesh (`copilot up`'s default metrics ports) with the generated rules, until
    Ctrl-C. Needs the `prometheus` binary (Debian: apt-get install prometheus)."""
    from copilot import monitoring as signals

    binary = shutil.which("prometheus")
    if binary is None:
        out.print("prometheus is not installed: `sudo apt-get install prometheus` (or `make servers` as root)")
        raise typer.Exit(1)
    folder = data_dir() / "prometheus"
    folder.mkdir(parents=True, exist_ok=True)
    rules = folder / "rules.yaml"
    rules.write_text(yaml.safe_dump(signals.rules_file(signals.Source.load())))
    config = folder / "prometheus.yml"
    targets = {name: [f"{host}:{port_}"] for name, port_ in DEFAULT_METRICS_PORTS.items()}
    config.write_text(yaml.safe_dump(signals.scrape_config(targets, rule_files=[str(rules)])))
    out.print(f"Prometheus on http://127.0.0.1:{port} (alerts: /alerts, rules: /rules); Ctrl-C stops it")
    with contextlib.suppress(KeyboardInterrupt):
        subprocess.run(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            check=False,
        )
