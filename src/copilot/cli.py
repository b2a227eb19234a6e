"""`copilot up | diagnose | ingest | docs | eval | bench` — the command line of the Manufacturing Copilot."""
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
    with grpc.insecure_channel(addr) as channel, Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), console=console) as progress:
        overall = progress.add_task("documents", total=sum(f.stat().st_size for f in files))
        for path in files:
            try:
                reply = ingest_file(channel, path, document_id=document_id, title=title, version=version,
                                    equipment_types=equipment_types, plant_ids=plants,
                                    on_bytes=lambda n: progress.advance(overall, n))
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
) -> None:
    """List the documents loaded in the knowledge service."""
    from copilot.v1 import knowledge_pb2, knowledge_pb2_grpc

    documents = []
    with grpc.insecure_channel(addr) as channel:
        stub = knowledge_pb2_grpc.KnowledgeServiceStub(channel)
        token = ""
        while True:
            page = stub.ListDocuments(knowledge_pb2.ListDocumentsRequest(
                page_size=200, page_token=token, equipment_type=equipment_type, plant_id=plant), timeout=30)
            documents.extend(page.documents)
            token = page.next_page_token
            if not token:
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
) -> None:
    """Knowledge quality on a labelled set, hybrid scoring on and off, in-process on a fresh store with the
    shipped library: recall@1/@3, MRR, citation precision, escalation accuracy. Prints a table, writes JSON."""
    import tempfile
    from dataclasses import asdict

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
                                                      "retrieval: p50/p99 at 1k/10k/100k chunks, ingest, embedding"),
    n: int = typer.Option(50, "--n", help="diagnoses (mesh) or images per run (vision) to time"),
    output: Optional[Path] = typer.Option(None, "--output", help="JSON file (default benchmarks/results/<suite>.json)"),
    sizes: str = typer.Option("1000,10000,100000", "--sizes", help="retrieval: store sizes in chunks"),
) -> None:
    """Benchmarks: print a table and write JSON (never asserted in tests)."""
    from copilot.bench import run, run_vision
    from copilot.bench_retrieval import run_retrieval

    if suite not in ("mesh", "vision", "retrieval"):
        raise typer.BadParameter("--suite is mesh, vision or retrieval")
    target = output or Path("benchmarks/results") / f"{suite}.json"
    if suite == "mesh":
        run(n=n, output=target, console=out)
    elif suite == "vision":
        run_vision(total=n, output=target, console=out)
    else:
        run_retrieval(queries=n, output=target, console=out, sizes=tuple(int(x) for x in sizes.split(",")))


if __name__ == "__main__":
    app()
