"""Every server closes its connections after `max_connection_age_s` (GOAWAY) and gives the calls on them time to
finish: clients then reconnect and re-resolve the service's name, which is what lets a replica added under load
get calls. Observed as the client channel's own connectivity: READY, then a new connection, calls answered all
along. The wait is bounded generously (the age is 1 s); no figure of speed is asserted."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.contract.conftest import serving


async def test_connections_are_aged_out_and_calls_carry_on(tmp_path):
    from services.report.server import ReportSettings, build

    settings = ReportSettings(port=0, metrics_port=0, max_connection_age_s=1.0, max_connection_age_grace_s=5.0)
    async with serving(*build(settings)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="")
            assert (await health.Check(check, timeout=5)).status == health_pb2.HealthCheckResponse.SERVING
            assert channel.get_state() is grpc.ChannelConnectivity.READY
            seen = []
            for _ in range(300):  # up to ~30 s: the server's GOAWAY moves the channel off READY
                state = channel.get_state()
                seen.append(state)
                if state is not grpc.ChannelConnectivity.READY:
                    break
                await asyncio.sleep(0.1)
            assert seen[-1] is not grpc.ChannelConnectivity.READY, "the connection was never aged out"
            # the next call connects again (re-resolving the target) and is answered
            assert (await health.Check(check, timeout=5)).status == health_pb2.HealthCheckResponse.SERVING
