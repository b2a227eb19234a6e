"""The report core composes every section from its typed inputs."""

from __future__ import annotations

from datetime import UTC, datetime

from copilot.domain import BoundingBox, Defect, GuidanceStep, ReportInputs, SopCitation
from copilot.reporting import compose_report

NOW = datetime(2026, 11, 25, 14, 32, tzinfo=UTC)


def _inputs(**overrides) -> ReportInputs:
    base = dict(
        request_id="req-1",
        plant_id="PUNE-IN",
        equipment_id="CNC-A-102",
        problem_description="Machine overheating during operation",
        defects=(Defect("crack", 0.87, "Crack at x 0.2", BoundingBox(0.2, 0.3, 0.5, 0.6)),),
        guidance=(
            GuidanceStep("Check the coolant level.", ("SOP-123",), ("Cooling",)),
            GuidanceStep("Check gas flow.", ("MAINT-GUIDE-V2",), ("Gas",)),
        ),
        citations=(SopCitation("SOP-123", "CNC", "Cooling", 0.7), SopCitation("SAFETY-SOP-001", "ER", "LOTO", 0.4)),
        safety_notes=("Allow the spindle to cool.",),
        confidence_score=0.8,
        image_analyzed=True,
    )
    base.update(overrides)
    return ReportInputs(**base)


def test_sections_follow_the_seed_layout():
    report = compose_report(_inputs(), now=NOW)
    text = report.rendered_text
    order = [
        "MANUFACTURING INCIDENT REPORT",
        "SUMMARY:",
        "DEFECTS IDENTIFIED:",
        "RECOMMENDED ACTIONS:",
        "SAFETY NOTES:",
        "FOLLOW-UP REQUIRED:",
        "Referenced SOPs:",
        "Report Generated:",
    ]
    positions = [text.index(h) for h in order]
    assert positions == sorted(positions)
    assert "• Crack (87% confidence)" in text
    assert "1. Check the coolant level. [SOP-123]" in text
    assert "Referenced SOPs: SOP-123, MAINT-GUIDE-V2, SAFETY-SOP-001" in text
    assert "Report Generated: 2026-11-25 14:32:00 UTC" in text


def test_structured_fields_come_from_the_inputs():
    report = compose_report(_inputs(), now=NOW)
    assert [a.sop_ids for a in report.recommended_actions] == [("SOP-123",), ("MAINT-GUIDE-V2",)]
    assert report.referenced_sop_ids == ("SOP-123", "MAINT-GUIDE-V2", "SAFETY-SOP-001")
    assert report.safety_notes[0] == "Allow the spindle to cool."
    assert any("crack" in n for n in report.safety_notes)
    assert "CNC-A-102" in report.summary and "PUNE-IN" in report.summary and "crack (87%)" in report.summary
    assert report.generated_at == NOW and report.defects[0].box.x_min == 0.2


def test_manual_review_and_degraded_stages_reach_summary_and_follow_up():
    report = compose_report(
        _inputs(
            confidence_score=0.3,
            requires_manual_review=True,
            defects=(),
            image_analyzed=False,
            stage_notes=("vision stage degraded (UNAVAILABLE: down)",),
        ),
        now=NOW,
    )
    assert "below 50%" in report.summary and "No image was analysed" in report.summary
    assert any("manual review" in f for f in report.follow_up)
    assert any("vision stage degraded" in f for f in report.follow_up)
    assert "• None identified" in report.rendered_text


def test_different_inputs_give_different_reports():
    a = compose_report(_inputs(), now=NOW)
    b = compose_report(_inputs(equipment_id="WELD-R-9", guidance=(), citations=()), now=NOW)
    assert a.rendered_text != b.rendered_text
    assert "WELD-R-9" in b.summary and "No plant SOP matched" in b.summary


def test_an_inconclusive_image_analysis_is_not_reported_as_a_sound_part():
    unsure = "Cannot judge defects: the surface as a whole is unlike the generic references."
    report = compose_report(
        _inputs(defects=(), vision_summary=unsure, vision_confidence=0.2, confidence_score=0.35), now=NOW
    )
    assert "found no visible defect" not in report.summary
    assert "not conclusive (confidence 20%): Cannot judge defects" in report.summary
    assert "Inspect the equipment on site." in report.summary
    guessed = compose_report(
        _inputs(vision_summary="1 defect(s) against the generic references", vision_confidence=0.45), now=NOW
    )
    assert "1 possible defect(s): crack (87%)" in guessed.summary and "not conclusive" in guessed.summary
    sure = compose_report(_inputs(defects=(), vision_summary="No defect.", vision_confidence=0.9), now=NOW)
    assert "found no visible defect" in sure.summary and "not conclusive" not in sure.summary


def test_a_diagnosis_under_review_recommends_no_sop_steps_and_shows_them_to_the_reviewer():
    """The forklift case: escalated at 0.44, yet its report listed conveyor steps as RECOMMENDED ACTIONS."""
    notes = ("No SOP in scope is written for forklift; the closest SOPs found are for belt-conveyor (CONV-310).",)
    inputs = _inputs(
        equipment_id="FL-3",
        guidance=(
            GuidanceStep("Stop the equipment safely and isolate it under lockout/tagout.", (), (), True),
            GuidanceStep("Adjust the tail pulley take-up to track the belt.", ("CONV-310",), ("Tracking",)),
        ),
        confidence_score=0.44,
        requires_manual_review=True,
        review_notes=notes,
    )
    report = compose_report(inputs, now=NOW)
    assert [a.description for a in report.recommended_actions] == [
        "Stop the equipment safely and isolate it under lockout/tagout."
    ]
    assert [a.sop_ids for a in report.review_steps] == [("CONV-310",)] and report.review_notes == notes
    text = report.rendered_text
    actions = text[text.index("RECOMMENDED ACTIONS:") : text.index("REVIEW REQUIRED:")]
    assert "CONV-310" not in actions and "tail pulley" not in actions
    review = text[text.index("REVIEW REQUIRED:") : text.index("SAFETY NOTES:")]
    assert notes[0] in review and "Adjust the tail pulley take-up to track the belt. [CONV-310]" in review
    assert "for the reviewer" in report.summary


def test_under_review_without_a_generic_step_the_action_is_to_hold():
    report = compose_report(_inputs(requires_manual_review=True, review_notes=("Language not served.",)), now=NOW)
    assert len(report.recommended_actions) == 1 and not report.recommended_actions[0].sop_ids
    assert "hold the repair" in report.recommended_actions[0].description and "CNC-A-102" in report.summary
    assert [a.sop_ids for a in report.review_steps] == [("SOP-123",), ("MAINT-GUIDE-V2",)]
