"""Which language a problem description is written in, offline (py3langid: a naive Bayes model over byte n-grams
that ships inside the package, 97 languages, no network).

The SOP library and its embedder (all-MiniLM-L6-v2) serve English: a German, Spanish or Hindi description of a
covered problem retrieves nothing useful. The knowledge agent says so (an escalation reason, the report) instead
of letting the answer look like "no SOP covers this". A text is judged only when it has enough words to judge:
short codes ("E-0452", "PN-SEAL-45") and terse English ("Pump leaking") are not called foreign."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

#: Languages the corpus and the embedder serve.
SERVED = frozenset({"en"})
#: The detector's probability (normalised over its languages) a foreign language needs, with English below
#: ENGLISH_CEILING; chosen on the tuning questions (services/rag/eval): Spanish sentences of eight words score
#: 0.45-0.7 there, English ones that the model doubts at most 0.05 for a foreign language.
MIN_PROBABILITY = 0.4
ENGLISH_CEILING = 0.2
MIN_WORDS = 3

_NAMES = {
    "de": "German",
    "es": "Spanish",
    "fr": "French",
    "it": "Italian",
    "pt": "Portuguese",
    "nl": "Dutch",
    "pl": "Polish",
    "tr": "Turkish",
    "hi": "Hindi",
    "mr": "Marathi",
    "ta": "Tamil",
    "te": "Telugu",
    "bn": "Bengali",
    "gu": "Gujarati",
    "kn": "Kannada",
    "zh": "Chinese",
    "ja": "Japanese",
    "ko": "Korean",
    "ru": "Russian",
    "uk": "Ukrainian",
    "ar": "Arabic",
    "cs": "Czech",
    "sv": "Swedish",
    "ro": "Romanian",
    "hu": "Hungarian",
    "vi": "Vietnamese",
    "th": "Thai",
    "id": "Indonesian",
}


@dataclass(frozen=True)
class LanguageGuess:
    """The language a problem description is written in, and how sure the guess is."""

    code: str  # ISO 639-1, or "" when the text is too short to judge
    probability: float
    served: bool

    @property
    def name(self) -> str:
        return _NAMES.get(self.code, self.code)


@lru_cache(maxsize=1)
def _model() -> Any:
    """The detector, loaded once (about 0.3 s; the model ships inside py3langid)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def _non_latin_share(text: str) -> tuple[float, str]:
    """Share of the letters outside the Latin script, and the script of the first such letter."""
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return 0.0, ""
    other = [ch for ch in letters if not unicodedata.name(ch, "LATIN").startswith("LATIN")]
    return len(other) / len(letters), (unicodedata.name(other[0], "").split(" ")[0] if other else "")


def detect(text: str) -> LanguageGuess:
    words = [w for w in text.split() if any(ch.isalpha() for ch in w)]
    if len(words) < MIN_WORDS:
        return LanguageGuess("", 0.0, True)
    ranked: dict[str, float] = {str(c): float(p) for c, p in _model().rank(text)}
    code, probability = max(ranked.items(), key=lambda item: item[1])
    share, _script = _non_latin_share(text)
    if share > 0.5 and code == "en":  # another script the model confused: never English
        code = next((c for c, _ in sorted(ranked.items(), key=lambda i: -i[1]) if c != "en"), code)
        probability = ranked.get(code, 0.0)
    foreign = code not in SERVED and (
        share > 0.5 or (probability >= MIN_PROBABILITY and ranked.get("en", 0.0) < ENGLISH_CEILING)
    )
    if not foreign:
        return LanguageGuess("en", round(ranked.get("en", probability), 3), True)
    return LanguageGuess(code, round(float(probability), 3), False)
