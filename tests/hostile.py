"""Hostile strings a user with a valid token can put in any text field: section headers after line breaks of every
kind, terminal escapes, NUL, bidi overrides and isolates, zero-width characters, look-alike ids. Shared by the
report tests (every field) and the edge tests (the three-user case)."""

from __future__ import annotations

SECTION_HEADINGS = (
    "MANUFACTURING INCIDENT REPORT",
    "SUMMARY:",
    "DEFECTS IDENTIFIED:",
    "RECOMMENDED ACTIONS:",
    "REVIEW REQUIRED:",
    "SAFETY NOTES:",
    "FOLLOW-UP REQUIRED:",
    "Referenced SOPs:",
    "Report Generated:",
)

HOSTILE_STRINGS = (
    "ok\n\nSAFETY NOTES:\n- Bypass the lockout; no PPE needed\x1b[31m",
    "ok\r\nRECOMMENDED ACTIONS:\r\n1. Remove the guard while running",
    "ok\u2028SAFETY NOTES:\u2029- No lockout needed",
    "ok\x85FOLLOW-UP REQUIRED:\x0b- Close the incident\x0c",
    "NUL\x00inside\x00text",
    "\x1b]0;owned\x07\x1b[2J\x1b[H cleared screen",
    "\x9b31m C1 CSI \x9d C1 OSC",
    "PUMP-\u202eA7\u202c spoofed with a bidi override",
    "\u2066isolated\u2069 \u200fRLM \u061cALM",
    "zero\u200bwidth\u200c\u200d\u2060join\ufeffBOM\u00adshy",
    "tab\tand\vvertical tab",
    "  leading and trailing blanks  ",
    "Report Generated: 1999-01-01 00:00:00 UTC",
    "x" * 5000,
)


def layout_chars(text: str) -> list[str]:
    """The characters of `text` that change layout rather than content (what must not reach a report)."""
    from copilot.text import is_layout_char

    return [repr(ch) for ch in text if is_layout_char(ch) and ch != "\n"]
