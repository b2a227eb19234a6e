"""Vision service process: settings and wiring."""

from __future__ import annotations

import asyncio
import importlib
import logging
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from copilot.agents.v1 import vision_pb2_grpc
from copilot.contracts import FORMER_AGENT_SERVICES, VISION_SERVICE
from copilot.runtime.auth import AccessPolicy, Role
from copilot.runtime.config import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, ImageLimitSettings, ServerSettings, data_dir
from copilot.runtime.hosted import HostedModelSettings
from copilot.runtime.server import ServiceSpec, run_service
from services.vision.core import EngineTuning
from services.vision.servicer import VisionServicer

SERVICE_NAME = VISION_SERVICE
log = logging.getLogger(__name__)


class VisionSettings(ServerSettings, HostedModelSettings, ImageLimitSettings):
    model_config = SettingsConfigDict(env_prefix="VISION_", extra="ignore")

    port: int = DEFAULT_PORTS["vision"]
    metrics_port: int = DEFAULT_METRICS_PORTS["vision"]
    provider: Literal["patchcore", "hf-endpoint", "blip2-local", "openai-compatible"] = "patchcore"
    # patchcore
    reference_dir: Path = Field(default_factory=lambda: data_dir() / "vision-references")
    image_size: int = Field(256, ge=64, le=1024)
    coreset_ratio: float = Field(0.1, gt=0, le=1)
    threads: int = Field(
        0,
        ge=0,
        description="the backbone runtime's intra-op threads; 0 = 1 without batching (concurrent requests "
        "use the cores), the CPUs this process may use with batching (docs/performance.md)",
    )
    backbone_runtime: Literal["auto", "onnx", "torch"] = Field(
        "auto",
        description="auto = ONNX Runtime on a CPU (no torch import at start, less CPU per image than torch), "
        "torch on a GPU",
    )
    # where the backbone's ONNX graph is exported to, once (the image exports it at build time)
    onnx_dir: Path = Field(default_factory=lambda: data_dir() / "models")
    # A store shared by several replicas (one host, or a ReadWriteMany volume): how often to pick up what the
    # others registered or deleted; 0 = never (a store of its own).
    reference_sync_s: float = Field(2.0, ge=0)
    device: str = Field(
        "cpu",
        pattern=r"^(cpu|auto|cuda(:\d+)?)$",
        description="where the backbone runs: cpu (default, tested), cuda, cuda:N, auto",
    )
    batching: Literal["auto"] | bool = Field(
        "auto",
        description="dynamic batching of the model path; auto = on where the backbone runs on a GPU, off on a CPU "
        "(where it measured slower: copilot bench --suite vision, docs/performance.md)",
    )
    batch_max_size: int = Field(8, ge=1, le=128)
    decode_slots: int = Field(4, ge=1, le=64, description="photos decoded at once (decoding is the memory peak)")
    batch_max_wait_ms: float = Field(5.0, ge=0, le=1000)
    # the hosted model: model_endpoint (hf-endpoint: the URL of a BLIP-2 inference endpoint; openai-compatible:
    # the API's base URL), model_name, model_api_key, model_timeout_s, model_attempts (HostedModelSettings)
    model_path: str = ""  # blip2-local: the BLIP-2 weights folder

    def batching_on(self) -> bool:
        if self.batching == "auto":  # on where the backbone runs on a GPU
            from services.vision.backbone import resolve_device

            return self.device != "cpu" and (self.device != "auto" or resolve_device("auto").type != "cpu")
        return self.batching


def _import(module: str) -> None:
    importlib.import_module(module)


def build_provider(settings: VisionSettings, servicer: VisionServicer) -> None:
    """Load the configured provider (blocking: runs in a thread during warm-up)."""
    from services.vision import providers

    limits = settings.image_limits()
    if settings.provider == "patchcore":
        from PIL import Image

        from copilot.runtime.batching import DynamicBatcher
        from copilot.runtime.metrics import copilot_metrics
        from services.vision.backbone import feature_extractor
        from services.vision.core import VisionEngine
        from services.vision.references import ReferenceStore

        batching = settings.batching_on()
        threads = settings.threads or (None if batching else 1)  # None: every CPU this process may use
        engine = VisionEngine(
            feature_extractor(
                settings.image_size, threads, settings.device, settings.onnx_dir, settings.backbone_runtime
            ),
            ReferenceStore(settings.reference_dir),
            limits,
            EngineTuning(image_size=settings.image_size, coreset_ratio=settings.coreset_ratio),
        )
        engine.seed_starter_set()
        engine.load()
        batcher = None
        if batching:
            meters = copilot_metrics()
            batcher = DynamicBatcher(
                engine.measure,
                max_batch=settings.batch_max_size,
                max_wait_s=settings.batch_max_wait_ms / 1000,
                on_batch=lambda size, _s: meters.batch_size.record(size),
            )
        servicer.engine = engine
        provider = providers.PatchCoreProvider(engine, batcher, settings.decode_slots)
        provider.warm_up(
            Image.new("RGB", (settings.image_size, settings.image_size), (128, 128, 128)), settings.batch_max_size
        )
        servicer.provider = provider
    elif settings.provider == "hf-endpoint":
        servicer.provider = providers.HfEndpointProvider(settings.hosted_model(), limits)
    elif settings.provider == "blip2-local":
        servicer.provider = providers.Blip2LocalProvider(settings.model_path, limits)
    else:
        servicer.provider = providers.OpenAICompatibleProvider(settings.hosted_model(), limits)


def build(settings: VisionSettings | None = None) -> tuple[ServiceSpec, VisionSettings]:
    settings = settings or VisionSettings()
    servicer = VisionServicer()

    tasks: list[asyncio.Task[None]] = []

    async def sync_references() -> None:
        while True:
            await asyncio.sleep(settings.reference_sync_s)
            engine = servicer.engine
            if engine is None:  # a provider without reference images
                return
            try:
                changed = await asyncio.to_thread(engine.sync)
                if changed:
                    log.info("reference sets changed by another replica: %s", sorted(changed))
            except Exception:
                log.exception("reference sync failed")

    async def warm_up() -> None:
        await asyncio.to_thread(build_provider, settings, servicer)
        if servicer.engine is not None:
            # what only an analysis's regions need (scipy.ndimage: 0.3 s of a ~2.7 s start) is imported in the
            # background once the replica serves; an analysis arriving meanwhile waits for that import
            tasks.append(asyncio.create_task(asyncio.to_thread(_import, "scipy.ndimage")))
        if servicer.engine is not None and settings.reference_sync_s > 0:
            tasks.append(asyncio.create_task(sync_references()))

    async def close() -> None:
        for task in tasks:
            task.cancel()
        if servicer.provider is not None:
            await servicer.provider.close()
        if servicer.engine is not None:
            await asyncio.to_thread(servicer.engine.close)

    spec = ServiceSpec(
        name="vision",
        service_names=[SERVICE_NAME],
        former_service_names={old: new for old, new in FORMER_AGENT_SERVICES.items() if new == SERVICE_NAME},
        register=lambda server: vision_pb2_grpc.add_VisionServiceServicer_to_server(servicer, server),
        warm_up=warm_up,
        close=close,
        policy=AccessPolicy(
            internal=frozenset({f"/{SERVICE_NAME}/AnalyzeImage"}),
            methods={
                f"/{SERVICE_NAME}/RegisterReference": Role.ENGINEER,
                f"/{SERVICE_NAME}/DeleteReference": Role.ENGINEER,
            },
        ),
    )
    return spec, settings


def main() -> None:
    run_service("vision", build)
