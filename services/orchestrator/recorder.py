"""Diagnoses run at most once per request_id and recorded before they are answered, apart from the gRPC edge
(testable with a workflow and a store, no server). It speaks domain types: the servicer converts the request and
the workflow's events, and maps the two refusals to status codes."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from opentelemetry import trace

from copilot.domain import Diagnosis, DiagnosisInput, StageFinished, StageStarted, utc_now
from copilot.images import sniff_mime_type
from copilot.runtime.metrics import copilot_metrics
from services.orchestrator.history import IncidentStore, RequestIdConflict, StoredIncident
from services.orchestrator.workflow import DiagnosisWorkflow

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


def request_fingerprint(request: DiagnosisInput, image_sha256: str) -> str:
    """The identity of a request, to tell a retry (same fingerprint) from another request under a used
    request_id. `image_sha256`: the photo's digest (hashed once, by the recorder)."""
    digest = hashlib.sha256()
    for part in (
        request.plant_id,
        request.equipment_id,
        request.problem_description,
        request.equipment_type,
        request.image_id,
        image_sha256,
        *([request.reference_set] if request.reference_set else []),  # fingerprints stored before it stay valid
    ):
        digest.update(part.encode() + b"\x00")
    return digest.hexdigest()


@dataclass(frozen=True)
class Answer:
    """The last event of a diagnosis: the answer as stored in the history (`response`: what `encode` made of the
    Diagnosis), `replayed` when it was stored by an earlier call."""

    request_id: str
    response: bytes
    replayed: bool = False


@dataclass(frozen=True)
class _Request:
    """A request as the recorder keeps it: the input, its photo's digest and its identity, computed once."""

    input: DiagnosisInput
    request_id: str  # as the caller sent it ("" = none: not idempotent)
    image_sha256: str
    fingerprint: str

    @classmethod
    def of(cls, request: DiagnosisInput, request_id: str) -> _Request:
        image = hashlib.sha256(request.image_data).hexdigest() if request.image_data else ""
        return cls(request, request_id, image, request_fingerprint(request, image))


class DiagnosisRecorder:
    """The one diagnosis path of Diagnose, StreamDiagnose and DiagnoseBatch."""

    def __init__(
        self, workflow: DiagnosisWorkflow, history: IncidentStore, *, encode: Callable[[Diagnosis], bytes]
    ) -> None:
        """`encode`: the Diagnosis as the history stores it and a replay answers it (the servicer's wire form)."""
        self.workflow = workflow
        self.history = history
        self.encode = encode
        # request_id -> (input fingerprint, future stored answer) of the call running it
        self._running: dict[str, tuple[str, asyncio.Future[bytes | None]]] = {}

    @staticmethod
    def _replayed(request_id: str, response: bytes) -> Answer:
        copilot_metrics().incidents_replayed.add(1)
        return Answer(request_id, response, replayed=True)

    async def events(
        self,
        request: DiagnosisInput,
        request_id: str,
        deadline: float | None,
        principal: str,
        *,
        stage_events: bool = True,
    ) -> AsyncIterator[StageStarted | StageFinished | Answer]:
        """Stage events (unless `stage_events` is False: a unary call has no use for them), then the Answer; the
        diagnosis is stored before the Answer is given.

        With a request_id the call is idempotent: while one call with that id runs, retries wait for its answer
        (the check-and-register below has no await in between, so exactly one call leads); afterwards the stored
        answer is replayed. A different request under a used id is RequestIdReused."""
        own = _Request.of(request, request_id)
        while request_id and request_id in self._running:
            leader_fingerprint, leader = self._running[request_id]
            if leader_fingerprint != own.fingerprint:
                raise RequestIdReused(request_id)
            led = await asyncio.shield(leader)
            if led is not None:
                yield self._replayed(request_id, led)
                return
            # the leading call failed or was cancelled: the loop lets one waiter take over
        run_id = request_id or str(uuid.uuid4())
        outcome: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()  # None if no answer came
        if request_id:
            self._running[request_id] = (own.fingerprint, outcome)
        try:
            stored = await asyncio.to_thread(self.history.get, request_id) if request_id else None
            if stored is not None:
                if stored.input_fingerprint != own.fingerprint:
                    raise RequestIdReused(request_id)
                outcome.set_result(stored.response)
                yield self._replayed(request_id, stored.response)
                return
            trace.get_current_span().set_attributes({"app.request_id": run_id, "app.principal": principal})
            async for event in self.workflow.events(request, deadline=deadline, request_id=run_id):
                if isinstance(event, Diagnosis):
                    answer = await self._store(own, event, principal)
                    outcome.set_result(answer.response)
                    yield answer
                elif stage_events:
                    yield event
        finally:
            if not outcome.done():
                outcome.set_result(None)
            if self._running.get(run_id, (None, None))[1] is outcome:
                del self._running[run_id]

    async def _store(self, request: _Request, diagnosis: Diagnosis, principal: str) -> Answer:
        response = self.encode(diagnosis)
        source = request.input
        image = source.image_data
        incident = StoredIncident(
            request_id=diagnosis.request_id,
            created_at=utc_now(),
            plant_id=source.plant_id,
            equipment_id=source.equipment_id,
            equipment_type=source.equipment_type,
            problem_description=source.problem_description,
            image_sha256=request.image_sha256,
            image_mime_type=sniff_mime_type(image) or "" if image else "",
            principal=principal,
            trace_id=diagnosis.trace_id,
            confidence=diagnosis.confidence_score,
            requires_manual_review=diagnosis.requires_manual_review,
            referenced_sop_ids=tuple(diagnosis.report.referenced_sop_ids),
            response=response,
            input_fingerprint=request.fingerprint,
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
            return self._replayed(diagnosis.request_id, stored.response)
        return Answer(diagnosis.request_id, response)

    async def diagnose(
        self, request: DiagnosisInput, request_id: str, deadline: float | None, principal: str
    ) -> Answer:
        """The diagnosis without stage events: the Answer alone. The stream is consumed to its end (the Answer is
        its last event), so the workflow's spans close here, in this call's context, not when it is collected."""
        answer = None
        async for event in self.events(request, request_id, deadline, principal, stage_events=False):
            if isinstance(event, Answer):
                answer = event
        if answer is None:
            raise AssertionError("the workflow always ends with a Diagnosis")
        return answer
