"""A small client of the public CopilotService, used by the CLI, the benchmarks and the tests."""
from __future__ import annotations

import mimetypes
from pathlib import Path

import grpc

from copilot.v1 import common_pb2, copilot_pb2, copilot_pb2_grpc, knowledge_pb2, knowledge_pb2_grpc

DEV_TOKEN = "technician-cli"


def diagnose_request(plant_id: str, equipment_id: str, problem: str, image: Path | bytes | None = None,
                     image_id: str | None = None, equipment_type: str = "") -> copilot_pb2.DiagnoseRequest:
    request = copilot_pb2.DiagnoseRequest(plant_id=plant_id, equipment_id=equipment_id, problem_description=problem,
                                          equipment_type=equipment_type)
    if image is not None:
        if isinstance(image, Path):
            data, mime = image.read_bytes(), mimetypes.guess_type(image.name)[0] or ""
            image_id = image_id or image.name
        else:
            data, mime = image, ""
        request.image.CopyFrom(common_pb2.Image(data=data, mime_type=mime))
    if image_id:
        request.image_id = image_id
    return request


def auth_metadata(token: str = DEV_TOKEN) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def diagnose(address: str, request: copilot_pb2.DiagnoseRequest, *, token: str = DEV_TOKEN,
             timeout: float = 60.0) -> copilot_pb2.DiagnoseResponse:
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 16 * 1024 * 1024)]) as channel:
        return copilot_pb2_grpc.CopilotServiceStub(channel).Diagnose(request, metadata=auth_metadata(token),
                                                                     timeout=timeout)


UPLOAD_PIECE = 256 * 1024


def ingest_file(channel: grpc.Channel, path: Path, *, document_id: str = "", title: str = "", version: str = "",
                equipment_types=(), plant_ids=(), on_bytes=None, timeout: float = 300.0
                ) -> knowledge_pb2.IngestDocumentResponse:
    """Stream one file to KnowledgeService.IngestDocument: metadata first, then 256 KiB pieces."""
    metadata = knowledge_pb2.DocumentMetadata(document_id=document_id, title=title, version=version,
                                              equipment_types=list(equipment_types), plant_ids=list(plant_ids),
                                              filename=path.name)

    def messages():
        yield knowledge_pb2.IngestDocumentRequest(metadata=metadata)
        with path.open("rb") as handle:
            while piece := handle.read(UPLOAD_PIECE):
                if on_bytes:
                    on_bytes(len(piece))
                yield knowledge_pb2.IngestDocumentRequest(content=piece)

    return knowledge_pb2_grpc.KnowledgeServiceStub(channel).IngestDocument(messages(), timeout=timeout)
