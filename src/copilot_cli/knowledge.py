"""`copilot ingest | docs | eval`: the knowledge library of a running knowledge service, and its quality
measured in-process on the labelled set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import grpc
import typer
from google.protobuf.json_format import MessageToDict
from rich.table import Table

from copilot.agents.v1 import knowledge_pb2, knowledge_pb2_grpc
from copilot.runtime.config import data_dir, incident_history_url
from copilot_cli.common import (
    KNOWLEDGE_ADDR,
    AdminToken,
    AsJson,
    DataDir,
    KnowledgeAddr,
    Token,
    connected,
    console,
    describe_rpc_error,
    out,
    paged,
)


def _outcome(value: int) -> str:
    return knowledge_pb2.IngestOutcome.Name(value).removeprefix("INGEST_OUTCOME_").lower()


def default_document_id(path: Path) -> str:
    """The id a file without one of its own is sent with: its name's stem (`SOP-123.docx` → `SOP-123`) where that is a
    valid document id. Markdown says its own (front matter) and gets none: a sent id would win over it."""
    from services.rag.corpus import DOCUMENT_ID, EXTENSIONS, DocumentFormat

    if EXTENSIONS.get(path.suffix.lower()) in (None, DocumentFormat.MARKDOWN):
        return ""
    return path.stem if DOCUMENT_ID.match(path.stem) else ""


def ingest(
    paths: Annotated[list[Path], typer.Argument(exists=True, help="files (.md .txt .pdf .docx .html .htm) or folders")],
    addr: KnowledgeAddr = KNOWLEDGE_ADDR,
    document_id: Annotated[str, typer.Option("--id", help="document id (one file only; Markdown may carry it)")] = "",
    title: Annotated[str, typer.Option("--title", help="one file only")] = "",
    version: Annotated[
        str, typer.Option("--version", help="default: the Markdown front matter, else a content hash")
    ] = "",
    equipment_types: Annotated[
        list[str] | None, typer.Option("--equipment-type", help="scope; repeat for several")
    ] = None,
    plants: Annotated[list[str] | None, typer.Option("--plant", help="scope; repeat for several")] = None,
    token: AdminToken = "",
) -> None:
    """Upload documents to the knowledge service (streamed in 256 KiB pieces) with a progress bar.

    A Markdown SOP may say what it is in a YAML front matter (the options above win over it):

    \b
        ---
        id: CHILL-901                      # the document id cited in answers
        title: Process Water Chiller Fault Response
        version: "1.0"                     # a new version replaces the old one
        equipment_types: [chiller]         # the machine types it is written for (none: every type)
        plant_ids: [PUNE-IN]               # the plants it applies at (none: every plant)
        ---
        # Process Water Chiller Fault Response
        ## High discharge pressure trip
        1. Isolate the chiller ...

    Sections are the Markdown headings; numbered lines become the steps cited. Text, PDF, Word (.docx) and HTML files
    take their scope from the options and their id from --id, else from their file name (SOP-123.docx: SOP-123);
    Word's Title style and HTML's first <h1> are their titles, their headings the sections. The service must run
    (`copilot up`, or `make pods`, which publishes it on 127.0.0.1:50053)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from copilot.client import ingest_file
    from services.rag.corpus import document_files  # light: no model or store behind it

    files = document_files(paths)
    if (document_id or title) and len(files) != 1:
        raise typer.BadParameter("--id and --title apply to a single file")
    table = Table("file", "document", "version", "outcome", "chunks", title="ingest")
    failed = 0
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), console=console)
    with connected(addr, token, role="admin") as (channel, metadata), progress:
        overall = progress.add_task("documents", total=sum(f.stat().st_size for f in files))
        for path in files:
            try:
                reply = ingest_file(
                    channel,
                    path,
                    document_id=document_id or default_document_id(path),
                    title=title,
                    version=version,
                    equipment_types=equipment_types or (),
                    plant_ids=plants or (),
                    on_bytes=lambda n: progress.advance(overall, n),
                    metadata=metadata,
                )
            except grpc.RpcError as exc:  # one file's failure is a row; the others still load
                failed += 1
                code = exc.code()
                table.add_row(
                    str(path), "", "", f"[red]{code.name if code else 'UNKNOWN'}[/red]", describe_rpc_error(exc)
                )
                continue
            doc = reply.document
            table.add_row(
                str(path),
                doc.document_id,
                doc.version,
                _outcome(reply.outcome),
                f"+{reply.chunks_written} -{reply.chunks_removed}",
            )
    out.print(table)
    raise typer.Exit(1 if failed else 0)


def delete_doc(
    document_id: Annotated[str, typer.Argument(help="the document's id, as `copilot docs` lists it")],
    addr: KnowledgeAddr = KNOWLEDGE_ADDR,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask for confirmation")] = False,
    token: AdminToken = "",
) -> None:
    """Remove a document from the knowledge library (DeleteDocument): answers stop citing it at once."""
    if not yes:
        typer.confirm(f"delete {document_id} from the knowledge library?", abort=True, err=True)
    with connected(addr, token, role="admin") as (channel, metadata):
        stub = knowledge_pb2_grpc.KnowledgeServiceStub(channel)
        reply = stub.DeleteDocument(
            knowledge_pb2.DeleteDocumentRequest(document_id=document_id), metadata=metadata, timeout=60
        )
    out.print(f"deleted {document_id} ({reply.chunks_removed} chunks)")


def docs(
    addr: KnowledgeAddr = KNOWLEDGE_ADDR,
    equipment_type: Annotated[str, typer.Option("--equipment-type")] = "",
    plant: Annotated[str, typer.Option("--plant")] = "",
    as_json: AsJson = False,
    token: Token = "",
) -> None:
    """List the documents loaded in the knowledge service."""
    with connected(addr, token) as (channel, metadata):
        stub = knowledge_pb2_grpc.KnowledgeServiceStub(channel)

        def fetch(page_token: str, size: int) -> tuple[list[knowledge_pb2.Document], str]:
            request = knowledge_pb2.ListDocumentsRequest(
                page_size=size, page_token=page_token, equipment_type=equipment_type, plant_id=plant
            )
            page = stub.ListDocuments(request, timeout=30, metadata=metadata)
            return list(page.documents), page.next_page_token

        documents = paged(fetch, page_size=200)
    if as_json:
        out.print_json(json.dumps([MessageToDict(d, preserving_proto_field_name=True) for d in documents]))
        return
    table = Table(
        "id", "title", "version", "format", "chunks", "equipment types", "plants", title=f"{len(documents)} documents"
    )
    for d in documents:
        file_format = knowledge_pb2.DocumentFormat.Name(d.format).removeprefix("DOCUMENT_FORMAT_").lower()
        table.add_row(
            d.document_id,
            d.title,
            d.version,
            file_format,
            str(d.chunk_count),
            ", ".join(d.equipment_types) or "all",
            ", ".join(d.plant_ids) or "all",
        )
    out.print(table)


def evaluate(
    data: Annotated[
        Path | None,
        typer.Option("--data", exists=True, help="labelled questions (q, expect, escalate); default: the shipped set"),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", help="JSON (default <data dir>/eval/knowledge.json)")
    ] = None,
    feedback_target: Annotated[
        Path | None,
        typer.Option("--export-feedback", help="deprecated: `copilot export-feedback TARGET` does this", hidden=True),
    ] = None,
    database_url: Annotated[str, typer.Option("--database-url", envvar="ORCHESTRATOR_DATABASE_URL", hidden=True)] = "",
) -> None:
    """Knowledge quality on a labelled set, hybrid scoring on and off, in-process on a fresh store with the
    shipped library: recall@1/@3, MRR, citation precision, escalation accuracy. Prints a table, writes JSON.
    Technicians' feedback becomes more labelled questions with `copilot export-feedback` (evaluate them with --data)."""
    if feedback_target is not None:
        console.print("[yellow]--export-feedback is deprecated: use `copilot export-feedback TARGET`[/]")
        export_feedback(feedback_target, database_url)
        return
    import tempfile
    from dataclasses import asdict

    from services.rag.core import AdvisorTuning, KnowledgeBase, open_store
    from services.rag.corpus import starter_corpus
    from services.rag.embedders import minilm_embedder
    from services.rag.evaluation import LABELLED_QUESTIONS, eval_documents, evaluate, load_questions

    source = data or LABELLED_QUESTIONS
    questions = load_questions(source)
    embedder = minilm_embedder()
    with tempfile.TemporaryDirectory() as folder:
        store = open_store(Path(folder))
        KnowledgeBase(store, embedder).ensure_documents([*starter_corpus(), *eval_documents()])
        reports = {
            name: evaluate(KnowledgeBase(store, embedder, AdvisorTuning(hybrid=hybrid)), questions)
            for name, hybrid in (("hybrid", True), ("vector only", False))
        }
    metrics = ["recall_at_1", "recall_at_3", "mrr", "citation_precision", "citation_relevance", "escalation_accuracy"]
    table = Table("metric", *reports, title=f"knowledge eval: {len(questions)} questions ({source})")
    for metric in metrics:
        table.add_row(metric, *(f"{getattr(r, metric):.3f}" for r in reports.values()))
    out.print(table)
    hybrid = reports["hybrid"]
    kinds = Table(
        "kind",
        "split",
        "questions",
        "answered (no review)",
        "of those, citing a right SOP",
        "sent to review",
        "review as labelled",
        title="trust per kind of question (hybrid)",
    )
    for kind, splits in hybrid.by_kind.items():
        for split in ("tune", "holdout"):
            score = splits[split]
            if score.questions:
                kinds.add_row(
                    kind,
                    split,
                    str(score.questions),
                    f"{score.answered:.2f}",
                    f"{score.right_of_answered:.2f}",
                    f"{score.escalated:.2f}",
                    f"{score.escalation_correct:.2f}",
                )
    out.print(kinds)
    targets = Table("target (issue #30)", "value", title="targets")
    for name, value in hybrid.targets.items():
        targets.add_row(name, f"{value:.3f}")
    out.print(targets)
    target = output or data_dir() / "eval" / "knowledge.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    summary = {name: {**r.summary(), "results": [asdict(x) for x in r.results]} for name, r in reports.items()}
    target.write_text(json.dumps(summary, indent=2))
    console.print(f"wrote {target}")


def export_feedback(
    target: Annotated[Path, typer.Argument(help="YAML file to write (the `copilot eval --data` format)")],
    database_url: Annotated[
        str,
        typer.Option(
            "--database-url",
            envvar="ORCHESTRATOR_DATABASE_URL",
            help="the incident history (default: <data dir>/incidents.db, the local mesh's)",
        ),
    ] = "",
    data_dir_option: DataDir = None,
) -> None:
    """Write the technicians' feedback in the incident history as labelled questions (question, the SOPs that
    helped, whether it should have been escalated). Reads only: the history is never created or upgraded."""
    import yaml

    from services.orchestrator.history import IncidentStore, SchemaMismatch
    from services.rag.evaluation import questions_from_feedback

    try:  # read-only: an export never creates or upgrades the database it is pointed at
        store = IncidentStore(database_url or incident_history_url(data_dir_option), migrate=False)
    except SchemaMismatch as refused:
        console.print(f"[red]{refused}[/red]")
        raise typer.Exit(1) from None
    try:
        labelled = questions_from_feedback(store.feedback_export())
    finally:
        store.close()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(
        "# Labelled questions from technician feedback (copilot export-feedback)\n"
        + yaml.safe_dump({"questions": labelled}, sort_keys=False, allow_unicode=True)
    )
    console.print(f"wrote {len(labelled)} labelled questions from feedback to {target}")
