"""Server interceptors shared by every service, in the order the server applies them.

1. `RpcObservabilityInterceptor`: access log + metrics for every RPC, unexpected exceptions → INTERNAL with a
   trace id (the stack trace goes to the log, never to the caller);
2. `AuthInterceptor`: bearer token → Principal (UNAUTHENTICATED), role check against the service's
   AccessPolicy (PERMISSION_DENIED); the principal goes into logs and span attributes, never the token;
3. `AdmissionInterceptor` (where a service has one): in-flight cap and per-principal rate limit;
4. `ValidationInterceptor`: the protovalidate rules of the request messages → INVALID_ARGUMENT with a
   google.rpc.BadRequest listing every violated field.

All four RPC kinds are wrapped (unary and streaming requests and responses)."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeAlias

import grpc
from opentelemetry import trace

from copilot.domain import FieldViolation
from copilot.runtime.auth import END_USER_HEADER, SUBJECT, AccessPolicy, Authenticator, AuthError, Principal
from copilot.runtime.errors import Reason, abort_invalid, abort_with, set_call_error_domain
from copilot.runtime.metrics import copilot_metrics

log = logging.getLogger("copilot.rpc")

#: The authenticated caller of the current RPC, for logs and span attributes.
current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("current_principal", default=None)
#: The user a service principal calls for (the `x-copilot-end-user` metadata, trusted from a service token only).
current_end_user: contextvars.ContextVar[str | None] = contextvars.ContextVar("current_end_user", default=None)


def caller_key() -> str:
    """Whom the current call's work is for, for fair shares and limits: the end user of a service's call (the
    orchestrator calls for many users), else the authenticated subject."""
    principal = current_principal.get()
    if principal is None:
        return "anonymous"
    return current_end_user.get() or principal.subject


HEALTH = "grpc.health.v1.Health"
OPEN_SERVICES = frozenset({HEALTH, "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"})


# grpc's classes are generic only in their stubs, so the aliases are strings (resolved by the type checker)
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]"
Before: TypeAlias = "Callable[[Any, Context], Awaitable[Any]]"
After: TypeAlias = "Callable[[Any, Context, BaseException | None], Awaitable[None]]"
RequestFilter: TypeAlias = "Callable[[AsyncIterator[Any], Context], AsyncIterator[Any]]"


def service_of(method: str) -> str:
    return method.rsplit("/", 1)[0].lstrip("/")


def wrap_handler(
    handler: Handler,
    *,
    before: Before,
    after: After | None = None,
    filter_requests: RequestFilter | None = None,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> Handler:
    """Rebuild `handler` so that `before(request_or_None, context)` runs first (it may abort; what it returns is
    passed to `after`), `after(state, context, error)` runs last, and a streamed request goes through
    `filter_requests` (and `request_deserializer`, when given). Works for the four RPC kinds."""

    # `seen` is what `before` gets: the request, or None for a request stream (which `behaviour` gets filtered)
    async def run_unary(
        behaviour: Callable[[Any, Context], Awaitable[Any]], seen: Any, request: Any, context: Context
    ) -> Any:
        state = await before(seen, context)
        error = None
        try:
            return await behaviour(request, context)
        except BaseException as exc:
            error = exc
            raise
        finally:
            if after is not None:
                await after(state, context, error)

    async def run_stream(
        behaviour: Callable[[Any, Context], Any], seen: Any, request: Any, context: Context
    ) -> AsyncIterator[Any]:
        state = await before(seen, context)
        error = None
        try:
            responses = behaviour(request, context)
            if inspect.isawaitable(responses):  # a coroutine that sends with context.write (grpc's Health/Watch)
                await responses
            else:
                async for item in responses:
                    yield item
        except BaseException as exc:
            error = exc
            raise
        finally:
            if after is not None:
                await after(state, context, error)

    def requests(iterator: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        return filter_requests(iterator, context) if filter_requests is not None else iterator

    deserializer = request_deserializer or handler.request_deserializer
    serializer = handler.response_serializer
    # the handler's behaviours are typed for the blocking server; on the asyncio server they are coroutines.
    # The wrappers are real coroutine / async generator functions: the asyncio server looks at the function to
    # know whether to await it (a lambda returning a coroutine is taken for a blocking behaviour).
    behaviours: Any = handler
    if (uu := behaviours.unary_unary) is not None:

        async def unary_unary(request: Any, context: Context) -> Any:
            return await run_unary(uu, request, request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, request_deserializer=deserializer, response_serializer=serializer
        )
    if (us := behaviours.unary_stream) is not None:

        async def unary_stream(request: Any, context: Context) -> AsyncIterator[Any]:
            async for item in run_stream(us, request, request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, request_deserializer=deserializer, response_serializer=serializer
        )
    if (su := behaviours.stream_unary) is not None:

        async def stream_unary(iterator: AsyncIterator[Any], context: Context) -> Any:
            return await run_unary(su, None, requests(iterator, context), context)

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, request_deserializer=deserializer, response_serializer=serializer
        )
    ss = behaviours.stream_stream

    async def stream_stream(iterator: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        async for item in run_stream(ss, None, requests(iterator, context), context):
            yield item

    return grpc.stream_stream_rpc_method_handler(
        stream_stream, request_deserializer=deserializer, response_serializer=serializer
    )


def current_trace_id() -> str:
    """The current span's trace id as Jaeger shows it (32 hex digits)."""
    return format(trace.get_current_span().get_span_context().trace_id, "032x")


class RpcObservabilityInterceptor(grpc.aio.ServerInterceptor):
    """Logs and meters every RPC (requests by status code, duration, in flight); an unexpected exception
    becomes INTERNAL with a trace id."""

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        meters = copilot_metrics()

        async def before(_request: Any, _context: Context) -> float:
            meters.rpc_in_flight.add(1, {"rpc.method": method})
            return time.perf_counter()

        async def after(started: float, context: Context, error: BaseException | None) -> None:
            code = grpc.StatusCode.OK
            if isinstance(error, grpc.aio.AbortError):
                code = context.code() or grpc.StatusCode.UNKNOWN
            elif isinstance(error, BaseException) and not isinstance(error, GeneratorExit):
                if isinstance(error, asyncio.CancelledError):
                    code = grpc.StatusCode.CANCELLED
                else:
                    code = grpc.StatusCode.INTERNAL
                    log.error("unhandled error in %s", method, exc_info=error, extra={"rpc.method": method})
            elif context.code() not in (None, grpc.StatusCode.OK):
                code = context.code()
            elapsed = time.perf_counter() - started
            meters.rpc_in_flight.add(-1, {"rpc.method": method})
            meters.rpc_requests.add(1, {"rpc.method": method, "rpc.grpc.status_code": code.name})
            meters.rpc_duration.record(elapsed, {"rpc.method": method})
            # a successful health check (a probe every few seconds) is not worth a line at INFO
            level = logging.DEBUG if code is grpc.StatusCode.OK and service_of(method) == HEALTH else logging.INFO
            principal = current_principal.get()
            log.log(
                level,
                "rpc %s %s",
                method,
                code.name,
                extra={
                    "rpc.method": method,
                    "rpc.code": code.name,
                    "duration_ms": round(elapsed * 1000, 2),
                    "principal": principal.subject if principal else None,
                    "end_user": current_end_user.get(),  # the user a service's call is for
                },
            )
            if code is grpc.StatusCode.INTERNAL and not isinstance(error, grpc.aio.AbortError):
                # shield the caller from the stack trace: replace the error by a clean status
                trace_id = current_trace_id()
                await abort_with(
                    context,
                    code,
                    Reason.INTERNAL,
                    f"internal error; trace id {trace_id}",
                    metadata={"trace_id": trace_id},
                )

        return wrap_handler(handler, before=before, after=after)


def _renamed(details: grpc.HandlerCallDetails, method: str) -> grpc.HandlerCallDetails:
    """The same call's details with another method name (grpc.aio's own details type: the server looks the
    handler up by it)."""
    from grpc._cython import cygrpc  # type: ignore[attr-defined]  # grpc.aio's compiled core: no stubs

    renamed: grpc.HandlerCallDetails = cygrpc._HandlerCallDetails(method, details.invocation_metadata)
    return renamed


class FormerServiceNames(grpc.aio.ServerInterceptor):
    """First in the chain: a call to a service's former full name (e.g. /copilot.v1.VisionService/AnalyzeImage,
    before the agents' API moved to copilot.agents.v1) is served as a call to its current name, with the same
    policy, validation and metrics, so that an orchestrator of the previous release keeps working against agents
    of this one during a rollout. Only whole service names listed in `former` are renamed."""

    def __init__(self, former: Mapping[str, str]) -> None:
        self.former = {f"/{old}/": f"/{new}/" for old, new in former.items()}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        method = handler_call_details.method
        for old, new in self.former.items():
            if method.startswith(old):
                return await continuation(_renamed(handler_call_details, new + method[len(old) :]))
        return await continuation(handler_call_details)


class ErrorDomainInterceptor(grpc.aio.ServerInterceptor):
    """First in the chain: this call's errors name this service in ErrorInfo.domain."""

    def __init__(self, service: str) -> None:
        self.service = service

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler

        async def before(_request: Any, _context: Context) -> None:
            set_call_error_domain(self.service)

        return wrap_handler(handler, before=before)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call to a non-open service and checks the role the AccessPolicy asks for."""

    def __init__(self, authenticator: Authenticator, policy: AccessPolicy | None = None) -> None:
        self.authenticator = authenticator
        self.policy = policy or AccessPolicy()
        self.users_may_call_internal = authenticator.settings.agent_callers == "any"

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or service_of(method) in OPEN_SERVICES:
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        header = metadata.get("authorization")
        header = str(header) if header is not None else None
        end_user: str | None = None
        try:
            authenticated = self.authenticator.authenticate(header)
            principal: Principal | None = authenticated
            failure: AuthError | None = None
            refusal = self.policy.refusal(authenticated, method, users_may_call_internal=self.users_may_call_internal)
            if refusal is not None:
                failure = AuthError(grpc.StatusCode.PERMISSION_DENIED, refusal)
            claimed = metadata.get(END_USER_HEADER)
            if authenticated.is_service and isinstance(claimed, str) and SUBJECT.match(claimed):
                end_user = claimed  # a user's token cannot speak for someone else: only a service's is read
        except AuthError as exc:
            principal, failure = None, exc

        async def before(_request: Any, context: Context) -> None:
            span = trace.get_current_span()
            if principal is not None:
                # a service's call is for its end user (whose role the orchestrator checked): the span names both
                span.set_attributes(
                    {"enduser.id": end_user or principal.subject, "copilot.caller": principal.subject}
                    if principal.is_service
                    else {"enduser.id": principal.subject, "enduser.role": principal.role.label}
                )
            if failure is not None:
                log.warning(
                    "auth refused %s: %s",
                    method,
                    failure.message,
                    extra={"rpc.method": method, "principal": principal.subject if principal else None},
                )
                await abort_with(context, failure.code, Reason(failure.reason), failure.message)
            # Each RPC runs in its own task, so these stay this call's; they are not reset, so that the access
            # log written by RpcObservabilityInterceptor after the call still names the principal.
            current_principal.set(principal)
            current_end_user.set(end_user)

        return wrap_handler(handler, before=before)


class Undecodable:
    """A request whose bytes are not the method's message (left for ValidationInterceptor to refuse)."""

    def __init__(self, error: str) -> None:
        self.error = error


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A deserializer that returns Undecodable instead of raising: gRPC would answer a raising deserializer with
    INTERNAL, but bytes that do not parse are the caller's mistake (INVALID_ARGUMENT)."""
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            return Undecodable(f"{type(exc).__name__}: {exc}")

    return parse


class ValidationInterceptor(grpc.aio.ServerInterceptor):
    """Undecodable request bytes, the protovalidate rules of every request message (each message of a request
    stream) and a service's own `checks` (full method path -> function giving the FieldViolations of a
    message, for what a proto rule cannot say, such as an image's real format) → one INVALID_ARGUMENT listing
    every violation."""

    def __init__(self, checks: Mapping[str, Callable[[Any], list[FieldViolation]]] | None = None) -> None:
        self.checks = dict(checks or {})

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        from copilot.runtime.validation import rule_violations

        handler = await continuation(handler_call_details)
        if handler is None or service_of(handler_call_details.method) in OPEN_SERVICES:
            return handler
        check = self.checks.get(handler_call_details.method)

        async def refuse(message: Any, context: Context) -> None:
            if isinstance(message, Undecodable):
                await abort_invalid(
                    context,
                    [FieldViolation("", f"request is not a valid protobuf message of this method ({message.error})")],
                )
            violations = rule_violations(message)
            if check is not None:
                violations += check(message)
            if violations:
                await abort_invalid(context, violations)

        async def before(request: Any, context: Context) -> None:
            if request is not None:
                await refuse(request, context)

        async def checked(iterator: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            async for message in iterator:
                await refuse(message, context)
                yield message

        return wrap_handler(
            handler, before=before, filter_requests=checked, request_deserializer=tolerant(handler.request_deserializer)
        )


#: What a channel's calls carry: (key, value) metadata pairs computed per call (e.g. a renewed token).
MetadataSource: TypeAlias = "Callable[[], Sequence[tuple[str, str]]]"


class _SetMetadata:
    """Client side: the pairs `source()` gives on every call, replacing any of the same key."""

    def __init__(self, source: MetadataSource) -> None:
        self.source = source

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        pairs = [(k, v) for k, v in self.source() if v]
        if not pairs:
            return details
        keys = {k for k, _ in pairs}
        metadata = [m for m in (details.metadata or ()) if m[0] not in keys]
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            grpc.aio.Metadata(*metadata, *pairs),
            details.credentials,
            details.wait_for_ready,
        )


class _MetadataUnaryUnary(_SetMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(self._details(details), request)


class _MetadataUnaryStream(_SetMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(self._details(details), request)


class _MetadataStreamUnary(_SetMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return await continuation(self._details(details), request_iterator)


class _MetadataStreamStream(_SetMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return await continuation(self._details(details), request_iterator)


def metadata_interceptors(source: MetadataSource) -> list[grpc.aio.ClientInterceptor]:
    """asyncio channel interceptors setting the metadata `source()` gives on calls of every kind (a channel files
    each interceptor under one kind only, hence four)."""
    return [
        kind(source)
        for kind in (
            _MetadataUnaryUnary,
            _MetadataUnaryStream,
            _MetadataStreamUnary,
            _MetadataStreamStream,
        )
    ]


def bearer_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Calls carrying `authorization: Bearer <token>`."""
    pairs = [("authorization", f"Bearer {token}")]
    return metadata_interceptors(lambda: pairs)


def on_behalf_of(identity: Callable[[], str]) -> list[grpc.aio.ClientInterceptor]:
    """Agent calls made while serving an RPC carry this service's token (`identity()`: `Bearer …`) and name the
    user they are made for (x-copilot-end-user), so the agents see one trusted caller and can still log, trace
    and share fairly per user. A user's own token never reaches an agent."""

    def pairs() -> list[tuple[str, str]]:
        user = caller_key() if current_principal.get() is not None else ""
        return [("authorization", identity()), (END_USER_HEADER, user)]

    return metadata_interceptors(pairs)
