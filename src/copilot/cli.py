"""`copilot up | diagnose | bench` — the command line of the Manufacturing Copilot."""
from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import grpc
import typer
from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.table import Table

from copilot.client import DEV_TOKEN, diagnose, diagnose_request
from copilot.runtime.config import DEFAULT_PORTS
from copilot.runtime.errors import field_violations

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Manufacturing Copilot mesh")
console = Console(stderr=True)
out = Console()

SAMPLE_PHOTO = Path(__file__).resolve().parents[2] / "samples" / "pump-housing-crack.jpg"


def print_diagnosis(response, as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(MessageToDict(response, preserving_proto_field_name=True)))
        return
    out.print(response.report.rendered_text, markup=False, highlight=False)
    table = Table(title=f"request {response.request_id}")
    for column in ("stage", "state", "confidence", "ms", "error"):
        table.add_column(column)
    for s in response.stages:
        table.add_row(
            s.DESCRIPTOR.fields_by_name["stage"].enum_type.values_by_number[s.stage].name.removeprefix("STAGE_").lower(),
            s.DESCRIPTOR.fields_by_name["state"].enum_type.values_by_number[s.state].name.removeprefix("STAGE_STATE_").lower(),
            f"{s.confidence:.2f}" if s.HasField("confidence") else "-", f"{s.duration_ms:.1f}", s.error,
        )
    out.print(table)
    review = "[bold red]yes[/]" if response.requires_manual_review else "no"
    out.print(f"confidence {response.confidence_score:.2f} · manual review: {review}")
    out.print(f"[dim]{response.safety_disclaimer}[/]")


@app.command("diagnose")
def diagnose_cmd(
    plant: str = typer.Option(..., "--plant", help="plant id, e.g. PUNE-IN"),
    equipment: str = typer.Option(..., "--equipment", help="equipment id, e.g. CNC-A-102"),
    problem: str = typer.Option(..., "--problem", help="what the technician sees (10-500 characters)"),
    image: Optional[Path] = typer.Option(None, "--image", exists=True, dir_okay=False, help="photo (JPEG/PNG/WebP)"),
    image_id: Optional[str] = typer.Option(None, "--image-id"),
    equipment_type: str = typer.Option("", "--equipment-type", help="vision reference set, e.g. brushed-steel"),
    as_json: bool = typer.Option(False, "--json", help="print the whole response as JSON"),
    addr: str = typer.Option(f"localhost:{DEFAULT_PORTS['orchestrator']}", "--addr", envvar="COPILOT_ADDR"),
    token: str = typer.Option(DEV_TOKEN, "--token", envvar="COPILOT_TOKEN", help="technician-<id>"),
    timeout: float = typer.Option(60.0, "--timeout"),
) -> None:
    """Send one diagnosis to the orchestrator and print the report."""
    request = diagnose_request(plant, equipment, problem, image, image_id, equipment_type)
    try:
        response = diagnose(addr, request, token=token, timeout=timeout)
    except grpc.RpcError as exc:
        console.print(f"[bold red]{exc.code().name}[/]: {exc.details()}")
        for v in field_violations(exc):
            console.print(f"  • [bold]{v.field}[/]: {v.description}")
        raise typer.Exit(2)
    print_diagnosis(response, as_json)


@app.command()
def up(
    host: str = typer.Option("127.0.0.1", "--host", help="interface every service binds"),
    orchestrator_port: int = typer.Option(DEFAULT_PORTS["orchestrator"], "--orchestrator-port"),
    vision_port: int = typer.Option(DEFAULT_PORTS["vision"], "--vision-port"),
    knowledge_port: int = typer.Option(DEFAULT_PORTS["knowledge"], "--knowledge-port"),
    report_port: int = typer.Option(DEFAULT_PORTS["report"], "--report-port"),
    data_dir: Path = typer.Option(Path(".copilot-data"), "--data-dir", help="Chroma store and service logs"),
    vision_replicas: int = typer.Option(1, "--vision-replicas", min=1, max=8,
                                        help="vision processes; the orchestrator round-robins over them"),
    demo: bool = typer.Option(False, "--demo", help="run one diagnosis with the shipped sample photo once SERVING"),
    exit_after_demo: bool = typer.Option(False, "--exit-after-demo", help="stop the mesh after the demo"),
) -> None:
    """Start the four services as separate processes, wait for SERVING, serve until Ctrl-C/SIGTERM."""
    from copilot.launcher import Mesh

    ports = {"orchestrator": orchestrator_port, "vision": vision_port, "knowledge": knowledge_port,
             "report": report_port}
    mesh = Mesh(host=host, data_dir=data_dir, vision_replicas=vision_replicas, ports=ports)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    started = time.monotonic()
    mesh.start()
    try:
        with console.status("starting vision, knowledge, report and orchestrator…"):
            ready = mesh.wait_ready()
        table = Table(title=f"mesh SERVING in {time.monotonic() - started:.1f}s")
        for column in ("service", "address", "SERVING after", "pid", "log"):
            table.add_column(column)
        for name, proc in mesh.services.items():
            table.add_row(name, mesh.address(name), f"{ready[name]:.1f}s", str(proc.process.pid), str(proc.log_path))
        console.print(table)
        if demo:
            console.rule("demo diagnosis with the shipped sample photo")
            request = diagnose_request("PUNE-IN", "PUMP-A-7", "Pump housing overheating during operation and a "
                                       "visible crack near the outlet flange", SAMPLE_PHOTO,
                                       equipment_type="brushed-steel")
            print_diagnosis(diagnose(mesh.address("orchestrator"), request), as_json=False)
        if demo and exit_after_demo:
            return
        console.print(f"[green]serving[/] — try: copilot diagnose --addr {mesh.address('orchestrator')} --plant PUNE-IN "
                      "--equipment CNC-A-102 --problem 'Machine overheating during operation'   (Ctrl-C stops)")
        while not stop.wait(0.5):
            for name, proc in mesh.services.items():
                if not proc.alive:
                    console.print(f"[red]{name} exited ({proc.process.returncode}); see {proc.log_path}[/]")
                    stop.set()
    finally:
        codes = mesh.stop()
        console.print("stopped: " + ", ".join(f"{n}={c}" for n, c in codes.items()))


@app.command()
def health(
    addr: str = typer.Option(f"localhost:{DEFAULT_PORTS['orchestrator']}", "--addr"),
    service: str = typer.Option("", "--service", help="a full service name; empty = the whole server"),
    timeout: float = typer.Option(2.0, "--timeout"),
) -> None:
    """grpc.health.v1 check (for container health checks): exit 0 when SERVING, 1 otherwise."""
    from grpc_health.v1 import health_pb2

    from copilot.launcher import health_status

    status = health_status(addr, timeout=timeout, service=service)
    name = "UNREACHABLE" if status is None else health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    out.print(f"{addr} {service or '(server)'}: {name}")
    raise typer.Exit(0 if status == health_pb2.HealthCheckResponse.SERVING else 1)


@app.command()
def bench(
    suite: str = typer.Option("mesh", "--suite", help="mesh: cold start + Diagnose latency, mesh vs in-process; "
                                                      "vision: AnalyzeImage at 1/4/16 clients, batching off vs on"),
    n: int = typer.Option(50, "--n", help="diagnoses (mesh) or images per run (vision) to time"),
    output: Optional[Path] = typer.Option(None, "--output", help="JSON file (default benchmarks/results/<suite>.json)"),
) -> None:
    """Benchmarks: print a table and write JSON (never asserted in tests)."""
    from copilot.bench import run, run_vision

    if suite not in ("mesh", "vision"):
        raise typer.BadParameter("--suite is mesh or vision")
    target = output or Path("benchmarks/results") / f"{suite}.json"
    if suite == "mesh":
        run(n=n, output=target, console=out)
    else:
        run_vision(total=n, output=target, console=out)


if __name__ == "__main__":
    app()
