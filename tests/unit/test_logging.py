"""The shared JSON logging: lines carry the caller's trace context although a writer thread formats them, and a
stalled log output never blocks the thread that logs (records are dropped, counted and reported instead)."""

from __future__ import annotations

import io
import json
import logging
import logging.handlers
import sys
import threading
import time

import pytest
from opentelemetry.sdk.trace import TracerProvider

from copilot.runtime import logging as copilot_logging


class _Output(io.StringIO):
    """A stderr that can be stalled, as a log pipe nobody drains."""

    def __init__(self) -> None:
        super().__init__()
        self.flowing = threading.Event()
        self.flowing.set()

    def write(self, text: str) -> int:
        self.flowing.wait()
        return super().write(text)


@pytest.fixture
def output(monkeypatch):
    stream = _Output()
    monkeypatch.setattr(sys, "stderr", stream)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    copilot_logging.configure_logging("copilot-test")
    yield stream
    stream.flowing.set()
    copilot_logging.stop_logging()
    root.handlers[:], root.level = handlers, level


def _lines(stream: _Output) -> list[dict]:
    copilot_logging.stop_logging()  # writes what is queued
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_line_carries_the_trace_of_the_code_that_logged_it(output):
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        logging.getLogger("copilot.rpc").info("rpc %s %s", "/x.Y/Z", "OK", extra={"duration_ms": 1.5})
        ctx = span.get_span_context()
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("copilot.rpc").exception("failed")
    first, second = _lines(output)
    assert first["msg"] == "rpc /x.Y/Z OK" and first["duration_ms"] == 1.5 and first["service"] == "copilot-test"
    assert (first["trace_id"], first["span_id"]) == (format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"))
    assert "trace_id" not in second and "ValueError: boom" in second["exc"] and second["level"] == "ERROR"


def test_a_stalled_output_never_blocks_the_caller(output):
    output.flowing.clear()
    log = logging.getLogger("copilot.rpc")
    started = time.perf_counter()
    for i in range(copilot_logging.QUEUE_RECORDS + 500):
        log.info("line %d", i)
    assert time.perf_counter() - started < 10  # enqueued or dropped, never waiting for the output
    output.flowing.set()
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.handlers.QueueHandler)
    records = handler.queue
    deadline = time.monotonic() + 30
    while records.qsize() > 0 and time.monotonic() < deadline:  # the writer catches up once the output drains
        time.sleep(0.01)
    log.info("after")
    lines = _lines(output)
    notice = next(line for line in lines if "were dropped" in line["msg"])
    dropped = int(notice["msg"].split()[0])
    assert dropped > 0 and len(lines) == copilot_logging.QUEUE_RECORDS + 500 - dropped + 2
    assert lines[-1]["msg"] == "after"
