"""OpenTelemetry set-up: one tracer and one meter provider per process with service.name, OTLP export
when OTEL_EXPORTER_OTLP_ENDPOINT is set, Prometheus /metrics on the metrics port, and the gRPC
instrumentation that carries the trace context in metadata."""

from __future__ import annotations

import os
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

_provider: TracerProvider | None = None
_meter_provider: MeterProvider | None = None


def _otlp_enabled(signal: str) -> bool:
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
    provider = TracerProvider(resource=resource)
    if _otlp_enabled("TRACES"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)

    readers: list[MetricReader] = []
    if metrics_port:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        readers.append(PrometheusMetricReader())
        start_http_server(metrics_port, addr=metrics_host)
    if _otlp_enabled("METRICS"):
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    _meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    metrics.set_meter_provider(_meter_provider)
    _provider = provider
    return provider


def shutdown_telemetry() -> None:
    if _provider is not None:
        _provider.shutdown()
    if _meter_provider is not None:
        _meter_provider.shutdown()


class _UntracedHealthChecks(grpc.aio.ServerInterceptor):
    """Health checks (kubelet probes every few seconds, the launcher's polling) make no spans: a trace per probe
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
