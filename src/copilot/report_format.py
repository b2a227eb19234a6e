"""The plain-text layout of an incident report (the seed's format), shared by the report agent and the
orchestrator's degraded-mode fallback."""
from __future__ import annotations

from datetime import timezone
from typing import Sequence

from copilot.domain import Defect, RecommendedAction


def render_text(
    summary: str,
    defects: Sequence[Defect],
    actions: Sequence[RecommendedAction],
    safety_notes: Sequence[str],
    follow_up: Sequence[str],
    referenced_sop_ids: Sequence[str],
    generated_at,
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
    lines += ["", "SAFETY NOTES:", *[f"- {note}" for note in safety_notes]]
    lines += ["", "FOLLOW-UP REQUIRED:", *[f"- {item}" for item in follow_up]]
    lines += [
        "",
        f"Referenced SOPs: {', '.join(referenced_sop_ids) if referenced_sop_ids else 'none'}",
        f"Report Generated: {generated_at.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S} UTC",
    ]
    return "\n".join(lines)
