"""A problem description's rules read Unicode, not ASCII: blank is blank in any script's spaces and invisible
characters, bidi overrides and C0 controls are refused, every script's words and line breaks pass, and the
forbidden characters' refusal says what to write instead. Examples, then hypothesis over Unicode text."""

from __future__ import annotations

import protovalidate
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from copilot.client import diagnose_request

BLANKS = " \t\n\u00a0\u1680\u2000\u2003\u200a\u202f\u205f\u3000\u200b\u200d\u2060\ufeff"
BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


def rule_ids(problem: str) -> list[str]:
    try:
        protovalidate.validate(diagnose_request("PUNE-IN", "CNC-A-102", problem))
    except protovalidate.ValidationError as error:
        return [v.proto.rule_id for v in error.violations]
    return []


@pytest.mark.parametrize(
    ("problem", "refused_by"),
    [
        (" " * 12, "problem_description.not_blank"),
        ("\u00a0" * 12, "problem_description.not_blank"),  # no-break spaces
        ("\u3000" * 12, "problem_description.not_blank"),  # ideographic spaces
        ("\u200b" * 12, "problem_description.not_blank"),  # zero-width spaces
        ("Pump noisy \u202eesion gnidaol", "problem_description.no_controls"),  # right-to-left override
        ("Pump noisy\x1b[31m again", "problem_description.no_controls"),
        ("Temperature > 90 C on the spindle", "problem_description.forbidden_chars"),
    ],
)
def test_blank_invisible_and_layout_changing_text_is_refused_by_its_rule(problem, refused_by):
    assert refused_by in rule_ids(problem)


@pytest.mark.parametrize(
    "problem",
    [
        "Machine overheating during operation",
        "Line one: spindle hot\nLine two: coolant low\r\n\tthird",
        "机器运行时过热，冷却液不足",
        "मशीन चलते समय बहुत गर्म हो रही है",
        "Überhitzung der Spindel während des Betriebs",
        "Pump vibrates 🔧 and leaks at the flange",
    ],
)
def test_words_in_any_script_and_line_breaks_pass(problem):
    assert rule_ids(problem) == []


def test_the_forbidden_characters_refusal_says_what_to_write():
    with pytest.raises(protovalidate.ValidationError) as refused:
        protovalidate.validate(diagnose_request("PUNE-IN", "CNC-A-102", "Temperature > 90 C on the spindle"))
    (violation,) = refused.value.violations
    assert "above 90 C" in violation.proto.message


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(BLANKS), min_size=10, max_size=80))
def test_any_text_of_only_spaces_and_invisible_characters_is_blank(problem):
    assert "problem_description.not_blank" in rule_ids(problem)


@settings(max_examples=200, deadline=None)
@given(
    st.text(
        alphabet=st.characters(
            categories=["L", "M", "N", "P", "S", "Zs"], exclude_characters="<>{};\u00ad", codec="utf-8"
        ),
        min_size=10,
        max_size=200,
    ).filter(lambda text: any(ch.isalnum() for ch in text))
)
def test_any_text_with_a_word_and_no_forbidden_or_control_character_passes(problem):
    assert rule_ids(problem) == []


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=4, max_size=40), st.sampled_from(BIDI), st.text(min_size=6, max_size=40))
def test_a_bidi_control_anywhere_is_refused(before, bidi, after):
    assert "problem_description.no_controls" in rule_ids(before + bidi + after)
