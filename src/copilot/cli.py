"""`copilot up | status | diagnose | token | incidents | incident | feedback | ingest | docs | eval | bench` — the command line of the Manufacturing Copilot."""
from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

import grpc
import typer
from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.table import Table

from copilot.client import auth_metadata, diagnose_request, open_channel, resolve_token
from copilot.runtime.config import DEFAULT_PORTS
from copilot.runtime.errors import field_violations
from copilot.v1 import copilot_pb2, copilot_pb2_grpc

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Manufacturing Copilot mesh")
console = Console(stderr=True)
out = Console()

SAMPLE_PHOTO = Path(__file__).resolve().parents[2] / "samples" / "pump-housing-crack.jpg"


STAGES = ("vision", "knowledge", "report")


def _enum_label(message, field: str, prefix: str) -> str:
    value = getattr(message, field)
    return message.DESCRIPTOR.fields_by_name[field].enum_type.values_by_number[value].name.removeprefix(prefix).lower()


def _stage_summary(finished) -> str:
    if finished.defects:
        return ", ".join(f"{d.type} {d.confidence:.2f}" for d in finished.defects)
    if finished.citations:
        return f"{len(finished.guidance)} steps citing " + ", ".join(dict.fromkeys(c.sop_id for c in finished.citations))
    if finished.HasField("report"):
        return f"{len(finished.report.recommended_actions)} actions, SOPs " + (
            ", ".join(finished.report.referenced_sop_ids) or "none")
    return finished.status.error


def _stage_row(status, detail: str) -> list[str]:
    name, state = _enum_label(status, "stage", "STAGE_"), _enum_label(status, "state", "STAGE_STATE_")
    colour = "green" if state == "ok" else "yellow"
    return [name, f"[{colour}]{state}[/]", f"{status.confidence:.2f}" if status.HasField("confidence") else "-",
            f"{status.duration_ms:.0f}", detail]


def run_streamed(address: str, request, *, token: str, timeout: float, show: bool = True):
    """StreamDiagnose with a live stage table; returns the final DiagnoseResponse. Ctrl-C cancels the call,
    which cancels the agent calls downstream."""
    from rich.live import Live
    from rich.spinner import Spinner

    from copilot.client import stream_diagnose

    rows: dict[str, list] = {}
    started: dict[str, float] = {}

    def render() -> Table:
        table = Table("stage", "state", "confidence", "ms", "partial result", title="diagnosis")
        for name in STAGES:
            if name in rows:
                table.add_row(*rows[name])
            elif name in started:
                table.add_row(name, Spinner("dots", text="running"), "", f"{(time.monotonic() - started[name]) * 1000:.0f}", "")
            else:
                table.add_row(name, "[dim]waiting[/]", "", "", "")
        return table

    result = None
    with open_channel(address) as channel:
        call = stream_diagnose(channel, request, token=token, timeout=timeout)
        try:
            display = Live(render(), console=console, refresh_per_second=8) if show else contextlib.nullcontext()
            with display as live:
                for event in call:
                    kind = event.WhichOneof("event")
                    if kind == "stage_started":
                        started[_enum_label(event.stage_started, "stage", "STAGE_")] = time.monotonic()
                    elif kind == "stage_finished":
                        row = _stage_row(event.stage_finished.status, _stage_summary(event.stage_finished))
                        rows[row[0]] = row
                    elif kind == "result":
                        result = event.result
                        for s in result.stages:  # a replayed answer (or a skipped stage) has no live events
                            rows.setdefault(_enum_label(s, "stage", "STAGE_"), _stage_row(s, s.error))
                    if live is not None:
                        live.update(render())
            if show and not console.is_terminal:
                console.print()  # a non-terminal gets the final table without its line end
        except KeyboardInterrupt:
            call.cancel()
            console.print("[yellow]cancelled[/]")
            raise typer.Exit(130)
    return result


def print_diagnosis(response, as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(MessageToDict(response, preserving_proto_field_name=True)))
        return
    out.print(response.report.rendered_text, markup=False, highlight=False)
    review = "[bold red]yes[/]" if response.requires_manual_review else "no"
    reasons = ", ".join(copilot_pb2.EscalationReason.Name(r).removeprefix("ESCALATION_REASON_").lower()
                        for r in response.escalation_reasons)
    out.print(f"request {response.request_id}{' (replayed)' if response.replayed else ''} · confidence "
              f"{response.confidence_score:.2f} · manual review: {review}" + (f" · reasons: {reasons}" if reasons else ""))
    if response.trace_id:
        out.print(f"[dim]trace {response.trace_id}[/]")
    out.print(f"[dim]{response.safety_disclaimer}[/]")


def _rpc_failed(exc: grpc.RpcError) -> typer.Exit:
    console.print(f"[bold red]{exc.code().name}[/]: {exc.details()}")
    for v in field_violations(exc):
        console.print(f"  • [bold]{v.field}[/]: {v.description}")
    return typer.Exit(2)


ORCHESTRATOR_ADDR = f"localhost:{DEFAULT_PORTS['orchestrator']}"
TOKEN_HELP = "bearer token (default: a JWT minted with the local dev mesh's secret; see `copilot token`)"


@app.command("diagnose")
def diagnose_cmd(
    plant: str = typer.Option(..., "--plant", help="plant id, e.g. PUNE-IN"),
    equipment: str = typer.Option(..., "--equipment", help="equipment id, e.g. CNC-A-102"),
    problem: str = typer.Option(..., "--problem", help="what the technician sees (10-500 characters)"),
    image: Optional[Path] = typer.Option(None, "--image", exists=True, dir_okay=False, help="photo (JPEG/PNG/WebP)"),
    image_id: Optional[str] = typer.Option(None, "--image-id"),
    equipment_type: str = typer.Option("", "--equipment-type", help="vision reference set, e.g. brushed-steel"),
    request_id: str = typer.Option("", "--request-id", help="makes the call idempotent: a retry replays the answer"),
    as_json: bool = typer.Option(False, "--json", help="print the whole response as JSON (no live display)"),
    addr: str = typer.Option(ORCHESTRATOR_ADDR, "--addr", envvar="COPILOT_ADDR"),
    token: str = typer.Option("", "--token", envvar="COPILOT_TOKEN", help=TOKEN_HELP),
    timeout: float = typer.Option(60.0, "--timeout"),
) -> None:
    """Diagnose through StreamDiagnose, showing each stage live, then print the report."""
    request = diagnose_request(plant, equipment, problem, image, image_id, equipment_type, request_id=request_id)
    try:
        response = run_streamed(addr, request, token=resolve_token(token), timeout=timeout, show=not as_json)
    except grpc.RpcError as exc:
        raise _rpc_failed(exc) from None
    print_diagnosis(response, as_json)


@app.command()
def token(
    role: str = typer.Option("technician", "--role", help="technician, engineer or admin"),
    subject: str = typer.Option("", "--subject", help="the `sub` claim (default: <role>-cli)"),
    ttl: float = typer.Option(3600, "--ttl", min=1, help="seconds until it expires"),
    secret_file: Optional[Path] = typer.Option(None, "--secret-file", exists=True, dir_okay=False,
                                               help="HS256 secret (default: AUTH_JWT_SECRET(_FILE), else the dev "
                                                    "mesh's .copilot-data/auth/dev-jwt-secret)"),
    private_key: Optional[Path] = typer.Option(None, "--private-key", exists=True, dir_okay=False,
                                               help="PEM private key: an RS256 token"),
) -> None:
    """Mint a signed JWT for a dev or test mesh and print it (use it as COPILOT_TOKEN or --token)."""
    from copilot.runtime.auth import AuthSettings, Role, mint_token, signing_secret

    parsed = Role.parse(role)
    if parsed is None:
        raise typer.BadParameter("--role is technician, engineer or admin")
    settings = AuthSettings()
    try:
        if private_key is not None:
            value = mint_token(subject or f"{role}-cli", parsed, private_key=private_key.read_text(), ttl_s=ttl,
                               issuer=settings.issuer, audience=settings.audience)
        else:
            secret = secret_file.read_text().strip() if secret_file else signing_secret(create=True)
            value = mint_token(subject or f"{role}-cli", parsed, secret=secret, ttl_s=ttl,
                               issuer=settings.issuer, audience=settings.audience)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    print(value)


@app.command()
def incidents(
    plant: str = typer.Option("", "--plant"),
    equipment: str = typer.Option("", "--equipment"),
    since: Optional[datetime] = typer.Option(None, "--since", help="ISO time, UTC unless it says otherwise"),
    until: Optional[datetime] = typer.Option(None, "--until"),
    limit: int = typer.Option(20, "--limit", min=1, max=1000, help="incidents to show (pages of 100 are fetched)"),
    as_json: bool = typer.Option(False, "--json"),
    addr: str = typer.Option(ORCHESTRATOR_ADDR, "--addr", envvar="COPILOT_ADDR"),
    token: str = typer.Option("", "--token", envvar="COPILOT_TOKEN", help=TOKEN_HELP),
) -> None:
    """List past diagnoses, newest first (ListIncidents)."""
    from copilot.runtime.convert import timestamp_to_pb

    def stamp(value: datetime | None):
        return timestamp_to_pb(value) if value is not None else None  # naive: UTC

    found = []
    metadata = auth_metadata(resolve_token(token))
    try:
        with open_channel(addr) as channel:
            stub = copilot_pb2_grpc.CopilotServiceStub(channel)
            page_token = ""
            while len(found) < limit:
                page = stub.ListIncidents(copilot_pb2.ListIncidentsRequest(
                    plant_id=plant, equipment_id=equipment, start_time=stamp(since), end_time=stamp(until),
                    page_size=min(100, limit - len(found)), page_token=page_token), metadata=metadata, timeout=30)
                found.extend(page.incidents)
                page_token = page.next_page_token
                if not page_token:
                    break
    except grpc.RpcError as exc:
        raise _rpc_failed(exc) from None
    if as_json:
        out.print_json(json.dumps([MessageToDict(i, preserving_proto_field_name=True) for i in found]))
        return
    table = Table("when (UTC)", "request", "plant", "equipment", "problem", "confidence", "review", "SOPs", "feedback",
                  title=f"{len(found)} incidents")
    for i in found:
        table.add_row(i.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"), i.request_id, i.plant_id,
                      i.equipment_id, i.problem_description[:60], f"{i.diagnosis.confidence_score:.2f}",
                      "[red]yes[/]" if i.diagnosis.requires_manual_review else "no",
                      ", ".join(i.diagnosis.report.referenced_sop_ids),
                      " ".join("+" if f.helpful else "-" for f in i.feedback))
    out.print(table)


@app.command()
def incident(
    request_id: str = typer.Argument(..., help="the diagnosis' request id"),
    as_json: bool = typer.Option(False, "--json"),
    addr: str = typer.Option(ORCHESTRATOR_ADDR, "--addr", envvar="COPILOT_ADDR"),
    token: str = typer.Option("", "--token", envvar="COPILOT_TOKEN", help=TOKEN_HELP),
) -> None:
    """Show one stored diagnosis (GetIncident) with its feedback."""
    try:
        with open_channel(addr) as channel:
            found = copilot_pb2_grpc.CopilotServiceStub(channel).GetIncident(
                copilot_pb2.GetIncidentRequest(request_id=request_id), metadata=auth_metadata(resolve_token(token)),
                timeout=30).incident
    except grpc.RpcError as exc:
        raise _rpc_failed(exc) from None
    if as_json:
        out.print_json(json.dumps(MessageToDict(found, preserving_proto_field_name=True)))
        return
    out.print(f"[bold]{found.request_id}[/] · {found.created_at.ToDatetime():%Y-%m-%d %H:%M:%S} UTC · by "
              f"{found.principal} · trace {found.trace_id}" + (f" · image sha256 {found.image_sha256[:12]}…"
                                                               if found.image_sha256 else ""))
    print_diagnosis(found.diagnosis, as_json=False)
    for f in found.feedback:
        out.print(f"feedback by {f.principal}: {'helpful' if f.helpful else 'not helpful'}"
                  + (f" · SOPs {', '.join(f.helpful_sop_ids)}" if f.helpful_sop_ids else "")
                  + (f" · {f.resolution_notes}" if f.resolution_notes else ""))


@app.command()
def feedback(
    request_id: str = typer.Argument(..., help="the diagnosis' request id"),
    helpful: bool = typer.Option(..., "--helpful/--not-helpful"),
    notes: str = typer.Option("", "--notes", help="how it was resolved"),
    sop_ids: list[str] = typer.Option([], "--sop", help="an SOP id that really helped; repeat for several"),
    addr: str = typer.Option(ORCHESTRATOR_ADDR, "--addr", envvar="COPILOT_ADDR"),
    token: str = typer.Option("", "--token", envvar="COPILOT_TOKEN", help=TOKEN_HELP),
) -> None:
    """Record whether a diagnosis helped (SubmitFeedback); `copilot eval --export-feedback` exports it."""
    try:
        with open_channel(addr) as channel:
            copilot_pb2_grpc.CopilotServiceStub(channel).SubmitFeedback(
                copilot_pb2.SubmitFeedbackRequest(request_id=request_id, helpful=helpful, resolution_notes=notes,
                                                  helpful_sop_ids=sop_ids),
                metadata=auth_metadata(resolve_token(token)), timeout=30)
    except grpc.RpcError as exc:
        raise _rpc_failed(exc) from None
    out.print(f"feedback stored for {request_id}")


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
    """Start the four services as separate processes, wait for SERVING, serve until Ctrl-C/SIGTERM. A process
    that crashes or hangs is restarted with back-off (like a kubelet); one that keeps crashing is reported and
    left down while the rest serves (`copilot status` lists them)."""
    from copilot.launcher import Mesh, State

    ports = {"orchestrator": orchestrator_port, "vision": vision_port, "knowledge": knowledge_port,
             "report": report_port}
    mesh = Mesh(host=host, data_dir=data_dir, vision_replicas=vision_replicas, ports=ports)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    started = time.monotonic()
    mesh.start()
    supervisor = mesh.supervise(on_event=print_supervisor_event)
    try:
        with console.status("starting vision, knowledge, report and orchestrator…"):
            states = supervisor.wait_settled(timeout=600)
        table = Table(title=f"mesh up in {time.monotonic() - started:.1f}s")
        for column in ("service", "address", "state", "pid", "log"):
            table.add_column(column)
        for name, status in supervisor.snapshot().items():
            colour = "green" if status["state"] == "serving" else "red"
            table.add_row(name, status["address"], f"[{colour}]{status['state']}[/]", str(status["pid"] or "-"),
                          str(mesh.services[name].log_path))
        console.print(table)
        if demo and states["orchestrator"] is State.SERVING:
            console.rule("demo diagnosis with the shipped sample photo")
            request = diagnose_request("PUNE-IN", "PUMP-A-7", "Pump housing overheating during operation and a "
                                       "visible crack near the outlet flange", SAMPLE_PHOTO,
                                       equipment_type="brushed-steel")
            print_diagnosis(run_streamed(mesh.address("orchestrator"), request, token=mesh.token(), timeout=120),
                            as_json=False)
        if demo and exit_after_demo:
            return
        console.print(f"[green]serving[/] — try: copilot diagnose --addr {mesh.address('orchestrator')} --plant PUNE-IN "
                      "--equipment CNC-A-102 --problem 'Machine overheating during operation'   (Ctrl-C stops; "
                      "`copilot status` lists the services)")
        stop.wait()
    finally:
        codes = mesh.stop()
        console.print("stopped: " + ", ".join(f"{n}={c}" for n, c in codes.items()))


def print_supervisor_event(event) -> None:
    """One line per restart as it happens (service, reason, restart count)."""
    if event.kind == "crashed":
        console.print(f"[yellow]{event.service} exited ({event.reason}); restarting in {event.delay_s:.0f}s "
                      f"(restarts so far: {event.restarts})[/]")
    elif event.kind == "hung":
        console.print(f"[yellow]{event.service} is alive but not answering ({event.reason}): killing it[/]")
    elif event.kind == "restarted":
        console.print(f"[cyan]{event.service} restarted ({event.reason}, restart {event.restarts})[/]")
    elif event.kind == "serving" and event.restarts:
        console.print(f"[green]{event.service} SERVING again {event.reason}[/]")
    elif event.kind == "gave-up":
        console.print(f"[red]{event.service} keeps crashing ({event.reason}): left down while the rest serves. "
                      f"Last log lines:[/]\n{event.log_tail}")


@app.command()
def status(
    data_dir: Path = typer.Option(Path(".copilot-data"), "--data-dir", help="the data folder `copilot up` uses"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Each service of the local mesh (`copilot up`): state, pid, restarts, last exit, address, live health."""
    from grpc_health.v1 import health_pb2

    from copilot.launcher import health_status, read_state

    state = read_state(data_dir)
    if state is None:
        console.print(f"no local mesh is running from {data_dir} (start one with `copilot up`)")
        raise typer.Exit(1)
    services = state["services"]
    for name, service in services.items():
        code = health_status(service["address"], timeout=1.0)
        service["health"] = "UNREACHABLE" if code is None else health_pb2.HealthCheckResponse.ServingStatus.Name(code)
    if as_json:
        out.print_json(json.dumps(services))
    else:
        table = Table("service", "state", "health", "pid", "restarts", "last exit", "address",
                      title=f"local mesh (supervisor pid {state['supervisor_pid']})")
        for name, service in services.items():
            colour = {"serving": "green", "failed": "red"}.get(service["state"], "yellow")
            table.add_row(name, f"[{colour}]{service['state']}[/]", service["health"], str(service["pid"] or "-"),
                          str(service["restarts"]), service["last_exit"] or "-", service["address"])
        out.print(table)
    raise typer.Exit(0 if all(s["state"] == "serving" for s in services.values()) else 2)


@app.command()
def health(
    addr: str = typer.Option(f"localhost:{DEFAULT_PORTS['orchestrator']}", "--addr"),
    service: str = typer.Option("", "--service", help="a full service name; empty = the whole server"),
    timeout: float = typer.Option(2.0, "--timeout"),
) -> None:
    """grpc.health.v1 check (for container health checks): exit 0 when SERVING, 1 otherwise."""
    from grpc_health.v1 import health_pb2

    from copilot.launcher import health_status

    status = health_status(addr, timeout=timeout, service=service, channel=open_channel(addr))  # TLS: COPILOT_TLS_*
    name = "UNREACHABLE" if status is None else health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    out.print(f"{addr} {service or '(server)'}: {name}")
    raise typer.Exit(0 if status == health_pb2.HealthCheckResponse.SERVING else 1)


KNOWLEDGE_ADDR = f"localhost:{DEFAULT_PORTS['knowledge']}"


@app.command()
def ingest(
    paths: list[Path] = typer.Argument(..., exists=True, help="files (.md .txt .pdf) or folders"),
    addr: str = typer.Option(KNOWLEDGE_ADDR, "--addr", help="the knowledge service"),
    document_id: str = typer.Option("", "--id", help="document id (one file only; Markdown may carry it)"),
    title: str = typer.Option("", "--title", help="one file only"),
    version: str = typer.Option("", "--version", help="default: the Markdown front matter, else a content hash"),
    equipment_types: list[str] = typer.Option([], "--equipment-type", help="scope; repeat for several"),
    plants: list[str] = typer.Option([], "--plant", help="scope; repeat for several"),
    token: str = typer.Option("", "--token", envvar="COPILOT_TOKEN", help="an admin token (default: minted with "
                                                                         "the local dev mesh's secret)"),
) -> None:
    """Upload documents to the knowledge service (streamed in 256 KiB pieces) with a progress bar."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from copilot.client import ingest_file
    from services.rag.corpus import document_files

    files = document_files(paths)
    if (document_id or title) and len(files) != 1:
        raise typer.BadParameter("--id and --title apply to a single file")
    table = Table("file", "document", "version", "outcome", "chunks", title="ingest")
    failed = 0
    bearer = resolve_token(token, role="admin")
    with open_channel(addr) as channel, Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), console=console) as progress:
        overall = progress.add_task("documents", total=sum(f.stat().st_size for f in files))
        for path in files:
            try:
                reply = ingest_file(channel, path, document_id=document_id, title=title, version=version,
                                    equipment_types=equipment_types, plant_ids=plants,
                                    on_bytes=lambda n: progress.advance(overall, n), token=bearer)
                doc = reply.document
                outcome = knowledge_outcome(reply.outcome)
                table.add_row(str(path), doc.document_id, doc.version, outcome,
                              f"+{reply.chunks_written} -{reply.chunks_removed}")
            except grpc.RpcError as exc:
                failed += 1
                details = "; ".join(f"{v.field}: {v.description}" for v in field_violations(exc)) or exc.details()
                table.add_row(str(path), "", "", f"[red]{exc.code().name}[/red]", details)
    out.print(table)
    raise typer.Exit(1 if failed else 0)


def knowledge_outcome(value: int) -> str:
    from copilot.v1 import knowledge_pb2

    return knowledge_pb2.IngestOutcome.Name(value).removeprefix("INGEST_OUTCOME_").lower()


@app.command()
def docs(
    addr: str = typer.Option(KNOWLEDGE_ADDR, "--addr", help="the knowledge service"),
    equipment_type: str = typer.Option("", "--equipment-type"),
    plant: str = typer.Option("", "--plant"),
    as_json: bool = typer.Option(False, "--json"),
    token: str = typer.Option("", "--token", envvar="COPILOT_TOKEN", help=TOKEN_HELP),
) -> None:
    """List the documents loaded in the knowledge service."""
    from copilot.v1 import knowledge_pb2, knowledge_pb2_grpc

    documents = []
    with open_channel(addr) as channel:
        stub = knowledge_pb2_grpc.KnowledgeServiceStub(channel)
        metadata = auth_metadata(resolve_token(token))
        page_token = ""
        while True:
            page = stub.ListDocuments(knowledge_pb2.ListDocumentsRequest(
                page_size=200, page_token=page_token, equipment_type=equipment_type, plant_id=plant), timeout=30,
                metadata=metadata)
            documents.extend(page.documents)
            page_token = page.next_page_token
            if not page_token:
                break
    if as_json:
        out.print_json(json.dumps([MessageToDict(d, preserving_proto_field_name=True) for d in documents]))
        return
    table = Table("id", "title", "version", "format", "chunks", "equipment types", "plants", title=f"{len(documents)} documents")
    for d in documents:
        table.add_row(d.document_id, d.title, d.version, knowledge_pb2.DocumentFormat.Name(d.format).removeprefix(
            "DOCUMENT_FORMAT_").lower(), str(d.chunk_count), ", ".join(d.equipment_types) or "all",
            ", ".join(d.plant_ids) or "all")
    out.print(table)


@app.command("eval")
def eval_cmd(
    data: Path = typer.Option(Path("tests/data/knowledge_eval.yaml"), "--data", exists=True,
                              help="labelled questions (q, expect, escalate)"),
    output: Path = typer.Option(Path("benchmarks/results/knowledge-eval.json"), "--output"),
    export_feedback: Optional[Path] = typer.Option(
        None, "--export-feedback", help="write the technicians' feedback from the incident history as labelled "
                                        "questions (YAML, the --data format) and stop"),
    database_url: str = typer.Option("sqlite:///.copilot-data/incidents.db", "--database-url",
                                     envvar="ORCHESTRATOR_DATABASE_URL", help="the incident history"),
) -> None:
    """Knowledge quality on a labelled set, hybrid scoring on and off, in-process on a fresh store with the
    shipped library: recall@1/@3, MRR, citation precision, escalation accuracy. Prints a table, writes JSON.
    With --export-feedback it exports the feedback as extra labelled data instead (evaluate it with --data)."""
    import tempfile
    from dataclasses import asdict

    if export_feedback is not None:
        import yaml

        from services.orchestrator.history import IncidentStore
        from services.rag.evaluation import questions_from_feedback

        store = IncidentStore(database_url)
        try:
            labelled = questions_from_feedback(store.feedback_export())
        finally:
            store.close()
        export_feedback.parent.mkdir(parents=True, exist_ok=True)
        export_feedback.write_text("# Labelled questions from technician feedback (copilot eval --export-feedback)\n"
                                   + yaml.safe_dump({"questions": labelled}, sort_keys=False, allow_unicode=True))
        console.print(f"wrote {len(labelled)} labelled questions from feedback to {export_feedback}")
        return

    from services.rag.core import AdvisorTuning, KnowledgeBase, minilm_embedder, open_store
    from services.rag.corpus import starter_corpus
    from services.rag.evaluation import evaluate, load_questions

    questions = load_questions(data)
    embedder = minilm_embedder()
    with tempfile.TemporaryDirectory() as folder:
        store = open_store(Path(folder))
        KnowledgeBase(store, embedder).ensure_documents(starter_corpus())
        reports = {name: evaluate(KnowledgeBase(store, embedder, AdvisorTuning(hybrid=hybrid)), questions)
                   for name, hybrid in (("hybrid", True), ("vector only", False))}
    metrics = ["recall_at_1", "recall_at_3", "mrr", "citation_precision", "citation_relevance", "escalation_accuracy"]
    table = Table("metric", *reports, title=f"knowledge eval: {len(questions)} questions ({data})")
    for metric in metrics:
        table.add_row(metric, *(f"{getattr(r, metric):.3f}" for r in reports.values()))
    out.print(table)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({name: {**r.summary(), "results": [asdict(x) for x in r.results]}
                                  for name, r in reports.items()}, indent=2))
    console.print(f"wrote {output}")


@app.command()
def bench(
    suite: str = typer.Option("mesh", "--suite", help="mesh: cold start + Diagnose latency, mesh vs in-process; "
                                                      "vision: AnalyzeImage at 1/4/16 clients, batching off vs on; "
                                                      "retrieval: p50/p99 at 1k/10k/100k chunks, ingest, embedding; "
                                                      "soak: fixed rate while an agent is killed every minute"),
    n: int = typer.Option(50, "--n", help="diagnoses (mesh) or images per run (vision) to time"),
    output: Optional[Path] = typer.Option(None, "--output", help="JSON file (default benchmarks/results/<suite>.json)"),
    sizes: str = typer.Option("1000,10000,100000", "--sizes", help="retrieval: store sizes in chunks"),
    duration: float = typer.Option(600, "--duration", help="soak: seconds of load"),
    rate: float = typer.Option(20, "--rate", help="soak: diagnoses per second (open loop)"),
    photo_share: float = typer.Option(0.1, "--photo-share", help="soak: share of diagnoses with a photo"),
    kill_every: float = typer.Option(60, "--kill-every", help="soak: seconds between agent kills (0: none)"),
) -> None:
    """Benchmarks: print a table and write JSON (never asserted in tests)."""
    from copilot.bench import run, run_vision
    from copilot.bench_retrieval import run_retrieval
    from copilot.bench_soak import run_soak

    if suite not in ("mesh", "vision", "retrieval", "soak"):
        raise typer.BadParameter("--suite is mesh, vision, retrieval or soak")
    target = output or Path("benchmarks/results") / f"{suite}.json"
    if suite == "soak":
        run_soak(output=target, console=out, duration_s=duration, rate=rate, photo_share=photo_share,
                 kill_every_s=kill_every)
    elif suite == "mesh":
        run(n=n, output=target, console=out)
    elif suite == "vision":
        run_vision(total=n, output=target, console=out)
    else:
        run_retrieval(queries=n, output=target, console=out, sizes=tuple(int(x) for x in sizes.split(",")))


if __name__ == "__main__":
    app()
