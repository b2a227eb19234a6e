"""Report service process: settings and wiring."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from copilot.agents.v1 import report_pb2_grpc
from copilot.contracts import FORMER_AGENT_SERVICES, REPORT_SERVICE
from copilot.runtime.auth import AccessPolicy
from copilot.runtime.config import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, ServerSettings
from copilot.runtime.server import ServiceSpec, run_service
from services.report.servicer import ReportServicer

SERVICE_NAME = REPORT_SERVICE


class ReportSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="REPORT_", extra="ignore")

    port: int = DEFAULT_PORTS["report"]
    metrics_port: int = DEFAULT_METRICS_PORTS["report"]
    # a ComposeReportRequest is a few KB; 6.4 MB ones once blocked the event loop for seconds (issue #38)
    max_message_bytes: int = Field(1024 * 1024, gt=0)


def build(settings: ReportSettings | None = None) -> tuple[ServiceSpec, ReportSettings]:
    settings = settings or ReportSettings()

    async def warm_up() -> None:  # nothing to load: the composition is deterministic
        return None

    spec = ServiceSpec(
        name="report",
        service_names=[SERVICE_NAME],
        former_service_names={old: new for old, new in FORMER_AGENT_SERVICES.items() if new == SERVICE_NAME},
        register=lambda server: report_pb2_grpc.add_ReportServiceServicer_to_server(ReportServicer(), server),
        warm_up=warm_up,
        policy=AccessPolicy(internal=frozenset({f"/{SERVICE_NAME}/ComposeReport"})),
    )
    return spec, settings


def main() -> None:
    run_service("report", build)
