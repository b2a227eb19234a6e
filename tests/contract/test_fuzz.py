"""Hypothesis fuzzing of the public CopilotService: random and hostile requests (and raw bytes that are not
protobuf at all) always end in a clean status, the server keeps serving, and its memory stays bounded.

The edge runs on its own event loop in a thread (hypothesis drives plain synchronous calls); the agents behind
it are the in-process fakes, so that thousands of calls take seconds — what is under test is the edge: auth,
admission, protovalidate, image checks, idempotency and the history."""

from __future__ import annotations

import asyncio
import gc
import io
import os
import threading

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from copilot.client import CHANNEL_OPTIONS, auth_metadata
from copilot.v1 import common_pb2, copilot_pb2, copilot_pb2_grpc
from tests.conftest import token
from tests.fakes import FakeAgents

CLEAN = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.UNAUTHENTICATED,
}


class EdgeThread:
    """A CopilotService with fake agents, served from a background event loop."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server = None

    def __enter__(self) -> EdgeThread:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(60)
        return self

    async def _start(self) -> None:
        from copilot.runtime.server import AgentServer
        from services.orchestrator.server import OrchestratorSettings, build

        settings = OrchestratorSettings(
            port=0,
            host="127.0.0.1",
            database_url=self.database_url,
            rate_limit="",
            # the fuzzer explores validation: feedback's own bounds are tested in test_copilot_edge.py
            feedback_rate_limit="",
            feedback_max_per_incident=0,
            max_image_bytes=256 * 1024,
            max_image_pixels=1_000_000,
        )
        self.server = AgentServer(*build(settings, clients=FakeAgents()))
        await self.server.start()
        await self.server.wait_ready()

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    with EdgeThread(f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'incidents.db'}") as running:
        with grpc.insecure_channel(f"127.0.0.1:{running.server.port}", options=CHANNEL_OPTIONS) as channel:
            yield channel


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's header, without the bomb)."""
    import struct
    import zlib

    data = bytearray(_png(1, 1))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


SMALL_PNG = _png(8, 8)
hostile_text = st.one_of(
    st.text(max_size=600),
    st.sampled_from(
        [
            "",
            " ",
            "PUNE-IN",
            "CNC-A-102",
            "x" * 5000,
            "<script>alert(1)</script>",
            "'; DROP TABLE x;--",
            "\x00\x01\x02",
            "\u202e\u0000",
            "../../etc/passwd",
            "PUNE-IN\n",
            "🔥" * 100,
        ]
    ),
)
images = st.one_of(
    st.none(),
    st.binary(max_size=2048),
    st.just(SMALL_PNG),
    st.builds(lambda n: SMALL_PNG[:n], st.integers(0, len(SMALL_PNG))),  # truncated
    st.builds(_png_claiming, st.integers(1, 200_000), st.integers(1, 200_000)),
    st.builds(lambda tail: b"\xff\xd8\xff" + tail, st.binary(max_size=512)),
    st.builds(lambda tail: b"RIFF\0\0\0\0WEBP" + tail, st.binary(max_size=512)),
)


@st.composite
def diagnose_requests(draw):
    request = copilot_pb2.DiagnoseRequest(
        plant_id=draw(st.one_of(st.just("PUNE-IN"), hostile_text)),
        equipment_id=draw(st.one_of(st.just("CNC-A-102"), hostile_text)),
        problem_description=draw(st.one_of(st.just("Spindle overheating during the shift"), hostile_text)),
        equipment_type=draw(st.one_of(st.just(""), st.just("brushed-steel"), hostile_text)),
        request_id=draw(st.one_of(st.just(""), st.from_regex(r"[a-z0-9]{1,12}", fullmatch=True), hostile_text)),
    )
    if draw(st.booleans()):
        request.image_id = draw(hostile_text)
    image = draw(images)
    if image is not None:
        request.image.CopyFrom(
            common_pb2.Image(data=image, mime_type=draw(st.one_of(st.just("image/png"), hostile_text)))
        )
    return request


def _code(call) -> grpc.StatusCode:
    try:
        call()
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        assert exc.code() in CLEAN, (exc.code(), exc.details())
        assert "Traceback" not in (exc.details() or "")
        return exc.code()


FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
METADATA = auth_metadata(token("technician"))


@FUZZ
@given(request=diagnose_requests())
def test_fuzz_diagnose_and_stream(edge, request):
    copilot = copilot_pb2_grpc.CopilotServiceStub(edge)
    _code(lambda: copilot.Diagnose(request, metadata=METADATA, timeout=10))
    _code(
        lambda: list(
            copilot.StreamDiagnose(copilot_pb2.StreamDiagnoseRequest(diagnosis=request), metadata=METADATA, timeout=10)
        )
    )


@FUZZ
@given(requests=st.lists(diagnose_requests(), max_size=5))
def test_fuzz_batch(edge, requests):
    copilot = copilot_pb2_grpc.CopilotServiceStub(edge)
    reply = None

    def call():
        nonlocal reply
        reply = copilot.DiagnoseBatch(
            copilot_pb2.DiagnoseBatchRequest(requests=requests), metadata=METADATA, timeout=20
        )

    if _code(call) is grpc.StatusCode.OK:
        assert [item.index for item in reply.items] == list(range(len(requests)))
        assert all(item.code != 13 for item in reply.items)  # never INTERNAL per item either


@FUZZ
@given(
    request_id=hostile_text,
    page_token=hostile_text,
    page_size=st.integers(-(2**31), 2**31 - 1),
    plant=hostile_text,
    notes=hostile_text,
    sops=st.lists(hostile_text, max_size=4),
    start=st.integers(-(2**40), 2**40),
)
def test_fuzz_history_and_feedback(edge, request_id, page_token, page_size, plant, notes, sops, start):
    copilot = copilot_pb2_grpc.CopilotServiceStub(edge)
    _code(
        lambda: copilot.GetIncident(
            copilot_pb2.GetIncidentRequest(request_id=request_id), metadata=METADATA, timeout=10
        )
    )
    listing = copilot_pb2.ListIncidentsRequest(page_token=page_token, page_size=page_size, plant_id=plant)
    listing.start_time.seconds = start
    _code(lambda: copilot.ListIncidents(listing, metadata=METADATA, timeout=10))
    _code(
        lambda: copilot.SubmitFeedback(
            copilot_pb2.SubmitFeedbackRequest(
                request_id=request_id, helpful=True, resolution_notes=notes, helpful_sop_ids=sops
            ),
            metadata=METADATA,
            timeout=10,
        )
    )


@FUZZ
@given(
    payload=st.binary(max_size=4096),
    method=st.sampled_from(
        ["Diagnose", "StreamDiagnose", "DiagnoseBatch", "GetIncident", "ListIncidents", "SubmitFeedback"]
    ),
    header=st.one_of(st.none(), st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=200)),
)
def test_fuzz_raw_bytes_and_headers(edge, payload, method, header):
    """Bytes that are not the method's message, with any authorization header: still a clean status."""
    path = f"/copilot.v1.CopilotService/{method}"
    metadata = METADATA if header is None else (("authorization", header),)
    if method == "StreamDiagnose":
        call = edge.unary_stream(path, request_serializer=None, response_deserializer=None)
        _code(lambda: list(call(payload, metadata=metadata, timeout=10)))
    else:
        call = edge.unary_unary(path, request_serializer=None, response_deserializer=None)
        _code(lambda: call(payload, metadata=metadata, timeout=10))


def test_after_the_fuzzing_the_server_still_serves_and_memory_stayed_bounded(edge):
    copilot = copilot_pb2_grpc.CopilotServiceStub(edge)
    request = copilot_pb2.DiagnoseRequest(
        plant_id="PUNE-IN", equipment_id="CNC-A-102", problem_description="Spindle overheating during the shift"
    )
    for _ in range(20):  # warm: the first calls allocate caches
        copilot.Diagnose(request, metadata=METADATA, timeout=10)
    gc.collect()
    before = rss_bytes()
    hostile = copilot_pb2.DiagnoseRequest(
        plant_id="x" * 5000, equipment_id="\x00" * 3000, problem_description="<" * 10_000
    )
    hostile.image.data = _png_claiming(100_000, 100_000)
    for _ in range(300):
        _code(lambda: copilot.Diagnose(hostile, metadata=METADATA, timeout=10))
        copilot.Diagnose(request, metadata=METADATA, timeout=10)
    gc.collect()
    grown = rss_bytes() - before
    assert grown < 64 * 1024 * 1024, f"RSS grew {grown / 2**20:.1f} MiB over 600 calls"
    assert copilot.Diagnose(request, metadata=METADATA, timeout=10).report.summary
