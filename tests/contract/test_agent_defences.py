"""Agents defend themselves (issue #38): their work takes only the orchestrator's service token, one caller's burst
waits behind itself while other users' calls run, and health Watch streams are capped per connection."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from copilot.agents.v1 import (
    knowledge_pb2,
    knowledge_pb2_grpc,
    report_pb2,
    report_pb2_grpc,
    vision_pb2,
    vision_pb2_grpc,
)
from copilot.runtime.auth import END_USER_HEADER, AccessPolicy, Authenticator, AuthSettings
from copilot.runtime.config import ServerSettings
from copilot.runtime.errors import retry_delay_s
from copilot.runtime.server import AgentServer, ServiceSpec
from copilot.v1 import common_pb2
from tests.contract.conftest import channel_to

COMPOSE = "/copilot.agents.v1.ReportService/ComposeReport"


def report_request() -> report_pb2.ComposeReportRequest:
    return report_pb2.ComposeReportRequest(
        request_id="r-1", plant_id="PUNE-IN", equipment_id="CNC-A-102", problem_description="Spindle overheating"
    )


@pytest.mark.parametrize("role", ["technician", "engineer", "admin"])
async def test_a_users_token_cannot_reach_an_agents_work(vision_server, knowledge_server, report_server, role):
    calls = [
        (
            vision_server,
            lambda c: vision_pb2_grpc.VisionServiceStub(c).AnalyzeImage(
                vision_pb2.AnalyzeImageRequest(image=common_pb2.Image(data=b"\xff\xd8\xff"))
            ),
        ),
        (
            knowledge_server,
            lambda c: knowledge_pb2_grpc.KnowledgeServiceStub(c).Advise(
                knowledge_pb2.AdviseRequest(problem_description="Spindle overheating")
            ),
        ),
        (
            knowledge_server,
            lambda c: knowledge_pb2_grpc.KnowledgeServiceStub(c).Retrieve(knowledge_pb2.RetrieveRequest(query="x")),
        ),
        (report_server, lambda c: report_pb2_grpc.ReportServiceStub(c).ComposeReport(report_request())),
    ]
    for server, call in calls:
        async with channel_to(server, role) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(channel)
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "service token" in refused.value.details() and "CopilotService" in refused.value.details()
    async with channel_to(report_server, "service") as channel:  # the orchestrator's token is served
        assert (await report_pb2_grpc.ReportServiceStub(channel).ComposeReport(report_request())).report.summary


class GatedReports(report_pb2_grpc.ReportServiceServicer):
    """ComposeReport that holds every call until `gate` opens, recording who got in."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.entered: list[str] = []

    async def ComposeReport(self, request, context):
        self.entered.append(request.request_id)
        await self.gate.wait()
        return report_pb2.ComposeReportResponse(report=common_pb2.IncidentReport(summary=request.request_id))


async def until(condition, what: str) -> None:
    """Waits for a state change the test caused (never for a length of time): fails after a generous 30 s."""
    for _ in range(3000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


async def test_one_callers_burst_waits_behind_itself_and_nobody_else():
    servicer = GatedReports()
    spec = ServiceSpec(
        name="report",
        service_names=["copilot.agents.v1.ReportService"],
        register=lambda s: report_pb2_grpc.add_ReportServiceServicer_to_server(servicer, s),
        warm_up=lambda: asyncio.sleep(0),
        policy=AccessPolicy(internal=frozenset({COMPOSE})),
    )
    settings = ServerSettings(port=0, max_running_per_caller=1, max_queued_per_caller=1, max_in_flight=10)
    # user tokens allowed too here, to show that only a service's x-copilot-end-user is believed
    server = AgentServer(spec, settings, Authenticator(AuthSettings(mode="dev", agent_callers="any")))
    await server.start()
    await server.wait_ready()
    share = server.fair_share
    assert share is not None
    try:
        async with channel_to(server, "service") as orchestrator, channel_to(server, "technician") as user:
            stub = report_pb2_grpc.ReportServiceStub(orchestrator)

            def for_user(name: str, request_id: str):
                request = report_request()
                request.request_id = request_id
                return stub.ComposeReport(request, metadata=((END_USER_HEADER, name),), timeout=60)

            first = asyncio.ensure_future(for_user("alice", "alice-1"))
            await until(lambda: servicer.entered == ["alice-1"], "alice's first call runs")
            second = asyncio.ensure_future(for_user("alice", "alice-2"))
            await until(lambda: share._callers["alice"].waiting == 1, "alice's second call waits")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await for_user("alice", "alice-3")
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "alice" in refused.value.details()
            assert retry_delay_s(refused.value) == pytest.approx(0.5)

            bob = asyncio.ensure_future(for_user("bob", "bob-1"))  # runs while alice's calls are held
            await until(lambda: servicer.entered == ["alice-1", "bob-1"], "bob's call runs")
            # a user's token naming alice is keyed to its own subject: it runs too
            request = report_request()
            request.request_id = "mallory-1"
            spoof = asyncio.ensure_future(
                report_pb2_grpc.ReportServiceStub(user).ComposeReport(
                    request, metadata=((END_USER_HEADER, "alice"),), timeout=60
                )
            )
            await until(lambda: "mallory-1" in servicer.entered, "the spoofing caller runs as itself")

            servicer.gate.set()
            answers = await asyncio.gather(first, second, bob, spoof)
            assert [a.report.summary for a in answers] == ["alice-1", "alice-2", "bob-1", "mallory-1"]
        await until(lambda: not share._callers and share.in_flight == 0, "every share is released")
    finally:
        await server.stop(0)


async def test_health_watch_streams_are_capped_per_connection():
    spec = ServiceSpec(
        name="report",
        service_names=["copilot.agents.v1.ReportService"],
        register=lambda s: None,
        warm_up=lambda: asyncio.sleep(0),
    )
    server = AgentServer(spec, ServerSettings(port=0, max_health_watches_per_connection=3, max_health_watches=5))
    await server.start()
    await server.wait_ready()
    # separate subchannel pools: two real connections (channels otherwise share one)
    options = [("grpc.use_local_subchannel_pool", 1)]
    address = f"127.0.0.1:{server.port}"

    async def watch(channel: grpc.aio.Channel):
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        first = await call.read()
        return call, first

    try:
        async with (
            grpc.aio.insecure_channel(address, options=options) as one,
            grpc.aio.insecure_channel(address, options=options) as two,
        ):
            held = [await watch(one) for _ in range(3)]  # no token needed: kubelets and balancers watch
            assert all(first.status == health_pb2.HealthCheckResponse.SERVING for _, first in held)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await watch(one)
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "this connection" in refused.value.details()
            held += [await watch(two) for _ in range(2)]  # another connection has its own share…
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await watch(two)  # …up to the server's total
            assert "5 health Watch streams" in refused.value.details()
            # unary Check is not a stream and is never capped
            assert (await health_pb2_grpc.HealthStub(one).Check(health_pb2.HealthCheckRequest())).status
            for call, _ in held:
                call.cancel()
            await until(lambda: server.health_watches.open.total == 0, "cancelled streams are released")
            assert (await watch(one))[1].status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(0)
