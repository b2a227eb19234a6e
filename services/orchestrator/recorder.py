"""Diagnoses run at most once per request_id and recorded before they are answered, apart from the gRPC edge
(testable with a workflow and a store, no server). The servicer maps the two refusals to status codes."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator

from opentelemetry import trace

from copilot.domain import Diagnosis, DiagnosisInput, Guidance, IncidentReport, VisionFindings, utc_now
from copilot.images import sniff_mime_type
from copilot.runtime import convert
from copilot.runtime.metrics import copilot_metrics
from copilot.v1 import copilot_pb2
from services.orchestrator.history import IncidentStore, RequestIdConflict, StoredIncident, fingerprint
from services.orchestrator.workflow import DiagnosisWorkflow, StageFinished, StageStarted

log = logging.getLogger(__name__)


class RequestIdReused(Exception):
    """The request_id names a different request (ALREADY_EXISTS at the edge)."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"request_id {request_id} was used for a different request")
        self.request_id = request_id


class IncidentNotStored(Exception):
    """The diagnosis ran but could not be stored, so it is not answered (UNAVAILABLE at the edge: retry with
    the same request_id)."""

    def __init__(self, request_id: str, cause: str) -> None:
        super().__init__(
            f"the incident history could not store this diagnosis ({cause}); nothing was recorded: "
            "retry, with the same request_id"
        )
        self.request_id = request_id


def event_to_pb(event: StageStarted | StageFinished) -> copilot_pb2.StreamDiagnoseResponse:
    if isinstance(event, StageStarted):
        return copilot_pb2.StreamDiagnoseResponse(
            request_id=event.request_id, stage_started=copilot_pb2.StageStarted(stage=convert.stage_to_pb(event.stage))
        )
    finished = copilot_pb2.StageFinished(status=convert.stage_status_to_pb(event.status))
    result = event.result
    if isinstance(result, VisionFindings):
        finished.defects.extend(convert.defect_to_pb(d) for d in result.defects)
    elif isinstance(result, Guidance):
        finished.guidance.extend(convert.step_to_pb(s) for s in result.steps)
        finished.citations.extend(convert.citation_to_pb(c) for c in result.citations)
    elif isinstance(result, IncidentReport):
        finished.report.CopyFrom(convert.report_to_pb(result))
    return copilot_pb2.StreamDiagnoseResponse(request_id=event.request_id, stage_finished=finished)


class DiagnosisRecorder:
    """The one diagnosis path of Diagnose, StreamDiagnose and DiagnoseBatch."""

    def __init__(self, workflow: DiagnosisWorkflow, history: IncidentStore) -> None:
        self.workflow = workflow
        self.history = history
        # request_id -> (input fingerprint, future answer) of the call running it
        self._running: dict[str, tuple[str, asyncio.Future[copilot_pb2.DiagnoseResponse | None]]] = {}

    @staticmethod
    def _replayed(response: copilot_pb2.DiagnoseResponse) -> copilot_pb2.DiagnoseResponse:
        copy = copilot_pb2.DiagnoseResponse()
        copy.CopyFrom(response)
        copy.replayed = True
        copilot_metrics().incidents_replayed.add(1)
        return copy

    async def events(
        self,
        request: copilot_pb2.DiagnoseRequest,
        deadline: float | None,
        principal: str,
        *,
        stage_events: bool = True,
    ) -> AsyncIterator[copilot_pb2.StreamDiagnoseResponse]:
        """Stage events (unless `stage_events` is False: a unary call has no use for them), then the final
        result; the diagnosis is stored before the result is sent.

        With a request_id the call is idempotent: while one call with that id runs, retries wait for its answer
        (the check-and-register below has no await in between, so exactly one call leads); afterwards the stored
        answer is replayed. A different request under a used id is ALREADY_EXISTS."""
        diagnosis_input = convert.diagnosis_input_from_pb(request)
        own_fingerprint = fingerprint(diagnosis_input)
        request_id = request.request_id
        while request_id and request_id in self._running:
            leader_fingerprint, leader = self._running[request_id]
            if leader_fingerprint != own_fingerprint:
                raise RequestIdReused(request_id)
            answer = await asyncio.shield(leader)
            if answer is not None:
                yield copilot_pb2.StreamDiagnoseResponse(request_id=request_id, result=self._replayed(answer))
                return
            # the leading call failed or was cancelled: the loop lets one waiter take over
        request_id = request_id or str(uuid.uuid4())
        outcome: asyncio.Future[copilot_pb2.DiagnoseResponse | None] = (
            asyncio.get_running_loop().create_future()
        )  # the answer, or None if none came
        if request.request_id:
            self._running[request_id] = (own_fingerprint, outcome)
        try:
            stored = await asyncio.to_thread(self.history.get, request_id) if request.request_id else None
            if stored is not None:
                if stored.input_fingerprint != own_fingerprint:
                    raise RequestIdReused(request_id)
                answer = copilot_pb2.DiagnoseResponse.FromString(stored.response)
                outcome.set_result(answer)
                yield copilot_pb2.StreamDiagnoseResponse(request_id=request_id, result=self._replayed(answer))
                return
            trace.get_current_span().set_attributes({"app.request_id": request_id, "app.principal": principal})
            async for event in self.workflow.events(diagnosis_input, deadline=deadline, request_id=request_id):
                if isinstance(event, Diagnosis):
                    response = await self._store(request, diagnosis_input, own_fingerprint, event, principal)
                    outcome.set_result(response)
                    yield copilot_pb2.StreamDiagnoseResponse(request_id=request_id, result=response)
                elif stage_events:
                    yield event_to_pb(event)
        finally:
            if not outcome.done():
                outcome.set_result(None)
            if self._running.get(request_id, (None, None))[1] is outcome:
                del self._running[request_id]

    async def _store(
        self,
        request: copilot_pb2.DiagnoseRequest,
        diagnosis_input: DiagnosisInput,
        input_fingerprint: str,
        diagnosis: Diagnosis,
        principal: str,
    ) -> copilot_pb2.DiagnoseResponse:
        response = convert.diagnosis_to_pb(diagnosis)
        image = diagnosis_input.image_data
        incident = StoredIncident(
            request_id=diagnosis.request_id,
            created_at=utc_now(),
            plant_id=request.plant_id,
            equipment_id=request.equipment_id,
            equipment_type=request.equipment_type,
            problem_description=request.problem_description,
            image_sha256=hashlib.sha256(image).hexdigest() if image else "",
            image_mime_type=sniff_mime_type(image) or "" if image else "",
            principal=principal,
            trace_id=diagnosis.trace_id,
            confidence=diagnosis.confidence_score,
            requires_manual_review=diagnosis.requires_manual_review,
            referenced_sop_ids=tuple(diagnosis.report.referenced_sop_ids),
            response=response.SerializeToString(),
            input_fingerprint=input_fingerprint,
            stages=tuple(
                {"stage": st.stage.value, "state": st.state.value, "error": st.error} for st in diagnosis.stages
            ),
        )
        try:
            stored = await asyncio.to_thread(self.history.save, incident, image)
        except RequestIdConflict:  # another orchestrator replica stored a different request under this id
            raise RequestIdReused(request.request_id) from None
        except Exception as exc:
            # Policy: an answer is only sent once its incident is stored, so no acknowledged diagnosis is ever
            # missing from the history. UNAVAILABLE tells the caller to retry (with the same request_id).
            log.exception("could not store incident %s: refusing the answer", diagnosis.request_id)
            copilot_metrics().incident_store_failures.add(1)
            raise IncidentNotStored(diagnosis.request_id, type(exc).__name__) from None
        if stored is not incident:  # a twin on another replica was stored first: answer what is stored
            return self._replayed(copilot_pb2.DiagnoseResponse.FromString(stored.response))
        return response

    async def diagnose(
        self, request: copilot_pb2.DiagnoseRequest, deadline: float | None, principal: str
    ) -> copilot_pb2.DiagnoseResponse:
        result = None
        async for event in self.events(request, deadline, principal, stage_events=False):
            if event.WhichOneof("event") == "result":
                result = event.result
        if result is None:
            raise AssertionError("the workflow always ends with a Diagnosis")
        return result
