"""Rich gRPC errors (AIP-193): every error a service raises carries a google.rpc.ErrorInfo with a reason from
`Reason` and the service's domain ("<service>.copilot"), plus google.rpc.BadRequest field violations for
INVALID_ARGUMENT and google.rpc.RetryInfo where a retry can succeed. Clients tell refusals apart by
`ErrorInfo.reason`, never by the message text (which is for people and may change)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar
from enum import StrEnum
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from copilot.domain import FieldViolation


class Reason(StrEnum):
    """The `ErrorInfo.reason` of every error, with its code and whether the same call may be retried.
    docs/errors.md lists them for integrators; tests/contract/test_error_reasons.py maps each refusal to its own."""

    INVALID_FIELDS = "INVALID_FIELDS"  # INVALID_ARGUMENT, BadRequest names the fields; not retryable as sent
    TOKEN_MISSING = "TOKEN_MISSING"  # UNAUTHENTICATED: no bearer token; not retryable
    TOKEN_INVALID = "TOKEN_INVALID"  # UNAUTHENTICATED: malformed, wrong key or algorithm, bad claims; not retryable
    TOKEN_EXPIRED = "TOKEN_EXPIRED"  # UNAUTHENTICATED: retry with a fresh token
    ROLE_NOT_ALLOWED = "ROLE_NOT_ALLOWED"  # PERMISSION_DENIED: the token's role may not call this; not retryable
    RATE_LIMITED = "RATE_LIMITED"  # RESOURCE_EXHAUSTED + RetryInfo: the caller's rate; retry after the delay
    PHOTO_QUOTA_EXCEEDED = "PHOTO_QUOTA_EXCEEDED"  # RESOURCE_EXHAUSTED + RetryInfo: a day's photo bytes
    CALLER_IN_FLIGHT_LIMIT = "CALLER_IN_FLIGHT_LIMIT"  # RESOURCE_EXHAUSTED + RetryInfo: one caller's calls at once
    CALLER_QUEUE_FULL = "CALLER_QUEUE_FULL"  # RESOURCE_EXHAUSTED + RetryInfo: an agent's queue for one caller
    SERVER_BUSY = "SERVER_BUSY"  # RESOURCE_EXHAUSTED + RetryInfo: the server's in-flight cap; retry after the delay
    HEALTH_WATCH_LIMIT = "HEALTH_WATCH_LIMIT"  # RESOURCE_EXHAUSTED + RetryInfo: too many health Watch streams
    FEEDBACK_LIMIT_REACHED = "FEEDBACK_LIMIT_REACHED"  # RESOURCE_EXHAUSTED: an incident's feedback cap; never
    REQUEST_ID_REUSED = "REQUEST_ID_REUSED"  # ALREADY_EXISTS: request_id sent before with other content; never
    FEEDBACK_ID_REUSED = "FEEDBACK_ID_REUSED"  # ALREADY_EXISTS: feedback_id sent before with other content; never
    INCIDENT_NOT_STORED = "INCIDENT_NOT_STORED"  # UNAVAILABLE: the history could not store it; retry, same id
    INCIDENT_NOT_FOUND = "INCIDENT_NOT_FOUND"  # NOT_FOUND: no incident with that request_id
    DOCUMENT_NOT_FOUND = "DOCUMENT_NOT_FOUND"  # NOT_FOUND: no such knowledge document
    REFERENCE_NOT_FOUND = "REFERENCE_NOT_FOUND"  # NOT_FOUND: no such vision reference image
    NO_REFERENCE_IMAGES = "NO_REFERENCE_IMAGES"  # FAILED_PRECONDITION: register references for the type first
    REFERENCES_NOT_SUPPORTED = "REFERENCES_NOT_SUPPORTED"  # FAILED_PRECONDITION: the vision provider has none
    WARMING_UP = "WARMING_UP"  # UNAVAILABLE: models still loading; retry (another replica may answer)
    MODEL_FAILED = "MODEL_FAILED"  # UNAVAILABLE: the model provider failed on this call; retry
    INTERNAL = "INTERNAL"  # INTERNAL: a bug; metadata trace_id names the trace; retry is not expected to help


#: `ErrorInfo.domain` of a call's errors ("<service>.copilot"): each call of a server sets it for its own task
#: (ErrorDomainInterceptor, first in the chain), so several servers in one process (tests) differ.
_call_domain: ContextVar[str] = ContextVar("copilot_error_domain", default="copilot")

#: The admission limiters' own reason names (metric labels) -> the ErrorInfo reason.
ADMISSION_REASONS = {
    "rate": Reason.RATE_LIMITED,
    "photo_quota": Reason.PHOTO_QUOTA_EXCEEDED,
    "principal_in_flight": Reason.CALLER_IN_FLIGHT_LIMIT,
    "caller_queue": Reason.CALLER_QUEUE_FULL,
    "in_flight": Reason.SERVER_BUSY,
    "health_watch": Reason.HEALTH_WATCH_LIMIT,
}


def domain_of(service: str) -> str:
    return f"{service}.copilot"


def set_call_error_domain(service: str) -> None:
    _call_domain.set(domain_of(service))


def error_domain() -> str:
    return _call_domain.get()


def _packed(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def status_message(
    code: grpc.StatusCode,
    reason: Reason,
    message: str,
    *,
    metadata: Mapping[str, object] | None = None,
    details: Sequence[Message] = (),
) -> status_pb2.Status:
    """The google.rpc.Status of an error: its ErrorInfo first, then `details` (BadRequest, RetryInfo ...). What a
    call's trailer carries, and what a batch item carries for its own outcome."""
    info = error_details_pb2.ErrorInfo(
        reason=str(reason), domain=error_domain(), metadata={k: str(v) for k, v in (metadata or {}).items()}
    )
    return status_pb2.Status(
        code=code.value[0], message=message, details=[_packed(info), *(_packed(d) for d in details)]
    )


def bad_request(violations: Iterable[FieldViolation]) -> error_details_pb2.BadRequest:
    return error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description) for v in violations
        ]
    )


def error_status(
    code: grpc.StatusCode,
    reason: Reason,
    message: str,
    *,
    metadata: Mapping[str, object] | None = None,
    details: Sequence[Message] = (),
) -> grpc.Status:
    """A call's error status (see status_message)."""
    status: grpc.Status = rpc_status.to_status(
        status_message(code, reason, message, metadata=metadata, details=details)
    )
    return status


async def abort_with(
    context: grpc.aio.ServicerContext[Any, Any],
    code: grpc.StatusCode,
    reason: Reason,
    message: str,
    *,
    metadata: Mapping[str, object] | None = None,
    details: Sequence[Message] = (),
) -> NoReturn:
    status = error_status(code, reason, message, metadata=metadata, details=details)
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("unreachable")  # context.abort raises


def bad_request_message(violations: Iterable[FieldViolation], message: str | None = None) -> status_pb2.Status:
    """INVALID_ARGUMENT (INVALID_FIELDS) naming every violation: the fields in ErrorInfo's metadata, each with its
    description in a google.rpc.BadRequest. A call's error (bad_request_status) and a batch item's outcome."""
    violations = list(violations)
    text = message or "invalid request: " + "; ".join(f"{v.field}: {v.description}" for v in violations)
    fields = ",".join(dict.fromkeys(v.field for v in violations))
    return status_message(
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.INVALID_FIELDS,
        text,
        metadata={"fields": fields},
        details=[bad_request(violations)],
    )


def bad_request_status(violations: Iterable[FieldViolation], message: str | None = None) -> grpc.Status:
    status: grpc.Status = rpc_status.to_status(bad_request_message(violations, message))
    return status


def resource_exhausted_status(message: str, retry_after_s: float, reason: Reason = Reason.SERVER_BUSY) -> grpc.Status:
    """RESOURCE_EXHAUSTED with a google.rpc.RetryInfo saying when a retry may succeed."""
    retry = error_details_pb2.RetryInfo()
    retry.retry_delay.FromMilliseconds(max(1, int(retry_after_s * 1000)))
    return error_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        reason,
        message,
        metadata={"retry_after_ms": max(1, int(retry_after_s * 1000))},
        details=[retry],
    )


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """Client side: the ErrorInfo an error carries, if any."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]  # an RpcError from a call is also a Call
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def retry_delay_s(error: grpc.RpcError) -> float | None:
    """Client side: the RetryInfo delay carried by an error, if any."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]  # an RpcError from a call is also a Call
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToMilliseconds()) / 1000
    return None


async def abort_invalid(context: grpc.aio.ServicerContext[Any, Any], violations: Iterable[FieldViolation]) -> NoReturn:
    status = bad_request_status(violations)
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("unreachable")  # context.abort raises


def field_violations(error: grpc.RpcError) -> list[FieldViolation]:
    """Client side: the BadRequest violations carried by an error, if any."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]  # an RpcError from a call is also a Call
    found: list[FieldViolation] = []
    if status is None:
        return found
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
    return found
