"""Rich gRPC errors: INVALID_ARGUMENT with google.rpc.BadRequest field violations."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from copilot.domain import FieldViolation


def bad_request_status(violations: Iterable[FieldViolation], message: str | None = None) -> grpc.Status:
    violations = list(violations)
    detail = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description) for v in violations
        ]
    )
    packed = any_pb2.Any()
    packed.Pack(detail)
    text = message or "invalid request: " + "; ".join(f"{v.field}: {v.description}" for v in violations)
    status: grpc.Status = rpc_status.to_status(
        status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=text, details=[packed])
    )
    return status


def resource_exhausted_status(message: str, retry_after_s: float) -> grpc.Status:
    """RESOURCE_EXHAUSTED with a google.rpc.RetryInfo saying when a retry may succeed."""
    retry = error_details_pb2.RetryInfo()
    retry.retry_delay.FromMilliseconds(max(1, int(retry_after_s * 1000)))
    packed = any_pb2.Any()
    packed.Pack(retry)
    status: grpc.Status = rpc_status.to_status(
        status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message, details=[packed])
    )
    return status


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
