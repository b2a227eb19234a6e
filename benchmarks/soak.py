"""`copilot bench --suite soak`: a supervised local mesh under a fixed rate of diagnoses (a share with photos)
while one agent is SIGKILLed every interval, in turn. Per minute: answered, errors, degraded share, p50/p99;
RSS and open file descriptors of every process at start and end; incidents stored vs answered."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import tempfile
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.table import Table

from benchmarks.mesh import PROBLEMS, SAMPLE, percentiles
from copilot.client import CHANNEL_OPTIONS, auth_metadata, diagnose_request
from copilot.v1 import copilot_pb2, copilot_pb2_grpc
from copilot_cli.launcher import Mesh, RestartPolicy

VICTIMS = ("knowledge", "vision", "report")


def process_figures(mesh: Mesh) -> dict[str, dict[str, Any]]:
    """RSS (MiB) and open file descriptors of every service process, from /proc."""
    found: dict[str, dict[str, Any]] = {}
    for name, proc in mesh.services.items():
        if not proc.alive:
            found[name] = {"pid": None}
            continue
        pid = proc.handle.pid
        try:
            rss_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
            fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
        except OSError:
            found[name] = {"pid": pid}
            continue
        found[name] = {"pid": pid, "rss_mib": round(rss_pages * 4096 / 2**20, 1), "fds": fds}
    return found


async def _load(address: str, rate: float, photo_share: float, duration_s: float, on_tick) -> list[dict]:
    """Open loop: one diagnosis every 1/rate seconds whatever the answers do; each with its own request_id."""
    photo = SAMPLE.read_bytes()
    every_photo = max(1, round(1 / photo_share)) if photo_share > 0 else 0
    results: list[dict] = []
    metadata = auth_metadata("technician-soak")
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = copilot_pb2_grpc.CopilotServiceStub(channel)

        async def one(i: int, at: float) -> None:
            request_id = f"soak-{uuid.uuid4().hex[:16]}"
            with_photo = bool(every_photo) and i % every_photo == 0
            request = diagnose_request(
                "PUNE-IN",
                f"CNC-A-{i % 50:03d}",
                PROBLEMS[i % len(PROBLEMS)],
                photo if with_photo else None,
                request_id=request_id,
                equipment_type="brushed-steel" if with_photo else "",
            )
            started = time.perf_counter()
            record = {"i": i, "t": at, "request_id": request_id, "photo": with_photo}
            try:
                reply = await stub.Diagnose(request, metadata=metadata, timeout=20)
                record.update(
                    code="OK", degraded=any(s.state == copilot_pb2.STAGE_STATE_DEGRADED for s in reply.stages)
                )
            except grpc.aio.AioRpcError as exc:
                record.update(code=exc.code().name, degraded=False)
            record["ms"] = (time.perf_counter() - started) * 1000
            results.append(record)

        began = time.monotonic()
        tasks, i = [], 0
        while (elapsed := time.monotonic() - began) < duration_s:
            tasks.append(asyncio.create_task(one(i, elapsed)))
            i += 1
            on_tick(elapsed)
            await asyncio.sleep(max(0.0, began + i / rate - time.monotonic()))
        await asyncio.gather(*tasks)
    return results


def run_soak(
    *,
    output: Path,
    console: Console,
    duration_s: float = 600,
    rate: float = 20,
    photo_share: float = 0.1,
    kill_every_s: float = 60,
) -> dict:
    data = Path(tempfile.mkdtemp(prefix="copilot-soak-"))
    mesh = Mesh.on_free_ports(data_dir=data, extra_env={"ORCHESTRATOR_RATE_LIMIT": ""})
    events: list[dict] = []
    mesh.start()
    try:
        mesh.wait_ready(timeout=300)
        started = [time.monotonic()]
        supervisor = mesh.supervise(
            RestartPolicy(),
            on_event=lambda e: events.append(
                {"t": round(time.monotonic() - started[0], 1), "service": e.service, "kind": e.kind, "reason": e.reason}
            ),
        )
        at_start = process_figures(mesh)
        kills: list[dict] = []
        next_kill = [kill_every_s]

        def on_tick(elapsed: float) -> None:
            if kill_every_s and elapsed >= next_kill[0]:
                victim = VICTIMS[len(kills) % len(VICTIMS)]
                proc = mesh.services[victim]
                if proc.alive:
                    proc.handle.send_signal(signal.SIGKILL)
                kills.append({"t": round(elapsed, 1), "service": victim})
                next_kill[0] += kill_every_s

        with console.status(
            f"soak: {rate:g} diagnoses/s for {duration_s:.0f} s, an agent killed every {kill_every_s:.0f} s"
        ):
            results = asyncio.run(_load(mesh.address("orchestrator"), rate, photo_share, duration_s, on_tick))
        time.sleep(2)
        at_end = process_figures(mesh)
        answered = {r["request_id"] for r in results if r["code"] == "OK"}
        with sqlite3.connect(data / "incidents.db") as db:
            stored = {row[0] for row in db.execute("SELECT request_id FROM incidents WHERE request_id LIKE 'soak-%'")}
        restarts = {name: status.restarts for name, status in supervisor.status.items()}
    finally:
        mesh.stop()

    minutes: dict[int, list[dict]] = defaultdict(list)
    for record in results:
        minutes[int(record["t"] // 60)].append(record)
    per_minute = []
    for minute, records in sorted(minutes.items()):
        ok = [r for r in records if r["code"] == "OK"]
        errors: defaultdict[str, int] = defaultdict(int)
        for r in records:
            if r["code"] != "OK":
                errors[r["code"]] += 1
        per_minute.append(
            {
                "minute": minute + 1,
                "sent": len(records),
                "answered": len(ok),
                "errors": dict(errors),
                "degraded_share": round(sum(r["degraded"] for r in ok) / max(len(ok), 1), 3),
                **(
                    {k: v for k, v in percentiles([r["ms"] for r in ok]).items() if k in ("p50_ms", "p99_ms")}
                    if len(ok) > 1
                    else {}
                ),
            }
        )
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "rate_per_s": rate,
        "photo_share": photo_share,
        "duration_s": duration_s,
        "kill_every_s": kill_every_s,
        "kills": kills,
        "per_minute": per_minute,
        "sent": len(results),
        "answered": len(answered),
        "errors": sum(1 for r in results if r["code"] != "OK"),
        "incidents_stored": len(stored),
        "answered_not_stored": len(answered - stored),
        "restarts": restarts,
        "processes_at_start": at_start,
        "processes_at_end": at_end,
        "supervisor_events": events,
    }
    table = Table(
        "minute",
        "sent",
        "answered",
        "errors",
        "degraded",
        "p50 ms",
        "p99 ms",
        title=f"soak: {rate:g}/s, {photo_share:.0%} photos, kill every {kill_every_s:.0f} s",
    )
    for row in per_minute:
        table.add_row(
            str(row["minute"]),
            str(row["sent"]),
            str(row["answered"]),
            ", ".join(f"{k} {v}" for k, v in row["errors"].items()) or "0",
            f"{row['degraded_share']:.1%}",
            str(row.get("p50_ms", "-")),
            str(row.get("p99_ms", "-")),
        )
    console.print(table)
    processes = Table("process", "RSS start MiB", "RSS end MiB", "fds start", "fds end", "restarts")
    for name in at_start:
        s, e = at_start[name], at_end.get(name, {})
        processes.add_row(
            name,
            str(s.get("rss_mib", "-")),
            str(e.get("rss_mib", "-")),
            str(s.get("fds", "-")),
            str(e.get("fds", "-")),
            str(restarts.get(name, 0)),
        )
    console.print(processes)
    console.print(
        f"answered {len(answered)} of {len(results)}; stored {len(stored)}; answered but not stored "
        f"{len(answered - stored)}; kills {[k['service'] for k in kills]}"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {output}")
    return report
