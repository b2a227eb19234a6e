"""The incident report: a deterministic composition of the typed inputs into the report's sections (SUMMARY,
DEFECTS IDENTIFIED, RECOMMENDED ACTIONS, SAFETY NOTES, FOLLOW-UP REQUIRED, referenced SOPs, timestamp) and
their plain-text layout. No gRPC and no language model: every sentence is built from the request, the
defects, the guidance and the stage outcomes it is given.

The report agent serves it (services/report); the orchestrator calls it itself, with `written_by_orchestrator`,
when the report agent cannot be reached, so a degraded diagnosis still gets the same report."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime

from copilot.domain import (
    MANUAL_REVIEW_THRESHOLD,
    Defect,
    DefectType,
    IncidentReport,
    RecommendedAction,
    ReportInputs,
    utc_now,
)
from copilot.text import as_data

BASELINE_SAFETY = (
    "Lock out/tag out the equipment before maintenance (SAFETY-SOP-001).",
    "Wear the PPE required for the task: safety glasses, gloves and safety shoes.",
)
DEFECT_SAFETY: dict[str, str] = {
    DefectType.CRACK: "Do not return the equipment to service until the crack has been assessed by an engineer.",
    DefectType.CORROSION: "Check load-bearing parts near the corrosion for loss of wall thickness before restart.",
    DefectType.CONTAMINATION: "Identify the contaminant before cleaning; consult its safety data sheet.",
    DefectType.SCRATCH: "Check that the scratched surface is not a sealing face before restart.",
    DefectType.WELD_POROSITY: "Quarantine the welds made since the porosity appeared until they are inspected.",
}
ORCHESTRATOR_NOTE = (
    "The report agent was unavailable; the orchestrator wrote this report from the same findings. "
    "Review it before closing the incident."
)


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for item in items:
        if item and item not in seen:
            seen[item] = None
    return tuple(seen)


def summarize(i: ReportInputs) -> str:
    parts = [
        f'Equipment {i.equipment_id} at plant {i.plant_id} was reported with: "{i.problem_description.rstrip(".")}".'
    ]
    inconclusive = i.image_analyzed and i.vision_summary and i.vision_confidence < MANUAL_REVIEW_THRESHOLD
    if i.defects:
        names = ", ".join(f"{d.label} ({d.confidence:.0%})" for d in i.defects)
        parts.append(
            f"Visual inspection found {len(i.defects)} possible defect(s): {names}."
            if inconclusive
            else f"Visual inspection found {len(i.defects)} defect(s): {names}."
        )
    elif i.image_analyzed and not inconclusive:
        parts.append("Visual inspection of the supplied image found no visible defect.")
    elif not i.image_analyzed:
        parts.append("No image was analysed.")
    if inconclusive:
        parts.append(
            f"The image analysis is not conclusive (confidence {i.vision_confidence:.0%}): "
            f"{i.vision_summary.rstrip('.')}. Inspect the equipment on site."
        )
    sops = _unique(s for step in i.guidance for s in step.sop_ids)
    if sops and i.requires_manual_review:
        parts.append(
            f"The closest SOP steps found ({', '.join(sops)}) are listed for the reviewer, not as recommended actions."
        )
    elif sops:
        parts.append(f"{len(i.guidance)} corrective step(s) are drawn from {', '.join(sops)}.")
    else:
        parts.append("No plant SOP matched the problem closely enough to cite.")
    if i.requires_manual_review and i.confidence_score < MANUAL_REVIEW_THRESHOLD:
        parts.append(
            f"Diagnosis confidence is {i.confidence_score:.0%}, below {MANUAL_REVIEW_THRESHOLD:.0%}: "
            "manual review by a maintenance engineer is required."
        )
    elif i.requires_manual_review:
        parts.append(
            f"Diagnosis confidence is {i.confidence_score:.0%}, but manual review by a maintenance engineer is "
            "required: see REVIEW REQUIRED."
        )
    else:
        parts.append(f"Diagnosis confidence is {i.confidence_score:.0%}.")
    return " ".join(parts)


def follow_up(i: ReportInputs) -> tuple[str, ...]:
    items = [f"Maintenance team to carry out the recommended actions on {i.equipment_id} within 24 hours."]
    if i.requires_manual_review:
        items.append("Escalate to a maintenance engineer for manual review before closing the incident.")
    if i.defects:
        items.append(f"Re-inspect {i.equipment_id} after repair and photograph the repaired area.")
    items += [f"Re-run the diagnosis when the agent is back: {note}" for note in i.stage_notes]
    for past in i.related_incidents:
        line = (
            f"Similar past incident on {i.equipment_id}: {past.request_id} "
            f'({past.created_at:%Y-%m-%d}) "{past.problem_description.rstrip(".")[:120]}"'
        )
        if past.referenced_sop_ids:
            line += f", which cited {', '.join(past.referenced_sop_ids)}"
        if past.resolution_notes:
            line += f'; resolution noted: "{past.resolution_notes.rstrip(".")[:200]}"'
        items.append(line + ". Check whether the fault is recurring.")
    items.append(f"Record the work in the CMMS maintenance log with request id {i.request_id}.")
    return tuple(items)


def _data(texts: Iterable[str], max_chars: int = 500) -> tuple[str, ...]:
    return tuple(as_data(t, max_chars) for t in texts)


def as_report_data(i: ReportInputs) -> ReportInputs:
    """Every string of the inputs as one line of data (`copilot.text.as_data`): a user's problem description,
    another user's feedback notes in a related incident, a document's step text, a model's sentence. None of them
    can then start a line of the report, so none can open a SAFETY NOTES section of its own, and no control or bidi
    character reaches the report or the terminal that prints it. The report's sections are built from these typed
    fields only."""
    return replace(
        i,
        request_id=as_data(i.request_id, 64),
        plant_id=as_data(i.plant_id, 64),
        equipment_id=as_data(i.equipment_id, 64),
        problem_description=as_data(i.problem_description, 500),
        defects=tuple(replace(d, type=as_data(d.type, 40), description=as_data(d.description, 300)) for d in i.defects),
        guidance=tuple(
            replace(g, text=as_data(g.text, 600), sop_ids=_data(g.sop_ids, 64), sections=_data(g.sections, 200))
            for g in i.guidance
        ),
        citations=tuple(
            replace(c, sop_id=as_data(c.sop_id, 64), title=as_data(c.title, 200), section=as_data(c.section, 200))
            for c in i.citations
        ),
        safety_notes=_data(i.safety_notes, 600),
        stage_notes=_data(i.stage_notes, 300),
        review_notes=_data(i.review_notes, 600),
        related_incidents=tuple(
            replace(
                p,
                request_id=as_data(p.request_id, 64),
                problem_description=as_data(p.problem_description, 500),
                referenced_sop_ids=_data(p.referenced_sop_ids, 64),
                resolution_notes=as_data(p.resolution_notes, 2000),
            )
            for p in i.related_incidents
        ),
        vision_summary=as_data(i.vision_summary, 2000),
        equipment_type=as_data(i.equipment_type, 64),
    )


def compose_report(
    i: ReportInputs, now: datetime | None = None, *, written_by_orchestrator: bool = False
) -> IncidentReport:
    now = now or utc_now()
    i = as_report_data(i)
    actions, review_steps = recommended_actions(i)
    safety = _unique([*i.safety_notes, *BASELINE_SAFETY, *(DEFECT_SAFETY.get(d.type, "") for d in i.defects)])
    referenced = _unique([*(s for step in i.guidance for s in step.sop_ids), *(c.sop_id for c in i.citations)])
    summary = summarize(i) + (f" {ORCHESTRATOR_NOTE}" if written_by_orchestrator else "")
    follow = follow_up(i)
    return IncidentReport(
        summary=summary,
        defects=i.defects,
        recommended_actions=actions,
        safety_notes=safety,
        follow_up=follow,
        referenced_sop_ids=referenced,
        generated_at=now,
        rendered_text=render_text(
            summary, i.defects, actions, safety, follow, referenced, now, review_steps, i.review_notes
        ),
        citations=i.citations,
        review_steps=review_steps,
        review_notes=i.review_notes,
    )


HOLD_FOR_REVIEW = (
    "Keep {equipment} isolated under lockout/tagout and hold the repair until a maintenance engineer has "
    "reviewed this diagnosis."
)


def recommended_actions(i: ReportInputs) -> tuple[tuple[RecommendedAction, ...], tuple[RecommendedAction, ...]]:
    """(recommended actions, steps for the reviewer). A diagnosis that needs manual review recommends only what
    is safe whatever the cause (isolate, hold, escalate: the guidance's steps that cite no SOP); the SOP steps it
    found may be another machine's or weakly matched, so they go to the reviewer, never to the technician as the
    recommendation."""
    steps = tuple(RecommendedAction(step.text, step.sop_ids) for step in i.guidance)
    if not i.requires_manual_review:
        return steps, ()
    generic = tuple(a for a in steps if not a.sop_ids)
    cited = tuple(a for a in steps if a.sop_ids)
    hold = RecommendedAction(HOLD_FOR_REVIEW.format(equipment=i.equipment_id))
    return (generic or (hold,)), cited


def render_text(
    summary: str,
    defects: Sequence[Defect],
    actions: Sequence[RecommendedAction],
    safety_notes: Sequence[str],
    follow_up: Sequence[str],
    referenced_sop_ids: Sequence[str],
    generated_at: datetime,
    review_steps: Sequence[RecommendedAction] = (),
    review_notes: Sequence[str] = (),
) -> str:
    lines = ["MANUFACTURING INCIDENT REPORT", "", "SUMMARY:", summary, "", "DEFECTS IDENTIFIED:"]
    if defects:
        lines += [f"• {d.label.capitalize()} ({d.confidence:.0%} confidence)" for d in defects]
    else:
        lines.append("• None identified")
    lines += ["", "RECOMMENDED ACTIONS:"]
    for number, action in enumerate(actions, start=1):
        cite = f" [{', '.join(action.sop_ids)}]" if action.sop_ids else ""
        lines.append(f"{number}. {action.description}{cite}")
    if not actions:
        lines.append("1. Escalate to a maintenance engineer.")
    if review_notes or review_steps:
        lines += ["", "REVIEW REQUIRED:", *[f"- {note}" for note in review_notes]]
        if review_steps:
            lines.append("Closest SOP steps found, for the reviewer only (not verified for this equipment or problem):")
            for action in review_steps:
                lines.append(f"  - {action.description} [{', '.join(action.sop_ids)}]")
    lines += ["", "SAFETY NOTES:", *[f"- {note}" for note in safety_notes]]
    lines += ["", "FOLLOW-UP REQUIRED:", *[f"- {item}" for item in follow_up]]
    lines += [
        "",
        f"Referenced SOPs: {', '.join(referenced_sop_ids) if referenced_sop_ids else 'none'}",
        f"Report Generated: {generated_at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC",
    ]
    return "\n".join(lines)
