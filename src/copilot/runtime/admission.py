"""Backpressure, written once for every service. Refusals answer RESOURCE_EXHAUSTED with a google.rpc.RetryInfo,
before any work is done.

* `AdmissionInterceptor` (the orchestrator's edge): a cap on calls in flight, one caller's share of it, and a
  per-principal rate limit (the `limits` library's moving window);
* `FairShareInterceptor` (each agent): how many of one caller's calls run at once (the user the orchestrator
  calls for, see interceptors.caller_key), the rest wait their turn in a bounded queue, so one user's burst
  slows that user and nobody else; a cap on everything the agent holds;
* `HealthWatchLimiter` (every service): open health Watch streams per connection and in all (they need no
  token, and each held one costs memory).

The rate limit's window lives in a `limits` storage named by a URI: `memory://` (one process: the local mesh,
tests) or `redis://host:6379/0` (every orchestrator replica shares one window, so a principal gets the limit once
for the fleet, not once per pod). When the storage cannot be reached the limiter **fails open**: the call is
admitted (the in-flight cap still bounds the work), the refusal it might have earned is counted in
`copilot_admission_limiter_errors_total` and logged at most once every 10 s; each call tries the storage again
(a 250 ms connect/read timeout), so the limit holds again as soon as Redis is back. Refusing every diagnosis
while Redis restarts would turn a cache outage into a full outage."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from copilot.runtime.errors import ADMISSION_REASONS, resource_exhausted_status
from copilot.runtime.interceptors import HEALTH, Context, Continuation, Handler, caller_key, wrap_handler
from copilot.runtime.metrics import copilot_metrics

log = logging.getLogger("copilot.admission")


class Tally:
    """Calls held, in all and per key; a key with none left is forgotten (memory bounded by what is held)."""

    def __init__(self) -> None:
        self.total = 0
        self.by_key: dict[str, int] = {}

    def of(self, key: str) -> int:
        return self.by_key.get(key, 0)

    def add(self, key: str) -> None:
        self.total += 1
        self.by_key[key] = self.by_key.get(key, 0) + 1

    def remove(self, key: str) -> None:
        self.total -= 1
        left = self.by_key.get(key, 1) - 1
        if left > 0:
            self.by_key[key] = left
        else:
            self.by_key.pop(key, None)


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """`methods` are the guarded full method paths. `cost(method, request)` is how many units a call uses
    from the principal's rate (a batch of n diagnoses costs n). `rate` is a `limits` string such as
    "120/minute"; empty disables the rate limit. `max_in_flight` 0: no in-flight cap (a second window over methods
    another interceptor already caps). Runs after authentication (it keys on the principal)."""

    def __init__(
        self,
        methods: set[str],
        *,
        max_in_flight: int,
        rate: str = "",
        retry_after_s: float = 1.0,
        cost: Callable[[str, object], int] | None = None,
        max_in_flight_per_principal: int = 0,
        storage_uri: str = "memory://",
        reason: str = "rate",
        explain: Callable[[str, float], str] | None = None,
    ) -> None:
        """`cost` may be 0 for a call the rate does not count (a diagnosis without a photo, for a photo quota).
        `reason` labels refusals in copilot_admission_rejected_total; `explain(key, wait_s)` words them."""
        self.methods = frozenset(methods)
        self.max_in_flight = max_in_flight
        # one principal's fair share of the cap (0: the whole cap): a technician holding 64 photo diagnoses in
        # flight once got 24 of another user's 43 calls refused
        self.max_per_principal = max_in_flight_per_principal or max_in_flight
        self.held = Tally()  # diagnoses in flight, in all and per caller
        self.retry_after_s = retry_after_s
        # `limits` is the orchestrator's dependency (its extra): the agents' images, which use the fair share and
        # the health Watch caps below, do not install it
        from limits import parse
        from limits.aio import strategies

        self.rate = parse(rate) if rate else None
        self.limiter = strategies.MovingWindowRateLimiter(async_storage(storage_uri)) if self.rate else None
        self._last_storage_warning = 0.0
        self.cost = cost or (lambda _method, _request: 1)
        self.reason = reason
        self.explain = explain or (lambda key, wait: f"rate limit {self.rate} exceeded for {key}; retry in {wait:.1f}s")

    async def _over_rate(self, key: str, cost: int) -> float | None:
        """Seconds until `key` may call again when this call is over its rate; None when it is admitted, or when
        the window's storage cannot be reached (fail open, counted and logged)."""
        assert self.limiter is not None and self.rate is not None
        try:
            if await self.limiter.hit(self.rate, key, cost=cost):
                return None
            stats = await self.limiter.get_window_stats(self.rate, key)
            return max(0.05, stats.reset_time - time.time())
        except Exception as exc:  # the storage's client raises its own connection and timeout errors
            copilot_metrics().admission_limiter_errors.add(1)
            now = time.monotonic()
            if now - self._last_storage_warning > 10:
                self._last_storage_warning = now
                log.warning("rate limit storage unreachable, admitting without a limit: %s", type(exc).__name__)
            return None

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method not in self.methods:
            return handler

        async def before(request: Any, context: Context) -> str:
            key = caller_key()
            if self.max_in_flight and self.held.of(key) >= self.max_per_principal:
                await refuse(
                    context,
                    "principal_in_flight",
                    f"{key} has {self.held.of(key)} diagnoses in flight, the most one caller may have "
                    f"(limit {self.max_per_principal} of {self.max_in_flight}); retry when one has finished",
                    self.retry_after_s,
                )
            if self.max_in_flight and self.held.total >= self.max_in_flight:
                await refuse(
                    context,
                    "in_flight",
                    f"server busy: {self.held.total} diagnoses in flight (limit {self.max_in_flight}); retry later",
                    self.retry_after_s,
                )
            if self.limiter is not None and self.rate is not None:
                cost = self.cost(method, request)
                wait = await self._over_rate(key, cost) if cost > 0 else None
                if wait is not None:
                    await refuse(context, self.reason, self.explain(key, wait), wait)
            if not self.max_in_flight:
                return ""
            self.held.add(key)
            return key

        async def after(admitted: str, _context: Context, _error: BaseException | None) -> None:
            if admitted:
                self.held.remove(admitted)

        return wrap_handler(handler, before=before, after=after)


#: Timeouts of a Redis storage: a call waits at most this long for the shared window before it is admitted anyway.
STORAGE_TIMEOUT_S = 0.25


def async_storage(uri: str) -> Any:
    """A `limits` asyncio storage from a plain URI ("memory://", "redis://host:6379/0", "rediss://…"): the event
    loop never blocks on the network for a rate check."""
    from limits.storage import storage_from_string

    if uri.startswith("async+"):
        uri = uri.removeprefix("async+")
    scheme = uri.split("://", 1)[0]
    if scheme in ("redis", "rediss", "redis+unix"):
        return storage_from_string(
            f"async+{uri}",
            implementation="redispy",
            socket_connect_timeout=STORAGE_TIMEOUT_S,
            socket_timeout=STORAGE_TIMEOUT_S,
        )
    return storage_from_string(f"async+{uri}")


async def refuse(context: Context, reason: str, message: str, retry_after_s: float) -> None:
    """RESOURCE_EXHAUSTED with RetryInfo, counted by reason and logged."""
    copilot_metrics().admission_rejected.add(1, {"reason": reason})
    log.warning("refused: %s", message, extra={"reason": reason})
    status = resource_exhausted_status(message, retry_after_s, ADMISSION_REASONS[reason])
    await context.abort(status.code, status.details, status.trailing_metadata)


class FairShareInterceptor(grpc.aio.ServerInterceptor):
    """An agent's own limits on its work `methods`: at most `per_caller` calls of one caller run at once, up to
    `queue_per_caller` more wait (in arrival order, within their deadline), and the agent holds at most
    `max_in_flight` calls in all (running and waiting). Anything beyond is refused with RESOURCE_EXHAUSTED and a
    RetryInfo. The caller is the end user the orchestrator names (a service token's x-copilot-end-user), else the
    token's subject, so one user's burst waits behind itself while others' calls still run."""

    def __init__(
        self,
        methods: set[str],
        *,
        per_caller: int,
        queue_per_caller: int,
        max_in_flight: int,
        retry_after_s: float = 0.5,
    ) -> None:
        self.methods = frozenset(methods)
        self.per_caller = per_caller
        self.queue_per_caller = queue_per_caller
        self.max_in_flight = max_in_flight
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self._callers: dict[str, _Share] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method not in self.methods:
            return handler

        async def before(_request: Any, context: Context) -> tuple[str, _Share]:
            key = caller_key()
            share = self._callers.get(key)
            if share is None:
                share = self._callers[key] = _Share(self.per_caller)
            if share.running >= self.per_caller and share.waiting >= self.queue_per_caller:
                self._forget_if_idle(key, share)
                await refuse(
                    context,
                    "caller_queue",
                    f"{key} has {share.running} calls running and {share.waiting} waiting here, the most one caller "
                    f"may have ({self.per_caller} + {self.queue_per_caller}); retry when one has finished",
                    self.retry_after_s,
                )
            if self.in_flight >= self.max_in_flight:
                self._forget_if_idle(key, share)
                await refuse(
                    context,
                    "in_flight",
                    f"server busy: {self.in_flight} calls held (limit {self.max_in_flight}); retry later",
                    self.retry_after_s,
                )
            self.in_flight += 1
            share.waiting += 1
            try:
                await share.slots.acquire()  # cancelled with the call when its deadline passes while it waits
            except BaseException:
                share.waiting -= 1
                self.in_flight -= 1
                self._forget_if_idle(key, share)
                raise
            share.waiting -= 1
            share.running += 1
            return key, share

        async def after(admitted: tuple[str, _Share] | None, _context: Context, _error: BaseException | None) -> None:
            if admitted is None:
                return
            key, share = admitted
            share.running -= 1
            share.slots.release()
            self.in_flight -= 1
            self._forget_if_idle(key, share)

        return wrap_handler(handler, before=before, after=after)

    def _forget_if_idle(self, key: str, share: _Share) -> None:
        """A caller with nothing running or waiting is forgotten (memory stays bounded by the callers in flight)."""
        if share.running == 0 and share.waiting == 0 and self._callers.get(key) is share:
            del self._callers[key]


class _Share:
    __slots__ = ("running", "slots", "waiting")

    def __init__(self, size: int) -> None:
        self.slots = asyncio.Semaphore(size)
        self.running = 0
        self.waiting = 0


WATCH = f"/{HEALTH}/Watch"


class HealthWatchLimiter(grpc.aio.ServerInterceptor):
    """Health Watch needs no token (kubelets and load balancers call it), and every open stream is held memory:
    5,008 of them once took a service from 84 to 196 MiB. At most `per_connection` streams per peer address and
    `total` in all; more are refused with RESOURCE_EXHAUSTED (a client watches a few services, not thousands)."""

    def __init__(self, *, per_connection: int, total: int) -> None:
        self.per_connection = per_connection
        self.total = total
        self.open = Tally()  # streams per peer

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method != WATCH:
            return handler

        async def before(_request: Any, context: Context) -> str:
            peer = context.peer() or "unknown"
            if self.open.of(peer) >= self.per_connection:
                await refuse(
                    context,
                    "health_watch",
                    f"{self.per_connection} health Watch streams are already open on this connection",
                    5.0,
                )
            if self.open.total >= self.total:
                await refuse(context, "health_watch", f"{self.total} health Watch streams are already open", 5.0)
            self.open.add(peer)
            return peer

        async def after(peer: str | None, _context: Context, _error: BaseException | None) -> None:
            if peer is not None:
                self.open.remove(peer)

        return wrap_handler(handler, before=before, after=after)
