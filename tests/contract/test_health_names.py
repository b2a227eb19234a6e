"""Readiness and liveness are two health names: "" (and each service's name) is SERVING only while calls are
taken, so a stopping pod leaves the endpoints; LIVENESS stays SERVING from the first moment the server listens
until the process ends, so a liveness probe never kills a pod that is still warming up or about to drain. With a
shutdown delay (where no preStop hook runs: compose, Podman, a VM) calls are still answered during it."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from copilot.runtime.server import LIVENESS, AgentServer, ServiceSpec

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def test_liveness_stays_serving_through_warm_up_and_drain_while_readiness_does_not():
    from services.report.server import ReportSettings

    warm = asyncio.Event()

    async def warm_up() -> None:
        await warm.wait()

    spec = ServiceSpec("probe", ["copilot.agents.v1.ReportService"], register=lambda server: None, warm_up=warm_up)
    server = AgentServer(spec, ReportSettings(port=0, metrics_port=0, shutdown_delay_s=30))
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def status(name: str) -> int:
            return (await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)).status

        assert (await status("")) == NOT_SERVING and (await status(LIVENESS)) == SERVING  # warming up
        warm.set()
        await server.wait_ready()
        assert (await status("")) == SERVING and (await status(LIVENESS)) == SERVING
        stopping = asyncio.create_task(server.stop(grace=2))
        await asyncio.sleep(0)  # the stop has begun: health says so at once, within the delay
        assert (await status("")) == NOT_SERVING and (await status(LIVENESS)) == SERVING
        # and a new connection is still accepted and answered during the delay
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as fresh:
            reply = await health_pb2_grpc.HealthStub(fresh).Check(
                health_pb2.HealthCheckRequest(service=LIVENESS), timeout=5
            )
            assert reply.status == SERVING
        stopping.cancel()  # the rest is grpc's own drain (tested elsewhere); the delay is what is tested here
        await server.server.stop(0)
