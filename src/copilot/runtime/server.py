"""Server bootstrap written once: grpc.aio server, health (NOT_SERVING until warm-up has loaded models
and stores), reflection, interceptors, telemetry, JSON logs and graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from copilot.domain import FieldViolation
from copilot.runtime.admission import FairShareInterceptor, HealthWatchLimiter
from copilot.runtime.auth import AccessPolicy, Authenticator
from copilot.runtime.config import ServerSettings, message_size_options
from copilot.runtime.interceptors import (
    AuthInterceptor,
    ErrorDomainInterceptor,
    FormerServiceNames,
    RpcObservabilityInterceptor,
    ValidationInterceptor,
)
from copilot.runtime.logging import configure_logging
from copilot.runtime.memory import return_freed_memory
from copilot.runtime.offline import models_offline_by_default
from copilot.runtime.telemetry import server_interceptors, setup_telemetry, shutdown_telemetry
from copilot.runtime.tls import server_credentials

log = logging.getLogger("copilot.server")

#: The health name a liveness probe asks for: SERVING from the moment the server listens until the process ends,
#: through warm-up and drain, unlike "" and the service names (readiness: SERVING only while calls are taken).
LIVENESS = "liveness"


@dataclass
class ServiceSpec:
    """What one agent process serves."""

    name: str  # short name: "vision", "knowledge", "report", "orchestrator"
    service_names: list[str]  # full proto service names, e.g. "copilot.agents.v1.VisionService"
    register: Callable[[grpc.aio.Server], None]  # adds the servicers
    warm_up: Callable[[], Awaitable[None]]  # loads models/stores; SERVING once it returns
    close: Callable[[], Awaitable[None]] | None = None
    # Which role each method needs (authentication is always required outside health and reflection), and which
    # methods are an agent's internal work (service token only; fair share per caller, see FairShareInterceptor).
    policy: AccessPolicy = field(default_factory=AccessPolicy)
    # Run after authentication and before validation (e.g. the orchestrator's admission control).
    interceptors: list[grpc.aio.ServerInterceptor] = field(default_factory=list)
    # Checks the validation interceptor adds to the proto rules, per full method path (see ValidationInterceptor).
    request_checks: dict[str, Callable[[Any], list[FieldViolation]]] = field(default_factory=dict)
    # Former full service names still answered, old -> current (see FormerServiceNames).
    former_service_names: dict[str, str] = field(default_factory=dict)


class AgentServer:
    """One gRPC server. `start()` binds and serves health at once; warm-up runs in the background and
    flips health to SERVING when it finishes (or stops the process when it fails)."""

    def __init__(self, spec: ServiceSpec, settings: ServerSettings, authenticator: Authenticator | None = None) -> None:
        self.spec = spec
        self.settings = settings
        self.health = health_aio.HealthServicer()
        self.authenticator = authenticator or Authenticator()
        # an agent's work methods wait for a fair share after they are known to be valid
        self.fair_share = (
            FairShareInterceptor(
                set(spec.policy.internal),
                per_caller=settings.max_running_per_caller,
                queue_per_caller=settings.max_queued_per_caller,
                max_in_flight=settings.max_in_flight,
            )
            if spec.policy.internal
            else None
        )
        self.health_watches = HealthWatchLimiter(
            per_connection=settings.max_health_watches_per_connection, total=settings.max_health_watches
        )
        self.server = grpc.aio.server(
            interceptors=[
                *([FormerServiceNames(spec.former_service_names)] if spec.former_service_names else []),
                ErrorDomainInterceptor(spec.name),
                *server_interceptors(),
                RpcObservabilityInterceptor(),
                self.health_watches,
                AuthInterceptor(self.authenticator, spec.policy),
                *spec.interceptors,
                ValidationInterceptor(spec.request_checks),
                *([self.fair_share] if self.fair_share is not None else []),
            ],
            options=[
                *message_size_options(settings.max_message_bytes),
                ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_s * 1000)),
            ],
        )
        # with TLS on, the kubelet's native gRPC probes (plaintext only) reach health here, and nothing else
        self.probe_server: grpc.aio.Server | None = None
        self.probe_port = 0
        self.port = 0
        self.ready = asyncio.Event()
        self.failed: BaseException | None = None
        self._warm_task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    async def _set_health(self, status: int) -> None:
        for name in ("", *self.spec.service_names):
            await self.health.set(name, status)

    async def start(self) -> int:
        self.spec.register(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [
                *self.spec.service_names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self.server,
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        address = f"{self.settings.host}:{self.settings.port}"
        credentials = server_credentials(self.settings.tls)
        self.port = (
            self.server.add_secure_port(address, credentials)
            if credentials is not None
            else self.server.add_insecure_port(address)
        )
        if self.port == 0:
            raise RuntimeError(f"cannot bind {self.settings.host}:{self.settings.port}")
        if self.settings.probe_port is not None:
            await self._start_probe_server()
        await self.server.start()
        log.info(
            "%s listening on %s:%d (%s, NOT_SERVING until warm)",
            self.spec.name,
            self.settings.host,
            self.port,
            "mTLS" if self.settings.tls.client_ca_file else "TLS" if credentials else "plaintext",
        )
        self._warm_task = asyncio.create_task(self._warm())
        return self.port

    async def _start_probe_server(self) -> None:
        """The plaintext health-only port (`probe_port`): the same health statuses as the service's own port (one
        HealthServicer), under the same cap on Watch streams; no other service, no reflection, no token needed
        (health never needs one). It stops last, so liveness still answers while the service drains."""
        self.probe_server = grpc.aio.server(interceptors=[ErrorDomainInterceptor(self.spec.name), self.health_watches])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.probe_server)
        address = f"{self.settings.host}:{self.settings.probe_port}"
        self.probe_port = self.probe_server.add_insecure_port(address)
        if self.probe_port == 0:
            raise RuntimeError(f"cannot bind the probe port {address}")
        await self.probe_server.start()
        log.info("%s health for probes on %s:%d (plaintext)", self.spec.name, self.settings.host, self.probe_port)

    async def _warm(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await self.spec.warm_up()
        except BaseException as exc:
            self.failed = exc
            log.exception("%s warm-up failed; stopping", self.spec.name)
            self._stopped.set()
            return
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self.ready.set()
        log.info(
            "%s SERVING after %.2fs warm-up",
            self.spec.name,
            loop.time() - started,
            extra={"warmup_s": round(loop.time() - started, 3)},
        )

    async def wait_ready(self) -> None:
        """Wait until SERVING; raises if warm-up failed."""
        assert self._warm_task is not None, "start() first"
        await self._warm_task
        if self.failed is not None:
            raise RuntimeError(f"{self.spec.name} warm-up failed") from self.failed

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking calls (health says NOT_SERVING at once), let in-flight calls finish within grace. The
        LIVENESS name stays SERVING: a draining process is alive, and a liveness probe must not kill it. With
        `shutdown_delay_s` new calls are still taken that long first, while clients that watch health move away."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.settings.shutdown_delay_s > 0:
            await asyncio.sleep(self.settings.shutdown_delay_s)
        if self._warm_task is not None and not self._warm_task.done():
            self._warm_task.cancel()
        await self.server.stop(self.settings.grace_seconds if grace is None else grace)
        if self.spec.close is not None:
            await self.spec.close()
        if self.probe_server is not None:
            await self.probe_server.stop(0)
        self._stopped.set()

    async def serve_until_signal(self) -> int:
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_requested.set)
        await self.start()
        waiter = asyncio.create_task(stop_requested.wait())
        crashed = asyncio.create_task(self._stopped.wait())
        await asyncio.wait({waiter, crashed}, return_when=asyncio.FIRST_COMPLETED)
        log.info("%s shutting down (grace %.1fs)", self.spec.name, self.settings.grace_seconds)
        await self.stop()
        waiter.cancel()
        crashed.cancel()
        return 1 if self.failed is not None else 0


def run_service(name: str, build: Callable[[], tuple[ServiceSpec, ServerSettings]]) -> None:
    """Process entry point shared by every `python -m services.<agent>`. `build` runs inside the event
    loop, so channels and other loop-bound objects it creates belong to the loop that serves."""
    otel_name = f"copilot-{name}"
    models_offline_by_default()
    return_freed_memory()  # before anything large is allocated
    configure_logging(otel_name)

    async def main() -> int:
        spec, settings = build()  # trace/metric proxies created here bind to the providers set next
        logging.getLogger().setLevel(settings.log_level.upper())
        # metrics listen where gRPC does unless told otherwise (127.0.0.1 on a workstation, 0.0.0.0 in a pod)
        setup_telemetry(otel_name, settings.metrics_host or settings.host, settings.metrics_port)
        return await AgentServer(spec, settings).serve_until_signal()

    try:
        code = asyncio.run(main())
    finally:
        shutdown_telemetry()
    raise SystemExit(code)
