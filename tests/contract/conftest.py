"""In-process servers built by each service's own `build()` on free ports, with the shared runtime."""
from __future__ import annotations

import grpc
import pytest

from copilot.runtime.server import AgentServer


async def start(spec, settings) -> AgentServer:
    server = AgentServer(spec, settings)
    await server.start()
    await server.wait_ready()
    return server


@pytest.fixture(scope="session")
async def vision_server():
    from services.vision.server import VisionSettings, build

    server = await start(*build(VisionSettings(port=0)))
    yield server
    await server.stop(0)


@pytest.fixture(scope="session")
async def knowledge_server(knowledge_base):
    from services.rag.server import KnowledgeSettings, build

    server = await start(*build(KnowledgeSettings(port=0), knowledge=knowledge_base))
    yield server
    await server.stop(0)


@pytest.fixture(scope="session")
async def report_server():
    from services.report.server import ReportSettings, build

    server = await start(*build(ReportSettings(port=0)))
    yield server
    await server.stop(0)


@pytest.fixture(scope="session")
async def copilot_server(vision_server, knowledge_server, report_server):
    from services.orchestrator.server import OrchestratorSettings, build

    settings = OrchestratorSettings(
        port=0,
        vision_addr=f"127.0.0.1:{vision_server.port}",
        knowledge_addr=f"127.0.0.1:{knowledge_server.port}",
        report_addr=f"127.0.0.1:{report_server.port}",
    )
    server = await start(*build(settings))
    yield server
    await server.stop(0)


def channel_to(server: AgentServer) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
