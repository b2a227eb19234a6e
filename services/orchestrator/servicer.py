"""CopilotService: the public gRPC edge. Authentication, admission and the protovalidate rules run in the
shared interceptors before these methods; here the image is checked, the workflow runs, and every diagnosis
is stored in the incident history (which also makes a Diagnose with a request_id idempotent)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import NoReturn

import grpc
from google.rpc import code_pb2, status_pb2
from opentelemetry import trace

from copilot.domain import FieldViolation, as_utc, utc_now
from copilot.images import ImageLimits
from copilot.runtime import convert
from copilot.runtime.errors import Reason, abort_invalid, abort_with, bad_request_message, status_message
from copilot.runtime.interceptors import Context, current_principal, current_trace_id
from copilot.runtime.pagination import decode_page_token, encode_page_token, invalid_page_token, page_size
from copilot.v1 import copilot_pb2, copilot_pb2_grpc
from services.orchestrator.clients import AgentCatalog
from services.orchestrator.history import (
    IncidentStore,
    StoredFeedback,
    StoredIncident,
)
from services.orchestrator.recorder import Answer, DiagnosisRecorder, IncidentNotStored, RequestIdReused
from services.orchestrator.validation import diagnosis_violations
from services.orchestrator.workflow import DiagnosisWorkflow

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

DEFAULT_PAGE_SIZE = 20


MAX_PAGE_SIZE = 100


def _incident_filters(request: copilot_pb2.ListIncidentsRequest) -> dict[str, str]:
    """What a ListIncidents page token is bound to: the same filters or INVALID_ARGUMENT (AIP-158)."""
    return {
        "plant_id": request.plant_id,
        "equipment_id": request.equipment_id,
        # raw seconds.nanos: a timestamp out of range is refused later, with its field, not here
        "start_time": f"{request.start_time.seconds}.{request.start_time.nanos}"
        if request.HasField("start_time")
        else "",
        "end_time": f"{request.end_time.seconds}.{request.end_time.nanos}" if request.HasField("end_time") else "",
    }


def _incident_cursor(token: str, filters: dict[str, str]) -> tuple[datetime, str] | None:
    """(created_at, request_id) after which a ListIncidents page continues."""
    position = decode_page_token(token, "ListIncidents", 2, filters=filters)
    if position is None:
        return None
    try:
        return as_utc(datetime.fromisoformat(position[0])), str(position[1])
    except (TypeError, ValueError, OverflowError):  # a crafted token (year 9999 at -14:00) is invalid, not INTERNAL
        return None


_VERDICTS = {
    "helpful": copilot_pb2.VERDICT_HELPFUL,
    "not_helpful": copilot_pb2.VERDICT_NOT_HELPFUL,
    "unspecified": copilot_pb2.VERDICT_UNSPECIFIED,
}


def _verdict(request: copilot_pb2.SubmitFeedbackRequest) -> str:
    """The verdict, when set (VERDICT_UNSPECIFIED: not said); else, from a client of an earlier release, the
    deprecated bool as it always meant."""
    if not request.HasField("verdict"):
        return "helpful" if request.helpful else "not_helpful"
    return {copilot_pb2.VERDICT_HELPFUL: "helpful", copilot_pb2.VERDICT_NOT_HELPFUL: "not_helpful"}.get(
        request.verdict, "unspecified"
    )


def _feedback_pb(f: StoredFeedback) -> copilot_pb2.Feedback:
    return copilot_pb2.Feedback(
        helpful=f.said == "helpful",
        resolution_notes=f.resolution_notes,
        helpful_sop_ids=list(f.helpful_sop_ids),
        principal=f.principal,
        submitted_at=convert.timestamp_to_pb(f.submitted_at),
        verdict=_VERDICTS[f.said],
        feedback_id=f.feedback_id,
    )


def incident_to_pb(i: StoredIncident, *, full: bool = True) -> copilot_pb2.Incident:
    diagnosis = copilot_pb2.DiagnoseResponse.FromString(i.response)
    if not full:
        diagnosis.report.ClearField("rendered_text")
    return copilot_pb2.Incident(
        request_id=i.request_id,
        plant_id=i.plant_id,
        equipment_id=i.equipment_id,
        equipment_type=i.equipment_type,
        problem_description=i.problem_description,
        image_sha256=i.image_sha256,
        image_mime_type=i.image_mime_type,
        principal=i.principal,
        trace_id=i.trace_id,
        created_at=convert.timestamp_to_pb(i.created_at),
        diagnosis=diagnosis,
        feedback=[_feedback_pb(f) for f in i.feedback],
    )


def _response(answer: Answer) -> copilot_pb2.DiagnoseResponse:
    """The stored answer as sent: `replayed` when an earlier call stored it."""
    response = copilot_pb2.DiagnoseResponse.FromString(answer.response)
    response.replayed = answer.replayed
    return response


def _principal() -> str:
    principal = current_principal.get()
    return principal.subject if principal else "anonymous"


def _refusal(refused: RequestIdReused | IncidentNotStored) -> tuple[grpc.StatusCode, Reason]:
    """A diagnosis the history refused, as a call's error or a batch item's outcome."""
    if isinstance(refused, RequestIdReused):
        return grpc.StatusCode.ALREADY_EXISTS, Reason.REQUEST_ID_REUSED
    return grpc.StatusCode.UNAVAILABLE, Reason.INCIDENT_NOT_STORED


async def _refuse(context: Context, refused: RequestIdReused | IncidentNotStored, request_id: str) -> NoReturn:
    await abort_with(context, *_refusal(refused), str(refused), metadata={"request_id": request_id})


async def _no_incident(context: Context, request_id: str) -> NoReturn:
    await abort_with(
        context,
        grpc.StatusCode.NOT_FOUND,
        Reason.INCIDENT_NOT_FOUND,
        f"no incident {request_id}",
        metadata={"request_id": request_id},
    )


class CopilotServicer(copilot_pb2_grpc.CopilotServiceServicer):
    def __init__(
        self,
        workflow: DiagnosisWorkflow,
        history: IncidentStore,
        *,
        image_limits: ImageLimits,
        batch_max_items: int = 32,
        batch_concurrency: int = 4,
        catalog: AgentCatalog | None = None,
        feedback_max_per_incident: int = 20,
    ) -> None:
        self.workflow = workflow
        self.catalog = catalog
        self.feedback_max_per_incident = feedback_max_per_incident
        self.history = history
        self.image_limits = image_limits
        self.batch_max_items = batch_max_items
        self.batch_concurrency = batch_concurrency
        self.recorder = DiagnosisRecorder(workflow, history, encode=convert.diagnosis_to_bytes)

    @staticmethod
    def _deadline(context) -> float | None:
        remaining = context.time_remaining()
        return time.monotonic() + remaining if remaining is not None else None

    # --- RPCs -----------------------------------------------------------------------------------

    # The request rules, image checks included, ran in the ValidationInterceptor before these methods.

    async def Diagnose(self, request: copilot_pb2.DiagnoseRequest, context: Context) -> copilot_pb2.DiagnoseResponse:
        try:
            answer = await self.recorder.diagnose(
                convert.diagnosis_input_from_pb(request), request.request_id, self._deadline(context), _principal()
            )
        except (RequestIdReused, IncidentNotStored) as refused:
            await _refuse(context, refused, request.request_id)
        return _response(answer)

    async def StreamDiagnose(
        self, request: copilot_pb2.StreamDiagnoseRequest, context: Context
    ) -> AsyncIterator[copilot_pb2.StreamDiagnoseResponse]:
        diagnosis = request.diagnosis
        events = self.recorder.events(
            convert.diagnosis_input_from_pb(diagnosis), diagnosis.request_id, self._deadline(context), _principal()
        )
        try:
            async for event in events:
                if isinstance(event, Answer):
                    yield copilot_pb2.StreamDiagnoseResponse(request_id=event.request_id, result=_response(event))
                else:
                    yield convert.stage_event_to_pb(event)
        except (RequestIdReused, IncidentNotStored) as refused:
            await _refuse(context, refused, request.diagnosis.request_id)

    async def DiagnoseBatch(self, request: copilot_pb2.DiagnoseBatchRequest, context: Context):
        if len(request.requests) > self.batch_max_items:
            await abort_invalid(
                context,
                [
                    FieldViolation(
                        "requests",
                        f"has {len(request.requests)} items; this server takes at most {self.batch_max_items}",
                    )
                ],
            )
        deadline = self._deadline(context)
        principal = _principal()
        gate = asyncio.Semaphore(self.batch_concurrency)

        def failed(index: int, status: status_pb2.Status, violations=()) -> copilot_pb2.DiagnoseBatchItem:
            # the deprecated code / message / field_violations stay filled for clients of earlier releases
            return copilot_pb2.DiagnoseBatchItem(
                index=index,
                code=status.code,
                message=status.message,
                field_violations=[
                    copilot_pb2.FieldViolation(field=v.field, description=v.description) for v in violations
                ],
                status=status,
            )

        async def one(index: int, item: copilot_pb2.DiagnoseRequest) -> copilot_pb2.DiagnoseBatchItem:
            violations = diagnosis_violations(item, self.image_limits)
            if violations:
                return failed(index, bad_request_message(violations), violations)
            async with gate:
                try:
                    answer = await self.recorder.diagnose(
                        convert.diagnosis_input_from_pb(item), item.request_id, deadline, principal
                    )
                except (RequestIdReused, IncidentNotStored) as refused:
                    status = status_message(*_refusal(refused), str(refused), metadata={"request_id": item.request_id})
                    return failed(index, status)
                except Exception as exc:
                    log.exception("batch item %d failed", index)
                    trace_id = current_trace_id()
                    status = status_message(
                        grpc.StatusCode.INTERNAL,
                        Reason.INTERNAL,
                        f"internal error: {type(exc).__name__}",
                        metadata={"trace_id": trace_id},
                    )
                    return failed(index, status)
            return copilot_pb2.DiagnoseBatchItem(
                index=index, code=code_pb2.OK, response=_response(answer), status=status_pb2.Status()
            )

        items = await asyncio.gather(*(one(i, item) for i, item in enumerate(request.requests)))
        ok = sum(1 for item in items if item.code == code_pb2.OK)
        return copilot_pb2.DiagnoseBatchResponse(items=items, succeeded=ok, failed=len(items) - ok)

    async def GetIncident(self, request: copilot_pb2.GetIncidentRequest, context: Context):
        stored = await asyncio.to_thread(self.history.get, request.request_id)
        if stored is None:
            await _no_incident(context, request.request_id)
        return copilot_pb2.GetIncidentResponse(incident=incident_to_pb(stored))

    async def ListIncidents(self, request: copilot_pb2.ListIncidentsRequest, context: Context):
        filters = _incident_filters(request)
        after = None
        if request.page_token:
            after = _incident_cursor(request.page_token, filters)
            if after is None:
                await abort_invalid(context, [invalid_page_token("ListIncidents")])
        bounds, violations = {}, []
        for name in ("start_time", "end_time"):
            if request.HasField(name):
                try:
                    bounds[name] = getattr(request, name).ToDatetime(UTC)
                except (ValueError, OverflowError):
                    violations.append(FieldViolation(name, "is outside the timestamps years 1 to 9999 can hold"))
        if violations:
            await abort_invalid(context, violations)
        start, end = bounds.get("start_time"), bounds.get("end_time")
        page, following = await asyncio.to_thread(
            self.history.list,
            plant_id=request.plant_id,
            equipment_id=request.equipment_id,
            start=start,
            end=end,
            limit=page_size(request.page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE),
            after=after,
        )
        return copilot_pb2.ListIncidentsResponse(
            incidents=[incident_to_pb(i, full=False) for i in page],
            next_page_token=encode_page_token(
                "ListIncidents", as_utc(following[0]).isoformat(), following[1], filters=filters
            )
            if following
            else "",
        )

    async def SubmitFeedback(self, request: copilot_pb2.SubmitFeedbackRequest, context: Context):
        said = _verdict(request)
        feedback = StoredFeedback(
            helpful=said == "helpful",
            resolution_notes=request.resolution_notes,
            helpful_sop_ids=tuple(dict.fromkeys(request.helpful_sop_ids)),
            principal=_principal(),
            submitted_at=utc_now(),
            verdict=said,
            feedback_id=request.feedback_id,
        )
        outcome, stored = await asyncio.to_thread(
            self.history.add_feedback, request.request_id, feedback, self.feedback_max_per_incident
        )
        if outcome == "missing":
            await _no_incident(context, request.request_id)
        if outcome == "full":
            await abort_with(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                Reason.FEEDBACK_LIMIT_REACHED,
                f"incident {request.request_id} has {self.feedback_max_per_incident} feedback entries, the limit "
                "per incident; nothing was added",
                metadata={"request_id": request.request_id, "limit": self.feedback_max_per_incident},
            )
        if outcome == "conflict":
            await abort_with(
                context,
                grpc.StatusCode.ALREADY_EXISTS,
                Reason.FEEDBACK_ID_REUSED,
                f"feedback_id {request.feedback_id!r} was sent for incident {request.request_id} with other content; "
                "nothing was added (a new entry needs a new feedback_id)",
                metadata={"request_id": request.request_id, "feedback_id": request.feedback_id},
            )
        assert stored is not None
        return copilot_pb2.SubmitFeedbackResponse(feedback=_feedback_pb(stored), replayed=outcome == "replayed")

    async def ListEquipment(
        self, request: copilot_pb2.ListEquipmentRequest, context: Context
    ) -> copilot_pb2.ListEquipmentResponse:
        registry = self.workflow.equipment.registry
        response = copilot_pb2.ListEquipmentResponse(
            equipment=[
                copilot_pb2.RegisteredEquipment(
                    match=e.match,
                    plant_id=e.plant_id,
                    equipment_type=e.equipment_type,
                    reference_set=e.reference_set,
                    description=e.description,
                )
                for e in registry.for_plant(request.plant_id)
            ]
        )
        if self.catalog is None:
            response.unavailable.extend(["knowledge: not connected", "vision: not connected"])
            return response
        timeout = min(5.0, context.time_remaining() or 5.0)
        types, sets = await asyncio.gather(
            self.catalog.sop_types(request.plant_id, timeout),
            self.catalog.reference_sets(timeout),
            return_exceptions=True,
        )
        if isinstance(types, BaseException):
            response.unavailable.append(f"knowledge: {_agent_error(types)}")
        else:
            response.sop_types.extend(
                copilot_pb2.SopEquipmentType(equipment_type=t, document_ids=ids) for t, ids in types.items()
            )
        if isinstance(sets, BaseException):
            response.unavailable.append(f"vision: {_agent_error(sets)}")
        else:
            response.reference_sets.extend(sets)
        return response


def _agent_error(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name
    return type(exc).__name__
