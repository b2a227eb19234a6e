"""Citation verification: every step of a draft is checked against what retrieval returned, whichever
generator wrote it. A citation stands only where the cited document was retrieved and says what the step says;
a step without one is attributed to the chunk that states it, or flagged unsupported."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from copilot.domain import GuidanceStep, SopChunk
from copilot.text import content_words
from services.rag.generators import Draft


@dataclass(frozen=True)
class Verified:
    """Guidance steps after citation checking, with what was removed or left unsupported."""

    steps: tuple[GuidanceStep, ...]
    citations_removed: int
    unsupported_steps: int


def _coverage(words: frozenset[str], chunk: SopChunk) -> float:
    return len(words & content_words(chunk.text)) / len(words) if words else 0.0


def verify(
    draft: Draft, retrieved: Sequence[SopChunk], cited_overlap: float = 0.4, attributed_overlap: float = 0.75
) -> Verified:
    """Check every step against what was retrieved.

    A citation is kept only if that document was retrieved and the step's words appear in what was retrieved
    from it (>= `cited_overlap` of them); other citations are removed and counted. A step left without a
    citation is attributed to the retrieved chunk that states it (>= `attributed_overlap` of its words), since
    small models paraphrase without citing; otherwise it is flagged unsupported.
    """
    by_id: dict[str, list[SopChunk]] = {}
    for chunk in retrieved:
        by_id.setdefault(chunk.sop_id.lower(), []).append(chunk)
    removed = unsupported = 0
    steps: list[GuidanceStep] = []
    for step in draft.steps:
        words = content_words(step.text)
        kept: list[tuple[str, str]] = []
        for cited in step.sop_ids:
            chunks = by_id.get(cited.lower())
            if not chunks:
                removed += 1
                continue
            best = max(chunks, key=lambda c: _coverage(words, c))
            if words and _coverage(words, best) < cited_overlap:
                removed += 1  # the document was retrieved but does not say this
                continue
            kept.append((best.sop_id, best.section))
        if not kept and retrieved and words:
            best = max(retrieved, key=lambda c: _coverage(words, c))
            if _coverage(words, best) >= attributed_overlap:
                kept.append((best.sop_id, best.section))
        kept = list(dict.fromkeys(kept))
        if not kept:
            unsupported += 1
        steps.append(
            GuidanceStep(step.text, tuple(i for i, _ in kept), tuple(s for _, s in kept), unsupported=not kept)
        )
    return Verified(tuple(steps), removed, unsupported)
