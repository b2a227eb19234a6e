"""JSON-lines logging with the active trace and span ids on every line, written off the request path: a call
to the logger only puts the record on a bounded queue (the message, trace context and traceback are taken in
the caller's thread); one writer thread formats and writes (`logging.handlers.QueueHandler`/`QueueListener`).
A stderr that stops draining (a stalled log pipe) therefore never blocks the event loop; when the queue is
full, records are dropped and counted, and the next line written says how many."""

from __future__ import annotations

import atexit
import copy
import json
import logging
import logging.handlers
import queue
import sys
from datetime import UTC, datetime

from opentelemetry import trace

_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
#: Records waiting for the writer thread at most; more are dropped (counted) rather than blocking the caller.
QUEUE_RECORDS = 10_000
#: At exit, how long the queued records may take to be written (a stalled output must not keep the process up).
EXIT_WAIT_S = 5.0


class JsonFormatter(logging.Formatter):
    """One JSON object per log line, with the trace and span ids of the current span."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        trace_id, span_id = getattr(record, "_trace_id", None), getattr(record, "_span_id", None)
        if trace_id is None:  # formatted in the thread that logged
            ctx = trace.get_current_span().get_span_context()
            if ctx.is_valid:
                trace_id, span_id = format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
        if trace_id:
            entry["trace_id"] = trace_id
            entry["span_id"] = span_id
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        return json.dumps(entry, default=str)


class _ContextQueueHandler(logging.handlers.QueueHandler):
    """Puts a self-contained copy of the record on the queue: message merged with its args, traceback as text,
    the caller's trace and span ids (the writer thread has no span context)."""

    def __init__(self, records: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(records)
        self.dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        prepared = copy.copy(record)
        prepared.msg, prepared.args = record.getMessage(), None
        if record.exc_info:
            prepared.exc_text = logging.Formatter().formatException(record.exc_info)
            prepared.exc_info = None
        ctx = trace.get_current_span().get_span_context()
        prepared.__dict__["_trace_id"] = format(ctx.trace_id, "032x") if ctx.is_valid else ""
        prepared.__dict__["_span_id"] = format(ctx.span_id, "016x") if ctx.is_valid else ""
        return prepared

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            if self.dropped:
                notice = logging.makeLogRecord(
                    {"name": __name__, "levelno": logging.WARNING, "levelname": "WARNING", "_trace_id": ""}
                )
                notice.msg = f"{self.dropped} log records were dropped: the log output was not keeping up"
                self.queue.put_nowait(notice)
                self.dropped = 0
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


class _Writer(logging.handlers.QueueListener):
    """The writer thread; stopping it waits at most EXIT_WAIT_S for the queue to drain."""

    def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        try:
            self.queue.put(self._sentinel, timeout=EXIT_WAIT_S)  # type: ignore[attr-defined]  # a Queue here
        except queue.Full:
            return  # the output is stalled: leave the rest (the thread is a daemon)
        thread.join(EXIT_WAIT_S)
        self._thread = None


_listener: _Writer | None = None


def stop_logging() -> None:
    """Write what is queued and stop the writer thread (at exit; idempotent)."""
    global _listener  # noqa: PLW0603 - one writer thread per process
    if _listener is not None:
        _listener.stop()
        _listener = None


def configure_logging(service: str, level: str = "INFO") -> None:
    global _listener  # noqa: PLW0603 - one writer thread per process
    stop_logging()
    writer = logging.StreamHandler(sys.stderr)
    writer.setFormatter(JsonFormatter(service))
    records: queue.Queue[logging.LogRecord] = queue.Queue(QUEUE_RECORDS)
    _listener = _Writer(records, writer)
    _listener.start()
    root = logging.getLogger()
    root.handlers[:] = [_ContextQueueHandler(records)]
    root.setLevel(level.upper())
    for noisy in ("chromadb", "httpx", "urllib3", "sentence_transformers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


atexit.register(stop_logging)
