"""The fault suite: a supervised local mesh (what `copilot up` runs) under a closed loop of diagnoses while
agents are killed, frozen, the orchestrator dies mid-request, the incident store is locked, and stores on
disk are damaged. Bounded in count and time, loopback only.

Each load phase asserts: every call answered (degraded is fine; an error only where the case says), none
slower than its deadline, every answered diagnosis retrievable with GetIncident afterwards, and full health
(every stage OK) back within a stated time."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from copilot.client import auth_metadata, diagnose_request
from copilot.v1 import copilot_pb2, copilot_pb2_grpc
from copilot_cli.launcher import Mesh, RestartPolicy, State, health_status
from tests.conftest import SAMPLES

pytestmark = pytest.mark.integration

OK = copilot_pb2.STAGE_STATE_OK
SERVING = health_pb2.HealthCheckResponse.SERVING
DEADLINE_S = 20.0  # each client call's deadline
TECHNICIAN = auth_metadata("technician-faults")
RECOVERY_S = {"vision": 120, "knowledge": 120, "report": 30, "orchestrator": 60}  # to full health after a kill


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    mesh = Mesh.on_free_ports(
        data_dir=tmp_path_factory.mktemp("faults"),
        extra_env={
            "ORCHESTRATOR_VISION_TIMEOUT_S": "4",
            "ORCHESTRATOR_KNOWLEDGE_TIMEOUT_S": "3",
            "ORCHESTRATOR_REPORT_TIMEOUT_S": "3",
            "ORCHESTRATOR_RATE_LIMIT": "",
        },
    )
    mesh.start()
    try:
        mesh.wait_ready(timeout=300)
        mesh.supervise(RestartPolicy(stable_after_s=5))
        yield mesh
    finally:
        mesh.stop()


@pytest.fixture(scope="module")
def stub(mesh):
    with grpc.insecure_channel(mesh.address("orchestrator")) as channel:
        yield copilot_pb2_grpc.CopilotServiceStub(channel)


@dataclass
class Outcome:
    request_id: str
    seconds: float
    code: grpc.StatusCode
    stages: list = field(default_factory=list)


def full_health(stub) -> bool:
    """A photo diagnosis with every stage OK."""
    try:
        reply = stub.Diagnose(photo_request(), metadata=TECHNICIAN, timeout=DEADLINE_S)
    except grpc.RpcError:
        return False
    return all(s.state == OK for s in reply.stages)


PHOTO = (SAMPLES / "pump-housing-crack.jpg").read_bytes()


def photo_request(request_id: str = "") -> copilot_pb2.DiagnoseRequest:
    return diagnose_request(
        "PUNE-IN",
        "PUMP-A-7",
        "Crack near the outlet flange of the pump housing",
        PHOTO,
        equipment_type="brushed-steel",
        request_id=request_id,
    )


def text_request(request_id: str = "") -> copilot_pb2.DiagnoseRequest:
    return diagnose_request(
        "PUNE-IN", "CNC-A-102", "Machine overheating during operation, coolant low", request_id=request_id
    )


def closed_loop(stub, fault, *, clients: int = 3, until, max_s: float = 180, photos: bool = True) -> list[Outcome]:
    """`clients` threads send diagnoses back to back (with a photo every other call when `photos`), each with
    its own request_id; `fault()` runs once the load is going; the load stops once `until()` holds (checked
    after the fault) or after max_s."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    done = threading.Event()

    def client(index: int) -> None:
        n = 0
        while not done.is_set():
            n += 1
            request_id = f"fault-{uuid.uuid4().hex[:12]}"
            request = photo_request(request_id) if photos and n % 2 else text_request(request_id)
            started = time.monotonic()
            try:
                reply = stub.Diagnose(request, metadata=TECHNICIAN, timeout=DEADLINE_S)
                outcome = Outcome(
                    request_id, time.monotonic() - started, grpc.StatusCode.OK, [s.state for s in reply.stages]
                )
            except grpc.RpcError as error:
                outcome = Outcome(request_id, time.monotonic() - started, error.code())
            with lock:
                outcomes.append(outcome)
            time.sleep(0.05)

    with ThreadPoolExecutor(clients) as pool:
        for i in range(clients):
            pool.submit(client, i)
        time.sleep(1.0)
        fault()
        deadline = time.monotonic() + max_s
        while time.monotonic() < deadline and not until():
            time.sleep(0.5)
        time.sleep(1.0)
        done.set()
    return outcomes


def assert_every_answer_is_stored(stub, outcomes: list[Outcome]) -> None:
    answered = [o for o in outcomes if o.code == grpc.StatusCode.OK]
    missing = []
    for outcome in answered:
        try:
            stub.GetIncident(
                copilot_pb2.GetIncidentRequest(request_id=outcome.request_id), metadata=TECHNICIAN, timeout=10
            )
        except grpc.RpcError as error:
            missing.append((outcome.request_id, error.code()))
    assert missing == [], missing[:5]


def recovered(mesh: Mesh, stub, name: str):
    """A predicate for closed_loop: the killed service is SERVING again and a photo diagnosis is all OK."""

    def check() -> bool:
        if health_status(mesh.address(name), timeout=0.5) != SERVING:
            return False
        return full_health(stub)

    return check


@pytest.mark.parametrize("agent", ["vision", "knowledge", "report"])
def test_sigkill_of_an_agent_under_load_degrades_answers_and_heals(mesh, stub, agent):
    restarts = mesh.supervisor.status[agent].restarts
    killed_at = []

    def kill():
        killed_at.append(time.monotonic())
        mesh.services[agent].process.send_signal(signal.SIGKILL)

    outcomes = closed_loop(stub, kill, until=recovered(mesh, stub, agent), max_s=RECOVERY_S[agent])
    healed_after = time.monotonic() - killed_at[0]
    errors = [o.code for o in outcomes if o.code != grpc.StatusCode.OK]
    assert errors == [], errors[:5]  # every call answered: degraded while the agent was down
    assert max(o.seconds for o in outcomes) < DEADLINE_S
    assert any(any(state != OK for state in o.stages) for o in outcomes)  # the kill was felt
    assert mesh.supervisor.status[agent].restarts == restarts + 1  # the supervisor restarted it
    assert full_health(stub), f"{agent} not back within {RECOVERY_S[agent]} s"
    print(f"{agent}: {len(outcomes)} calls, healed after {healed_after:.1f} s")
    assert_every_answer_is_stored(stub, outcomes)


def test_a_frozen_agent_costs_its_stage_deadline_then_recovers(mesh, stub):
    """SIGSTOP (hung, not dead): calls wait out the knowledge stage deadline (3 s) and degrade; SIGCONT heals.
    Shorter than the liveness window (6 checks 5 s apart), so the supervisor does not kill it."""
    process = mesh.services["knowledge"].process
    restarts = mesh.supervisor.status["knowledge"].restarts

    def freeze():
        process.send_signal(signal.SIGSTOP)
        threading.Timer(8.0, process.send_signal, args=(signal.SIGCONT,)).start()

    outcomes = closed_loop(stub, freeze, until=lambda: full_health(stub), max_s=40, photos=False)
    errors = [o.code for o in outcomes if o.code != grpc.StatusCode.OK]
    assert errors == [], errors[:5]
    degraded = [o for o in outcomes if o.stages and o.stages[1] != OK]
    assert degraded and all(2.5 < o.seconds < DEADLINE_S for o in degraded)  # waited out the 3 s deadline
    assert full_health(stub)
    assert mesh.supervisor.status["knowledge"].restarts == restarts  # frozen, not restarted
    assert_every_answer_is_stored(stub, outcomes)


def test_orchestrator_killed_mid_request_answers_a_retry_exactly_once(mesh, stub):
    request_id = f"retry-{uuid.uuid4().hex[:12]}"
    equipment = f"PUMP-{uuid.uuid4().hex[:6].upper()}"
    request = diagnose_request(
        "PUNE-IN",
        equipment,
        "Crack near the outlet flange of the pump housing",
        PHOTO,
        equipment_type="brushed-steel",
        request_id=request_id,
    )
    future = stub.Diagnose.future(request, metadata=TECHNICIAN, timeout=DEADLINE_S)
    time.sleep(0.05)
    mesh.services["orchestrator"].process.send_signal(signal.SIGKILL)
    try:
        first = future.result()
    except grpc.RpcError as error:
        first = None
        assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), error
    deadline, answer = time.monotonic() + RECOVERY_S["orchestrator"], None
    while answer is None and time.monotonic() < deadline:  # the caller retries with the same request_id
        try:
            answer = stub.Diagnose(request, metadata=TECHNICIAN, timeout=DEADLINE_S)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            time.sleep(0.5)
    assert answer is not None and answer.request_id == request_id
    if first is not None:  # the first call was answered before the kill: the retry is its replay
        assert answer.replayed
    listed = stub.ListIncidents(
        copilot_pb2.ListIncidentsRequest(equipment_id=equipment), metadata=TECHNICIAN, timeout=10
    )
    assert [i.request_id for i in listed.incidents] == [request_id]  # one incident, one answer
    again = stub.Diagnose(request, metadata=TECHNICIAN, timeout=DEADLINE_S)
    assert again.replayed and again.report.rendered_text == answer.report.rendered_text


def test_a_locked_incident_store_refuses_rather_than_losing_an_answer(mesh, stub):
    """Policy: an answer is sent only after its incident is stored. While another writer holds the SQLite
    database (longer than its 5 s busy timeout), diagnoses are refused with UNAVAILABLE; nothing that was
    answered is missing afterwards, and the refused ones succeed when retried with their request_id."""
    database = mesh.data_dir / "incidents.db"
    holder = sqlite3.connect(database, timeout=30, isolation_level=None, check_same_thread=False)
    outcomes: list[Outcome] = []

    def lock():
        holder.execute("BEGIN EXCLUSIVE")
        threading.Timer(8.0, holder.execute, args=("COMMIT",)).start()

    try:
        outcomes = closed_loop(stub, lock, clients=2, until=lambda: False, max_s=12, photos=False)
    finally:
        time.sleep(0.5)
        holder.close()
    refused = [o for o in outcomes if o.code != grpc.StatusCode.OK]
    assert refused and {o.code for o in refused} == {grpc.StatusCode.UNAVAILABLE}
    assert_every_answer_is_stored(stub, outcomes)
    for outcome in refused:  # retried with the same request_id: answered and stored now
        reply = stub.Diagnose(text_request(outcome.request_id), metadata=TECHNICIAN, timeout=DEADLINE_S)
        assert reply.request_id == outcome.request_id
    assert_every_answer_is_stored(stub, [Outcome(o.request_id, 0, grpc.StatusCode.OK) for o in refused])


def test_a_damaged_store_on_disk_is_reported_and_left_down_while_the_rest_serves(tmp_path):
    """A reference index and a Chroma directory damaged before start: each service stops with an error that
    names the file (never serves a guess), the supervisor reports it as crash-looping and leaves it down, and
    the orchestrator answers degraded diagnoses meanwhile."""
    references = tmp_path / "vision-references"
    references.mkdir()
    (references / "index.json").write_text("{not json")
    chroma = tmp_path / "chroma"
    chroma.mkdir()
    (chroma / "chroma.sqlite3").write_bytes(b"\x00garbage" * 512)
    mesh = Mesh.on_free_ports(data_dir=tmp_path)
    mesh.start()
    events = []
    try:
        supervisor = mesh.supervise(
            RestartPolicy(initial_backoff_s=0.2, max_backoff_s=0.5, give_up_after=2), on_event=events.append
        )
        states = supervisor.wait_settled(timeout=300)
        assert states == {
            "vision": State.FAILED,
            "knowledge": State.FAILED,
            "report": State.SERVING,
            "orchestrator": State.SERVING,
        }
        gave_up = {e.service: e for e in events if e.kind == "gave-up"}
        assert "index.json is not a readable reference index" in gave_up["vision"].log_tail
        assert f"the Chroma store at {chroma} cannot be opened" in gave_up["knowledge"].log_tail
        assert "exit code 1" in gave_up["vision"].reason
        assert sum(1 for e in events if e.kind == "restarted" and e.service == "vision") == 2
        with grpc.insecure_channel(mesh.address("orchestrator")) as channel:
            reply = copilot_pb2_grpc.CopilotServiceStub(channel).Diagnose(
                photo_request(), metadata=TECHNICIAN, timeout=DEADLINE_S
            )
        assert [s.state for s in reply.stages] != [OK, OK, OK] and reply.requires_manual_review
        assert (references / "index.json").read_text() == "{not json"  # nothing overwritten
        status = subprocess.run(
            [str(Path(sys.executable).with_name("copilot")), "status", "--json", "--data-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 2, status.stderr  # not everything is serving
        listed = json.loads(status.stdout)
        assert {name: (s["state"], s["health"]) for name, s in listed.items()} == {
            "vision": ("failed", "UNREACHABLE"),
            "knowledge": ("failed", "UNREACHABLE"),
            "report": ("serving", "SERVING"),
            "orchestrator": ("serving", "SERVING"),
        }
        assert listed["vision"]["restarts"] == 2 and listed["vision"]["last_exit"] == "exit code 1"
    finally:
        mesh.stop()


def test_chroma_server_killed_and_restarted_knowledge_degrades_then_recovers_without_a_restart(tmp_path):
    """Knowledge on a `chroma run` server (the cluster's shape): SIGKILL the server under load, start it again
    on the same directory. Diagnoses degrade meanwhile, knowledge heals without being restarted, no document
    is lost."""
    from copilot.agents.v1 import knowledge_pb2, knowledge_pb2_grpc
    from copilot_cli.launcher import free_port
    from tests.conftest import token
    from tests.integration.test_chroma_server import start_chroma

    chroma_port = free_port()
    chroma = start_chroma(tmp_path / "chroma-server", chroma_port)
    mesh = Mesh.on_free_ports(
        data_dir=tmp_path / "mesh",
        extra_env={
            "KNOWLEDGE_CHROMA_HOST": "127.0.0.1",
            "KNOWLEDGE_CHROMA_PORT": str(chroma_port),
            "ORCHESTRATOR_KNOWLEDGE_TIMEOUT_S": "3",
            "ORCHESTRATOR_RATE_LIMIT": "",
        },
    )
    mesh.start()
    try:
        mesh.wait_ready(timeout=300)
        mesh.supervise(RestartPolicy())
        admin = auth_metadata(token("admin"))

        def documents() -> list[tuple[str, str]]:
            with grpc.insecure_channel(mesh.address("knowledge")) as channel:
                listed = knowledge_pb2_grpc.KnowledgeServiceStub(channel).ListDocuments(
                    knowledge_pb2.ListDocumentsRequest(page_size=100), metadata=admin, timeout=30
                )
            return sorted((d.document_id, d.version) for d in listed.documents)

        before = documents()
        assert before
        with grpc.insecure_channel(mesh.address("orchestrator")) as channel:
            stub = copilot_pb2_grpc.CopilotServiceStub(channel)
            holder = {"chroma": chroma}

            def kill_and_restart():
                holder["chroma"].send_signal(signal.SIGKILL)
                holder["chroma"].wait(timeout=30)
                time.sleep(4)  # down for a while: diagnoses degrade
                holder["chroma"] = start_chroma(tmp_path / "chroma-server", chroma_port)

            outcomes = closed_loop(
                stub, kill_and_restart, clients=2, photos=False, until=lambda: full_text_health(stub), max_s=60
            )
            chroma = holder["chroma"]
            errors = [o.code for o in outcomes if o.code != grpc.StatusCode.OK]
            assert errors == [], errors[:5]
            assert any(o.stages[1] != OK for o in outcomes)  # knowledge degraded while Chroma was down
            assert full_text_health(stub)
            assert_every_answer_is_stored(stub, outcomes)
        assert mesh.supervisor.status["knowledge"].restarts == 0  # healed without a restart of its own
        assert documents() == before  # nothing lost
    finally:
        mesh.stop()
        chroma.terminate()
        chroma.wait(timeout=30)


def full_text_health(stub) -> bool:
    try:
        reply = stub.Diagnose(text_request(), metadata=TECHNICIAN, timeout=DEADLINE_S)
    except grpc.RpcError:
        return False
    return all(s.state in (OK, copilot_pb2.STAGE_STATE_SKIPPED) for s in reply.stages)
