"""A knowledge replica of this release started on a store an earlier release wrote (every vector from the float
MiniLM, no model named in the catalog): it serves at once, embeds the library again with the int8 model in the
background, and a later start has nothing left to do."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from benchmarks.replica_start import spawn, wait_serving
from copilot.agents.v1 import knowledge_pb2, knowledge_pb2_grpc
from services.rag.core import KnowledgeBase, open_store
from services.rag.corpus import starter_corpus
from services.rag.embedders import minilm_embedder
from tests.conftest import ROOT, token

pytestmark = [pytest.mark.integration, pytest.mark.models]


def _start(store: Path, log: Path) -> tuple[subprocess.Popen, str]:
    process, address = spawn("rag", ROOT, store, log, {"KNOWLEDGE_ONNX_DIR": str(store.parent / "models")})
    wait_serving(process, address, log, "knowledge", timeout=120)
    return process, address


def _messages(log: Path) -> list[str]:
    return [json.loads(line).get("msg", "") for line in log.read_text().splitlines() if line.startswith("{")]


def test_a_store_of_an_earlier_release_is_embedded_again_while_the_replica_serves(tmp_path):
    store = tmp_path / "chroma"
    old = KnowledgeBase(open_store(store), minilm_embedder(kind="onnx", onnx_dir=tmp_path / "models"))
    old.ensure_documents(starter_corpus())
    documents = old.store.catalog.get(include=[])["ids"]
    old.store.catalog.update(ids=documents, metadatas=[{"embedder": None}] * len(documents))  # as releases before
    del old

    log = tmp_path / "knowledge.log"
    proc, address = _start(store, log)
    try:
        with grpc.insecure_channel(address) as channel:
            reply = knowledge_pb2_grpc.KnowledgeServiceStub(channel).Advise(
                knowledge_pb2.AdviseRequest(problem_description="Press won't build tonnage and shows E-0452"),
                metadata=(("authorization", f"Bearer {token('service')}"),),
                timeout=30,
            )
        assert reply.citations[0].sop_id == "HYD-210"
        deadline = time.monotonic() + 120
        while not any(m.startswith("embedded") and "again" in m for m in _messages(log)):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        assert f"embedded the chunks of {len(documents)} documents again with all-MiniLM-L6-v2-int8" in _messages(log)
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0

    records = open_store(store).catalog.get(include=["metadatas"])["metadatas"]
    assert {r["embedder"] for r in records} == {"all-MiniLM-L6-v2-int8"}
    second_log = tmp_path / "second.log"
    proc, _ = _start(store, second_log)
    try:
        time.sleep(1)
        assert not any("again" in m for m in _messages(second_log))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
