"""Configuration base classes (pydantic-settings): every service reads its settings from the environment."""
from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# Documented default ports of the mesh; `copilot up` and the Kubernetes manifests use the same numbers.
DEFAULT_PORTS = {"orchestrator": 50051, "vision": 50052, "knowledge": 50053, "report": 50054}
DEFAULT_METRICS_PORTS = {"orchestrator": 9464, "vision": 9465, "knowledge": 9466, "report": 9467}


class ServerSettings(BaseSettings):
    """What every gRPC server process reads. Subclasses set `env_prefix` (e.g. VISION_)."""

    model_config = SettingsConfigDict(extra="ignore")

    host: str = Field("127.0.0.1", description="interface to bind; 0.0.0.0 in containers")
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port")
    grace_seconds: float = Field(10.0, gt=0, description="drain time after SIGTERM")
    max_message_bytes: int = Field(16 * 1024 * 1024, gt=0)
    log_level: str = "INFO"
    metrics_host: str = Field("0.0.0.0", description="interface of the Prometheus /metrics endpoint")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port; 0 disables")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def message_size_options(max_bytes: int) -> list[tuple[str, int]]:
    """The same limits for servers and channels, so a message one side accepts the other can send."""
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
    ]
