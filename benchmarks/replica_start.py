"""How fast a new replica of an agent is ready to serve, with its store in place (what lets the HPA add pods in
a burst): seconds from spawning `python -m services.<agent>` to grpc.health SERVING, and its resident memory then.

    python -m benchmarks.replica_start [--service vision] [--starts 7] [--compare-root ../other-checkout]
        [--out .copilot-data/bench/replica-start.json]

The first start fills the store (and its cache) and is reported apart; the others are the replica starts. With
`--compare-root`, each start of this checkout alternates with one of the other checkout's code on the same store,
so the two are measured under the same load (a ratio from one run, not two); the other checkout needs its
generated code (`make protos`, or a link to this one's src/copilot/v1). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from grpc_health.v1 import health_pb2
from rich.console import Console
from rich.table import Table

from copilot.runtime.config import data_dir
from copilot_cli.launcher import free_port, health_status

ROOT = Path(__file__).resolve().parents[1]
STORE_ENV = {"vision": "VISION_REFERENCE_DIR", "rag": "KNOWLEDGE_CHROMA_PATH"}


def spawn(
    service: str, root: Path, store: Path, log: Path, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """`python -m services.<service>` of the checkout at `root` on `store`, on a free port: (process, address)."""
    port = free_port()
    prefix = "KNOWLEDGE" if service == "rag" else service.upper()
    env = {
        **os.environ,
        f"{prefix}_PORT": str(port),
        f"{prefix}_METRICS_PORT": "0",
        STORE_ENV[service]: str(store),
        "PYTHONPATH": os.pathsep.join([str(root), str(root / "src"), os.environ.get("PYTHONPATH", "")]),
        "AUTH_MODE": os.environ.get("AUTH_MODE", "dev"),  # a replica start needs no client to authenticate
        **(extra_env or {}),
    }
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", f"services.{service}"], cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    return process, f"127.0.0.1:{port}"


def wait_serving(process: subprocess.Popen[bytes], address: str, log: Path, what: str, timeout: float = 300) -> None:
    """Until the server at `address` reports SERVING; RuntimeError with its log's end if it exits or times out."""
    began = time.monotonic()
    while health_status(address, timeout=0.5) != health_pb2.HealthCheckResponse.SERVING:
        if process.poll() is not None or time.monotonic() - began > timeout:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{what} did not reach SERVING; its log ends:\n{tail}")
        time.sleep(0.02)


def start_once(service: str, root: Path, store: Path, log: Path, timeout: float = 300) -> tuple[float, int]:
    """Seconds from spawning the service to SERVING, and its resident memory then (MiB; then it is stopped)."""
    began = time.monotonic()
    process, address = spawn(service, root, store, log)
    try:
        wait_serving(process, address, log, f"{service} from {root}", timeout)
        return time.monotonic() - began, _resident_mib(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)


def _resident_mib(pid: int) -> int:
    """VmRSS of a process (Linux /proc; 0 elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--service", choices=sorted(STORE_ENV), default="vision")
    parser.add_argument("--starts", type=int, default=7, help="replica starts after the first (store-filling) one")
    parser.add_argument("--compare-root", type=Path, help="another checkout, alternated with this one")
    parser.add_argument("--out", type=Path, default=data_dir() / "bench" / "replica-start.json")
    args = parser.parse_args()
    roots = {"this": ROOT} | ({"other": args.compare_root.resolve()} if args.compare_root else {})
    console = Console()
    with tempfile.TemporaryDirectory() as folder:
        store, logs = Path(folder) / "store", Path(folder)
        first, _ = start_once(args.service, ROOT, store, logs / "first.log")
        console.print(f"first start (fills the store): {first:.2f} s")
        times: dict[str, list[float]] = {name: [] for name in roots}
        resident: dict[str, list[int]] = {name: [] for name in roots}
        for n in range(args.starts):
            for name, root in roots.items():
                seconds, mib = start_once(args.service, root, store, logs / f"{name}-{n}.log")
                times[name].append(seconds)
                resident[name].append(mib)
                console.print(f"{name} start {n + 1}: {seconds:.2f} s, {mib} MiB resident", highlight=False)
    table = Table(title=f"{args.service} replica: seconds to SERVING, store in place")
    for column in ("code", "starts", "min", "median", "max", "MiB resident (median)"):
        table.add_column(column)
    result: dict[str, object] = {"service": args.service, "first_start_s": round(first, 2), "runs": {}}
    for name, values in times.items():
        summary = {
            "root": str(roots[name]),
            "starts_s": [round(v, 2) for v in values],
            "min_s": round(min(values), 2),
            "median_s": round(statistics.median(values), 2),
            "max_s": round(max(values), 2),
            "resident_mib_at_serving": resident[name],
        }
        result["runs"][name] = summary  # type: ignore[index]
        table.add_row(
            name,
            str(len(values)),
            f"{min(values):.2f}",
            f"{statistics.median(values):.2f}",
            f"{max(values):.2f}",
            str(statistics.median(resident[name])),
        )
    if len(times) == 2:
        result["median_ratio_this_over_other"] = round(
            statistics.median(times["this"]) / statistics.median(times["other"]), 2
        )
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
