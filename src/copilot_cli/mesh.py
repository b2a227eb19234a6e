"""`copilot up | status | health`: the local mesh (four supervised processes) and gRPC health checks."""

from __future__ import annotations

import json
import signal
import threading
import time
from typing import Annotated

import typer
from rich.table import Table

from copilot.runtime.config import DEFAULT_PORTS
from copilot.runtime.config import data_dir as default_data_dir
from copilot_cli.common import AsJson, DataDir, console, out
from copilot_cli.launcher import SupervisorEvent

DEMO_PROBLEM = "Pump housing overheating during operation and a visible crack near the outlet flange"


def up(
    host: Annotated[str, typer.Option("--host", help="interface every service binds")] = "127.0.0.1",
    orchestrator_port: Annotated[int, typer.Option("--orchestrator-port")] = DEFAULT_PORTS["orchestrator"],
    vision_port: Annotated[int, typer.Option("--vision-port")] = DEFAULT_PORTS["vision"],
    knowledge_port: Annotated[int, typer.Option("--knowledge-port")] = DEFAULT_PORTS["knowledge"],
    report_port: Annotated[int, typer.Option("--report-port")] = DEFAULT_PORTS["report"],
    data_dir: DataDir = None,
    vision_replicas: Annotated[
        int,
        typer.Option(
            "--vision-replicas", min=1, max=8, help="vision processes; the orchestrator round-robins over them"
        ),
    ] = 1,
    demo: Annotated[
        bool, typer.Option("--demo", help="run one diagnosis with the shipped sample photo once SERVING")
    ] = False,
    exit_after_demo: Annotated[bool, typer.Option("--exit-after-demo", help="stop the mesh after the demo")] = False,
) -> None:
    """Start the four services as separate processes, wait for SERVING, serve until Ctrl-C/SIGTERM. A process
    that crashes or hangs is restarted with back-off (like a kubelet); one that keeps crashing is reported and
    left down while the rest serves (`copilot status` lists them)."""
    from copilot.client import diagnose_request
    from copilot_cli.diagnose import print_diagnosis, run_streamed, sample_photo
    from copilot_cli.launcher import Mesh, State

    ports = {
        "orchestrator": orchestrator_port,
        "vision": vision_port,
        "knowledge": knowledge_port,
        "report": report_port,
    }
    mesh = Mesh(host=host, data_dir=data_dir or default_data_dir(), vision_replicas=vision_replicas, ports=ports)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    started = time.monotonic()
    mesh.start()
    supervisor = mesh.supervise(on_event=print_supervisor_event)
    try:
        with console.status("starting vision, knowledge, report and orchestrator…"):
            states = supervisor.wait_settled(timeout=600)
        table = Table(
            "service", "address", "state", "pid", "log", title=f"mesh up in {time.monotonic() - started:.1f}s"
        )
        for name, status in supervisor.snapshot().items():
            colour = "green" if status["state"] == "serving" else "red"
            table.add_row(
                name,
                status["address"],
                f"[{colour}]{status['state']}[/]",
                str(status["pid"] or "-"),
                str(mesh.services[name].log_path),
            )
        console.print(table)
        if demo and states["orchestrator"] is State.SERVING:
            console.rule("demo diagnosis with the shipped sample photo")
            # the equipment registry says what PUMP-A-7 is: a centrifugal pump, brushed-steel reference set
            request = diagnose_request("PUNE-IN", "PUMP-A-7", DEMO_PROBLEM, sample_photo())
            response = run_streamed(mesh.address("orchestrator"), request, token=mesh.token(), timeout=120)
            if response is not None:
                print_diagnosis(response, as_json=False)
        if demo and exit_after_demo:
            return
        console.print(
            f"[green]serving[/] — try: copilot diagnose --addr {mesh.address('orchestrator')} --plant PUNE-IN "
            "--equipment CNC-A-102 --problem 'Machine overheating during operation'   (Ctrl-C stops; "
            "`copilot status` lists the services)"
        )
        stop.wait()
    finally:
        codes = mesh.stop()
        console.print("stopped: " + ", ".join(f"{n}={c}" for n, c in codes.items()))


def print_supervisor_event(event: SupervisorEvent) -> None:
    """One line per restart as it happens (service, reason, restart count)."""
    if event.kind == "crashed":
        console.print(
            f"[yellow]{event.service} exited ({event.reason}); restarting in {event.delay_s:.0f}s "
            f"(restarts so far: {event.restarts})[/]"
        )
    elif event.kind == "hung":
        console.print(f"[yellow]{event.service} is alive but not answering ({event.reason}): killing it[/]")
    elif event.kind == "restarted":
        console.print(f"[cyan]{event.service} restarted ({event.reason}, restart {event.restarts})[/]")
    elif event.kind == "serving" and event.restarts:
        console.print(f"[green]{event.service} SERVING again {event.reason}[/]")
    elif event.kind == "gave-up":
        console.print(
            f"[red]{event.service} keeps crashing ({event.reason}): left down while the rest serves. "
            f"Last log lines:[/]\n{event.log_tail}"
        )


def status(data_dir: DataDir = None, as_json: AsJson = False) -> None:
    """Each service of the local mesh (`copilot up`): state, pid, restarts, last exit, address, live health.
    Exit 0 when all serve, 2 when one does not, 1 when no mesh runs from the data folder."""
    from grpc_health.v1 import health_pb2

    from copilot_cli.launcher import health_status, read_state

    folder = data_dir or default_data_dir()
    state = read_state(folder)
    if state is None:
        hint = "" if folder.is_dir() else "; that folder does not exist: is the mesh's elsewhere (--data-dir)?"
        console.print(f"no local mesh is running from {folder} (start one with `copilot up`){hint}")
        raise typer.Exit(1)
    services = state["services"]
    for service in services.values():
        code = health_status(service["address"], timeout=1.0)
        service["health"] = "UNREACHABLE" if code is None else health_pb2.HealthCheckResponse.ServingStatus.Name(code)
    if as_json:
        out.print_json(json.dumps(services))
    else:
        table = Table(
            "service",
            "state",
            "health",
            "pid",
            "restarts",
            "last exit",
            "address",
            title=f"local mesh (supervisor pid {state['supervisor_pid']})",
        )
        for name, service in services.items():
            colour = {"serving": "green", "failed": "red"}.get(service["state"], "yellow")
            table.add_row(
                name,
                f"[{colour}]{service['state']}[/]",
                service["health"],
                str(service["pid"] or "-"),
                str(service["restarts"]),
                service["last_exit"] or "-",
                service["address"],
            )
        out.print(table)
    raise typer.Exit(0 if all(s["state"] == "serving" for s in services.values()) else 2)


def health(
    addr: Annotated[str, typer.Option("--addr", help="any service of the mesh")] = (
        f"localhost:{DEFAULT_PORTS['orchestrator']}"
    ),
    service: Annotated[str, typer.Option("--service", help="a full service name; empty = the whole server")] = "",
    timeout: Annotated[float, typer.Option("--timeout")] = 2.0,
) -> None:
    """grpc.health.v1 check (for container health checks): exit 0 when SERVING, 1 otherwise."""
    from grpc_health.v1 import health_pb2

    from copilot.client import open_channel
    from copilot_cli.launcher import health_status

    code = health_status(addr, timeout=timeout, service=service, channel=open_channel(addr))  # TLS: COPILOT_TLS_*
    name = "UNREACHABLE" if code is None else health_pb2.HealthCheckResponse.ServingStatus.Name(code)
    out.print(f"{addr} {service or '(server)'}: {name}")
    raise typer.Exit(0 if code == health_pb2.HealthCheckResponse.SERVING else 1)
