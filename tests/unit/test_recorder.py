"""DiagnosisRecorder without a server: at most one run per request_id, nothing answered that is not stored."""

from __future__ import annotations

import asyncio

import pytest

from copilot.v1 import copilot_pb2
from services.orchestrator.history import IncidentStore
from services.orchestrator.recorder import DiagnosisRecorder, IncidentNotStored, RequestIdReused
from services.orchestrator.workflow import DiagnosisWorkflow
from tests.fakes import FakeAgents


def _request(request_id: str = "cmms-1", problem: str = "Spindle vibration and chatter marks on parts"):
    return copilot_pb2.DiagnoseRequest(
        plant_id="PUNE-IN", equipment_id="CNC-A-102", problem_description=problem, request_id=request_id
    )


def _runs(agents: FakeAgents) -> int:
    return sum(1 for name, _timeout in agents.calls if name == "knowledge")


@pytest.fixture
def store(tmp_path):
    history = IncidentStore(f"sqlite:///{tmp_path / 'incidents.db'}")
    yield history
    history.close()


async def test_concurrent_calls_with_one_request_id_run_the_workflow_once_and_share_the_stored_answer(store):
    agents = FakeAgents(delay_s=0.2)
    recorder = DiagnosisRecorder(DiagnosisWorkflow(agents), store)
    first, second, third = await asyncio.gather(*(recorder.diagnose(_request(), None, "tech-1") for _ in range(3)))
    assert _runs(agents) == 1
    assert [first.replayed, second.replayed, third.replayed].count(False) == 1
    assert first.report.rendered_text == second.report.rendered_text == third.report.rendered_text
    stored = store.get("cmms-1")
    assert stored is not None and stored.principal == "tech-1"
    later = await recorder.diagnose(_request(), None, "tech-2")
    assert later.replayed and _runs(agents) == 1


async def test_a_different_request_under_a_used_id_is_refused(store):
    recorder = DiagnosisRecorder(DiagnosisWorkflow(FakeAgents()), store)
    await recorder.diagnose(_request(), None, "tech-1")
    with pytest.raises(RequestIdReused):
        await recorder.diagnose(_request(problem="Hydraulic oil dripping from a hose fitting"), None, "tech-1")


async def test_an_answer_that_cannot_be_stored_is_not_given_and_a_retry_runs_again(store, monkeypatch):
    agents = FakeAgents()
    recorder = DiagnosisRecorder(DiagnosisWorkflow(agents), store)
    real_save = store.save

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(store, "save", disk_full)
    with pytest.raises(IncidentNotStored, match="OSError"):
        await recorder.diagnose(_request(), None, "tech-1")
    assert store.get("cmms-1") is None
    monkeypatch.setattr(store, "save", real_save)
    answer = await recorder.diagnose(_request(), None, "tech-1")
    assert not answer.replayed and store.get("cmms-1") is not None
    assert _runs(agents) == 2
