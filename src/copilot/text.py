"""The one word tokeniser of the project: the content words of a text, compared between a problem description
and SOP lines (guidance, citation checks) or between problem descriptions (similar past incidents)."""

from __future__ import annotations

import re
from functools import lru_cache

# hyphenated terms stay whole: "weld-porosity", "e-stop", "m8-bolt"
_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
STOP_WORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "but",
        "by",
        "during",
        "for",
        "from",
        "has",
        "have",
        "in",
        "into",
        "is",
        "it",
        "its",
        "my",
        "no",
        "not",
        "of",
        "on",
        "or",
        "our",
        "that",
        "the",
        "this",
        "to",
        "was",
        "were",
        "when",
        "while",
        "with",
        "after",
        "before",
        "machine",
        "equipment",
    ]
)


@lru_cache(maxsize=8192)
def content_words(text: str) -> frozenset[str]:
    """Lower-cased words of three characters or more, stop words left out (remembered for the texts seen most
    recently: problem descriptions and SOP lines recur on every request)."""
    return frozenset(w for w in _WORD.findall(text.lower()) if len(w) > 2 and w not in STOP_WORDS)


# --- user text as data ----------------------------------------------------------------------------------------

#: Characters that change how text is laid out or read rather than what it says: line and paragraph breaks
#: (U+2028/2029 too), bidi embeddings, overrides and isolates (which can show "PUMP-7A" as "PUMP-A7"), zero-width
#: characters (which split or spoof an id), the byte order mark.
_INVISIBLE = {
    "\u200b",
    "\u200c",
    "\u200d",
    "\u200e",
    "\u200f",
    "\u2060",
    "\u2061",
    "\u2062",
    "\u2063",
    "\u2064",
    "\ufeff",
    "\u061c",
    "\u00ad",
}
_BIDI = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))}
_BREAKS = {"\u2028", "\u2029", "\u0085"}
_BLANKS = re.compile(r"\s+")


def is_layout_char(ch: str) -> bool:
    """A control character (C0, DEL, C1), a bidi control, a zero-width or invisible formatting character, or a
    line/paragraph separator: what must never reach a report, a log line or a terminal from a user."""
    code = ord(ch)
    return code < 0x20 or 0x7F <= code <= 0x9F or ch in _INVISIBLE or ch in _BIDI or ch in _BREAKS


def as_data(text: str, max_chars: int | None = None) -> str:
    """User-supplied text as one line of data: every control, bidi, zero-width and separator character becomes a
    space (ESC, NUL, CR, LF, U+2028 …), runs of blanks fold into one, the ends are trimmed, and a text longer
    than `max_chars` is cut with an ellipsis. What it returns cannot open a line, a section or an escape sequence
    wherever it is written: reports, logs, terminals."""
    cleaned = _BLANKS.sub(" ", "".join(" " if is_layout_char(ch) else ch for ch in text)).strip()
    if max_chars is not None and len(cleaned) > max_chars:
        cleaned = cleaned[: max(0, max_chars - 1)].rstrip() + "…"
    return cleaned
