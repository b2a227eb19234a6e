"""Orchestrator process: settings and wiring."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import SettingsConfigDict

from copilot.contracts import COPILOT_SERVICE
from copilot.domain import DiagnosisInput, PastIncident, utc_now
from copilot.equipment import EquipmentRegistry
from copilot.runtime.admission import AdmissionInterceptor
from copilot.runtime.auth import ServiceIdentity
from copilot.runtime.config import (
    DEFAULT_METRICS_PORTS,
    DEFAULT_PORTS,
    ImageLimitSettings,
    ServerSettings,
    incident_history_url,
)
from copilot.runtime.server import ServiceSpec, run_service
from copilot.v1 import copilot_pb2_grpc
from services.orchestrator.clients import AgentClients, GrpcAgentClients
from services.orchestrator.equipment import DEFAULT_REGISTRY, EquipmentResolver
from services.orchestrator.history import IncidentStore
from services.orchestrator.servicer import CopilotServicer
from services.orchestrator.validation import request_violations
from services.orchestrator.workflow import DiagnosisWorkflow, RelatedIncidents, StageTimeouts

log = logging.getLogger(__name__)
SERVICE_NAME = COPILOT_SERVICE
DIAGNOSIS_METHODS = {f"/{SERVICE_NAME}/{name}" for name in ("Diagnose", "StreamDiagnose", "DiagnoseBatch")}


class OrchestratorSettings(ServerSettings, ImageLimitSettings):
    model_config = SettingsConfigDict(env_prefix="ORCHESTRATOR_", extra="ignore", populate_by_name=True)

    port: int = DEFAULT_PORTS["orchestrator"]
    metrics_port: int = DEFAULT_METRICS_PORTS["orchestrator"]
    # Agent addresses: host:port, or dns:///name:port for a headless Service (round_robin over pods).
    vision_addr: str = Field(f"localhost:{DEFAULT_PORTS['vision']}", validation_alias=AliasChoices("VISION_ADDR"))
    knowledge_addr: str = Field(
        f"localhost:{DEFAULT_PORTS['knowledge']}", validation_alias=AliasChoices("KNOWLEDGE_ADDR")
    )
    report_addr: str = Field(f"localhost:{DEFAULT_PORTS['report']}", validation_alias=AliasChoices("REPORT_ADDR"))
    vision_timeout_s: float = 10.0
    knowledge_timeout_s: float = 15.0
    report_timeout_s: float = 5.0
    # Vision and knowledge at once (knowledge then does not see the defects); see `copilot bench --suite mesh`.
    parallel_stages: bool = False
    # Incident history: SQLAlchemy URL (sqlite:///path, or postgresql+psycopg://user:pw@host/db).
    database_url: str = Field(default_factory=incident_history_url)
    related_incidents: int = Field(3, ge=0, le=10, description="past incidents cited in a report's follow-up")
    equipment_registry: Path | None = Field(
        DEFAULT_REGISTRY,
        description="YAML equipment registry (equipment id or pattern -> machine type, reference set); empty: none",
    )

    @field_validator("equipment_registry", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value is None or (isinstance(value, str) and not value.strip()) else value

    # Backpressure: diagnoses in flight (a batch counts once) and a per-principal rate (a batch of n costs n).
    max_in_flight: int = Field(64, ge=1)
    max_in_flight_per_principal: int = Field(
        0, ge=0, description="one caller's share of max_in_flight; 0: half of it (at least 1)"
    )
    rate_limit: str = Field("600/minute", description="`limits` syntax, e.g. 10/second; empty disables")
    rate_limit_storage: str = Field(
        "memory://",
        description="where the rate windows live: memory:// (this process) or redis://host:6379/0 (every replica "
        "shares them); unreachable storage admits calls (fail open, counted)",
    )
    retry_after_s: float = Field(1.0, gt=0)
    batch_max_items: int = Field(32, ge=1, le=256)
    # Feedback is stored text that every later report on the equipment may quote: bounded per principal and per
    # incident, so no user can fill another's incident (GetIncident, ListIncidents pages stay under the message size)
    feedback_rate_limit: str = Field("30/minute", description="per principal, `limits` syntax; empty disables")
    feedback_max_per_incident: int = Field(20, ge=0, le=1000, description="0: no cap")
    batch_concurrency: int = Field(4, ge=1, le=64)
    # Photos are kept with their incidents (once per content hash, trailing bytes stripped): bounded per principal
    # and in time, so no user can fill the history's disk (issue #38: 6 GB a minute at the default rate before)
    photo_quota_mib_per_day: int = Field(
        1024, ge=0, description="MiB of photos one principal may send a day (shared like the rate); 0: no quota"
    )
    photo_retention_days: int = Field(
        90, ge=0, description="a photo's bytes are dropped this long after its newest incident; 0: kept for ever"
    )


def _diagnoses(method: str, request) -> list:
    """The DiagnoseRequests a diagnosis call carries (admission runs before validation: bytes that did not decode
    carry none, and are refused later)."""
    if method.endswith("/DiagnoseBatch"):
        return list(getattr(request, "requests", ()))
    if method.endswith("/StreamDiagnose"):
        return [request.diagnosis] if hasattr(request, "diagnosis") else []
    return [request] if hasattr(request, "image") else []


def _cost(method: str, request) -> int:
    """A batch of n diagnoses costs n of the caller's rate (undecodable bytes cost 1 and are refused later)."""
    return max(1, len(_diagnoses(method, request)))


def _photo_kib(method: str, request) -> int:
    """KiB of photos a diagnosis call sends (rounded up per photo), for the photo quota."""
    return sum(-(-len(d.image.data) // 1024) for d in _diagnoses(method, request))


#: how often a replica drops the bytes of photos past their retention
PHOTO_EXPIRY_INTERVAL_S = 3600.0


def related_incidents(history: IncidentStore, limit: int) -> RelatedIncidents | None:
    """The workflow's similar-incident lookup over the history (in a worker thread); None when `limit` is 0."""
    if not limit:
        return None

    async def related(request: DiagnosisInput, request_id: str) -> Sequence[PastIncident]:
        return await asyncio.to_thread(
            history.similar,
            request.plant_id,
            request.equipment_id,
            request.problem_description,
            exclude=request_id,
            limit=limit,
        )

    return related


def build(
    settings: OrchestratorSettings | None = None, *, clients: AgentClients | None = None
) -> tuple[ServiceSpec, OrchestratorSettings]:
    """`clients` defaults to gRPC channels to the three agents (tests may pass in-process ones)."""
    settings = settings or OrchestratorSettings()
    if settings.max_image_bytes > settings.max_message_bytes - 64 * 1024:
        raise ValueError(
            "ORCHESTRATOR_MAX_IMAGE_BYTES must leave room for the rest of the message below "
            "ORCHESTRATOR_MAX_MESSAGE_BYTES"
        )
    clients = clients or GrpcAgentClients(
        settings.vision_addr,
        settings.knowledge_addr,
        settings.report_addr,
        identity=ServiceIdentity("orchestrator").header,
        max_message_bytes=settings.max_message_bytes,
        tls=settings.tls,
    )
    history = IncidentStore(settings.database_url)
    registry = EquipmentRegistry.load(settings.equipment_registry)
    log.info("equipment registry: %d entries from %s", len(registry.entries), settings.equipment_registry)
    workflow = DiagnosisWorkflow(
        clients,
        StageTimeouts(settings.vision_timeout_s, settings.knowledge_timeout_s, settings.report_timeout_s),
        parallel=settings.parallel_stages,
        related_incidents=related_incidents(history, settings.related_incidents),
        equipment=EquipmentResolver(
            registry,
            reference_sets=(lambda: clients.reference_sets(2.0)) if isinstance(clients, GrpcAgentClients) else None,
        ),
    )
    limits = settings.image_limits()
    servicer = CopilotServicer(
        workflow,
        history,
        image_limits=limits,
        batch_max_items=settings.batch_max_items,
        batch_concurrency=settings.batch_concurrency,
        catalog=clients if isinstance(clients, GrpcAgentClients) else None,
        feedback_max_per_incident=settings.feedback_max_per_incident,
    )

    background: list[asyncio.Task[None]] = []

    async def expire_photos() -> None:
        """Every replica runs it (the update is idempotent); a failure is logged and tried again next round."""
        while True:
            cutoff = utc_now() - timedelta(days=settings.photo_retention_days)
            try:
                photos, freed = await asyncio.to_thread(history.expire_photos, cutoff)
                if photos:
                    log.info("dropped %d photos (%d bytes) past %d days", photos, freed, settings.photo_retention_days)
            except Exception:
                log.exception("expiring photos failed")
            await asyncio.sleep(PHOTO_EXPIRY_INTERVAL_S)

    async def warm_up() -> None:
        # agents are dialled lazily; a missing agent degrades its stage, it does not block start-up
        if settings.photo_retention_days:
            background.append(asyncio.create_task(expire_photos()))

    async def close() -> None:
        for task in background:
            task.cancel()
        await clients.close()
        history.close()

    spec = ServiceSpec(
        name="orchestrator",
        service_names=[SERVICE_NAME],
        register=lambda server: copilot_pb2_grpc.add_CopilotServiceServicer_to_server(servicer, server),
        warm_up=warm_up,
        close=close,
        # the image checks join the proto rules' violations in one INVALID_ARGUMENT (batch items: per item)
        request_checks={
            f"/{SERVICE_NAME}/Diagnose": lambda r: request_violations(r, limits),
            f"/{SERVICE_NAME}/StreamDiagnose": lambda r: request_violations(r.diagnosis, limits, "diagnosis."),
        },
        interceptors=[
            AdmissionInterceptor(
                DIAGNOSIS_METHODS,
                max_in_flight=settings.max_in_flight,
                rate=settings.rate_limit,
                retry_after_s=settings.retry_after_s,
                cost=_cost,
                max_in_flight_per_principal=settings.max_in_flight_per_principal or max(1, settings.max_in_flight // 2),
                storage_uri=settings.rate_limit_storage,
            ),
            *(
                [
                    AdmissionInterceptor(
                        DIAGNOSIS_METHODS,
                        max_in_flight=0,  # the interceptor above holds the in-flight cap
                        rate=f"{settings.photo_quota_mib_per_day * 1024}/day",  # in KiB
                        cost=_photo_kib,
                        storage_uri=settings.rate_limit_storage,
                        reason="photo_quota",
                        explain=lambda key, wait: (
                            f"{key} has sent {settings.photo_quota_mib_per_day} MiB of photos in the last day, the "
                            f"most one principal may store (ORCHESTRATOR_PHOTO_QUOTA_MIB_PER_DAY); send the diagnosis "
                            f"without a photo, or retry in {wait:.0f}s"
                        ),
                    )
                ]
                if settings.photo_quota_mib_per_day
                else []
            ),
            AdmissionInterceptor(
                {f"/{SERVICE_NAME}/SubmitFeedback"},
                max_in_flight=settings.max_in_flight,
                rate=settings.feedback_rate_limit,
                retry_after_s=settings.retry_after_s,
                storage_uri=settings.rate_limit_storage,
            ),
        ],
    )
    return spec, settings


def main() -> None:
    run_service("orchestrator", build)
