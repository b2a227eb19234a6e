"""Backpressure at the edge: a cap on calls in flight and a per-principal rate limit (the `limits` library's
moving window). Refusals answer RESOURCE_EXHAUSTED with a google.rpc.RetryInfo, before any work is done.

The rate limit's window lives in a `limits` storage named by a URI: `memory://` (one process: the local mesh,
tests) or `redis://host:6379/0` (every orchestrator replica shares one window, so a principal gets the limit once
for the fleet, not once per pod). When the storage cannot be reached the limiter **fails open**: the call is
admitted (the in-flight cap still bounds the work), the refusal it might have earned is counted in
`copilot_admission_limiter_errors_total` and logged at most once every 10 s; each call tries the storage again
(a 250 ms connect/read timeout), so the limit holds again as soon as Redis is back. Refusing every diagnosis
while Redis restarts would turn a cache outage into a full outage."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from limits import parse
from limits.aio import strategies
from limits.storage import storage_from_string

from copilot.runtime.errors import resource_exhausted_status
from copilot.runtime.interceptors import current_principal, wrap_handler
from copilot.runtime.metrics import copilot_metrics

log = logging.getLogger("copilot.admission")


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """`methods` are the guarded full method paths. `cost(method, request)` is how many units a call uses
    from the principal's rate (a batch of n diagnoses costs n). `rate` is a `limits` string such as
    "120/minute"; empty disables the rate limit. Runs after authentication (it keys on the principal)."""

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
    ) -> None:
        self.methods = frozenset(methods)
        self.max_in_flight = max_in_flight
        # one principal's fair share of the cap (0: the whole cap): a technician holding 64 photo diagnoses in
        # flight once got 24 of another user's 43 calls refused
        self.max_per_principal = max_in_flight_per_principal or max_in_flight
        self.in_flight = 0
        self.by_principal: dict[str, int] = {}
        self.retry_after_s = retry_after_s
        self.rate = parse(rate) if rate else None
        self.limiter = strategies.MovingWindowRateLimiter(async_storage(storage_uri)) if self.rate else None
        self._last_storage_warning = 0.0
        self.cost = cost or (lambda _method, _request: 1)

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

    async def _refuse(self, context, reason: str, message: str, retry_after_s: float):
        copilot_metrics().admission_rejected.add(1, {"reason": reason})
        log.warning("refused: %s", message, extra={"reason": reason})
        status = resource_exhausted_status(message, retry_after_s)
        await context.abort(status.code, status.details, status.trailing_metadata)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method not in self.methods:
            return handler

        async def before(request, context):
            principal = current_principal.get()
            key = principal.subject if principal else "anonymous"
            if self.by_principal.get(key, 0) >= self.max_per_principal:
                await self._refuse(
                    context,
                    "principal_in_flight",
                    f"{key} has {self.by_principal[key]} diagnoses in flight, the most one caller may have "
                    f"(limit {self.max_per_principal} of {self.max_in_flight}); retry when one has finished",
                    self.retry_after_s,
                )
            if self.in_flight >= self.max_in_flight:
                await self._refuse(
                    context,
                    "in_flight",
                    f"server busy: {self.in_flight} diagnoses in flight (limit {self.max_in_flight}); retry later",
                    self.retry_after_s,
                )
            if self.limiter is not None and self.rate is not None:
                cost = max(1, self.cost(method, request))
                wait = await self._over_rate(key, cost)
                if wait is not None:
                    await self._refuse(
                        context, "rate", f"rate limit {self.rate} exceeded for {key}; retry in {wait:.1f}s", wait
                    )
            self.in_flight += 1
            self.by_principal[key] = self.by_principal.get(key, 0) + 1
            return key

        async def after(admitted, _context, _error):
            if admitted:
                self.in_flight -= 1
                left = self.by_principal.get(admitted, 1) - 1
                if left > 0:
                    self.by_principal[admitted] = left
                else:
                    self.by_principal.pop(admitted, None)

        return wrap_handler(handler, before=before, after=after)


#: Timeouts of a Redis storage: a call waits at most this long for the shared window before it is admitted anyway.
STORAGE_TIMEOUT_S = 0.25


def async_storage(uri: str) -> Any:
    """A `limits` asyncio storage from a plain URI ("memory://", "redis://host:6379/0", "rediss://…"): the event
    loop never blocks on the network for a rate check."""
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
