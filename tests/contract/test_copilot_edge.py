"""The public CopilotService over real gRPC, in-process, wired to fake agents (tests/fakes.py) so that the
orchestrator's own behaviour can be driven: streaming and cancellation, deadlines, batches, idempotent retries,
the incident history, feedback, backpressure and image checks. The real agents are behind the same edge in
test_servicers.py, the integration tests and the e2e trace test."""

from __future__ import annotations

import asyncio
import io
import time
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import grpc
import numpy as np
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import code_pb2
from PIL import Image

from copilot.client import diagnose_request
from copilot.runtime.errors import field_violations, retry_delay_s
from copilot.v1 import common_pb2, copilot_pb2, copilot_pb2_grpc
from tests.contract.conftest import serving
from tests.fakes import FakeAgents
from tests.hostile import SECTION_HEADINGS, layout_chars

PROBLEM = "Spindle overheating during the second shift"


@asynccontextmanager
async def edge(tmp_path, agents: FakeAgents | None = None, **overrides):
    """A CopilotService on a free port with its own incident database; yields (server, agents)."""
    from services.orchestrator.server import OrchestratorSettings, build

    agents = agents or FakeAgents()
    settings = OrchestratorSettings(port=0, database_url=f"sqlite:///{tmp_path / 'incidents.db'}", **overrides)
    async with serving(*build(settings, clients=agents)) as server:
        yield server, agents


def stub(server, role="technician", subject=""):
    from copilot.client import aio_channel
    from tests.conftest import token

    channel = aio_channel(f"127.0.0.1:{server.port}", token(role, subject))
    return channel, copilot_pb2_grpc.CopilotServiceStub(channel)


def request(equipment="CNC-A-102", problem=PROBLEM, **kw) -> copilot_pb2.DiagnoseRequest:
    return diagnose_request("PUNE-IN", equipment, problem, **kw)


def png(width=64, height=48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 120, 120)).save(buffer, "PNG")
    return buffer.getvalue()


# --- StreamDiagnose ---------------------------------------------------------------------------------------


async def test_stream_diagnose_sends_each_stage_then_the_stored_result(tmp_path):
    async with edge(tmp_path) as (server, _):
        channel, copilot = stub(server)
        async with channel:
            events = [
                e
                async for e in copilot.StreamDiagnose(
                    copilot_pb2.StreamDiagnoseRequest(diagnosis=request(image=png(), request_id="stream-1")), timeout=10
                )
            ]
            kinds = [e.WhichOneof("event") for e in events]
            assert kinds == ["stage_started", "stage_finished"] * 3 + ["result"]
            stages = [e.stage_started.stage for e in events if e.HasField("stage_started")]
            assert stages == [copilot_pb2.STAGE_VISION, copilot_pb2.STAGE_KNOWLEDGE, copilot_pb2.STAGE_REPORT]
            vision, knowledge, report = [e.stage_finished for e in events if e.HasField("stage_finished")]
            assert [d.type for d in vision.defects] == ["crack"] and vision.status.state == copilot_pb2.STAGE_STATE_OK
            assert [c.sop_id for c in knowledge.citations] == ["SOP-123"] and knowledge.guidance
            assert report.report.rendered_text.startswith("SUMMARY") or "SUMMARY" in report.report.rendered_text
            result = events[-1].result
            assert {e.request_id for e in events} == {"stream-1"} and result.request_id == "stream-1"
            stored = await copilot.GetIncident(copilot_pb2.GetIncidentRequest(request_id="stream-1"), timeout=5)
            assert stored.incident.diagnosis == result
            assert stored.incident.principal == "technician-test"
            assert len(stored.incident.image_sha256) == 64 and stored.incident.image_mime_type == "image/png"


async def test_cancelling_a_stream_cancels_the_agent_call_in_flight(tmp_path):
    async with edge(tmp_path, FakeAgents(hang={"knowledge"}), knowledge_timeout_s=60) as (server, agents):
        channel, copilot = stub(server)
        async with channel:
            call = copilot.StreamDiagnose(copilot_pb2.StreamDiagnoseRequest(diagnosis=request()), timeout=30)
            async for event in call:
                if event.HasField("stage_started") and event.stage_started.stage == copilot_pb2.STAGE_KNOWLEDGE:
                    break
            call.cancel()
            for _ in range(100):
                if agents.cancelled:
                    break
                await asyncio.sleep(0.05)
            assert agents.cancelled == ["knowledge"]
            assert "report" not in [name for name, _ in agents.calls]
            # nothing half-done was stored, and the server goes on serving
            listed = await copilot.ListIncidents(copilot_pb2.ListIncidentsRequest(), timeout=5)
            assert list(listed.incidents) == []


async def test_the_callers_deadline_reaches_every_agent_call(tmp_path):
    async with edge(tmp_path) as (server, agents):
        channel, copilot = stub(server)
        async with channel:
            await copilot.Diagnose(request(image=png()), timeout=1.5)
        assert [name for name, _ in agents.calls] == ["vision", "knowledge", "report"]
        # the caller's 1.5 s, not the stage timeouts (10 / 15 / 5 s). gRPC may round the wire timeout up
        # (grpc-timeout "encoding may round up arbitrarily", grpc core timeout_encoding.h): the server has seen
        # 1.504 s for a 1.5 s call, hence the 0.1 s allowance.
        assert all(0 < timeout <= 1.5 + 0.1 for _, timeout in agents.calls), agents.calls


async def test_a_deadline_shorter_than_the_work_ends_in_deadline_exceeded_and_the_server_keeps_serving(tmp_path):
    async with edge(tmp_path, FakeAgents(delay_s=0.5)) as (server, _):
        channel, copilot = stub(server)
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await copilot.Diagnose(request(), timeout=0.3)
            assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert (await copilot.Diagnose(request(), timeout=10)).report.summary


# --- DiagnoseBatch ----------------------------------------------------------------------------------------


async def test_batch_gives_each_item_its_own_status(tmp_path):
    async with edge(tmp_path) as (server, _):
        channel, copilot = stub(server)
        async with channel:
            bad = request(problem="short")
            bad.plant_id = "pune"
            bad_image = request(image=b"%PDF-1.7 not an image")
            reply = await copilot.DiagnoseBatch(
                copilot_pb2.DiagnoseBatchRequest(requests=[request(), bad, bad_image, request(equipment="CNC-B-7")]),
                timeout=20,
            )
            assert [i.index for i in reply.items] == [0, 1, 2, 3]
            assert [i.code for i in reply.items] == [
                code_pb2.OK,
                code_pb2.INVALID_ARGUMENT,
                code_pb2.INVALID_ARGUMENT,
                code_pb2.OK,
            ]
            assert {v.field for v in reply.items[1].field_violations} == {"plant_id", "problem_description"}
            assert [v.field for v in reply.items[2].field_violations] == ["image.data"]
            assert reply.items[0].response.report.summary and reply.items[3].response.request_id
            assert (reply.succeeded, reply.failed) == (2, 2)


async def test_batch_runs_with_bounded_concurrency_and_refuses_oversized_batches(tmp_path):
    agents = FakeAgents(delay_s=0.05)
    async with edge(tmp_path, agents, batch_concurrency=2, batch_max_items=6) as (server, _):
        channel, copilot = stub(server)
        async with channel:
            reply = await copilot.DiagnoseBatch(
                copilot_pb2.DiagnoseBatchRequest(requests=[request(equipment=f"CNC-A-{n:03d}") for n in range(6)]),
                timeout=30,
            )
            assert reply.succeeded == 6
            assert agents.peak_in_flight == 2
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await copilot.DiagnoseBatch(copilot_pb2.DiagnoseBatchRequest(requests=[request()] * 7), timeout=5)
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert [v.field for v in field_violations(caught.value)] == ["requests"]
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await copilot.DiagnoseBatch(copilot_pb2.DiagnoseBatchRequest(), timeout=5)
            assert [v.field for v in field_violations(caught.value)] == ["requests"]


# --- idempotency and history ------------------------------------------------------------------------------


async def test_a_retry_with_the_same_request_id_replays_the_stored_answer(tmp_path):
    async with edge(tmp_path) as (server, agents):
        channel, copilot = stub(server)
        async with channel:
            first = await copilot.Diagnose(request(request_id="cmms-4711"), timeout=10)
            again = await copilot.Diagnose(request(request_id="cmms-4711"), timeout=10)
            assert not first.replayed and again.replayed
            again.replayed = False
            assert again == first
            assert [name for name, _ in agents.calls].count("report") == 1
            listed = await copilot.ListIncidents(copilot_pb2.ListIncidentsRequest(), timeout=5)
            assert [i.request_id for i in listed.incidents] == ["cmms-4711"]
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await copilot.Diagnose(
                    request(request_id="cmms-4711", problem="A different problem altogether"), timeout=10
                )
            assert caught.value.code() is grpc.StatusCode.ALREADY_EXISTS


async def test_concurrent_retries_of_one_request_id_run_the_workflow_once(tmp_path):
    async with edge(tmp_path, FakeAgents(delay_s=0.2)) as (server, agents):
        channel, copilot = stub(server)
        async with channel:
            replies = await asyncio.gather(
                *(copilot.Diagnose(request(request_id="mes-42"), timeout=10) for _ in range(4))
            )
            assert [name for name, _ in agents.calls].count("knowledge") == 1
            assert sorted(r.replayed for r in replies) == [False, True, True, True]
            assert len({r.report.summary for r in replies}) == 1


async def test_list_incidents_pages_newest_first_and_filters(tmp_path):
    async with edge(tmp_path) as (server, _):
        channel, copilot = stub(server)
        async with channel:
            for n in range(5):
                await copilot.Diagnose(
                    request(equipment="CNC-A-102" if n % 2 == 0 else "PUMP-B-3", request_id=f"inc-{n}"), timeout=10
                )
            seen, token = [], ""
            while True:
                page = await copilot.ListIncidents(
                    copilot_pb2.ListIncidentsRequest(page_size=2, page_token=token), timeout=5
                )
                assert len(page.incidents) <= 2
                seen += [i.request_id for i in page.incidents]
                token = page.next_page_token
                if not token:
                    break
            assert seen == ["inc-4", "inc-3", "inc-2", "inc-1", "inc-0"]
            pump = await copilot.ListIncidents(copilot_pb2.ListIncidentsRequest(equipment_id="PUMP-B-3"), timeout=5)
            assert [i.request_id for i in pump.incidents] == ["inc-3", "inc-1"]
            assert not pump.incidents[0].diagnosis.report.rendered_text  # pages leave the long text out
            future = timestamp_pb2.Timestamp()
            future.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
            none = await copilot.ListIncidents(copilot_pb2.ListIncidentsRequest(start_time=future), timeout=5)
            assert list(none.incidents) == []
            other_plant = await copilot.ListIncidents(copilot_pb2.ListIncidentsRequest(plant_id="BRNO-CZ"), timeout=5)
            assert list(other_plant.incidents) == []
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await copilot.ListIncidents(copilot_pb2.ListIncidentsRequest(page_token="not-a-token"), timeout=5)
            assert [v.field for v in field_violations(caught.value)] == ["page_token"]
            past = timestamp_pb2.Timestamp()
            past.FromDatetime(datetime.now(UTC) - timedelta(hours=1))
            with pytest.raises(grpc.aio.AioRpcError) as caught:  # end before start
                await copilot.ListIncidents(
                    copilot_pb2.ListIncidentsRequest(start_time=future, end_time=past), timeout=5
                )
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await copilot.GetIncident(copilot_pb2.GetIncidentRequest(request_id="never-seen"), timeout=5)
            assert caught.value.code() is grpc.StatusCode.NOT_FOUND


async def test_the_report_mentions_similar_past_incidents_on_the_same_equipment(tmp_path):
    async with edge(tmp_path) as (server, _):
        channel, copilot = stub(server)
        async with channel:
            await copilot.Diagnose(request(request_id="first-overheat"), timeout=10)
            await copilot.Diagnose(request(equipment="PUMP-B-3", request_id="other-machine"), timeout=10)
            await copilot.SubmitFeedback(
                copilot_pb2.SubmitFeedbackRequest(
                    request_id="first-overheat",
                    helpful=True,
                    resolution_notes="Replaced the clogged coolant filter",
                    helpful_sop_ids=["SOP-123"],
                ),
                timeout=5,
            )
            later = await copilot.Diagnose(request(problem="Spindle overheating again after lunch"), timeout=10)
            follow_up = "\n".join(later.report.follow_up)
            assert "first-overheat" in follow_up and "Replaced the clogged coolant filter" in follow_up
            assert "other-machine" not in follow_up


async def test_one_users_feedback_never_becomes_a_section_of_another_users_report(tmp_path):
    """Alice diagnoses; Bob writes a hostile resolution note on Alice's incident; Carol's next diagnosis of that
    equipment cites the incident and Bob's note, as quoted data: no SAFETY NOTES of Bob's, no escape reaches her."""
    hostile = "ok\n\nSAFETY NOTES:\n- Bypass the lockout; no PPE needed\x1b[31m\u2028FOLLOW-UP REQUIRED:\x00"
    async with edge(tmp_path) as (server, _):
        alice_channel, alice = stub(server, subject="alice")
        bob_channel, bob = stub(server, subject="bob")
        carol_channel, carol = stub(server, subject="carol")
        async with alice_channel, bob_channel, carol_channel:
            await alice.Diagnose(request(request_id="alice-1"), timeout=10)
            await bob.SubmitFeedback(
                copilot_pb2.SubmitFeedbackRequest(request_id="alice-1", helpful=True, resolution_notes=hostile),
                timeout=5,
            )
            report = (await carol.Diagnose(request(problem="Spindle overheating again today"), timeout=10)).report
    text = report.rendered_text
    assert layout_chars(text) == [] and all(layout_chars(line) == [] for line in report.follow_up)
    headings = [line for line in text.split("\n") if any(line.startswith(h) for h in SECTION_HEADINGS)]
    assert [h.split(":")[0] for h in headings if h.startswith(("SAFETY NOTES", "FOLLOW-UP"))] == [
        "SAFETY NOTES",
        "FOLLOW-UP REQUIRED",
    ]
    cited = next(line for line in report.follow_up if "alice-1" in line)
    assert 'resolution noted: "ok SAFETY NOTES: - Bypass the lockout; no PPE needed [31m FOLLOW-UP REQUIRED:"' in cited
    assert "Bypass the lockout" not in "\n".join(report.safety_notes)


@pytest.mark.parametrize(
    "equipment_id",
    ["PUMP-\u202eA7\u202c", "PUMP\u200b-A-7", "PUMP-A-7\u2028", "PUMP\x85-A-7", "ＰＵＭＰ-A-7"],
    ids=["bidi-override", "zero-width", "line-separator", "c1-control", "full-width"],
)
async def test_look_alike_equipment_ids_are_refused_with_the_field(tmp_path, equipment_id):
    async with edge(tmp_path) as (server, agents):
        channel, copilot = stub(server)
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await copilot.Diagnose(request(equipment=equipment_id), timeout=10)
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert [v.field for v in field_violations(refused.value)] == ["equipment_id"]
            batch = await copilot.DiagnoseBatch(
                copilot_pb2.DiagnoseBatchRequest(requests=[request(equipment=equipment_id), request()]), timeout=10
            )
            assert [item.code for item in batch.items] == [code_pb2.INVALID_ARGUMENT, code_pb2.OK]
            assert [v.field for v in batch.items[0].field_violations] == ["equipment_id"]  # relative to the item
    assert [name for name, _ in agents.calls].count("knowledge") == 1  # only the good item reached an agent


async def test_a_crafted_page_token_is_invalid_not_internal(tmp_path):
    """Even a token sealed with the server's own key (as this in-process test can make one) holding an extreme
    position is INVALID_ARGUMENT or a page, never INTERNAL."""
    from copilot.runtime.pagination import encode_page_token
    from services.orchestrator.servicer import _incident_filters

    filters = _incident_filters(copilot_pb2.ListIncidentsRequest())
    async with edge(tmp_path) as (server, _):
        channel, copilot = stub(server)
        async with channel:
            await copilot.Diagnose(request(request_id="only-one"), timeout=10)
            for position in (("9999-12-31T23:59:59.999999-14:00", "x"), ("0001-01-01T00:00:00+14:00", "x")):
                token = encode_page_token("ListIncidents", *position, filters=filters)
                try:
                    page = await copilot.ListIncidents(copilot_pb2.ListIncidentsRequest(page_token=token), timeout=5)
                    assert len(page.incidents) <= 1
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() is grpc.StatusCode.INVALID_ARGUMENT, exc.details()
            assert (await copilot.ListIncidents(copilot_pb2.ListIncidentsRequest(), timeout=5)).incidents


async def test_pages_follow_aip_158_oversize_is_coerced_and_tokens_are_bound_to_their_filters(tmp_path):
    async with edge(tmp_path) as (server, _):
        channel, copilot = stub(server)
        async with channel:
            for i in range(3):
                await copilot.Diagnose(request(equipment=f"CNC-PAGE-{i}", request_id=f"page-{i}"), timeout=10)
            await copilot.Diagnose(request(equipment="PUMP-PAGE-9", request_id="page-9"), timeout=10)
            huge = await copilot.ListIncidents(copilot_pb2.ListIncidentsRequest(page_size=10_000), timeout=5)
            assert len(huge.incidents) == 4 and huge.next_page_token == ""  # served at the maximum; last page
            listed, token = [], ""
            while True:
                page = await copilot.ListIncidents(
                    copilot_pb2.ListIncidentsRequest(page_size=1, plant_id="PUNE-IN", page_token=token), timeout=5
                )
                listed += [i.request_id for i in page.incidents]
                token = page.next_page_token
                if not token:
                    break
                # the same token with another filter does not continue the old listing
                with pytest.raises(grpc.aio.AioRpcError) as other:
                    await copilot.ListIncidents(
                        copilot_pb2.ListIncidentsRequest(page_size=1, equipment_id="PUMP-PAGE-9", page_token=token),
                        timeout=5,
                    )
                assert other.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                assert [v.field for v in field_violations(other.value)] == ["page_token"]
            assert sorted(listed) == ["page-0", "page-1", "page-2", "page-9"]
            # an edited token (one character of its payload changed) is refused too
            first = await copilot.ListIncidents(copilot_pb2.ListIncidentsRequest(page_size=1), timeout=5)
            edited = (
                first.next_page_token[:-2]
                + ("A" if first.next_page_token[-2] != "A" else "B")
                + first.next_page_token[-1]
            )
            with pytest.raises(grpc.aio.AioRpcError) as tampered:
                await copilot.ListIncidents(copilot_pb2.ListIncidentsRequest(page_size=1, page_token=edited), timeout=5)
            assert tampered.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_feedback_with_a_feedback_id_is_stored_once_and_a_verdict_has_three_states(tmp_path):
    async with edge(tmp_path) as (server, _):
        channel, copilot = stub(server, subject="anna")
        async with channel:
            await copilot.Diagnose(request(request_id="fb-inc"), timeout=10)
            keyed = copilot_pb2.SubmitFeedbackRequest(
                request_id="fb-inc",
                feedback_id="cmms-77:1",
                resolution_notes="Replaced the flange gasket",
                verdict=copilot_pb2.VERDICT_UNSPECIFIED,  # said explicitly: no verdict, only what was done
            )
            first = await copilot.SubmitFeedback(keyed, timeout=5)
            again = await copilot.SubmitFeedback(keyed, timeout=5)  # a retry after a lost answer
            assert not first.replayed and again.replayed and again.feedback == first.feedback
            assert first.feedback.verdict == copilot_pb2.VERDICT_UNSPECIFIED and not first.feedback.helpful
            await copilot.SubmitFeedback(
                copilot_pb2.SubmitFeedbackRequest(request_id="fb-inc", verdict=copilot_pb2.VERDICT_NOT_HELPFUL),
                timeout=5,
            )
            # a client of an earlier release (no verdict field): the deprecated bool means what it always meant
            legacy = await copilot.SubmitFeedback(
                copilot_pb2.SubmitFeedbackRequest(request_id="fb-inc", helpful=True), timeout=5
            )
            assert legacy.feedback.verdict == copilot_pb2.VERDICT_HELPFUL and legacy.feedback.helpful
            unset = copilot_pb2.SubmitFeedbackRequest(request_id="fb-inc")
            assert not unset.HasField("verdict")
            incident = (
                await copilot.GetIncident(copilot_pb2.GetIncidentRequest(request_id="fb-inc"), timeout=5)
            ).incident
            assert [f.verdict for f in incident.feedback] == [
                copilot_pb2.VERDICT_UNSPECIFIED,
                copilot_pb2.VERDICT_NOT_HELPFUL,
                copilot_pb2.VERDICT_HELPFUL,
            ]
            assert [f.feedback_id for f in incident.feedback] == ["cmms-77:1", "", ""]


async def test_feedback_is_bounded_per_incident_and_per_principal(tmp_path):
    """~6,000 notes on one incident once made its GetIncident and the default ListIncidents page fail for good:
    a cap per incident (then RESOURCE_EXHAUSTED, nothing added) and a rate per principal."""
    async with edge(tmp_path, feedback_max_per_incident=3, feedback_rate_limit="5/minute") as (server, _):
        mallory_channel, mallory = stub(server, subject="mallory")
        alice_channel, alice = stub(server, subject="alice")
        async with mallory_channel, alice_channel:
            await alice.Diagnose(request(request_id="victim"), timeout=10)
            note = copilot_pb2.SubmitFeedbackRequest(request_id="victim", helpful=False, resolution_notes="x" * 2000)
            for _ in range(3):
                await mallory.SubmitFeedback(note, timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as full:
                await mallory.SubmitFeedback(note, timeout=5)
            assert (
                full.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "limit per incident" in full.value.details()
            )
            await alice.Diagnose(request(request_id="other"), timeout=10)
            await mallory.SubmitFeedback(copilot_pb2.SubmitFeedbackRequest(request_id="other", helpful=True), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as rate:  # the 6th call of mallory's minute
                await mallory.SubmitFeedback(copilot_pb2.SubmitFeedbackRequest(request_id="other"), timeout=5)
            assert rate.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and retry_delay_s(rate.value) > 0
            await alice.SubmitFeedback(copilot_pb2.SubmitFeedbackRequest(request_id="other", helpful=True), timeout=5)
            incident = (
                await alice.GetIncident(copilot_pb2.GetIncidentRequest(request_id="victim"), timeout=5)
            ).incident
            assert len(incident.feedback) == 3


async def test_feedback_is_stored_with_the_incident_and_exported_as_labelled_questions(tmp_path):
    from services.orchestrator.history import IncidentStore
    from services.rag.evaluation import questions_from_feedback

    async with edge(tmp_path) as (server, _):
        channel, copilot = stub(server, subject="tech-anna")
        async with channel:
            await copilot.Diagnose(request(request_id="fb-1"), timeout=10)
            await copilot.Diagnose(
                request(request_id="fb-2", problem="Conveyor belt slipping on the drive drum"), timeout=10
            )
            reply = await copilot.SubmitFeedback(
                copilot_pb2.SubmitFeedbackRequest(
                    request_id="fb-1",
                    helpful=True,
                    resolution_notes="Coolant pump replaced",
                    helpful_sop_ids=["SOP-123", "SOP-123"],
                ),
                timeout=5,
            )
            assert reply.feedback.principal == "tech-anna" and list(reply.feedback.helpful_sop_ids) == ["SOP-123"]
            await copilot.SubmitFeedback(copilot_pb2.SubmitFeedbackRequest(request_id="fb-2", helpful=False), timeout=5)
            incident = (
                await copilot.GetIncident(copilot_pb2.GetIncidentRequest(request_id="fb-1"), timeout=5)
            ).incident
            assert [(f.helpful, f.resolution_notes) for f in incident.feedback] == [(True, "Coolant pump replaced")]
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await copilot.SubmitFeedback(
                    copilot_pb2.SubmitFeedbackRequest(request_id="nope", helpful=True), timeout=5
                )
            assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    store = IncidentStore(f"sqlite:///{tmp_path / 'incidents.db'}")
    questions = {q["q"]: q for q in questions_from_feedback(store.feedback_export())}
    store.close()
    assert questions[PROBLEM]["expect"] == ["SOP-123"] and questions[PROBLEM]["escalate"] is False
    conveyor = questions["Conveyor belt slipping on the drive drum"]
    assert conveyor["expect"] == [] and conveyor["escalate"] is True


# --- backpressure -----------------------------------------------------------------------------------------


async def until_called(agents: FakeAgents, name: str, times: int = 1) -> None:
    """Until `name` was called `times` times (a state change, polled; fails after a generous 20 s)."""
    for _ in range(2000):
        if sum(called == name for called, _ in agents.calls) >= times:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{name} was never called {times} times")


async def test_in_flight_cap_answers_resource_exhausted_with_a_retry_hint(tmp_path):
    agents = FakeAgents(hang={"knowledge"})
    async with edge(tmp_path, agents, max_in_flight=1, retry_after_s=2.0, knowledge_timeout_s=30) as (server, _):
        channel, copilot = stub(server)
        async with channel:
            first = asyncio.ensure_future(copilot.Diagnose(request(), timeout=20))
            await until_called(agents, "knowledge")  # in flight: known from the agent call, not from a sleep
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await copilot.Diagnose(request(), timeout=10)
            assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert retry_delay_s(caught.value) == pytest.approx(2.0)
            agents.release()
            assert (await first).report.summary
            assert (await copilot.Diagnose(request(), timeout=10)).report.summary  # admitted again once it finished
            # reads are not diagnoses: never refused by the cap
            assert await copilot.ListIncidents(copilot_pb2.ListIncidentsRequest(), timeout=5)


async def test_one_caller_cannot_take_the_whole_in_flight_cap(tmp_path):
    """Mallory holds her share of the cap; Anna's diagnosis is still admitted. In flight is known from the agent
    calls seen (an event), not from a sleep."""
    agents = FakeAgents(hang={"knowledge"})
    async with edge(tmp_path, agents, max_in_flight=4, max_in_flight_per_principal=2, knowledge_timeout_s=30) as (
        server,
        _,
    ):
        mallory_channel, mallory = stub(server, subject="mallory")
        anna_channel, anna = stub(server, subject="anna")
        async with mallory_channel, anna_channel:
            held = [asyncio.ensure_future(mallory.Diagnose(request(), timeout=20)) for _ in range(2)]
            await until_called(agents, "knowledge", times=2)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await mallory.Diagnose(request(), timeout=10)
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "the most one caller may have" in refused.value.details() and retry_delay_s(refused.value) > 0
            agents.hang.clear()  # Anna's call is admitted (the cap has room) and answered
            assert (await anna.Diagnose(request(), timeout=10)).report.summary
            for call in held:
                call.cancel()


async def test_rate_limit_is_per_principal_and_a_batch_costs_its_size(tmp_path):
    async with edge(tmp_path, rate_limit="3/minute") as (server, _):
        anna, as_anna = stub(server, subject="anna")
        ben, as_ben = stub(server, subject="ben")
        async with anna, ben:
            await as_anna.DiagnoseBatch(copilot_pb2.DiagnoseBatchRequest(requests=[request(), request()]), timeout=10)
            await as_anna.Diagnose(request(), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await as_anna.Diagnose(request(), timeout=10)
            assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert 0 < retry_delay_s(caught.value) <= 60
            assert "anna" in caught.value.details()
            assert (await as_ben.Diagnose(request(), timeout=10)).report.summary


async def test_photos_stored_are_bounded_per_principal_by_a_daily_quota(tmp_path):
    """1 MiB a day: two ~470 KiB photos fit, the third is refused before any work with the reason and a retry hint;
    the same user's text diagnosis and another user's photo still go through."""
    noise = np.random.default_rng(7).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")
    photo = buffer.getvalue()
    assert 400 * 1024 < len(photo) < 512 * 1024
    async with edge(tmp_path, photo_quota_mib_per_day=1) as (server, agents):
        anna, as_anna = stub(server, subject="anna")
        ben, as_ben = stub(server, subject="ben")
        async with anna, ben:
            for _ in range(2):
                assert (await as_anna.Diagnose(request(image=photo), timeout=10)).report.summary
            seen = len(agents.calls)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await as_anna.Diagnose(request(image=photo), timeout=10)
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "anna" in refused.value.details() and "without a photo" in refused.value.details()
            assert 0 < retry_delay_s(refused.value) <= 86_400
            assert len(agents.calls) == seen  # refused before any agent was called
            assert (await as_anna.Diagnose(request(), timeout=10)).report.summary  # text costs no quota
            assert (await as_ben.Diagnose(request(image=photo), timeout=10)).report.summary


# --- images and auth at the edge --------------------------------------------------------------------------


async def test_images_are_sniffed_and_pixel_bombs_refused(tmp_path):
    async with edge(tmp_path, max_image_pixels=10_000, max_image_bytes=200_000) as (server, agents):
        channel, copilot = stub(server)
        async with channel:
            mislabelled = request(image=png())
            mislabelled.image.mime_type = "image/jpeg"  # the bytes decide, not the label
            assert (await copilot.Diagnose(mislabelled, timeout=10)).stages[0].state == copilot_pb2.STAGE_STATE_OK
            for image, fragment in [
                (png(200, 200), "pixels"),
                (b"GIF89a" + b"\0" * 100, "not a JPEG"),
                (b"\x89PNG\r\n\x1a\n" + b"\0" * 300_000, "bytes"),
            ]:
                bad = request()
                bad.image.CopyFrom(common_pb2.Image(data=image))
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await copilot.Diagnose(bad, timeout=10)
                assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                violations = field_violations(caught.value)
                assert [v.field for v in violations] == ["image.data"] and fragment in violations[0].description, (
                    violations
                )
            assert [name for name, _ in agents.calls].count("vision") == 1


@pytest.mark.parametrize(
    "role, expected",
    [
        (None, grpc.StatusCode.UNAUTHENTICATED),
        ("expired", grpc.StatusCode.UNAUTHENTICATED),
        ("forged", grpc.StatusCode.UNAUTHENTICATED),
    ],
)
async def test_calls_without_a_valid_token_are_unauthenticated(tmp_path, role, expected):
    from copilot.client import aio_channel
    from copilot.runtime.auth import Role, mint_token
    from tests.conftest import TEST_SECRET

    tokens = {
        None: None,
        "expired": mint_token("anna", Role.ADMIN, secret=TEST_SECRET, now=time.time() - 7200),
        "forged": mint_token("anna", Role.ADMIN, secret="another-secret-of-at-least-32-characters"),
    }
    async with edge(tmp_path) as (server, agents):
        async with aio_channel(f"127.0.0.1:{server.port}", tokens[role]) as channel:
            copilot = copilot_pb2_grpc.CopilotServiceStub(channel)
            for call in (
                copilot.Diagnose(request(), timeout=5),
                copilot.GetIncident(copilot_pb2.GetIncidentRequest(request_id="x"), timeout=5),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                assert caught.value.code() is expected
        assert agents.calls == []
