"""CopilotService: the public gRPC edge. Authentication, admission and the protovalidate rules run in the
shared interceptors before these methods; here the image is checked, the workflow runs, and every diagnosis
is stored in the incident history (which also makes a Diagnose with a request_id idempotent)."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from datetime import datetime, timezone
from typing import AsyncIterator

import grpc
from google.rpc import code_pb2
from opentelemetry import trace

from copilot.domain import Diagnosis, FieldViolation, Guidance, IncidentReport, VisionFindings, as_utc
from copilot.images import ImageLimits, sniff_mime_type
from copilot.runtime import convert
from copilot.runtime.errors import abort_invalid
from copilot.runtime.interceptors import current_principal
from copilot.runtime.metrics import copilot_metrics
from copilot.runtime.pagination import decode_page_token, encode_page_token, invalid_page_token
from copilot.v1 import copilot_pb2, copilot_pb2_grpc
from services.orchestrator.history import (
    IncidentStore,
    RequestIdConflict,
    StoredFeedback,
    StoredIncident,
    fingerprint,
)
from services.orchestrator.validation import diagnosis_violations
from services.orchestrator.workflow import DiagnosisWorkflow, StageStarted

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

DEFAULT_PAGE_SIZE = 20



def _incident_cursor(token: str) -> tuple[datetime, str] | None:
    """(created_at, request_id) after which a ListIncidents page continues."""
    position = decode_page_token(token, "ListIncidents", 2)
    if position is None:
        return None
    try:
        return as_utc(datetime.fromisoformat(position[0])), str(position[1])
    except (TypeError, ValueError):
        return None

class DiagnosisRefused(Exception):
    """A diagnosis that cannot run (its request_id belongs to another request) or cannot be acknowledged (its
    incident could not be stored): its gRPC code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _feedback_pb(f: StoredFeedback) -> copilot_pb2.Feedback:
    return copilot_pb2.Feedback(helpful=f.helpful, resolution_notes=f.resolution_notes,
                                helpful_sop_ids=list(f.helpful_sop_ids), principal=f.principal,
                                submitted_at=convert.timestamp_to_pb(f.submitted_at))


def incident_to_pb(i: StoredIncident, *, full: bool = True) -> copilot_pb2.Incident:
    diagnosis = copilot_pb2.DiagnoseResponse.FromString(i.response)
    if not full:
        diagnosis.report.ClearField("rendered_text")
    return copilot_pb2.Incident(
        request_id=i.request_id, plant_id=i.plant_id, equipment_id=i.equipment_id, equipment_type=i.equipment_type,
        problem_description=i.problem_description, image_sha256=i.image_sha256, image_mime_type=i.image_mime_type,
        principal=i.principal, trace_id=i.trace_id, created_at=convert.timestamp_to_pb(i.created_at), diagnosis=diagnosis,
        feedback=[_feedback_pb(f) for f in i.feedback])


def event_to_pb(event) -> copilot_pb2.StreamDiagnoseResponse:
    if isinstance(event, StageStarted):
        return copilot_pb2.StreamDiagnoseResponse(
            request_id=event.request_id,
            stage_started=copilot_pb2.StageStarted(stage=convert.stage_to_pb(event.stage)))
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


class CopilotServicer(copilot_pb2_grpc.CopilotServiceServicer):
    def __init__(self, workflow: DiagnosisWorkflow, history: IncidentStore, *, image_limits: ImageLimits,
                 batch_max_items: int = 32, batch_concurrency: int = 4) -> None:
        self.workflow = workflow
        self.history = history
        self.image_limits = image_limits
        self.batch_max_items = batch_max_items
        self.batch_concurrency = batch_concurrency
        # request_id -> (input fingerprint, future answer) of the call running it
        self._running: dict[str, tuple[str, asyncio.Future]] = {}

    # --- the one diagnosis path -----------------------------------------------------------------

    @staticmethod
    def _replayed(response: copilot_pb2.DiagnoseResponse) -> copilot_pb2.DiagnoseResponse:
        copy = copilot_pb2.DiagnoseResponse()
        copy.CopyFrom(response)
        copy.replayed = True
        copilot_metrics().incidents_replayed.add(1)
        return copy

    @staticmethod
    def _conflict(request_id: str) -> DiagnosisRefused:
        return DiagnosisRefused(grpc.StatusCode.ALREADY_EXISTS,
                                f"request_id {request_id} was used for a different request")

    async def _events(self, request: copilot_pb2.DiagnoseRequest, deadline: float | None
                      ) -> AsyncIterator[copilot_pb2.StreamDiagnoseResponse]:
        """Stage events, then the final result; the diagnosis is stored before the result is sent.

        With a request_id the call is idempotent: while one call with that id runs, retries wait for its answer
        (the check-and-register below has no await in between, so exactly one call leads); afterwards the stored
        answer is replayed. A different request under a used id is ALREADY_EXISTS."""
        diagnosis_input = convert.diagnosis_input_from_pb(request)
        own_fingerprint = fingerprint(diagnosis_input)
        request_id = request.request_id
        while request_id and request_id in self._running:
            leader_fingerprint, leader = self._running[request_id]
            if leader_fingerprint != own_fingerprint:
                raise self._conflict(request_id)
            answer = await asyncio.shield(leader)
            if answer is not None:
                yield copilot_pb2.StreamDiagnoseResponse(request_id=request_id, result=self._replayed(answer))
                return
            # the leading call failed or was cancelled: the loop lets one waiter take over
        request_id = request_id or str(uuid.uuid4())
        outcome: asyncio.Future = asyncio.get_running_loop().create_future()  # the answer, or None if none came
        if request.request_id:
            self._running[request_id] = (own_fingerprint, outcome)
        try:
            stored = await asyncio.to_thread(self.history.get, request_id) if request.request_id else None
            if stored is not None:
                if stored.input_fingerprint != own_fingerprint:
                    raise self._conflict(request_id)
                answer = copilot_pb2.DiagnoseResponse.FromString(stored.response)
                outcome.set_result(answer)
                yield copilot_pb2.StreamDiagnoseResponse(request_id=request_id, result=self._replayed(answer))
                return
            principal = current_principal.get()
            trace.get_current_span().set_attributes({"app.request_id": request_id,
                                                     "app.principal": principal.subject if principal else ""})
            async for event in self.workflow.events(diagnosis_input, deadline=deadline, request_id=request_id):
                if isinstance(event, Diagnosis):
                    response = await self._store(request, diagnosis_input, own_fingerprint, event,
                                                 principal.subject if principal else "anonymous")
                    outcome.set_result(response)
                    yield copilot_pb2.StreamDiagnoseResponse(request_id=request_id, result=response)
                else:
                    yield event_to_pb(event)
        finally:
            if not outcome.done():
                outcome.set_result(None)
            if self._running.get(request_id, (None, None))[1] is outcome:
                del self._running[request_id]

    async def _store(self, request, diagnosis_input, input_fingerprint: str, diagnosis: Diagnosis, principal: str):
        response = convert.diagnosis_to_pb(diagnosis)
        image = diagnosis_input.image_data
        incident = StoredIncident(
            request_id=diagnosis.request_id, created_at=datetime.now(timezone.utc), plant_id=request.plant_id,
            equipment_id=request.equipment_id, equipment_type=request.equipment_type,
            problem_description=request.problem_description,
            image_sha256=hashlib.sha256(image).hexdigest() if image else "",
            image_mime_type=sniff_mime_type(image) or "" if image else "", principal=principal,
            trace_id=diagnosis.trace_id, confidence=diagnosis.confidence_score,
            requires_manual_review=diagnosis.requires_manual_review,
            referenced_sop_ids=tuple(diagnosis.report.referenced_sop_ids), response=response.SerializeToString(),
            input_fingerprint=input_fingerprint,
            stages=tuple({"stage": st.stage.value, "state": st.state.value, "error": st.error}
                         for st in diagnosis.stages))
        try:
            stored = await asyncio.to_thread(self.history.save, incident, image)
        except RequestIdConflict:  # another orchestrator replica stored a different request under this id
            raise self._conflict(request.request_id) from None
        except Exception as exc:  # noqa: BLE001 - any storage failure: nothing is acknowledged unstored
            # Policy: an answer is only sent once its incident is stored, so no acknowledged diagnosis is ever
            # missing from the history. UNAVAILABLE tells the caller to retry (with the same request_id).
            log.exception("could not store incident %s: refusing the answer", diagnosis.request_id)
            raise DiagnosisRefused(grpc.StatusCode.UNAVAILABLE,
                                   f"the incident history could not store this diagnosis ({type(exc).__name__}); "
                                   "nothing was recorded: retry, with the same request_id") from None
        if stored is not incident:  # a twin on another replica was stored first: answer what is stored
            return self._replayed(copilot_pb2.DiagnoseResponse.FromString(stored.response))
        return response

    @staticmethod
    def _deadline(context) -> float | None:
        remaining = context.time_remaining()
        return time.monotonic() + remaining if remaining is not None else None

    async def _diagnose_once(self, request, deadline) -> copilot_pb2.DiagnoseResponse:
        result = None
        async for event in self._events(request, deadline):
            if event.WhichOneof("event") == "result":
                result = event.result
        assert result is not None
        return result

    # --- RPCs -----------------------------------------------------------------------------------

    # The request rules, image checks included, ran in the ValidationInterceptor before these methods.

    async def Diagnose(self, request: copilot_pb2.DiagnoseRequest, context) -> copilot_pb2.DiagnoseResponse:
        try:
            return await self._diagnose_once(request, self._deadline(context))
        except DiagnosisRefused as refused:
            await context.abort(refused.code, refused.message)

    async def StreamDiagnose(self, request: copilot_pb2.StreamDiagnoseRequest, context):
        try:
            async for event in self._events(request.diagnosis, self._deadline(context)):
                yield event
        except DiagnosisRefused as refused:
            await context.abort(refused.code, refused.message)

    async def DiagnoseBatch(self, request: copilot_pb2.DiagnoseBatchRequest, context):
        if len(request.requests) > self.batch_max_items:
            await abort_invalid(context, [FieldViolation(
                "requests", f"has {len(request.requests)} items; this server takes at most {self.batch_max_items}")])
        deadline = self._deadline(context)
        gate = asyncio.Semaphore(self.batch_concurrency)

        async def one(index: int, item: copilot_pb2.DiagnoseRequest) -> copilot_pb2.DiagnoseBatchItem:
            violations = diagnosis_violations(item, self.image_limits)
            if violations:
                return copilot_pb2.DiagnoseBatchItem(
                    index=index, code=code_pb2.INVALID_ARGUMENT, message="invalid request",
                    field_violations=[copilot_pb2.FieldViolation(field=v.field, description=v.description)
                                      for v in violations])
            async with gate:
                try:
                    response = await self._diagnose_once(item, deadline)
                except DiagnosisRefused as refused:
                    return copilot_pb2.DiagnoseBatchItem(index=index, code=refused.code.value[0], message=refused.message)
                except Exception as exc:  # noqa: BLE001 - one item's failure stays that item's
                    log.exception("batch item %d failed", index)
                    return copilot_pb2.DiagnoseBatchItem(index=index, code=code_pb2.INTERNAL,
                                                         message=f"internal error: {type(exc).__name__}")
            return copilot_pb2.DiagnoseBatchItem(index=index, code=code_pb2.OK, response=response)

        items = await asyncio.gather(*(one(i, item) for i, item in enumerate(request.requests)))
        ok = sum(1 for item in items if item.code == code_pb2.OK)
        return copilot_pb2.DiagnoseBatchResponse(items=items, succeeded=ok, failed=len(items) - ok)

    async def GetIncident(self, request: copilot_pb2.GetIncidentRequest, context):
        stored = await asyncio.to_thread(self.history.get, request.request_id)
        if stored is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no incident {request.request_id}")
        return copilot_pb2.GetIncidentResponse(incident=incident_to_pb(stored))

    async def ListIncidents(self, request: copilot_pb2.ListIncidentsRequest, context):
        after = None
        if request.page_token:
            after = _incident_cursor(request.page_token)
            if after is None:
                await abort_invalid(context, [invalid_page_token("ListIncidents")])
        bounds, violations = {}, []
        for name in ("start_time", "end_time"):
            if request.HasField(name):
                try:
                    bounds[name] = getattr(request, name).ToDatetime(timezone.utc)
                except (ValueError, OverflowError):
                    violations.append(FieldViolation(name, "is outside the timestamps years 1 to 9999 can hold"))
        if violations:
            await abort_invalid(context, violations)
        start, end = bounds.get("start_time"), bounds.get("end_time")
        page, following = await asyncio.to_thread(
            self.history.list, plant_id=request.plant_id, equipment_id=request.equipment_id, start=start, end=end,
            limit=request.page_size or DEFAULT_PAGE_SIZE, after=after)
        return copilot_pb2.ListIncidentsResponse(
            incidents=[incident_to_pb(i, full=False) for i in page],
            next_page_token=encode_page_token("ListIncidents", as_utc(following[0]).isoformat(), following[1])
            if following else "")

    async def SubmitFeedback(self, request: copilot_pb2.SubmitFeedbackRequest, context):
        principal = current_principal.get()
        feedback = StoredFeedback(helpful=request.helpful, resolution_notes=request.resolution_notes,
                                  helpful_sop_ids=tuple(dict.fromkeys(request.helpful_sop_ids)),
                                  principal=principal.subject if principal else "anonymous",
                                  submitted_at=datetime.now(timezone.utc))
        if not await asyncio.to_thread(self.history.add_feedback, request.request_id, feedback):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no incident {request.request_id}")
        return copilot_pb2.SubmitFeedbackResponse(feedback=_feedback_pb(feedback))
