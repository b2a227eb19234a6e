"""Orchestrator process: settings and wiring."""
from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from copilot.contracts import COPILOT_SERVICE
from copilot.runtime.config import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, ServerSettings
from copilot.runtime.interceptors import BearerAuthInterceptor
from copilot.runtime.server import ServiceSpec, run_service
from copilot.v1 import copilot_pb2_grpc
from services.orchestrator.clients import GrpcAgentClients
from services.orchestrator.servicer import CopilotServicer
from services.orchestrator.workflow import DiagnosisWorkflow, StageTimeouts

SERVICE_NAME = COPILOT_SERVICE


class OrchestratorSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="ORCHESTRATOR_", extra="ignore", populate_by_name=True)

    port: int = DEFAULT_PORTS["orchestrator"]
    metrics_port: int = DEFAULT_METRICS_PORTS["orchestrator"]
    # Agent addresses: host:port, or dns:///name:port for a headless Service (round_robin over pods).
    vision_addr: str = Field(f"localhost:{DEFAULT_PORTS['vision']}", validation_alias=AliasChoices("VISION_ADDR"))
    knowledge_addr: str = Field(f"localhost:{DEFAULT_PORTS['knowledge']}",
                                validation_alias=AliasChoices("KNOWLEDGE_ADDR"))
    report_addr: str = Field(f"localhost:{DEFAULT_PORTS['report']}", validation_alias=AliasChoices("REPORT_ADDR"))
    vision_timeout_s: float = 10.0
    knowledge_timeout_s: float = 15.0
    report_timeout_s: float = 5.0
    max_image_bytes: int = 10 * 1024 * 1024


def build(settings: OrchestratorSettings | None = None) -> tuple[ServiceSpec, OrchestratorSettings]:
    settings = settings or OrchestratorSettings()
    clients = GrpcAgentClients(settings.vision_addr, settings.knowledge_addr, settings.report_addr,
                               max_message_bytes=settings.max_message_bytes)
    workflow = DiagnosisWorkflow(clients, StageTimeouts(settings.vision_timeout_s, settings.knowledge_timeout_s,
                                                        settings.report_timeout_s))
    servicer = CopilotServicer(workflow, max_image_bytes=settings.max_image_bytes)

    async def warm_up() -> None:
        return None  # agents are dialled lazily; a missing agent degrades its stage, it does not block start-up

    spec = ServiceSpec(
        name="orchestrator",
        service_names=[SERVICE_NAME],
        register=lambda server: copilot_pb2_grpc.add_CopilotServiceServicer_to_server(servicer, server),
        warm_up=warm_up,
        close=clients.close,
        interceptors=[BearerAuthInterceptor([SERVICE_NAME])],
    )
    return spec, settings


def main() -> None:
    run_service("orchestrator", build)
