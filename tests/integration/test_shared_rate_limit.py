"""One principal's rate limit across orchestrator replicas, on a real Redis (Debian's redis-server, started by the
test; .ci/run installs it): two orchestrators share the window, so the limit holds for the fleet, not per pod.
Redis down: calls are admitted (fail open) and counted; Redis back: the limit holds again."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from contextlib import AsyncExitStack

import grpc
import pytest

from copilot.client import aio_channel, diagnose_request
from copilot.v1 import copilot_pb2_grpc
from copilot_cli.launcher import free_port
from tests.conftest import token
from tests.contract.conftest import serving
from tests.fakes import FakeAgents

pytestmark = pytest.mark.integration


class RedisServer:
    def __init__(self, folder) -> None:
        self.port = free_port()
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not answer")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None


@pytest.fixture
def redis_server(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does)")
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def _replicas(stack: AsyncExitStack, tmp_path, redis_url: str, count: int = 2, **overrides):
    """`count` orchestrators on one incident database and one Redis, each with its own fake agents."""
    from services.orchestrator.server import OrchestratorSettings, build

    stubs = []
    for _ in range(count):
        settings = OrchestratorSettings(
            port=0,
            database_url=f"sqlite:///{tmp_path / 'incidents.db'}",
            rate_limit_storage=redis_url,
            metrics_port=0,
            **overrides,
        )
        server = await stack.enter_async_context(serving(*build(settings, clients=FakeAgents())))
        channel = await stack.enter_async_context(
            aio_channel(f"127.0.0.1:{server.port}", token("technician", "mallory"))
        )
        stubs.append(copilot_pb2_grpc.CopilotServiceStub(channel))
    return stubs


async def _outcomes(stubs, calls: int) -> tuple[int, int]:
    answered = refused = 0
    for n in range(calls):
        try:
            await stubs[n % len(stubs)].Diagnose(
                diagnose_request("PUNE-IN", "CNC-A-102", "Spindle overheating"), timeout=10
            )
            answered += 1
        except grpc.aio.AioRpcError as exc:
            assert exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
            refused += 1
    return answered, refused


async def test_one_principal_gets_the_limit_once_across_two_replicas(tmp_path, redis_server):
    async with AsyncExitStack() as stack:
        stubs = await _replicas(stack, tmp_path, redis_server.url, rate_limit="10/minute")
        answered, refused = await _outcomes(stubs, 30)  # alternating between the replicas
    assert (answered, refused) == (10, 20)  # with memory:// storage it was 20 / 10: the limit once per pod


async def test_redis_down_admits_and_counts_then_the_limit_holds_again(tmp_path, redis_server, caplog):
    async with AsyncExitStack() as stack:
        stubs = await _replicas(stack, tmp_path, redis_server.url, rate_limit="4/minute")
        assert await _outcomes(stubs, 6) == (4, 2)
        redis_server.stop()
        assert await _outcomes(stubs, 6) == (6, 0)  # fail open: the in-flight cap still bounds the work
        redis_server.start()  # a fresh, empty Redis on the same port: a new window
        assert await _outcomes(stubs, 6) == (4, 2)
    warnings = [r for r in caplog.records if "rate limit storage unreachable" in r.getMessage()]
    assert len(warnings) == 2  # once per replica for the outage (at most every 10 s), not once per call
