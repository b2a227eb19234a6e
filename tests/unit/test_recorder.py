"""DiagnosisRecorder without a server: at most one run per request_id, nothing answered that is not stored."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from copilot.domain import DiagnosisInput
from copilot.runtime import convert
from copilot.v1 import copilot_pb2
from services.orchestrator.history import IncidentStore
from services.orchestrator.recorder import Answer, DiagnosisRecorder, IncidentNotStored, RequestIdReused
from services.orchestrator.workflow import DiagnosisWorkflow
from tests.fakes import FakeAgents


def _request(problem: str = "Spindle vibration and chatter marks on parts") -> DiagnosisInput:
    return DiagnosisInput(plant_id="PUNE-IN", equipment_id="CNC-A-102", problem_description=problem)


def _recorder(agents: FakeAgents, store: IncidentStore) -> DiagnosisRecorder:
    return DiagnosisRecorder(DiagnosisWorkflow(agents), store, encode=convert.diagnosis_to_bytes)


def _report_text(answer: Answer) -> str:
    return copilot_pb2.DiagnoseResponse.FromString(answer.response).report.rendered_text


def _runs(agents: FakeAgents) -> int:
    return sum(1 for name, _timeout in agents.calls if name == "knowledge")


@pytest.fixture
def store(tmp_path):
    history = IncidentStore(f"sqlite:///{tmp_path / 'incidents.db'}")
    yield history
    history.close()


async def test_concurrent_calls_with_one_request_id_run_the_workflow_once_and_share_the_stored_answer(store):
    agents = FakeAgents(delay_s=0.2)
    recorder = _recorder(agents, store)
    first, second, third = await asyncio.gather(
        *(recorder.diagnose(_request(), "cmms-1", None, "tech-1") for _ in range(3))
    )
    assert _runs(agents) == 1
    assert [first.replayed, second.replayed, third.replayed].count(False) == 1
    assert _report_text(first) == _report_text(second) == _report_text(third) != ""
    stored = store.get("cmms-1")
    assert stored is not None and stored.principal == "tech-1"
    later = await recorder.diagnose(_request(), "cmms-1", None, "tech-2")
    assert later.replayed and _runs(agents) == 1


async def test_a_different_request_under_a_used_id_is_refused(store):
    recorder = _recorder(FakeAgents(), store)
    await recorder.diagnose(_request(), "cmms-1", None, "tech-1")
    with pytest.raises(RequestIdReused):
        await recorder.diagnose(
            _request(problem="Hydraulic oil dripping from a hose fitting"), "cmms-1", None, "tech-1"
        )


async def test_an_answer_that_cannot_be_stored_is_not_given_and_a_retry_runs_again(store, monkeypatch):
    agents = FakeAgents()
    recorder = _recorder(agents, store)
    real_save = store.save

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(store, "save", disk_full)
    with pytest.raises(IncidentNotStored, match="OSError"):
        await recorder.diagnose(_request(), "cmms-1", None, "tech-1")
    assert store.get("cmms-1") is None
    monkeypatch.setattr(store, "save", real_save)
    answer = await recorder.diagnose(_request(), "cmms-1", None, "tech-1")
    assert not answer.replayed and store.get("cmms-1") is not None
    assert _runs(agents) == 2


async def test_a_diagnosis_closes_its_workflow_in_its_own_call(store, caplog):
    """diagnose() consumes the stream to its end: the workflow's span context is left in the call that entered it.
    Returning at the Answer left the generators suspended; asyncio closed them later from another context, and
    OpenTelemetry logged "Failed to detach context" for every diagnosis (its span ended whenever that happened)."""
    recorder = _recorder(FakeAgents(), store)
    with caplog.at_level(logging.ERROR, logger="opentelemetry.context"):
        for n in range(3):
            await recorder.diagnose(_request(), f"cmms-span-{n}", None, "tech-1")
        for _ in range(5):  # let asyncio finalise any generator left open
            await asyncio.sleep(0)
        gc.collect()
        await asyncio.sleep(0)
    assert not [r for r in caplog.records if "detach" in r.getMessage()]
