"""Every refusal an integrator can meet, with the code, the google.rpc.ErrorInfo reason and domain it carries and the
other details beside it (BadRequest, RetryInfo): a client tells them apart by ErrorInfo.reason, never by the text.
The table is docs/errors.md's; each row is driven for real over gRPC (the public edge with fake agents, or an agent
server), and every reason of copilot.runtime.errors.Reason is either in the table or said here why not."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from copilot.agents.v1 import vision_pb2, vision_pb2_grpc
from copilot.client import aio_channel, diagnose_request
from copilot.runtime.auth import Role, mint_token
from copilot.runtime.errors import Reason, error_info
from copilot.v1 import copilot_pb2, copilot_pb2_grpc
from tests.conftest import TEST_SECRET, token
from tests.contract.test_copilot_edge import edge, request, stub, until_called
from tests.fakes import FakeAgents

ORCHESTRATOR = "orchestrator.copilot"


def details_of(error: grpc.aio.AioRpcError) -> set[str]:
    status = rpc_status.from_call(error)
    return {detail.TypeName() for detail in status.details} if status is not None else set()


async def refusal(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def check(error: grpc.aio.AioRpcError, code: grpc.StatusCode, reason: Reason, domain: str = ORCHESTRATOR, *extra: str):
    info = error_info(error)
    assert info is not None, error.details()
    assert (error.code(), info.reason, info.domain) == (code, str(reason), domain)
    assert details_of(error) == {"google.rpc.ErrorInfo", *extra}
    return info


async def test_invalid_fields_name_the_fields_in_bad_request_and_in_the_metadata(tmp_path):
    async with edge(tmp_path) as (server, _):
        channel, copilot = stub(server)
        async with channel:
            error = await refusal(copilot.Diagnose(diagnose_request("pune", "X", "short"), timeout=10))
    info = check(error, grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_FIELDS, ORCHESTRATOR, "google.rpc.BadRequest")
    assert set(info.metadata["fields"].split(",")) == {"plant_id", "equipment_id", "problem_description"}


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        (None, Reason.TOKEN_MISSING),
        ("Bearer not-a-jwt", Reason.TOKEN_INVALID),
        ("Basic dXNlcjpwYXNz", Reason.TOKEN_INVALID),
        ("expired", Reason.TOKEN_EXPIRED),
    ],
)
async def test_authentication_refusals_say_which(tmp_path, authorization, reason):
    if authorization == "expired":
        authorization = "Bearer " + mint_token(
            "anna", Role.TECHNICIAN, secret=TEST_SECRET, ttl_s=1, now=time.time() - 3600
        )
    metadata = (("authorization", authorization),) if authorization else ()
    async with edge(tmp_path) as (server, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            copilot = copilot_pb2_grpc.CopilotServiceStub(channel)
            error = await refusal(copilot.Diagnose(request(), metadata=metadata, timeout=10))
    check(error, grpc.StatusCode.UNAUTHENTICATED, reason)


async def test_a_user_token_on_an_agent_work_method_is_role_not_allowed(vision_server):
    async with aio_channel(f"127.0.0.1:{vision_server.port}", token()) as channel:
        vision = vision_pb2_grpc.VisionServiceStub(channel)
        error = await refusal(vision.AnalyzeImage(vision_pb2.AnalyzeImageRequest(), timeout=10))
    check(error, grpc.StatusCode.PERMISSION_DENIED, Reason.ROLE_NOT_ALLOWED, "vision.copilot")


async def test_a_missing_reference_is_reference_not_found_in_the_vision_domain(vision_server):
    async with aio_channel(f"127.0.0.1:{vision_server.port}", token("engineer")) as channel:
        vision = vision_pb2_grpc.VisionServiceStub(channel)
        error = await refusal(
            vision.DeleteReference(vision_pb2.DeleteReferenceRequest(reference_id="ref-none"), timeout=10)
        )
    info = check(error, grpc.StatusCode.NOT_FOUND, Reason.REFERENCE_NOT_FOUND, "vision.copilot")
    assert info.metadata["reference_id"] == "ref-none"


async def test_history_refusals_reuse_not_found_and_the_feedback_cap(tmp_path):
    async with edge(tmp_path, feedback_max_per_incident=1) as (server, _):
        channel, copilot = stub(server)
        async with channel:
            await copilot.Diagnose(request(request_id="err-1"), timeout=10)
            reused = await refusal(
                copilot.Diagnose(request(problem="Other words entirely", request_id="err-1"), timeout=10)
            )
            missing = await refusal(
                copilot.GetIncident(copilot_pb2.GetIncidentRequest(request_id="err-none"), timeout=10)
            )
            await copilot.SubmitFeedback(copilot_pb2.SubmitFeedbackRequest(request_id="err-1", helpful=True), timeout=5)
            full = await refusal(
                copilot.SubmitFeedback(copilot_pb2.SubmitFeedbackRequest(request_id="err-1", helpful=False), timeout=5)
            )

    keyed_path = tmp_path / "keyed"
    keyed_path.mkdir()
    async with edge(keyed_path) as (keyed_server, _):
        channel, copilot = stub(keyed_server)
        async with channel:
            await copilot.Diagnose(request(request_id="err-2"), timeout=10)
            keyed = copilot_pb2.SubmitFeedbackRequest(
                request_id="err-2", feedback_id="fb-1", verdict=copilot_pb2.VERDICT_HELPFUL
            )
            await copilot.SubmitFeedback(keyed, timeout=5)
            keyed.verdict = copilot_pb2.VERDICT_NOT_HELPFUL
            changed = await refusal(copilot.SubmitFeedback(keyed, timeout=5))
    assert check(reused, grpc.StatusCode.ALREADY_EXISTS, Reason.REQUEST_ID_REUSED).metadata["request_id"] == "err-1"
    assert check(missing, grpc.StatusCode.NOT_FOUND, Reason.INCIDENT_NOT_FOUND).metadata["request_id"] == "err-none"
    assert check(full, grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.FEEDBACK_LIMIT_REACHED).metadata["limit"] == "1"
    assert check(changed, grpc.StatusCode.ALREADY_EXISTS, Reason.FEEDBACK_ID_REUSED).metadata["feedback_id"] == "fb-1"


async def test_admission_refusals_carry_retry_info_and_their_own_reason(tmp_path):
    agents = FakeAgents(hang={"knowledge"})
    async with edge(
        tmp_path, agents, max_in_flight=2, max_in_flight_per_principal=1, knowledge_timeout_s=30, rate_limit="2/minute"
    ) as (server, _):
        anna_channel, anna = stub(server, subject="anna")
        ben_channel, ben = stub(server, subject="ben")
        cara_channel, cara = stub(server, subject="cara")
        async with anna_channel, ben_channel, cara_channel:
            held = [asyncio.ensure_future(anna.Diagnose(request(), timeout=20))]
            await until_called(agents, "knowledge")
            own = await refusal(anna.Diagnose(request(), timeout=10))  # anna's one call in flight
            held.append(asyncio.ensure_future(ben.Diagnose(request(), timeout=20)))
            await until_called(agents, "knowledge", times=2)
            busy = await refusal(cara.Diagnose(request(), timeout=10))  # the server's two are taken
            agents.release()
            await asyncio.gather(*held)
            await ben.Diagnose(request(), timeout=10)  # ben's second call of the minute
            limited = await refusal(ben.Diagnose(request(), timeout=10))
    retry = "google.rpc.RetryInfo"
    check(own, grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.CALLER_IN_FLIGHT_LIMIT, ORCHESTRATOR, retry)
    check(busy, grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.SERVER_BUSY, ORCHESTRATOR, retry)
    info = check(limited, grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED, ORCHESTRATOR, retry)
    assert int(info.metadata["retry_after_ms"]) > 0


#: Reasons not driven in this file: where another test drives the refusal (its code checked there; the reason comes
#: from the same one helper), or why no test can here.
ELSEWHERE = {
    Reason.PHOTO_QUOTA_EXCEEDED: "test_copilot_edge.py drives the daily photo quota (admission.refuse, one helper)",
    Reason.CALLER_QUEUE_FULL: "test_agent_defences.py drives an agent's queue for one caller (same helper)",
    Reason.HEALTH_WATCH_LIMIT: "test_agent_defences.py drives the health Watch caps (same helper)",
    Reason.DOCUMENT_NOT_FOUND: "test_knowledge_documents.py drives a document that is not loaded",
    Reason.INCIDENT_NOT_STORED: "needs the history to fail mid-call; the servicer maps it beside REQUEST_ID_REUSED",
    Reason.NO_REFERENCE_IMAGES: "the shipped starter set gives every reference set images",
    Reason.REFERENCES_NOT_SUPPORTED: "only with a provider other than patchcore (hosted vision models)",
    Reason.WARMING_UP: "a call before warm-up: clients' health checking keeps calls away until SERVING",
    Reason.MODEL_FAILED: "a provider raising mid-call",
    Reason.INTERNAL: "a bug: the observability interceptor replaces its stack trace with this reason and a trace id",
}


def test_every_reason_is_driven_here_or_accounted_for():
    import inspect
    import sys

    source = inspect.getsource(sys.modules[__name__]).split("ELSEWHERE = {")[0]
    driven = {reason for reason in Reason if f"Reason.{reason.name}" in source}
    assert driven | set(ELSEWHERE) == set(Reason)
    assert not driven & set(ELSEWHERE)


def test_error_info_is_none_for_an_error_without_details():
    class Plain(grpc.RpcError):
        def trailing_metadata(self):
            return ()

        def code(self):
            return grpc.StatusCode.UNKNOWN

        def details(self):
            return ""

    assert error_info(Plain()) is None
    assert error_details_pb2.ErrorInfo().reason == ""


async def test_a_batch_item_carries_its_own_google_rpc_status_as_a_call_error_would(tmp_path):
    """Each item's outcome is a google.rpc.Status (ErrorInfo + BadRequest for an invalid item); the deprecated
    code / message / field_violations of earlier releases stay filled with the same values."""
    async with edge(tmp_path) as (server, _):
        channel, copilot = stub(server)
        async with channel:
            await copilot.Diagnose(request(request_id="batch-used"), timeout=10)
            batch = await copilot.DiagnoseBatch(
                copilot_pb2.DiagnoseBatchRequest(
                    requests=[
                        request(),
                        diagnose_request("PUNE-IN", "X", PROBLEM_TEXT),
                        request(problem="Something else entirely now", request_id="batch-used"),
                    ]
                ),
                timeout=20,
            )
    good, invalid, reused = batch.items
    assert good.status.code == 0 and not good.status.details and good.response.report.summary
    kinds = {d.TypeName(): d for d in invalid.status.details}
    assert set(kinds) == {"google.rpc.ErrorInfo", "google.rpc.BadRequest"}
    info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    kinds["google.rpc.ErrorInfo"].Unpack(info)
    kinds["google.rpc.BadRequest"].Unpack(bad)
    assert (invalid.status.code, info.reason, info.domain) == (3, "INVALID_FIELDS", ORCHESTRATOR)
    assert [v.field for v in bad.field_violations] == ["equipment_id"] == [v.field for v in invalid.field_violations]
    assert (invalid.code, invalid.message) == (invalid.status.code, invalid.status.message)
    reused_info = error_details_pb2.ErrorInfo()
    reused.status.details[0].Unpack(reused_info)
    assert reused.status.code == grpc.StatusCode.ALREADY_EXISTS.value[0] and reused_info.reason == "REQUEST_ID_REUSED"
    assert (batch.succeeded, batch.failed) == (1, 2)


PROBLEM_TEXT = "Spindle overheating during the second shift"
