"""The real mesh: four OS processes on free ports, talking gRPC. Agents are killed, frozen and restarted
while the orchestrator keeps answering."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from copilot.agents.v1 import knowledge_pb2, knowledge_pb2_grpc
from copilot.client import auth_metadata, diagnose_request
from copilot.runtime.errors import field_violations
from copilot.v1 import copilot_pb2, copilot_pb2_grpc
from copilot_cli.launcher import Mesh
from tests.conftest import SAMPLES, token

pytestmark = pytest.mark.integration

OK, DEGRADED, SKIPPED = copilot_pb2.STAGE_STATE_OK, copilot_pb2.STAGE_STATE_DEGRADED, copilot_pb2.STAGE_STATE_SKIPPED
PROBLEM = "CNC machine overheating during operation, coolant smells burnt"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    mesh = Mesh.on_free_ports(
        data_dir=tmp_path_factory.mktemp("mesh"),
        extra_env={"ORCHESTRATOR_VISION_TIMEOUT_S": "2", "ORCHESTRATOR_REPORT_TIMEOUT_S": "2"},
    )
    mesh.start()
    try:
        mesh.wait_ready(timeout=180)
        yield mesh
    finally:
        codes = mesh.stop()
        print("exit codes", codes)


@pytest.fixture(scope="module")
def stub(mesh):
    with grpc.insecure_channel(mesh.address("orchestrator")) as channel:
        yield copilot_pb2_grpc.CopilotServiceStub(channel)


def run_cli(*args: str, exit_code: int = 0) -> subprocess.CompletedProcess:
    """`copilot ARGS` as a technician runs it (this venv's entry point; tokens minted from the test secret), ending
    with `exit_code`."""
    done = subprocess.run(
        [str(Path(sys.executable).with_name("copilot")), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "250"},
    )
    assert done.returncode == exit_code, done.stdout + done.stderr
    return done


def call(stub, image=None, **overrides):
    fields = dict(plant_id="PUNE-IN", equipment_id="CNC-A-102", problem=PROBLEM)
    fields.update(overrides)
    request = diagnose_request(fields["plant_id"], fields["equipment_id"], fields["problem"], image)
    return stub.Diagnose(request, metadata=auth_metadata("technician-42"), timeout=30)


def test_processes_are_separate(mesh):
    pids = {name: proc.process.pid for name, proc in mesh.services.items()}
    assert len(set(pids.values())) == 4 and all(p.alive for p in mesh.services.values())


def test_text_only_diagnosis_cites_what_knowledge_retrieves(mesh, stub):
    reply = call(stub)
    assert [s.state for s in reply.stages] == [SKIPPED, OK, OK]
    with grpc.insecure_channel(mesh.address("knowledge")) as channel:
        advice = knowledge_pb2_grpc.KnowledgeServiceStub(channel).Advise(
            knowledge_pb2.AdviseRequest(problem_description=PROBLEM),
            timeout=30,
            metadata=auth_metadata(token("service")),  # what the orchestrator sends
        )
    assert list(reply.report.referenced_sop_ids) == list(
        dict.fromkeys([s for step in advice.steps for s in step.sop_ids] + [c.sop_id for c in advice.citations])
    )
    assert reply.report.referenced_sop_ids[0] == "SOP-123"
    assert reply.confidence_score == pytest.approx(reply.stages[1].confidence, abs=1e-4)
    assert "SOP-123" in reply.report.rendered_text


def test_photo_diagnosis_uses_all_three_agents(stub, crack_photo):
    reply = call(stub, crack_photo)
    assert [s.state for s in reply.stages] == [OK, OK, OK]
    assert {"crack", "corrosion"} <= {d.type for d in reply.report.defects}


def test_bad_requests_get_precise_errors(stub):
    with pytest.raises(grpc.RpcError) as err:
        call(stub, plant_id="Pune", problem="short")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {v.field for v in field_violations(err.value)} == {"plant_id", "problem_description"}
    with pytest.raises(grpc.RpcError) as err:
        stub.Diagnose(diagnose_request("PUNE-IN", "CNC-A-102", PROBLEM), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert call(stub).report.summary  # and it keeps serving


INTEROP = Path(__file__).resolve().parents[1] / "interop"


def test_a_nodejs_client_diagnoses_through_the_published_protos(mesh):
    """Another language's client: Node.js with @grpc/grpc-js, loading protos/ at run time, a JWT in the
    authorization header, the field violations and the ErrorInfo reason decoded from grpc-status-details-bin."""
    node = shutil.which("node")
    if node is None or not (INTEROP / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.skip("Node.js or the interop client's packages are not installed (`make install` runs npm ci)")
    run = subprocess.run(
        [
            node,
            str(INTEROP / "diagnose.mjs"),
            mesh.address("orchestrator"),
            token(),
            str(SAMPLES / "pump-housing-crack.jpg"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    diagnosis = seen["diagnose"]
    assert diagnosis["stages"] == [[s, "STAGE_STATE_OK"] for s in ("STAGE_VISION", "STAGE_KNOWLEDGE", "STAGE_REPORT")]
    assert "crack" in {kind for kind, _, _ in diagnosis["defects"]}
    assert all(0 <= confidence <= 1 and boxed for _, confidence, boxed in diagnosis["defects"])
    assert diagnosis["referenced_sop_ids"] and 0 <= diagnosis["confidence_score"] <= 1
    assert abs(diagnosis["generated_at_seconds"] - time.time()) < 300
    assert diagnosis["rendered_starts"] == "MANUFACTURING INCIDENT REPORT"
    assert re.fullmatch(r"[0-9a-f]{32}", diagnosis["trace_id"])
    assert seen["invalid"]["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert set(seen["invalid"]["fields"]) == {"plant_id", "equipment_id", "problem_description"}
    info = seen["invalid"]["error_info"]  # the reason a client branches on, decoded from the trailer
    assert (info["reason"], info["domain"]) == ("INVALID_FIELDS", "orchestrator.copilot")
    assert set(info["metadata"]["fields"].split(",")) == {"plant_id", "equipment_id", "problem_description"}
    assert seen["unauthenticated_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert seen["unauthenticated_error_info"] == {
        "reason": "TOKEN_MISSING",
        "domain": "orchestrator.copilot",
        "metadata": {},
    }


@pytest.mark.parametrize("agent", ["vision", "knowledge", "report"])
def test_killed_agent_degrades_its_stage_then_recovers_after_restart(mesh, stub, crack_photo, agent):
    index = ["vision", "knowledge", "report"].index(agent)
    mesh.kill(agent)
    reply = call(stub, crack_photo)
    assert reply.stages[index].state == DEGRADED
    assert reply.stages[index].error.startswith("UNAVAILABLE")
    assert [s.state for i, s in enumerate(reply.stages) if i != index] == [OK, OK]
    assert reply.report.rendered_text.startswith("MANUFACTURING INCIDENT REPORT")
    if agent != "report":
        assert reply.requires_manual_review  # a degraded stage counts 0.0 in the mean
    mesh.services[agent].spawn()
    mesh.wait_ready(timeout=180, names=[agent])
    # the orchestrator's channel reconnects within its reconnect backoff (at most 1 s) and uses it again
    deadline = time.monotonic() + 5
    while (states := [s.state for s in call(stub, crack_photo).stages]) != [OK, OK, OK] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert states == [OK, OK, OK]


def test_frozen_agent_is_cut_by_the_stage_deadline(mesh, stub, crack_photo):
    vision = mesh.services["vision"].process
    vision.send_signal(signal.SIGSTOP)
    try:
        reply = call(stub, crack_photo)
    finally:
        vision.send_signal(signal.SIGCONT)
    assert reply.stages[0].state == DEGRADED and "DEADLINE_EXCEEDED" in reply.stages[0].error
    assert reply.stages[0].duration_ms < 5000
    assert reply.stages[1].state == OK


def test_sigterm_drains_and_exits_cleanly(tmp_path):
    mesh = Mesh.on_free_ports(data_dir=tmp_path)
    mesh.start()
    try:
        mesh.wait_ready(timeout=180, names=["report", "vision"])
    finally:
        codes = mesh.stop()
    assert codes["report"] == 0 and codes["vision"] == 0


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return reply.read().decode()


def test_every_service_exposes_prometheus_metrics(mesh, stub):
    call(stub)
    orchestrator = scrape(mesh.metrics_url("orchestrator"))
    assert re.search(
        r'copilot_rpc_requests_total\{[^}]*rpc_grpc_status_code="OK"[^}]*CopilotService/Diagnose', orchestrator
    )
    assert re.search(r'copilot_rpc_requests_total\{[^}]*rpc_grpc_status_code="INVALID_ARGUMENT"', orchestrator)
    assert re.search(r'copilot_stage_duration_seconds_bucket\{[^}]*stage="knowledge"', orchestrator)
    # the degradation tests above killed each agent once
    for stage in ("vision", "knowledge", "report"):
        assert re.search(rf'copilot_stage_degraded_total\{{[^}}]*stage="{stage}"[^}}]*\}} [1-9]', orchestrator), stage
    assert re.search(r"copilot_escalations_total\{[^}]*\} [1-9]", orchestrator)
    assert "copilot_rpc_in_flight" in orchestrator and "copilot_diagnosis_confidence_bucket" in orchestrator
    assert "copilot_model_inference_duration_seconds_count" in scrape(mesh.metrics_url("vision"))
    knowledge = scrape(mesh.metrics_url("knowledge"))
    assert "copilot_retrieval_top_score_bucket" in knowledge and "copilot_retrieval_results_count" in knowledge
    assert "CopilotService" not in scrape(mesh.metrics_url("report"))


def test_the_cli_streams_a_diagnosis_then_finds_it_and_records_feedback(mesh):
    """`copilot diagnose` (StreamDiagnose), `incidents`, `incident`, `feedback` and `export-feedback`
    as a technician runs them, against the real mesh (tokens minted from the mesh's secret)."""
    import yaml

    copilot = run_cli
    addr = ["--addr", mesh.address("orchestrator")]
    request = ["diagnose", "--plant", "PUNE-IN", "--equipment", "CNC-CLI-9", "--problem", PROBLEM]
    shown = copilot(*request, "--request-id", "cli-stream-1", *addr)
    assert "SUMMARY" in shown.stdout and "request cli-stream-1" in shown.stdout
    assert "knowledge" in shown.stderr and "report" in shown.stderr  # the live stage table
    again = json.loads(
        copilot(
            *request,
            "--request-id",
            "cli-stream-1",
            "--json",
            *addr,
        ).stdout
    )
    assert again["replayed"] is True and again["request_id"] == "cli-stream-1"

    listed = json.loads(copilot("incidents", "--equipment", "CNC-CLI-9", "--json", *addr).stdout)
    assert [i["request_id"] for i in listed] == ["cli-stream-1"]
    assert listed[0]["principal"] == "technician-cli"
    copilot("feedback", "cli-stream-1", "--helpful", "--sop", "SOP-123", "--notes", "Cleaned the coolant filter", *addr)
    shown = copilot("incident", "cli-stream-1", *addr)
    assert "helpful" in shown.stdout and "Cleaned the coolant filter" in shown.stdout

    export = mesh.data_dir / "feedback.yaml"
    copilot("export-feedback", str(export), "--data-dir", str(mesh.data_dir))
    questions = yaml.safe_load(export.read_text())["questions"]
    assert {"q": PROBLEM, "expect": ["SOP-123"], "escalate": False}.items() <= questions[0].items()


def test_the_readme_examples_get_answers_to_trust(stub, crack_photo):
    """The README's two diagnoses: CNC-A-102 gets the CNC SOP; the pump photo (only the equipment id given: the
    registry says centrifugal pump, brushed-steel references) never gets CNC tooling steps."""
    cnc = call(stub, problem="Machine overheating during operation")
    assert cnc.equipment_type == "cnc-machine" and not cnc.requires_manual_review
    assert cnc.report.recommended_actions and all(
        a.sop_ids == ["SOP-123"] for a in cnc.report.recommended_actions if a.sop_ids
    )
    pump = call(stub, crack_photo, equipment_id="PUMP-A-7", problem="Crack near the outlet flange")
    assert (pump.equipment_type, pump.reference_set) == ("centrifugal-pump", "brushed-steel")
    cited = {s for a in [*pump.report.recommended_actions, *pump.report.review_steps] for s in a.sop_ids}
    assert "SOP-123" not in cited and cited <= {"PUMP-330", "SAFETY-SOP-001", "LOTO-002", "LUB-120"}
    assert pump.requires_manual_review or cited & {"PUMP-330"}
    if pump.requires_manual_review:  # an honest escalation says why and recommends no SOP step
        assert pump.review_notes and all(not a.sop_ids for a in pump.report.recommended_actions)


def test_a_plant_sop_is_used_at_its_plant_and_an_uncovered_machine_goes_to_review(mesh, stub, tmp_path):
    """As a new user follows the README: `copilot ingest … --plant PUNE-IN`, `docs`, `equipment`, then diagnoses
    at that plant (the plant's SOP is cited) and at another (no chiller SOP there: review, no compressor steps)."""

    def copilot(*args: str) -> str:
        return run_cli(*args).stdout

    manual = tmp_path / "CHILL-901.md"
    source = (Path(__file__).resolve().parents[2] / "services/rag/eval/documents/CHILL-901.md").read_text()
    manual.write_text(source.replace("plant_ids: [PUNE-IN]\n", ""))
    copilot("ingest", str(manual), "--plant", "PUNE-IN", "--addr", mesh.address("knowledge"))
    listed = json.loads(copilot("docs", "--plant", "PUNE-IN", "--json", "--addr", mesh.address("knowledge")))
    chiller = next(d for d in listed if d["document_id"] == "CHILL-901")
    assert chiller["plant_ids"] == ["PUNE-IN"]
    lower = json.loads(copilot("docs", "--plant", "pune-in", "--json", "--addr", mesh.address("knowledge")))
    assert "CHILL-901" in {d["document_id"] for d in lower}
    other = json.loads(copilot("docs", "--plant", "BLR-IN", "--json", "--addr", mesh.address("knowledge")))
    assert "CHILL-901" not in {d["document_id"] for d in other}

    problem = "Chiller trips on high discharge pressure alarm"
    home = call(stub, plant_id="PUNE-IN", equipment_id="CHILL-2", problem=problem)
    assert home.equipment_type == "chiller" and not home.requires_manual_review
    assert "CHILL-901" in home.report.referenced_sop_ids
    away = call(stub, plant_id="BLR-IN", equipment_id="CHILL-2", problem=problem)
    assert away.requires_manual_review
    assert copilot_pb2.ESCALATION_REASON_EQUIPMENT_NOT_COVERED in away.escalation_reasons
    assert "CHILL-901" not in away.report.referenced_sop_ids
    assert all(not a.sop_ids for a in away.report.recommended_actions)
    assert any("chiller" in note for note in away.review_notes)
    assert "REVIEW REQUIRED:" in away.report.rendered_text

    shown = json.loads(copilot("equipment", "--plant", "PUNE-IN", "--json", "--addr", mesh.address("orchestrator")))
    assert {"match": "CHILL-*", "equipment_type": "chiller"}.items() <= next(
        e for e in shown["equipment"] if e["match"] == "CHILL-*"
    ).items()
    sop_types = {t["equipment_type"]: t["document_ids"] for t in shown["sop_types"]}
    assert sop_types["chiller"] == ["CHILL-901"] and "PUMP-330" in sop_types["centrifugal-pump"]
    assert {"brushed-steel", "painted-panel"} <= set(shown["reference_sets"]) and "unavailable" not in shown
    away_types = json.loads(copilot("equipment", "--plant", "BLR-IN", "--json", "--addr", mesh.address("orchestrator")))
    assert "chiller" not in {t["equipment_type"] for t in away_types["sop_types"]}


def test_a_refused_diagnosis_shows_its_error_once_and_documents_can_be_deleted_from_the_cli(mesh, tmp_path):
    """A new user's first mistakes: a lower-case plant code gets one error naming an example (no empty stage
    table, no regex); a document ingested by mistake goes with `copilot delete-doc`."""
    refused = run_cli(
        *("diagnose", "--plant", "pune", "--equipment", "CNC-A-102", "--problem", PROBLEM),
        *("--addr", mesh.address("orchestrator")),
        exit_code=2,
    )
    said = refused.stdout + refused.stderr
    assert "INVALID_ARGUMENT" in said and "PUNE-IN" in said and "waiting" not in said and "^[A-Z]" not in said
    assert said.count("plant_id") == 1, said

    manual = tmp_path / "TEMP-001.md"
    manual.write_text("---\nid: TEMP-001\ntitle: Scratch\nversion: '1'\n---\n# Scratch\n\n## Steps\n1. Nothing.\n")
    run_cli("ingest", str(manual), "--addr", mesh.address("knowledge"))
    deleted = run_cli("delete-doc", "TEMP-001", "--yes", "--addr", mesh.address("knowledge")).stdout
    assert "deleted TEMP-001" in deleted
    listed = json.loads(run_cli("docs", "--json", "--addr", mesh.address("knowledge")).stdout)
    assert "TEMP-001" not in {d["document_id"] for d in listed}
