"""Two orchestrator processes on one PostgreSQL behind one set of agents, as the prod overlay runs them: one request
id over both replicas is one incident; a replica SIGKILLed mid-diagnosis costs the caller nothing but a retry on the
other, answered once; and the autoscaler's load metric (calls in flight per pod, prometheus-adapter's query from
deploy/k8s/components/in-flight-autoscaling) read through a real Prometheus scraping both replicas equals what
each replica reports itself. Work is held in flight by construction (the knowledge agent SIGSTOPped), never by
assuming the machine is slow; every wait polls for a state with a generous bound."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import threading
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import yaml

from copilot import monitoring
from copilot.client import CHANNEL_OPTIONS, auth_metadata, diagnose_request
from copilot.v1 import copilot_pb2, copilot_pb2_grpc
from copilot_cli.launcher import Mesh, ServiceProcess, free_port, free_ports
from tests.conftest import wait_for
from tests.integration.test_history_stores import postgres_url  # noqa: F401 - the module's PostgreSQL fixture

pytestmark = pytest.mark.integration

ADAPTER_RULES = "deploy/k8s/components/in-flight-autoscaling/adapter-rules.yaml"
TECHNICIAN = auth_metadata("technician-fleet")
REPLICAS = ("orchestrator", "orchestrator-2")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, postgres_url):  # noqa: F811 - the imported fixture
    """The local mesh (four processes) on PostgreSQL, plus a second orchestrator process on the same database."""
    tmp = tmp_path_factory.mktemp("fleet")
    mesh = Mesh.on_free_ports(
        data_dir=tmp / "mesh",
        extra_env={
            "ORCHESTRATOR_DATABASE_URL": postgres_url,
            "ORCHESTRATOR_RATE_LIMIT": "",
            # a stopped knowledge agent holds a diagnosis for this long: the in-flight window the tests use
            "ORCHESTRATOR_KNOWLEDGE_TIMEOUT_S": "60",
        },
    )
    mesh.start()
    port, metrics_port = free_ports(2)
    env = {**mesh._env("orchestrator"), "ORCHESTRATOR_PORT": str(port), "ORCHESTRATOR_METRICS_PORT": str(metrics_port)}
    mesh.ports["orchestrator-2"], mesh.metrics_ports["orchestrator-2"] = port, metrics_port
    second = ServiceProcess("orchestrator-2", port, env, mesh.data_dir / "logs" / "orchestrator-2.log")
    second.spawn()
    mesh.services["orchestrator-2"] = second
    try:
        mesh.wait_ready(timeout=300)
        yield mesh
    finally:
        if mesh.services["knowledge"].alive:
            mesh.services["knowledge"].handle.send_signal(signal.SIGCONT)
        mesh.stop()


def stub(mesh: Mesh, name: str) -> copilot_pb2_grpc.CopilotServiceStub:
    return copilot_pb2_grpc.CopilotServiceStub(grpc.insecure_channel(mesh.address(name), options=CHANNEL_OPTIONS))


def incidents_of(mesh: Mesh, equipment: str) -> list:
    reply = stub(mesh, "orchestrator-2").ListIncidents(
        copilot_pb2.ListIncidentsRequest(equipment_id=equipment), metadata=TECHNICIAN, timeout=10
    )
    return list(reply.incidents)


def test_one_request_id_sent_to_both_replicas_at_once_is_one_incident(fleet):
    request = diagnose_request("PUNE-IN", "CNC-FLEET-1", "Spindle overheating during the shift", request_id="fleet-1")
    stubs = [stub(fleet, name) for name in REPLICAS]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda i: stubs[i % 2].Diagnose(request, metadata=TECHNICIAN, timeout=60), range(12)))
    assert len({a.report.SerializeToString(deterministic=True) for a in answers}) == 1
    assert answers[0].report.ByteSize() > 0
    assert sum(not a.replayed for a in answers) == 1  # one diagnosis ran; the other eleven were its replay
    assert [i.request_id for i in incidents_of(fleet, "CNC-FLEET-1")] == ["fleet-1"]


def test_a_replica_killed_mid_diagnosis_then_the_retry_on_the_other_is_answered_once(fleet):
    request = diagnose_request("PUNE-IN", "CNC-FLEET-2", "Coolant pump noise and vibration", request_id="fleet-2")
    fleet.services["knowledge"].handle.send_signal(signal.SIGSTOP)  # the diagnosis cannot finish while stopped
    stream = stub(fleet, "orchestrator").StreamDiagnose(
        copilot_pb2.StreamDiagnoseRequest(diagnosis=request), metadata=TECHNICIAN, timeout=120
    )
    try:
        first = next(stream)
        assert first.WhichOneof("event") == "stage_started"  # in flight on the first replica
        fleet.services["orchestrator"].handle.send_signal(signal.SIGKILL)
        fleet.services["orchestrator"].handle.wait(timeout=30)
        with pytest.raises(grpc.RpcError) as lost:
            list(stream)
        assert lost.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        fleet.services["knowledge"].handle.send_signal(signal.SIGCONT)
    # the caller retries the same request id on the other replica
    answer = stub(fleet, "orchestrator-2").Diagnose(request, metadata=TECHNICIAN, timeout=90)
    again = stub(fleet, "orchestrator-2").Diagnose(request, metadata=TECHNICIAN, timeout=90)
    assert answer.report.ByteSize() > 0 and again.replayed and again.report == answer.report
    assert [i.request_id for i in incidents_of(fleet, "CNC-FLEET-2")] == ["fleet-2"]
    fleet.services["orchestrator"].spawn()  # back for the next test
    fleet.wait_ready(timeout=300, names=["orchestrator"])


def own_in_flight(mesh: Mesh, name: str) -> float:
    """What one replica reports on its own /metrics: calls in flight, health streams left out (as the query)."""
    with urllib.request.urlopen(mesh.metrics_url(name), timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("copilot_rpc_in_flight{") and "grpc.health.v1.Health" not in line
    )


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed (make install); NOT a pass")
def test_the_autoscalers_in_flight_metric_per_replica_equals_what_each_replica_reports(fleet, tmp_path):
    from pathlib import Path

    rule = yaml.safe_load(yaml.safe_load((Path(__file__).parents[2] / ADAPTER_RULES).read_text())["data"]["rules.yaml"])
    (adapter,) = rule["rules"]
    series = adapter["seriesQuery"].split("{")[0]
    # prometheus-adapter fills in the pods' labels; here a replica is a scrape target (job, instance)
    query = (
        adapter["metricsQuery"]
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", 'job="copilot-orchestrator"')
        .replace("<<.GroupBy>>", "instance")
    )
    targets = {"orchestrator": [f"127.0.0.1:{fleet.metrics_ports[name]}" for name in REPLICAS]}
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(monitoring.scrape_config(targets, rule_files=[], interval="1s")))
    port = free_port()
    prometheus = subprocess.Popen(
        [
            shutil.which("prometheus") or "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    held = {"orchestrator": 3, "orchestrator-2": 5}
    calls: list[threading.Thread] = []
    fleet.services["knowledge"].handle.send_signal(signal.SIGSTOP)  # every diagnosis below waits on it
    try:
        for name, count in held.items():
            for i in range(count):
                request = diagnose_request("PUNE-IN", "CNC-FLEET-3", f"Spindle overheating, call {name} {i}")
                call = threading.Thread(
                    target=lambda r=request, n=name: _quietly(
                        lambda: stub(fleet, n).Diagnose(r, metadata=TECHNICIAN, timeout=90)
                    ),
                )
                call.start()
                calls.append(call)
        for name, count in held.items():
            wait_for(lambda n=name, c=count: own_in_flight(fleet, n) == c, f"{name} reports {count} in flight")

        def by_instance() -> dict[str, float] | None:
            url = f"http://127.0.0.1:{port}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    result = json.loads(response.read())["data"]["result"]
            except OSError:
                return None
            found = {r["metric"]["instance"]: float(r["value"][1]) for r in result}
            expected = {f"127.0.0.1:{fleet.metrics_ports[n]}": float(c) for n, c in held.items()}
            return found if found == expected else None

        seen = wait_for(by_instance, "Prometheus reads each replica's own in-flight figure")
        assert {n: own_in_flight(fleet, n) for n in held} == {n: float(c) for n, c in held.items()}
        assert sorted(seen.values()) == [3.0, 5.0]
    finally:
        fleet.services["knowledge"].handle.send_signal(signal.SIGCONT)
        for call in calls:
            call.join(timeout=120)
        prometheus.terminate()
        prometheus.wait(timeout=30)


def _quietly(call) -> None:
    with contextlib.suppress(grpc.RpcError):  # the figure under test is the calls in flight, not their outcome
        call()
