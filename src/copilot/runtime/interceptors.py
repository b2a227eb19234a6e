"""Server interceptors shared by every service: access log + error shielding, and bearer-token auth."""
from __future__ import annotations

import contextvars
import logging
import re
import time
from typing import Awaitable, Callable, Iterable

import grpc
from opentelemetry import trace

from copilot.runtime.metrics import copilot_metrics

log = logging.getLogger("copilot.rpc")

#: The authenticated caller of the current RPC ("technician-42"), for logs and span attributes.
current_principal: contextvars.ContextVar[str | None] = contextvars.ContextVar("current_principal", default=None)

UnaryBehaviour = Callable[[object, grpc.aio.ServicerContext], Awaitable[object]]


def _wrap_unary(handler: grpc.RpcMethodHandler, wrap: Callable[[UnaryBehaviour], UnaryBehaviour]):
    return grpc.unary_unary_rpc_method_handler(
        wrap(handler.unary_unary),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _service_of(method: str) -> str:
    return method.rsplit("/", 1)[0].lstrip("/")


class RpcObservabilityInterceptor(grpc.aio.ServerInterceptor):
    """Logs and meters every unary RPC (requests by status code, duration, in flight); an unexpected
    exception becomes INTERNAL with a trace id instead of a stack trace sent to the caller (the stack
    trace goes to the log)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method

        def wrap(behaviour: UnaryBehaviour) -> UnaryBehaviour:
            async def logged(request, context):
                started = time.perf_counter()
                code = grpc.StatusCode.OK
                meters = copilot_metrics()
                meters.rpc_in_flight.add(1, {"rpc.method": method})
                try:
                    return await behaviour(request, context)
                except grpc.aio.AbortError:
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                except Exception:
                    code = grpc.StatusCode.INTERNAL
                    trace_id = format(trace.get_current_span().get_span_context().trace_id, "032x")
                    log.exception("unhandled error in %s", method, extra={"rpc.method": method})
                    await context.abort(code, f"internal error; trace id {trace_id}")
                finally:
                    elapsed = time.perf_counter() - started
                    name = getattr(code, "name", str(code))
                    meters.rpc_in_flight.add(-1, {"rpc.method": method})
                    meters.rpc_requests.add(1, {"rpc.method": method, "rpc.grpc.status_code": name})
                    meters.rpc_duration.record(elapsed, {"rpc.method": method})
                    log.info("rpc %s %s", method, name, extra={
                        "rpc.method": method, "rpc.code": name, "duration_ms": round(elapsed * 1000, 2),
                        "principal": current_principal.get(),
                    })

            return logged

        return _wrap_unary(handler, wrap)


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """`authorization: Bearer technician-<id>` on the protected services (the seed's token form).

    Missing or malformed → UNAUTHENTICATED. Health and reflection stay open for probes and tools.
    Stronger auth (JWT, roles) replaces `pattern` later without changing the callers of this class.
    """

    TOKEN = re.compile(r"^Bearer (technician-[A-Za-z0-9][A-Za-z0-9._-]{0,63})$")

    def __init__(self, protected_services: Iterable[str]) -> None:
        self.protected = frozenset(protected_services)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or _service_of(handler_call_details.method) not in self.protected:
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        match = self.TOKEN.match(str(metadata.get("authorization", "")))

        def wrap(behaviour: UnaryBehaviour) -> UnaryBehaviour:
            async def authenticated(request, context):
                if match is None:
                    reason = "missing" if "authorization" not in metadata else "malformed"
                    await context.abort(
                        grpc.StatusCode.UNAUTHENTICATED,
                        f"{reason} bearer token: send metadata 'authorization: Bearer technician-<id>'",
                    )
                principal = match.group(1)
                token = current_principal.set(principal)
                trace.get_current_span().set_attribute("enduser.id", principal)
                try:
                    return await behaviour(request, context)
                finally:
                    current_principal.reset(token)

            return authenticated

        if handler.unary_unary is None:  # streaming RPCs are not part of the protected surface yet
            return handler
        return _wrap_unary(handler, wrap)
