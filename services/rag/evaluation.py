"""Knowledge quality eval over a labelled question set: recall@1, recall@3, MRR, citation precision and
escalation accuracy. Pure: give it a KnowledgeBase; `copilot eval` prints and saves the result."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from copilot.domain import MANUAL_REVIEW_THRESHOLD
from services.rag.core import KnowledgeBase

#: The shipped labelled set: technician questions with the documents that answer them (or none: escalate).
LABELLED_QUESTIONS = Path(__file__).parent / "eval" / "knowledge_eval.yaml"


@dataclass(frozen=True)
class Question:
    text: str
    expect: tuple[str, ...]
    escalate: bool
    equipment_type: str = ""


@dataclass(frozen=True)
class QuestionResult:
    question: str
    expect: list[str]
    retrieved: list[str]
    retrieved_all: list[str]  # documents the guidance was written from
    cited: list[str]
    rank: int | None  # 1-based rank of the first expected document among retrieved documents
    confidence: float
    escalated: bool
    escalate_expected: bool


@dataclass(frozen=True)
class EvalReport:
    questions: int
    answerable: int
    recall_at_1: float
    recall_at_3: float
    mrr: float
    citation_precision: float  # cited ids that were retrieved and verified (hallucinated citations lower it)
    citation_relevance: float  # cited ids that the label names as an answer (stricter, label-based)
    escalation_accuracy: float
    results: list[QuestionResult]

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("results")
        return data


def load_questions(path: Path) -> list[Question]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [
        Question(q["q"], tuple(q.get("expect") or ()), bool(q.get("escalate", False)), q.get("equipment_type", ""))
        for q in data["questions"]
    ]


def questions_from_feedback(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Technician feedback (the incident history's `feedback_export`) as labelled questions in the eval file's
    format. The label is what the technician said helped: the SOP ids they named; else, for a helpful answer,
    the SOPs it cited; an unhelpful answer that names none becomes a question no SOP answers (escalate).
    The last feedback on an incident wins."""
    latest = {r["request_id"]: r for r in records}
    questions = []
    for record in latest.values():
        expect = list(record["expected_sop_ids"]) or (list(record["cited_sop_ids"]) if record["helpful"] else [])
        question = {
            "q": record["question"],
            "expect": expect,
            "escalate": not expect,
            "source": f"feedback {record['request_id']} by {record['principal']}",
        }
        if record.get("equipment_type"):
            question["equipment_type"] = record["equipment_type"]
        questions.append(question)
    return questions


def evaluate(knowledge: KnowledgeBase, questions: list[Question], k: int = 3) -> EvalReport:
    results: list[QuestionResult] = []
    for question in questions:
        chunks = knowledge.retrieve(question.text, max(k, 5), question.equipment_type)
        retrieved = list(dict.fromkeys(c.sop_id for c in chunks))  # documents in rank order
        guidance = knowledge.advise(question.text, equipment_type=question.equipment_type)
        sources = sorted({c.sop_id for c in knowledge.retrieve(guidance.query, None, question.equipment_type)})
        cited = sorted({i for step in guidance.steps for i in step.sop_ids})
        rank = next((n for n, sop in enumerate(retrieved, 1) if sop in question.expect), None)
        results.append(
            QuestionResult(
                question.text,
                list(question.expect),
                retrieved,
                sources,
                cited,
                rank,
                guidance.confidence,
                guidance.confidence < MANUAL_REVIEW_THRESHOLD,
                question.escalate,
            )
        )
    answerable = [r for r in results if r.expect]
    cited_total = sum(len(r.cited) for r in results)
    cited_right = sum(len(set(r.cited) & set(r.expect)) for r in answerable)
    cited_retrieved = sum(len(set(r.cited) & set(r.retrieved_all)) for r in results)

    def share(hits: int, total: int) -> float:
        return round(hits / total, 4) if total else 1.0

    return EvalReport(
        questions=len(results),
        answerable=len(answerable),
        recall_at_1=share(sum(r.rank == 1 for r in answerable), len(answerable)),
        recall_at_3=share(sum(r.rank is not None and r.rank <= k for r in answerable), len(answerable)),
        mrr=round(sum(1 / r.rank for r in answerable if r.rank) / len(answerable), 4) if answerable else 1.0,
        citation_precision=share(cited_retrieved, cited_total),
        citation_relevance=share(cited_right, cited_total),
        escalation_accuracy=share(sum(r.escalated == r.escalate_expected for r in results), len(results)),
        results=results,
    )
