"""The knowledge core against a real `chroma run` server (the Kubernetes/compose configuration)."""
from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from copilot.launcher import free_port
from services.rag.core import KnowledgeBase, open_store
from services.rag.corpus import starter_corpus

pytestmark = pytest.mark.integration
CHROMA = Path(sys.executable).with_name("chroma")


def start_chroma(path: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([str(CHROMA), "run", "--path", str(path), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/heartbeat", timeout=1)
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError("chroma run did not start")


def test_knowledge_over_a_chroma_server_survives_a_server_restart(tmp_path, embedder):
    port = free_port()
    server = start_chroma(tmp_path, port)
    try:
        kb = KnowledgeBase(open_store(host="127.0.0.1", port=port), embedder)
        written = kb.ensure_documents(starter_corpus())
        assert written == kb.count() > 0
        before = kb.advise("CNC machine overheating during operation")
        assert before.steps[0].sop_ids == ("SOP-123",)
    finally:
        server.terminate()
        server.wait(timeout=30)
    server = start_chroma(tmp_path, port)
    try:
        kb = KnowledgeBase(open_store(host="127.0.0.1", port=port), embedder)
        assert kb.ensure_documents(starter_corpus()) == 0  # everything is still there
        after = kb.advise("CNC machine overheating during operation")
        assert after.steps == before.steps and after.citations == before.citations
    finally:
        server.terminate()
        server.wait(timeout=30)
