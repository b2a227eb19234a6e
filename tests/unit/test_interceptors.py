"""The shared interceptors wrap every kind of RPC on the asyncio server by themselves, without the tracing
interceptor in front (it is skipped for health checks): unary (Health/Check), unary-stream (Health/Watch) and
stream-stream (ServerReflectionInfo)."""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from copilot.runtime.interceptors import RpcObservabilityInterceptor


def test_every_rpc_kind_runs_through_the_interceptors_alone(caplog):
    async def scenario() -> None:
        server = grpc.aio.server(interceptors=[RpcObservabilityInterceptor()])
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        reflection.enable_server_reflection([health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                checked = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert checked.status == health_pb2.HealthCheckResponse.SERVING
                watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=5)
                first = await watch.read()
                assert first.status == health_pb2.HealthCheckResponse.SERVING
                watch.cancel()
                reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
                answers = [
                    a
                    async for a in reflect.ServerReflectionInfo(
                        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
                    )
                ]
                assert health.SERVICE_NAME in {s.name for s in answers[0].list_services_response.service}
        finally:
            await server.stop(None)

    with caplog.at_level(logging.DEBUG, logger="copilot.rpc"):
        asyncio.run(scenario())
    levels = {(r.getMessage(), r.levelno) for r in caplog.records if r.name == "copilot.rpc"}
    # a successful probe is logged below INFO; the other RPCs at INFO
    assert ("rpc /grpc.health.v1.Health/Check OK", logging.DEBUG) in levels
    assert any(m.startswith("rpc /grpc.reflection") and lvl == logging.INFO for m, lvl in levels), levels
