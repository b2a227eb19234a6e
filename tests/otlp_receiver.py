"""A minimal OTLP/gRPC trace receiver for the tests: keeps every span with its service.name.

Imported by the e2e trace test (in the test process) and run as a script inside a container by the container
test (`python otlp_receiver.py PORT OUT.jsonl`), where it appends one JSON line per span to OUT."""

from __future__ import annotations

import json
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def attributes(span) -> dict:
    out = {}
    for a in span.attributes:
        v = a.value
        kind = v.WhichOneof("value")
        out[a.key] = (
            [getattr(x, x.WhichOneof("value")) for x in v.array_value.values]
            if kind == "array_value"
            else getattr(v, kind)
        )
    return out


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, out: Path | None = None) -> None:
        self.spans: list[tuple[str, object]] = []
        self.lock = threading.Lock()
        self.out = out

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                service = attrs.get("service.name", "?")
                for scope in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope.spans)
                    if self.out is not None:
                        with self.out.open("a") as handle:
                            for span in scope.spans:
                                handle.write(
                                    json.dumps(
                                        {
                                            "service": service,
                                            "name": span.name,
                                            "trace_id": span.trace_id.hex(),
                                            "span_id": span.span_id.hex(),
                                            "parent_span_id": span.parent_span_id.hex(),
                                            "attributes": {k: str(v) for k, v in attributes(span).items()},
                                        }
                                    )
                                    + "\n"
                                )
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: bytes) -> list[tuple[str, object]]:
        with self.lock:
            return [(svc, s) for svc, s in self.spans if s.trace_id == trace_id]


def serve(address: str, out: Path | None = None) -> tuple[grpc.Server, OtlpReceiver]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = OtlpReceiver(out)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    server.add_insecure_port(address)
    server.start()
    return server, servicer


if __name__ == "__main__":
    receiver, _ = serve(f"0.0.0.0:{sys.argv[1]}", Path(sys.argv[2]))
    receiver.wait_for_termination()
