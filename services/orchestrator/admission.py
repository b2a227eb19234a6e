"""Backpressure at the edge: a cap on calls in flight and a per-principal rate limit (the `limits` library's
moving window). Refusals answer RESOURCE_EXHAUSTED with a google.rpc.RetryInfo, before any work is done."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc
from limits import parse, storage, strategies

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
        self.limiter = strategies.MovingWindowRateLimiter(storage.MemoryStorage()) if self.rate else None
        self.cost = cost or (lambda _method, _request: 1)

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
                if not self.limiter.hit(self.rate, key, cost=cost):
                    stats = self.limiter.get_window_stats(self.rate, key)
                    wait = max(0.05, stats.reset_time - time.time())
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
