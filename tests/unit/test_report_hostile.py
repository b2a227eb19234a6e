"""Text from users is data, never structure: every string field of the report's inputs, filled with each hostile
string of tests/hostile.py, leaves the report's sections as the report composer wrote them."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from copilot.domain import Defect, GuidanceStep, PastIncident, ReportInputs, SopCitation
from copilot.reporting import compose_report
from copilot.text import as_data
from tests.hostile import HOSTILE_STRINGS, SECTION_HEADINGS, layout_chars

NOW = datetime(2026, 12, 4, 9, 0, tzinfo=UTC)


def _inputs(text: str) -> ReportInputs:
    return ReportInputs(
        request_id=text,
        plant_id=text,
        equipment_id=text,
        problem_description=text,
        defects=(Defect(text, 0.8, text),),
        guidance=(GuidanceStep(text, (text,), (text,)),),
        citations=(SopCitation(text, text, text, 0.7),),
        safety_notes=(text,),
        confidence_score=0.4,
        requires_manual_review=True,
        stage_notes=(text,),
        image_analyzed=True,
        related_incidents=(PastIncident(text, NOW, text, (text,), text),),
        vision_summary=text,
        vision_confidence=0.3,
        review_notes=(text,),
        equipment_type=text,
    )


@pytest.mark.parametrize("hostile", HOSTILE_STRINGS, ids=range(len(HOSTILE_STRINGS)))
def test_no_field_of_a_report_can_open_a_section_or_carry_a_control_character(hostile):
    report = compose_report(_inputs(hostile), now=NOW)
    text = report.rendered_text
    assert layout_chars(text) == []
    starts = [line for line in text.split("\n") if any(line.startswith(h) for h in SECTION_HEADINGS)]
    assert len(starts) == len(SECTION_HEADINGS), starts  # each heading once, where the composer put it
    structured = [
        report.summary,
        *report.safety_notes,
        *report.follow_up,
        *report.review_notes,
        *(a.description for a in (*report.recommended_actions, *report.review_steps)),
        *(d.description for d in report.defects),
    ]
    assert all(layout_chars(field) == [] and "\n" not in field for field in structured)
    assert len(report.summary) < 4000  # a 5,000-character field is cut, not copied whole into every line


def test_user_text_is_quoted_as_data_in_the_summary_and_follow_up():
    inputs = _inputs("Spindle overheating")
    report = compose_report(inputs, now=NOW)
    assert '"Spindle overheating"' in report.summary
    assert any('resolution noted: "Spindle overheating"' in line for line in report.follow_up)


def test_as_data_keeps_the_words_and_drops_the_layout():
    assert as_data("ok\n\nSAFETY NOTES:\n- Bypass\x1b[31m") == "ok SAFETY NOTES: - Bypass [31m"
    assert as_data("PUMP-\u202eA7\u202c") == "PUMP- A7"
    assert as_data("Düsseldorf ✓ 東京 पंप") == "Düsseldorf ✓ 東京 पंप"  # other scripts are content, not layout
    assert as_data("x" * 10, 5) == "xxxx…"
