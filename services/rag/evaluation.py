"""Knowledge quality over a labelled question set: retrieval (recall@1, recall@3, MRR), citations, and whether each
answer can be trusted or goes to manual review, per kind of question (covered, out-of-scope, plant-scoped,
uncovered equipment, photo mismatch, language) and per split (tune: what thresholds were chosen on; holdout: the
headline). Pure: give it a KnowledgeBase; `copilot eval` prints and saves the result.

An answer "goes to review" as the orchestrator decides it for the knowledge stage: confidence below the manual-review threshold (0.5),
or any review the guidance carries (equipment not covered, another machine's SOP, a language not served, an
unknown machine matched weakly)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from copilot.domain import MANUAL_REVIEW_THRESHOLD, Defect
from services.rag.core import KnowledgeBase
from services.rag.corpus import SopDocument, load_folder

#: The shipped labelled set: technician questions with the documents that answer them (or none: escalate).
LABELLED_QUESTIONS = Path(__file__).parent / "eval" / "knowledge_eval.yaml"
#: Documents the labelled set needs besides the shipped library: plant-scoped SOPs (plant_ids set).
EVAL_DOCUMENTS = Path(__file__).parent / "eval" / "documents"
KINDS = (
    "covered",
    "out-of-scope",
    "plant-scoped",
    "uncovered-equipment",
    "unnamed-machine",
    "photo-mismatch",
    "language",
)


@dataclass(frozen=True)
class Question:
    """A labelled question: the SOPs a right answer cites, or that it should be escalated."""

    text: str
    expect: tuple[str, ...]
    escalate: bool | None  # None: either a right answer or an escalation is fine
    equipment_type: str = ""
    kind: str = "covered"
    split: str = "holdout"
    plant_id: str = ""
    equipment_id: str = ""
    defects: tuple[str, ...] = ()


@dataclass(frozen=True)
class QuestionResult:
    """What the knowledge agent answered to one labelled question, scored."""

    question: str
    expect: list[str]
    retrieved: list[str]
    retrieved_all: list[str]  # documents the guidance was written from
    cited: list[str]
    rank: int | None  # 1-based rank of the first expected document among retrieved documents
    confidence: float
    escalated: bool
    escalate_expected: bool | None
    kind: str = "covered"
    split: str = "holdout"
    reviews: list[str] = field(default_factory=list)
    equipment_type: str = ""
    language: str = ""

    @property
    def answered(self) -> bool:
        """Given as an answer to follow, not sent to review."""
        return not self.escalated

    @property
    def right(self) -> bool:
        """Cites a document the label names as an answer."""
        return bool(set(self.cited) & set(self.expect))


@dataclass(frozen=True)
class KindScore:
    """The trust figures of one kind of question on one split (tune or holdout)."""

    questions: int
    answered: float  # share answered without review
    right_of_answered: float  # of those, the share citing a document the label names (1.0 when none answered)
    escalated: float
    escalation_correct: float  # share whose review decision matches the label ("either" always does)


@dataclass(frozen=True)
class EvalReport:
    """Retrieval and trust figures over a labelled set."""

    questions: int
    answerable: int
    recall_at_1: float
    recall_at_3: float
    mrr: float
    citation_precision: float  # cited ids that were retrieved and verified (hallucinated citations lower it)
    citation_relevance: float  # cited ids that the label names as an answer (stricter, label-based)
    escalation_accuracy: float
    results: list[QuestionResult]
    #: kind -> split -> score ("all" = both splits)
    by_kind: dict[str, dict[str, KindScore]] = field(default_factory=dict)
    #: the issue's targets, on the held-out split: answers not sent to review that cite a document for the right
    #: equipment; uncovered-equipment questions sent to review; recall@3 on covered questions
    targets: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("results")
        return data


def load_questions(path: Path) -> list[Question]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    default_plant = str(data.get("default_plant", ""))
    questions = []
    for q in data["questions"]:
        escalate = q.get("escalate", False)
        questions.append(
            Question(
                q["q"],
                tuple(q.get("expect") or ()),
                None if escalate == "either" else bool(escalate),
                q.get("equipment_type", ""),
                q.get("kind", "covered"),
                q.get("split", "holdout"),
                str(q.get("plant", default_plant)),
                str(q.get("equipment_id", "")),
                tuple(q.get("defects") or ()),
            )
        )
    return questions


def eval_documents() -> list[SopDocument]:
    """The documents the labelled set needs besides the shipped library (plant-scoped SOPs)."""
    return load_folder(EVAL_DOCUMENTS)


def questions_from_feedback(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Technician feedback (the incident history's `feedback_export`) as labelled questions in the eval file's
    format. The label is what the technician said helped: the SOP ids they named; else, for a helpful answer,
    the SOPs it cited; an unhelpful answer that names none becomes a question no SOP answers (escalate). Feedback
    with no verdict and no SOP ids says nothing about the answer: left out. The last feedback on an incident wins."""
    latest = {
        r["request_id"]: r
        for r in records
        if r.get("verdict", "helpful" if r["helpful"] else "not_helpful") != "unspecified" or r["expected_sop_ids"]
    }
    questions = []
    for record in latest.values():
        expect = list(record["expected_sop_ids"]) or (list(record["cited_sop_ids"]) if record["helpful"] else [])
        question = {
            "q": record["question"],
            "expect": expect,
            "escalate": not expect,
            "kind": "feedback",
            "source": f"feedback {record['request_id']} by {record['principal']}",
        }
        if record.get("equipment_type"):
            question["equipment_type"] = record["equipment_type"]
        questions.append(question)
    return questions


def _share(hits: int, total: int) -> float:
    return round(hits / total, 4) if total else 1.0


def _kind_score(results: Sequence[QuestionResult]) -> KindScore:
    answered = [r for r in results if r.answered]
    return KindScore(
        questions=len(results),
        answered=_share(len(answered), len(results)),
        right_of_answered=_share(sum(r.right for r in answered), len(answered)),
        escalated=_share(sum(r.escalated for r in results), len(results)),
        escalation_correct=_share(
            sum(r.escalate_expected is None or r.escalated == r.escalate_expected for r in results), len(results)
        ),
    )


def evaluate(knowledge: KnowledgeBase, questions: list[Question], k: int = 3) -> EvalReport:
    results: list[QuestionResult] = []
    for question in questions:
        defects = tuple(Defect(d, 0.9) for d in question.defects)
        guidance = knowledge.advise(
            question.text,
            defects,
            equipment_type=question.equipment_type,
            plant_id=question.plant_id,
            equipment_id=question.equipment_id,
        )
        scope = knowledge.equipment_target(
            question.equipment_type, question.equipment_id, question.text, question.plant_id
        )
        retrieval_scope = scope.names if scope.covered else frozenset()
        chunks = knowledge.retrieve(question.text, max(k, 5), retrieval_scope, question.plant_id)
        retrieved = list(dict.fromkeys(c.sop_id for c in chunks))  # documents in rank order
        sources = sorted(
            {c.sop_id for c in knowledge.retrieve(guidance.query, None, retrieval_scope, question.plant_id)}
        )
        cited = sorted({i for step in guidance.steps for i in step.sop_ids})
        rank = next((n for n, sop in enumerate(retrieved, 1) if sop in question.expect), None)
        escalated = guidance.confidence < MANUAL_REVIEW_THRESHOLD or bool(guidance.reviews)
        results.append(
            QuestionResult(
                question.text,
                list(question.expect),
                retrieved,
                sources,
                cited,
                rank,
                guidance.confidence,
                escalated,
                question.escalate,
                question.kind,
                question.split,
                [r.kind.value for r in guidance.reviews],
                guidance.equipment_type,
                guidance.language,
            )
        )
    answerable = [r for r in results if r.expect]
    cited_total = sum(len(r.cited) for r in results)
    cited_right = sum(len(set(r.cited) & set(r.expect)) for r in answerable)
    cited_retrieved = sum(len(set(r.cited) & set(r.retrieved_all)) for r in results)
    by_kind: dict[str, dict[str, KindScore]] = {}
    for kind in dict.fromkeys([*KINDS, *(r.kind for r in results)]):
        of_kind = [r for r in results if r.kind == kind]
        if of_kind:
            by_kind[kind] = {
                split: _kind_score([r for r in of_kind if split == "all" or r.split == split])
                for split in ("tune", "holdout", "all")
            }
    return EvalReport(
        questions=len(results),
        answerable=len(answerable),
        recall_at_1=_share(sum(r.rank == 1 for r in answerable), len(answerable)),
        recall_at_3=_share(sum(r.rank is not None and r.rank <= k for r in answerable), len(answerable)),
        mrr=round(sum(1 / r.rank for r in answerable if r.rank) / len(answerable), 4) if answerable else 1.0,
        citation_precision=_share(cited_retrieved, cited_total),
        citation_relevance=_share(cited_right, cited_total),
        escalation_accuracy=_share(
            sum(r.escalate_expected is None or r.escalated == r.escalate_expected for r in results), len(results)
        ),
        results=results,
        by_kind=by_kind,
        targets=_targets(results, k),
    )


def _targets(results: Sequence[QuestionResult], k: int) -> dict[str, float]:
    targets: dict[str, float] = {}
    for split in ("holdout", "tune"):
        part = [r for r in results if r.split == split]
        answered = [r for r in part if r.answered]
        covered = [r for r in part if r.kind == "covered" and r.expect]
        uncovered = [r for r in part if r.kind == "uncovered-equipment" or (r.kind == "plant-scoped" and not r.expect)]
        targets[f"{split}.answered_citing_right_equipment"] = _share(sum(r.right for r in answered), len(answered))
        # machines the vocabulary names (every kind but unnamed-machine, whose only guard is the match's strength)
        named = [r for r in answered if r.kind != "unnamed-machine"]
        targets[f"{split}.answered_citing_right_equipment_named"] = _share(sum(r.right for r in named), len(named))
        targets[f"{split}.uncovered_sent_to_review"] = _share(sum(r.escalated for r in uncovered), len(uncovered))
        targets[f"{split}.covered_recall_at_{k}"] = _share(
            sum(r.rank is not None and r.rank <= k for r in covered), len(covered)
        )
        targets[f"{split}.foreign_language_sent_to_review"] = _share(
            sum(r.escalated for r in part if r.kind == "language"), sum(r.kind == "language" for r in part)
        )
    return targets
