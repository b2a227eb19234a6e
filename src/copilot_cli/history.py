"""`copilot incidents | incident | feedback`: the incident history behind the public API."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated

import typer
from google.protobuf.json_format import MessageToDict
from rich.table import Table

from copilot.client import canonical_plant
from copilot.runtime.convert import timestamp_to_pb
from copilot.v1 import copilot_pb2, copilot_pb2_grpc
from copilot_cli.common import (
    ORCHESTRATOR_ADDR,
    WHEN_FORMAT,
    AsJson,
    OrchestratorAddr,
    Token,
    connected,
    out,
    paged,
    parse_when,
    shown,
)
from copilot_cli.diagnose import print_diagnosis

# what a verdict reads as in a listing (VERDICT_UNSPECIFIED: said nothing about the answer)
VERDICT_WORDS = {copilot_pb2.VERDICT_HELPFUL: "helpful", copilot_pb2.VERDICT_NOT_HELPFUL: "not helpful"}
VERDICT_MARKS = {
    copilot_pb2.VERDICT_HELPFUL: "+",
    copilot_pb2.VERDICT_NOT_HELPFUL: "-",
    copilot_pb2.VERDICT_UNSPECIFIED: "·",
}

RequestId = Annotated[str, typer.Argument(help="the diagnosis' request id")]


def incidents(
    plant: Annotated[str, typer.Option("--plant")] = "",
    equipment: Annotated[str, typer.Option("--equipment")] = "",
    since: Annotated[
        datetime | None, typer.Option("--since", parser=parse_when, help=f"from this moment: {WHEN_FORMAT}")
    ] = None,
    until: Annotated[
        datetime | None, typer.Option("--until", parser=parse_when, help="up to this moment (same forms as --since)")
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", min=1, max=1000, help="incidents to show (pages of 100 are fetched)")
    ] = 20,
    as_json: AsJson = False,
    addr: OrchestratorAddr = ORCHESTRATOR_ADDR,
    token: Token = "",
) -> None:
    """List past diagnoses, newest first (ListIncidents)."""
    with connected(addr, token) as (channel, metadata):
        stub = copilot_pb2_grpc.CopilotServiceStub(channel)

        def fetch(page_token: str, size: int) -> tuple[list[copilot_pb2.Incident], str]:
            request = copilot_pb2.ListIncidentsRequest(
                plant_id=canonical_plant(plant),
                equipment_id=equipment,
                start_time=timestamp_to_pb(since) if since else None,
                end_time=timestamp_to_pb(until) if until else None,
                page_size=size,
                page_token=page_token,
            )
            page = stub.ListIncidents(request, metadata=metadata, timeout=30)
            return list(page.incidents), page.next_page_token

        found = paged(fetch, limit)
    if as_json:
        out.print_json(json.dumps([MessageToDict(i, preserving_proto_field_name=True) for i in found]))
        return
    table = Table(
        "when (UTC)",
        "request",
        "plant",
        "equipment",
        "problem",
        "confidence",
        "review",
        "SOPs",
        "feedback",
        title=f"{len(found)} incidents",
    )
    for i in found:
        table.add_row(
            i.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
            shown(i.request_id),
            shown(i.plant_id),
            shown(i.equipment_id),
            shown(i.problem_description, 60),
            f"{i.diagnosis.confidence_score:.2f}",
            "[red]yes[/]" if i.diagnosis.requires_manual_review else "no",
            ", ".join(i.diagnosis.report.referenced_sop_ids),
            " ".join(VERDICT_MARKS[f.verdict] for f in i.feedback),
        )
    out.print(table)


def incident(
    request_id: RequestId,
    as_json: AsJson = False,
    addr: OrchestratorAddr = ORCHESTRATOR_ADDR,
    token: Token = "",
) -> None:
    """Show one stored diagnosis (GetIncident) with its feedback."""
    with connected(addr, token) as (channel, metadata):
        found = (
            copilot_pb2_grpc.CopilotServiceStub(channel)
            .GetIncident(copilot_pb2.GetIncidentRequest(request_id=request_id), metadata=metadata, timeout=30)
            .incident
        )
    if as_json:
        out.print_json(json.dumps(MessageToDict(found, preserving_proto_field_name=True)))
        return
    image = f" · image sha256 {found.image_sha256[:12]}…" if found.image_sha256 else ""
    out.print(
        f"[bold]{shown(found.request_id)}[/] · {found.created_at.ToDatetime():%Y-%m-%d %H:%M:%S} UTC · by "
        f"{shown(found.principal)} · trace {shown(found.trace_id)}{image}"
    )
    print_diagnosis(found.diagnosis, as_json=False)
    for f in found.feedback:
        out.print(
            f"feedback by {shown(f.principal)}: {VERDICT_WORDS.get(f.verdict, 'no verdict')}"
            + (f" · SOPs {shown(', '.join(f.helpful_sop_ids))}" if f.helpful_sop_ids else "")
            + (f' · "{shown(f.resolution_notes)}"' if f.resolution_notes else "")
        )


def feedback(
    request_id: RequestId,
    helpful: Annotated[
        bool | None, typer.Option("--helpful/--not-helpful", help="the verdict; leave out: not said")
    ] = None,
    notes: Annotated[str, typer.Option("--notes", help="how it was resolved")] = "",
    sop_ids: Annotated[
        list[str] | None, typer.Option("--sop", help="an SOP id that really helped; repeat for several")
    ] = None,
    feedback_id: Annotated[
        str, typer.Option("--feedback-id", help="an idempotency key: the same command again stores nothing new")
    ] = "",
    addr: OrchestratorAddr = ORCHESTRATOR_ADDR,
    token: Token = "",
) -> None:
    """Record whether a diagnosis helped (SubmitFeedback); `copilot export-feedback` exports it."""
    verdict = {
        True: copilot_pb2.VERDICT_HELPFUL,
        False: copilot_pb2.VERDICT_NOT_HELPFUL,
        None: copilot_pb2.VERDICT_UNSPECIFIED,
    }
    request = copilot_pb2.SubmitFeedbackRequest(
        request_id=request_id,
        verdict=verdict[helpful],
        resolution_notes=notes,
        helpful_sop_ids=sop_ids or [],
        feedback_id=feedback_id,
    )
    with connected(addr, token) as (channel, metadata):
        reply = copilot_pb2_grpc.CopilotServiceStub(channel).SubmitFeedback(request, metadata=metadata, timeout=30)
    out.print(f"feedback {'already stored' if reply.replayed else 'stored'} for {request_id}")
