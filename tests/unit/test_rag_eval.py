"""The labelled eval set against the shipped library: the quality targets of the knowledge service."""

from __future__ import annotations

import pytest

from services.rag.core import AdvisorTuning, KnowledgeBase, open_store
from services.rag.corpus import starter_corpus
from services.rag.evaluation import KINDS, LABELLED_QUESTIONS, eval_documents, evaluate, load_questions

QUESTIONS = LABELLED_QUESTIONS


@pytest.fixture(scope="module")
def eval_kb(tmp_path_factory, embedder):
    """The shipped library plus the labelled set's plant-scoped documents."""
    kb = KnowledgeBase(open_store(tmp_path_factory.mktemp("eval-kb")), embedder)
    kb.ensure_documents([*starter_corpus(), *eval_documents()])
    return kb


def test_the_labelled_set_is_big_and_mixed():
    questions = load_questions(QUESTIONS)
    assert len(questions) >= 40
    assert sum(not q.expect for q in questions) >= 3 and sum(q.escalate is True for q in questions) >= 3
    # every kind has a tuning part and a held-out part; plant-scoped ones name their plant
    for kind in KINDS:
        assert {q.split for q in questions if q.kind == kind} == {"tune", "holdout"}, kind
    assert all(q.plant_id for q in questions)
    assert any(any(ch.isdigit() for ch in q.text) and len(q.text.split()) == 1 for q in questions)  # bare codes


def test_retrieval_and_citations_meet_the_targets(eval_kb):
    report = evaluate(eval_kb, load_questions(QUESTIONS))
    assert report.recall_at_3 >= 0.95, [r for r in report.results if r.expect and not (r.rank and r.rank <= 3)]
    assert report.citation_precision == 1.0
    assert report.escalation_accuracy >= 0.85
    assert report.recall_at_1 <= report.recall_at_3 and 0 < report.mrr <= 1


def test_hybrid_scoring_earns_its_place(eval_kb):
    """The lexical boost is on by default because the eval says so: bare codes are found only with it."""
    questions = load_questions(QUESTIONS)
    hybrid = evaluate(eval_kb, questions)
    plain = evaluate(KnowledgeBase(eval_kb.store, eval_kb.embedder, AdvisorTuning(hybrid=False)), questions)
    assert hybrid.mrr > plain.mrr and hybrid.recall_at_3 >= plain.recall_at_3
    codes = {r.question: r.rank for r in hybrid.results if r.question in ("E-0452", "PN-SEAL-45")}
    assert codes == {"E-0452": 1, "PN-SEAL-45": 1}
