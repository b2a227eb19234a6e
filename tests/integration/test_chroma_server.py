"""The knowledge core against a real `chroma run` server (the Kubernetes/compose configuration)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from copilot.agents.v1 import knowledge_pb2, knowledge_pb2_grpc
from copilot.client import auth_metadata
from copilot_cli.launcher import free_port, free_ports
from services.rag.core import KnowledgeBase, open_store
from services.rag.corpus import starter_corpus
from tests.conftest import token

pytestmark = pytest.mark.integration
CHROMA = Path(sys.executable).with_name("chroma")


def start_chroma(path: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [str(CHROMA), "run", "--path", str(path), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
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


def start_knowledge(chroma_port: int, port: int, data: Path) -> subprocess.Popen:
    from grpc_health.v1 import health_pb2

    from copilot_cli.launcher import health_status

    env = {
        **os.environ,
        "KNOWLEDGE_CHROMA_HOST": "127.0.0.1",
        "KNOWLEDGE_CHROMA_PORT": str(chroma_port),
        "KNOWLEDGE_PORT": str(port),
        "KNOWLEDGE_METRICS_PORT": "0",
        "KNOWLEDGE_LOAD_STARTER_CORPUS": "false",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.rag"], env=env, cwd=data, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if health_status(f"127.0.0.1:{port}") == health_pb2.HealthCheckResponse.SERVING:
            return proc
        assert proc.poll() is None, "the knowledge service exited"
        time.sleep(0.3)
    proc.kill()
    raise TimeoutError("knowledge service did not become SERVING")


def copilot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).with_name("copilot")), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "250"},
    )  # tables unwrapped


def test_documents_ingested_through_the_cli_survive_service_and_chroma_restarts(tmp_path):
    chroma_port, port = free_ports(2)
    addr = f"127.0.0.1:{port}"
    manual = tmp_path / "chiller.txt"
    manual.write_text(
        "CHILLER CH-150 SERVICE NOTES\n\nLow flow alarm F-21:\n1. Open the strainer and remove debris.\n"
        "2. Bleed air from the highest point of the circuit.\n"
    )
    chroma = start_chroma(tmp_path / "chroma", chroma_port)
    service = start_knowledge(chroma_port, port, tmp_path)
    try:
        ingested = copilot(
            "ingest", str(manual), "--id", "CH-150", "--version", "1", "--equipment-type", "chiller", "--addr", addr
        )
        assert ingested.returncode == 0, ingested.stdout + ingested.stderr
        assert "CH-150" in ingested.stdout and "created" in ingested.stdout
        unnamed = tmp_path / "chiller notes (copy).txt"  # no id, and a file name that is none either
        unnamed.write_text(manual.read_text())
        refused = copilot("ingest", str(unnamed), "--addr", addr)
        assert refused.returncode == 1 and "metadata.document_id" in refused.stdout
        technician = copilot("ingest", str(manual), "--id", "CH-151", "--addr", addr, "--token", token("technician"))
        assert technician.returncode == 1 and "PERMISSION_DENIED" in technician.stdout

        service.terminate()
        service.wait(timeout=30)
        service = start_knowledge(chroma_port, port, tmp_path)  # the service restarts on the same store
        listed = json.loads(copilot("docs", "--json", "--addr", addr).stdout)
        assert [(d["document_id"], d["version"], d["equipment_types"]) for d in listed] == [
            ("CH-150", "1", ["chiller"])
        ]

        chroma.terminate()
        chroma.wait(timeout=30)
        chroma = start_chroma(tmp_path / "chroma", chroma_port)  # and the Chroma server restarts under it
        with grpc.insecure_channel(addr) as channel:
            stub = knowledge_pb2_grpc.KnowledgeServiceStub(channel)
            found = stub.Retrieve(
                knowledge_pb2.RetrieveRequest(query="low flow alarm F-21 on the chiller", top_k=1),
                timeout=30,
                metadata=auth_metadata(token("service")),
            )
        assert found.chunks[0].sop_id == "CH-150" and "strainer" in found.chunks[0].text
    finally:
        for proc in (service, chroma):
            proc.terminate()
            proc.wait(timeout=30)
