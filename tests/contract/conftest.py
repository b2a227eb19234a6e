"""In-process servers built by each service's own `build()` on free ports, with the shared runtime."""

from __future__ import annotations

from contextlib import asynccontextmanager

import grpc
import pytest

from copilot.runtime.server import AgentServer


@asynccontextmanager
async def serving(spec, settings, *, ready: bool = True):
    """An AgentServer started on its settings' port (0 = free), stopped on exit."""
    server = AgentServer(spec, settings)
    await server.start()
    try:
        if ready:
            await server.wait_ready()
        yield server
    finally:
        await server.stop(0)


@pytest.fixture(scope="session")
async def vision_server(tmp_path_factory):
    from services.vision.server import VisionSettings, build

    settings = VisionSettings(port=0, reference_dir=tmp_path_factory.mktemp("vision-contract"))
    async with serving(*build(settings)) as server:
        yield server


@pytest.fixture(scope="session")
async def knowledge_server(knowledge_base):
    from services.rag.server import KnowledgeSettings, build

    async with serving(*build(KnowledgeSettings(port=0), knowledge=knowledge_base)) as server:
        yield server


@pytest.fixture(scope="session")
async def report_server():
    from services.report.server import ReportSettings, build

    async with serving(*build(ReportSettings(port=0))) as server:
        yield server


@pytest.fixture(scope="session")
async def copilot_server(vision_server, knowledge_server, report_server):
    from services.orchestrator.server import OrchestratorSettings, build

    settings = OrchestratorSettings(
        port=0,
        vision_addr=f"127.0.0.1:{vision_server.port}",
        knowledge_addr=f"127.0.0.1:{knowledge_server.port}",
        report_addr=f"127.0.0.1:{report_server.port}",
    )
    async with serving(*build(settings)) as server:
        yield server


def channel_to(server: AgentServer, role: str | None = "admin") -> grpc.aio.Channel:
    """A channel to `server` whose calls carry a JWT with `role` (None: no token at all)."""
    from copilot.client import aio_channel
    from tests.conftest import token

    return aio_channel(f"127.0.0.1:{server.port}", token(role) if role else None)
