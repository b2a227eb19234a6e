"""The agents' API moved from copilot.v1 to copilot.agents.v1. An orchestrator of the previous release, still calling
/copilot.v1.ReportService/ComposeReport during a rollout, is answered as a call to the new name would be: same
messages on the wire, same policy (a user token is still refused on an agent work method), same validation."""

from __future__ import annotations

import grpc
import pytest

from copilot.agents.v1 import report_pb2
from copilot.client import auth_metadata
from copilot.contracts import FORMER_AGENT_SERVICES, REPORT_SERVICE
from copilot.runtime.auth import ServiceIdentity
from copilot.runtime.errors import error_info
from tests.conftest import token


def former(channel: grpc.aio.Channel, method: str):
    return channel.unary_unary(
        f"/copilot.v1.ReportService/{method}",
        request_serializer=report_pb2.ComposeReportRequest.SerializeToString,
        response_deserializer=report_pb2.ComposeReportResponse.FromString,
    )


def compose_request() -> report_pb2.ComposeReportRequest:
    return report_pb2.ComposeReportRequest(
        request_id="former-1",
        plant_id="pune-in",
        equipment_id="CNC-A-102",
        problem_description="Spindle overheating during the shift",
    )


async def test_a_call_by_the_former_service_name_is_served_with_the_same_rules(report_server, monkeypatch):
    from tests.conftest import TEST_SECRET

    assert FORMER_AGENT_SERVICES["copilot.v1.ReportService"] == REPORT_SERVICE == "copilot.agents.v1.ReportService"
    monkeypatch.setenv("AUTH_JWT_SECRET", TEST_SECRET)
    service = auth_metadata(ServiceIdentity("orchestrator").header().removeprefix("Bearer "))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{report_server.port}") as channel:
        answer = await former(channel, "ComposeReport")(compose_request(), metadata=service, timeout=10)
        assert answer.report.summary and "SUMMARY" in answer.report.rendered_text
        with pytest.raises(grpc.aio.AioRpcError) as user:
            await former(channel, "ComposeReport")(compose_request(), metadata=auth_metadata(token()), timeout=10)
        assert user.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert error_info(user.value).reason == "ROLE_NOT_ALLOWED"
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await former(channel, "ComposeReport")(report_pb2.ComposeReportRequest(), metadata=service, timeout=10)
        assert invalid.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await former(channel, "NoSuchMethod")(compose_request(), metadata=service, timeout=10)
        assert unknown.value.code() is grpc.StatusCode.UNIMPLEMENTED
