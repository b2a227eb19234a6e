"""Report agent core: a deterministic composition of the typed inputs into the seed's report sections.
No gRPC here, and no language model: every sentence is built from the request, the defects, the
guidance and the stage outcomes it is given."""
from __future__ import annotations

from datetime import datetime, timezone

from copilot.domain import IncidentReport, RecommendedAction, ReportInputs
from copilot.report_format import render_text

BASELINE_SAFETY = (
    "Lock out/tag out the equipment before maintenance (SAFETY-SOP-001).",
    "Wear the PPE required for the task: safety glasses, gloves and safety shoes.",
)
DEFECT_SAFETY = {
    "crack": "Do not return the equipment to service until the crack has been assessed by an engineer.",
    "corrosion": "Check load-bearing parts near the corrosion for loss of wall thickness before restart.",
    "contamination": "Identify the contaminant before cleaning; consult its safety data sheet.",
    "scratch": "Check that the scratched surface is not a sealing face before restart.",
    "surface-roughness": "Quarantine parts produced since the roughness appeared.",
}
MANUAL_REVIEW_THRESHOLD = 0.5


def _unique(items) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for item in items:
        if item and item not in seen:
            seen[item] = None
    return tuple(seen)


def summarize(i: ReportInputs) -> str:
    parts = [f"Equipment {i.equipment_id} at plant {i.plant_id} was reported with: {i.problem_description.rstrip('.')}."]
    if i.defects:
        names = ", ".join(f"{d.label} ({d.confidence:.0%})" for d in i.defects)
        parts.append(f"Visual inspection found {len(i.defects)} defect(s): {names}.")
    elif i.image_analyzed:
        parts.append("Visual inspection of the supplied image found no visible defect.")
    else:
        parts.append("No image was analysed.")
    sops = _unique(s for step in i.guidance for s in step.sop_ids)
    if sops:
        parts.append(f"{len(i.guidance)} corrective step(s) are drawn from {', '.join(sops)}.")
    else:
        parts.append("No plant SOP matched the problem closely enough to cite.")
    if i.requires_manual_review:
        parts.append(f"Diagnosis confidence is {i.confidence_score:.0%}, below {MANUAL_REVIEW_THRESHOLD:.0%}: "
                     "manual review by a maintenance engineer is required.")
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
        line = (f"Similar past incident on {i.equipment_id}: {past.request_id} "
                f"({past.created_at:%Y-%m-%d}) \"{past.problem_description.rstrip('.')[:120]}\"")
        if past.referenced_sop_ids:
            line += f", which cited {', '.join(past.referenced_sop_ids)}"
        if past.resolution_notes:
            line += f"; resolution noted: {past.resolution_notes.rstrip('.')[:200]}"
        items.append(line + ". Check whether the fault is recurring.")
    items.append(f"Record the work in the CMMS maintenance log with request id {i.request_id}.")
    return tuple(items)


def compose_report(i: ReportInputs, now: datetime | None = None) -> IncidentReport:
    now = now or datetime.now(timezone.utc)
    actions = tuple(RecommendedAction(step.text, step.sop_ids) for step in i.guidance)
    safety = _unique([*i.safety_notes, *BASELINE_SAFETY, *(DEFECT_SAFETY.get(d.type, "") for d in i.defects)])
    referenced = _unique([*(s for step in i.guidance for s in step.sop_ids), *(c.sop_id for c in i.citations)])
    summary = summarize(i)
    follow = follow_up(i)
    return IncidentReport(
        summary=summary,
        defects=i.defects,
        recommended_actions=actions,
        safety_notes=safety,
        follow_up=follow,
        referenced_sop_ids=referenced,
        generated_at=now,
        rendered_text=render_text(summary, i.defects, actions, safety, follow, referenced, now),
        citations=i.citations,
    )
