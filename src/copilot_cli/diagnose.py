"""`copilot diagnose`: one diagnosis through StreamDiagnose with each stage shown live, then the report."""

from __future__ import annotations

import contextlib
import json
import time
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from google.protobuf.json_format import MessageToDict
from rich.table import Table

from copilot.client import diagnose_request, open_channel, resolve_token, stream_diagnose
from copilot.images import ImageLimits
from copilot.v1 import copilot_pb2
from copilot_cli.common import (
    ORCHESTRATOR_ADDR,
    AsJson,
    OrchestratorAddr,
    Token,
    console,
    enum_label,
    out,
    rpc_errors,
    shown,
)

STAGES = ("vision", "knowledge", "report")


def sample_photo() -> Path:
    """The photo `copilot up --demo` diagnoses: a pump housing with a crack, shipped with the CLI."""
    return Path(str(resources.files("copilot_cli") / "samples" / "pump-housing-crack.jpg"))


def _stage_summary(finished: copilot_pb2.StageFinished) -> str:
    if finished.defects:
        return ", ".join(f"{d.type} {d.confidence:.2f}" for d in finished.defects)
    if finished.citations:
        cited = ", ".join(dict.fromkeys(c.sop_id for c in finished.citations))
        return f"{len(finished.guidance)} steps citing {cited}"
    if finished.HasField("report"):
        return f"{len(finished.report.recommended_actions)} actions, SOPs " + (
            ", ".join(finished.report.referenced_sop_ids) or "none"
        )
    return finished.status.error


def _stage_row(status: copilot_pb2.StageStatus, detail: str) -> list[str]:
    name, state = enum_label(status, "stage", "STAGE_"), enum_label(status, "state", "STAGE_STATE_")
    colour = "green" if state == "ok" else "yellow"
    confidence = f"{status.confidence:.2f}" if status.HasField("confidence") else "-"
    return [name, f"[{colour}]{state}[/]", confidence, f"{status.duration_ms:.0f}", detail]


def run_streamed(
    address: str, request: copilot_pb2.DiagnoseRequest, *, token: str, timeout: float, show: bool = True
) -> copilot_pb2.DiagnoseResponse | None:
    """StreamDiagnose with a live stage table; returns the final DiagnoseResponse. Ctrl-C cancels the call,
    which cancels the agent calls downstream."""
    from rich.live import Live
    from rich.spinner import Spinner

    rows: dict[str, list[str]] = {}
    started: dict[str, float] = {}

    def render() -> Table:
        table = Table("stage", "state", "confidence", "ms", "partial result", title="diagnosis")
        for name in STAGES:
            if name in rows:
                table.add_row(*rows[name])
            elif name in started:
                elapsed = f"{(time.monotonic() - started[name]) * 1000:.0f}"
                table.add_row(name, Spinner("dots", text="running"), "", elapsed, "")
            else:
                table.add_row(name, "[dim]waiting[/]", "", "", "")
        return table

    result = None
    with open_channel(address) as channel:
        call = stream_diagnose(channel, request, token=token, timeout=timeout)
        try:
            # the table appears with the first event: a refused request shows its error alone, not an empty table
            display: Any = Live(console=console, refresh_per_second=8) if show else contextlib.nullcontext()
            with display as live:
                for event in call:
                    kind = event.WhichOneof("event")
                    if kind == "stage_started":
                        started[enum_label(event.stage_started, "stage", "STAGE_")] = time.monotonic()
                    elif kind == "stage_finished":
                        row = _stage_row(event.stage_finished.status, _stage_summary(event.stage_finished))
                        rows[row[0]] = row
                    elif kind == "result":
                        result = event.result
                        for s in result.stages:  # a replayed answer (or a skipped stage) has no live events
                            rows.setdefault(enum_label(s, "stage", "STAGE_"), _stage_row(s, s.error))
                    if live is not None:
                        live.update(render())
            if show and not console.is_terminal:
                console.print()  # a non-terminal gets the final table without its line end
        except grpc.RpcError:
            if show and (rows or started) and not console.is_terminal:
                console.print()  # the error starts on a line of its own, below the table
            raise
        except KeyboardInterrupt:
            call.cancel()
            console.print("[yellow]cancelled[/]")
            raise typer.Exit(130) from None
    return result


def check_photo_size(image: Path, limits: ImageLimits | None = None) -> None:
    """Refuse, before sending, a photo over the orchestrator's limit (gRPC would refuse it with a raw
    RESOURCE_EXHAUSTED that reads like backpressure)."""
    limit = (limits or ImageLimits()).max_bytes
    size = image.stat().st_size
    if size > limit:
        console.print(
            f"[red]{image} is {size / 2**20:.1f} MiB; the orchestrator takes photos up to {limit / 2**20:.0f} MiB.[/] "
            "Send a smaller export of it (a JPEG at 2000 px on its long side is well under 1 MiB); nothing was sent."
        )
        raise typer.Exit(2)


def print_diagnosis(response: copilot_pb2.DiagnoseResponse, as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(MessageToDict(response, preserving_proto_field_name=True)))
        return
    out.print(shown(response.report.rendered_text), highlight=False)  # a report stored before it was cleaned too
    review = "[bold red]yes[/]" if response.requires_manual_review else "no"
    reasons = ", ".join(
        copilot_pb2.EscalationReason.Name(r).removeprefix("ESCALATION_REASON_").lower()
        for r in response.escalation_reasons
    )
    out.print(
        f"request {response.request_id}{' (replayed)' if response.replayed else ''} · confidence "
        f"{response.confidence_score:.2f} · manual review: {review}" + (f" · reasons: {reasons}" if reasons else "")
    )
    equipment = response.equipment_type or "unknown"
    if response.reference_set:
        equipment += f" · reference set {response.reference_set}"
    out.print(f"equipment type {shown(equipment)}", highlight=False)
    for note in response.review_notes:
        out.print(f"review: {shown(note)}", highlight=False)
    if response.trace_id:
        out.print(f"[dim]trace {response.trace_id}[/]")
    out.print(f"[dim]{response.safety_disclaimer}[/]")


def diagnose(
    plant: Annotated[str, typer.Option("--plant", help="plant id, e.g. PUNE-IN")],
    equipment: Annotated[str, typer.Option("--equipment", help="equipment id, e.g. CNC-A-102")],
    problem: Annotated[str, typer.Option("--problem", help="what the technician sees (10-500 characters)")],
    image: Annotated[
        Path | None, typer.Option("--image", exists=True, dir_okay=False, help="photo (JPEG/PNG/WebP)")
    ] = None,
    image_id: Annotated[str | None, typer.Option("--image-id")] = None,
    equipment_type: Annotated[
        str,
        typer.Option(
            "--equipment-type",
            help="machine type the SOPs must be written for, e.g. centrifugal-pump, chiller (default: the equipment "
            "registry's; `copilot equipment` lists them)",
        ),
    ] = "",
    reference_set: Annotated[
        str,
        typer.Option(
            "--reference-set", help="vision reference set for the photo, e.g. brushed-steel (default: the registry's)"
        ),
    ] = "",
    request_id: Annotated[
        str, typer.Option("--request-id", help="makes the call idempotent: a retry replays the answer")
    ] = "",
    as_json: AsJson = False,
    addr: OrchestratorAddr = ORCHESTRATOR_ADDR,
    token: Token = "",
    timeout: Annotated[float, typer.Option("--timeout", help="seconds for the whole diagnosis")] = 60.0,
) -> None:
    """Diagnose through StreamDiagnose, showing each stage live, then print the report."""
    if image is not None:
        check_photo_size(image)
    request = diagnose_request(
        plant, equipment, problem, image, image_id, equipment_type, request_id=request_id, reference_set=reference_set
    )
    with rpc_errors():
        response = run_streamed(addr, request, token=resolve_token(token), timeout=timeout, show=not as_json)
    if response is None:
        console.print("[red]the stream ended without a result[/]")
        raise typer.Exit(2)
    print_diagnosis(response, as_json)
