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
