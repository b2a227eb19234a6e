"""Metrics through the OpenTelemetry API, exported for Prometheus scraping (`<PREFIX>_METRICS_PORT`,
path /metrics) and over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set. Prometheus names: dots become
underscores, counters end in _total, histograms in seconds end in _seconds."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from opentelemetry import metrics

_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class CopilotMetrics:
    """Every metric instrument the services record, created once per process."""

    rpc_requests: metrics.Counter
    rpc_duration: metrics.Histogram
    rpc_in_flight: metrics.UpDownCounter
    stage_duration: metrics.Histogram
    stage_degraded: metrics.Counter
    diagnoses: metrics.Counter
    escalations: metrics.Counter
    diagnosis_confidence: metrics.Histogram
    inference_duration: metrics.Histogram
    defects: metrics.Counter
    retrieval_results: metrics.Histogram
    retrieval_top_score: metrics.Histogram
    guidance_fallbacks: metrics.Counter
    batch_size: metrics.Histogram
    query_batch_size: metrics.Histogram
    generator_cache: metrics.Counter
    citations_removed: metrics.Counter
    unsupported_steps: metrics.Counter
    documents_ingested: metrics.Counter
    admission_rejected: metrics.Counter
    admission_limiter_errors: metrics.Counter
    incidents_replayed: metrics.Counter
    diagnosis_duration: metrics.Histogram
    incident_store_failures: metrics.Counter


@lru_cache(maxsize=1)
def copilot_metrics() -> CopilotMetrics:
    """The process's instruments, created once from the installed meter provider."""
    m = metrics.get_meter("copilot")
    seconds: dict[str, Any] = {"unit": "s", "explicit_bucket_boundaries_advisory": _LATENCY_BUCKETS_S}
    return CopilotMetrics(
        rpc_requests=m.create_counter("copilot.rpc.requests", description="RPCs served, by method and status code"),
        rpc_duration=m.create_histogram("copilot.rpc.duration", description="RPC latency, by method", **seconds),
        rpc_in_flight=m.create_up_down_counter("copilot.rpc.in_flight", description="RPCs being served now"),
        stage_duration=m.create_histogram(
            "copilot.stage.duration", description="workflow stage latency, by stage and state", **seconds
        ),
        stage_degraded=m.create_counter("copilot.stage.degraded", description="stages that degraded, by stage"),
        diagnoses=m.create_counter("copilot.diagnoses", description="diagnoses completed"),
        escalations=m.create_counter("copilot.escalations", description="diagnoses sent to manual review"),
        diagnosis_confidence=m.create_histogram(
            "copilot.diagnosis.confidence",
            description="merged diagnosis confidence",
            explicit_bucket_boundaries_advisory=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
        ),
        inference_duration=m.create_histogram(
            "copilot.model.inference.duration", description="model/analyser time per request, by model", **seconds
        ),
        defects=m.create_counter("copilot.vision.defects", description="defects reported, by type"),
        retrieval_results=m.create_histogram(
            "copilot.retrieval.results",
            description="chunks returned (Retrieve) or cited (Advise) per call",
            explicit_bucket_boundaries_advisory=(0, 1, 2, 3, 5, 10, 20),
        ),
        retrieval_top_score=m.create_histogram(
            "copilot.retrieval.top_score",
            description="cosine score of the best retrieved chunk",
            explicit_bucket_boundaries_advisory=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
        ),
        guidance_fallbacks=m.create_counter(
            "copilot.guidance.fallbacks", description="guidance answered with the no-evidence fallback"
        ),
        batch_size=m.create_histogram(
            "copilot.vision.batch_size",
            description="images per forward pass",
            explicit_bucket_boundaries_advisory=(1, 2, 4, 8, 16, 32, 64),
        ),
        query_batch_size=m.create_histogram(
            "copilot.knowledge.query_batch_size",
            description="query embeddings per forward pass",
            explicit_bucket_boundaries_advisory=(1, 2, 4, 8, 16, 32, 64),
        ),
        generator_cache=m.create_counter(
            "copilot.generator.cache",
            description="guidance generator response cache lookups, by result (hit/miss); "
            "hit ratio = hit / (hit + miss)",
        ),
        citations_removed=m.create_counter(
            "copilot.guidance.citations_removed",
            description="generator citations to documents not retrieved or not saying it",
        ),
        unsupported_steps=m.create_counter(
            "copilot.guidance.unsupported_steps", description="guidance steps no retrieved document supports"
        ),
        documents_ingested=m.create_counter(
            "copilot.documents.ingested",
            description="document uploads, by outcome (created/replaced/unchanged/rejected)",
        ),
        admission_rejected=m.create_counter(
            "copilot.admission.rejected", description="calls refused with RESOURCE_EXHAUSTED, by reason"
        ),
        admission_limiter_errors=m.create_counter(
            "copilot.admission.limiter_errors",
            description="rate checks whose storage (Redis) could not be reached: admitted without a limit (fail open)",
        ),
        incidents_replayed=m.create_counter(
            "copilot.incidents.replayed", description="Diagnose retries answered from the incident history"
        ),
        diagnosis_duration=m.create_histogram(
            "copilot.diagnosis.duration",
            description="a diagnosis's workflow from request to answer, by photo=true|false (the latency SLOs)",
            **seconds,
        ),
        incident_store_failures=m.create_counter(
            "copilot.incidents.store_failures",
            description="answers refused (UNAVAILABLE) because their incident could not be stored",
        ),
    )
