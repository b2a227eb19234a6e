"""Vision service process: settings and wiring."""
from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from copilot.contracts import VISION_SERVICE
from copilot.runtime.config import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, ServerSettings
from copilot.runtime.server import ServiceSpec, run_service
from copilot.v1 import vision_pb2_grpc
from services.vision.core import ImageLimits, TextureInspector
from services.vision.servicer import VisionServicer

SERVICE_NAME = VISION_SERVICE


class VisionSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="VISION_", extra="ignore")

    port: int = DEFAULT_PORTS["vision"]
    metrics_port: int = DEFAULT_METRICS_PORTS["vision"]
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000


def build(settings: VisionSettings | None = None) -> tuple[ServiceSpec, VisionSettings]:
    settings = settings or VisionSettings()
    inspector = TextureInspector(ImageLimits(settings.max_image_bytes, settings.max_image_pixels))

    async def warm_up() -> None:
        # Analysing a generated image once loads numpy/scipy code paths before the first real call.
        from copilot.samples import brushed_metal, to_bytes

        inspector.analyze(to_bytes(brushed_metal(64)))

    spec = ServiceSpec(
        name="vision",
        service_names=[SERVICE_NAME],
        register=lambda server: vision_pb2_grpc.add_VisionServiceServicer_to_server(VisionServicer(inspector), server),
        warm_up=warm_up,
    )
    return spec, settings


def main() -> None:
    run_service("vision", build)
