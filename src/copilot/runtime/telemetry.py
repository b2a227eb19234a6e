"""OpenTelemetry set-up: one tracer and one meter provider per process with service.name, OTLP export
when OTEL_EXPORTER_OTLP_ENDPOINT is set, Prometheus /metrics on the metrics port, and the gRPC
instrumentation that carries the trace context in metadata."""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Any

import grpc
from opentelemetry import metrics, trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from copilot import __version__
from copilot.runtime.interceptors import HEALTH, service_of

log = logging.getLogger(__name__)
_closed = False

_provider: TracerProvider | None = None
_meter_provider: MeterProvider | None = None


def _otlp_enabled(signal: str) -> bool:
    """OTLP export of one signal: an endpoint is configured and OTEL_<SIGNAL>_EXPORTER (the SDK's standard
    variable, e.g. OTEL_METRICS_EXPORTER=prometheus in a cluster that scrapes) does not leave OTLP out; metrics
    sent both ways would be counted twice."""
    exporters = os.environ.get(f"OTEL_{signal}_EXPORTER", "otlp")
    if "otlp" not in {name.strip() for name in exporters.lower().split(",")}:
        return False
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
    )


def setup_telemetry(service_name: str, metrics_host: str = "0.0.0.0", metrics_port: int = 0) -> TracerProvider:
    """Install the process-wide tracer and meter providers (idempotent). `metrics_port` > 0 serves
    Prometheus /metrics on that port."""
    global _provider, _meter_provider  # noqa: PLW0603 - one tracer/meter provider per process, set once
    if _provider is not None:
        return _provider
    resource = Resource.create(
        {"service.name": service_name, "service.version": __version__, "service.namespace": "manufacturing-copilot"}
    )
    # shutdown_on_exit off: the SDK's own exit hook would wait on an unreachable collector without a bound;
    # shutdown_telemetry (bounded) runs at exit instead
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    if _otlp_enabled("TRACES"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)

    readers: list[MetricReader] = []
    if metrics_port:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        readers.append(PrometheusMetricReader())
        serve_metrics(metrics_port, metrics_host)
    if _otlp_enabled("METRICS"):
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    _meter_provider = MeterProvider(resource=resource, metric_readers=readers, shutdown_on_exit=False)
    atexit.register(shutdown_telemetry)
    metrics.set_meter_provider(_meter_provider)
    _provider = provider
    return provider


#: How long a stopping process waits for its last spans and metrics to be exported. A collector that cannot be
#: reached (not resolvable, a black hole) would hold the exporter in its timeout and retries well past a pod's
#: grace period, and the kubelet would SIGKILL it: a process exits on time and drops what is left instead.
SHUTDOWN_TIMEOUT_S = 3.0


METRICS_PATH = "/metrics"


def serve_metrics(port: int, host: str) -> Any:
    """Prometheus text on `/metrics` only (any other path is 404: prometheus_client's own server answered 200 on
    every path), on a daemon thread; returns the server (its `server_port` is the port bound)."""
    from wsgiref.simple_server import make_server

    from prometheus_client import make_wsgi_app
    from prometheus_client.exposition import ThreadingWSGIServer, _get_best_family, _SilentHandler

    metrics_app = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") != METRICS_PATH:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: metrics are at /metrics\n"]
        return metrics_app(environ, start_response)

    class Server(ThreadingWSGIServer):  # IPv4 or IPv6, as the host asks (prometheus_client does the same)
        pass

    Server.address_family, host = _get_best_family(host, port)  # type: ignore[no-untyped-call]
    server = make_server(host, port, app, Server, handler_class=_SilentHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def shutdown_telemetry(timeout_s: float = SHUTDOWN_TIMEOUT_S) -> bool:
    """Flush and close the providers, waiting at most `timeout_s`; False when the export did not finish (what was
    left is dropped, logged). The work runs on a daemon thread, so an exporter stuck on the network cannot keep
    the process alive."""
    global _closed  # noqa: PLW0603 - once per process, whoever asks first (run_service, or the exit hook)
    providers = [p for p in (_provider, _meter_provider) if p is not None]
    if not providers or _closed:
        return True
    _closed = True

    def close() -> None:
        for provider in providers:
            try:
                provider.shutdown()
            except Exception:  # an exporter failing on the way out must not fail the exit
                log.warning("telemetry shutdown failed", exc_info=True)

    closer = threading.Thread(target=close, name="telemetry-shutdown", daemon=True)
    closer.start()
    closer.join(timeout_s)
    if closer.is_alive():
        log.warning("telemetry export did not finish within %.1fs at shutdown; the rest is dropped", timeout_s)
        return False
    return True


class _UntracedHealthChecks(grpc.aio.ServerInterceptor):
    """Health checks (kubelet probes every few seconds, the launcher's polling) make no spans.

    A trace per probe
    would bury the diagnoses SREs look for in Jaeger. (The instrumentation's own `filter_` breaks unary calls it
    filters out on the asyncio server, so the tracing interceptor is skipped here instead.)"""

    def __init__(self, tracing: grpc.aio.ServerInterceptor) -> None:
        self.tracing = tracing

    async def intercept_service(self, continuation: Any, handler_call_details: grpc.HandlerCallDetails) -> Any:
        if service_of(handler_call_details.method) == HEALTH:
            return await continuation(handler_call_details)
        return await self.tracing.intercept_service(continuation, handler_call_details)


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    # opentelemetry-instrumentation-grpc ships no annotations
    interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor()  # type: ignore[no-untyped-call]
    return [_UntracedHealthChecks(interceptor)]


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    interceptors: list[grpc.aio.ClientInterceptor] = aio_client_interceptors()  # type: ignore[no-untyped-call]
    return list(interceptors)


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)
