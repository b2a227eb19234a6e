"""The labelled eval set against the shipped library: the quality targets of the knowledge service."""

from __future__ import annotations

from services.rag.core import AdvisorTuning, KnowledgeBase
from services.rag.evaluation import LABELLED_QUESTIONS, evaluate, load_questions

QUESTIONS = LABELLED_QUESTIONS


def test_the_labelled_set_is_big_and_mixed():
    questions = load_questions(QUESTIONS)
    assert len(questions) >= 40
    assert sum(not q.expect for q in questions) >= 3 and sum(q.escalate for q in questions) >= 3
    assert any(any(ch.isdigit() for ch in q.text) and len(q.text.split()) == 1 for q in questions)  # bare codes


def test_retrieval_and_citations_meet_the_targets(knowledge_base):
    report = evaluate(knowledge_base, load_questions(QUESTIONS))
    assert report.recall_at_3 >= 0.95, [r for r in report.results if r.expect and not (r.rank and r.rank <= 3)]
    assert report.citation_precision == 1.0
    assert report.escalation_accuracy >= 0.85
    assert report.recall_at_1 <= report.recall_at_3 and 0 < report.mrr <= 1


def test_hybrid_scoring_earns_its_place(knowledge_base):
    """The lexical boost is on by default because the eval says so: bare codes are found only with it."""
    questions = load_questions(QUESTIONS)
    hybrid = evaluate(knowledge_base, questions)
    plain = evaluate(
        KnowledgeBase(knowledge_base.store, knowledge_base.embedder, AdvisorTuning(hybrid=False)), questions
    )
    assert hybrid.mrr > plain.mrr and hybrid.recall_at_3 >= plain.recall_at_3
    codes = {r.question: r.rank for r in hybrid.results if r.question in ("E-0452", "PN-SEAL-45")}
    assert codes == {"E-0452": 1, "PN-SEAL-45": 1}
