"""KnowledgeService document RPCs over real gRPC: client-streaming ingest, list/get/delete, filters, and
precise INVALID_ARGUMENT / NOT_FOUND answers that leave the store as it was."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from copilot.agents.v1 import knowledge_pb2, knowledge_pb2_grpc
from copilot.runtime.errors import field_violations
from tests.contract.conftest import channel_to, serving

HYD = b"""---
id: HYD-900
title: Test press manual
version: "1"
equipment_types: [hydraulic-press]
---
# Test press manual
## Alarm E-7781
1. Check the accumulator pre-charge pressure with the charging kit.
2. Replace the accumulator bladder if it does not hold nitrogen.
"""


@pytest.fixture
async def library(tmp_path, embedder):
    from services.rag.core import KnowledgeBase, open_store
    from services.rag.server import KnowledgeSettings, build

    knowledge = KnowledgeBase(open_store(tmp_path / "store"), embedder)
    async with serving(*build(KnowledgeSettings(port=0), knowledge=knowledge)) as server:
        async with channel_to(server, "admin") as channel, channel_to(server, "service") as orchestrator:
            stub = knowledge_pb2_grpc.KnowledgeServiceStub(channel)
            # Retrieve is the orchestrator's (a service token's); the library is managed by admins
            stub.Retrieve = knowledge_pb2_grpc.KnowledgeServiceStub(orchestrator).Retrieve
            yield stub, knowledge


def upload(metadata: knowledge_pb2.DocumentMetadata | None, data: bytes, piece: int = 64):
    async def stream():
        if metadata is not None:
            yield knowledge_pb2.IngestDocumentRequest(metadata=metadata)
        for start in range(0, len(data), piece):
            yield knowledge_pb2.IngestDocumentRequest(content=data[start : start + piece])

    return stream()


async def test_ingest_streams_a_document_in_pieces_and_is_idempotent(library):
    stub, _ = library
    first = await stub.IngestDocument(upload(knowledge_pb2.DocumentMetadata(filename="hyd.md"), HYD))
    assert first.outcome == knowledge_pb2.INGEST_OUTCOME_CREATED and first.chunks_written == 1
    doc = first.document
    assert (doc.document_id, doc.title, doc.version, list(doc.equipment_types)) == (
        "HYD-900",
        "Test press manual",
        "1",
        ["hydraulic-press"],
    )
    assert doc.format == knowledge_pb2.DOCUMENT_FORMAT_MARKDOWN and doc.size_bytes == len(HYD)
    again = await stub.IngestDocument(upload(knowledge_pb2.DocumentMetadata(filename="hyd.md"), HYD, piece=7))
    assert again.outcome == knowledge_pb2.INGEST_OUTCOME_UNCHANGED and again.chunks_written == 0

    found = await stub.Retrieve(knowledge_pb2.RetrieveRequest(query="alarm E-7781 on the press", top_k=1))
    assert found.chunks[0].sop_id == "HYD-900" and found.chunks[0].section == "Alarm E-7781"

    v2 = HYD.replace(b'version: "1"', b'version: "2"').replace(b"nitrogen", b"nitrogen at 90 bar")
    replaced = await stub.IngestDocument(upload(knowledge_pb2.DocumentMetadata(filename="hyd.md"), v2))
    assert replaced.outcome == knowledge_pb2.INGEST_OUTCOME_REPLACED and replaced.chunks_removed == 1
    got = await stub.GetDocument(knowledge_pb2.GetDocumentRequest(document_id="HYD-900"))
    assert got.document.version == "2" and "90 bar" in got.chunks[0].text


async def test_plain_text_needs_metadata_and_filters_apply(library):
    stub, _ = library
    text = b"Compressor room notes\n\nAlarm A-55 oil carry-over:\n1. Replace the separator element.\n"
    meta = knowledge_pb2.DocumentMetadata(
        document_id="CMP-55",
        version="2024-06",
        filename="notes.txt",
        equipment_types=["air-compressor"],
        plant_ids=["plant-7"],
    )
    created = await stub.IngestDocument(upload(meta, text))
    assert created.document.format == knowledge_pb2.DOCUMENT_FORMAT_TEXT
    assert created.document.title == "Compressor room notes"
    await stub.IngestDocument(upload(knowledge_pb2.DocumentMetadata(filename="hyd.md"), HYD))

    listed = await stub.ListDocuments(knowledge_pb2.ListDocumentsRequest())
    assert [d.document_id for d in listed.documents] == ["CMP-55", "HYD-900"] and listed.total_size == 2
    by_plant = await stub.ListDocuments(knowledge_pb2.ListDocumentsRequest(plant_id="plant-3"))
    assert [d.document_id for d in by_plant.documents] == ["HYD-900"]  # CMP-55 belongs to plant-7 only
    page = await stub.ListDocuments(knowledge_pb2.ListDocumentsRequest(page_size=1))
    rest = await stub.ListDocuments(knowledge_pb2.ListDocumentsRequest(page_size=1, page_token=page.next_page_token))
    assert [d.document_id for d in [*page.documents, *rest.documents]] == [
        "CMP-55",
        "HYD-900",
    ] and not rest.next_page_token

    scoped = await stub.Retrieve(
        knowledge_pb2.RetrieveRequest(query="oil carry-over alarm A-55", top_k=3, equipment_type="hydraulic-press")
    )
    assert "CMP-55" not in {c.sop_id for c in scoped.chunks}


async def test_delete_and_not_found(library):
    stub, knowledge = library
    await stub.IngestDocument(upload(knowledge_pb2.DocumentMetadata(filename="hyd.md"), HYD))
    deleted = await stub.DeleteDocument(knowledge_pb2.DeleteDocumentRequest(document_id="HYD-900"))
    assert deleted.chunks_removed == 1 and knowledge.count() == 0
    for call in (
        stub.DeleteDocument(knowledge_pb2.DeleteDocumentRequest(document_id="HYD-900")),
        stub.GetDocument(knowledge_pb2.GetDocumentRequest(document_id="HYD-900")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await call
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("metadata", "data", "field"),
    [
        (None, HYD, "metadata"),
        (knowledge_pb2.DocumentMetadata(filename="hyd.md"), b"", "content"),
        (knowledge_pb2.DocumentMetadata(filename="manual.rtf", document_id="X-1"), b"{\\rtf1 x}", "metadata.format"),
        (knowledge_pb2.DocumentMetadata(filename="manual.docx", document_id="X-1"), b"PK\x03\x04", "content"),
        (knowledge_pb2.DocumentMetadata(filename="notes.txt"), b"1. a step\n", "metadata.document_id"),
        (
            knowledge_pb2.DocumentMetadata(filename="notes.txt", document_id="has spaces"),
            b"text",
            "metadata.document_id",
        ),
        (knowledge_pb2.DocumentMetadata(filename="x.pdf", document_id="P-1"), b"\x00\x01garbage" * 50, "content"),
        (knowledge_pb2.DocumentMetadata(filename="x.txt", document_id="P-1"), bytes(range(256)) * 8, "content"),
        (knowledge_pb2.DocumentMetadata(filename="big.txt", document_id="P-1"), b"a" * 3000, "content"),
    ],
)
async def test_bad_uploads_are_invalid_argument_and_change_nothing(library, metadata, data, field):
    stub, knowledge = library
    knowledge.limits = type(knowledge.limits)(max_bytes=2048)
    await stub.IngestDocument(upload(knowledge_pb2.DocumentMetadata(filename="hyd.md"), HYD))
    before = (knowledge.count(), knowledge.list_documents())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.IngestDocument(upload(metadata, data))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in {v.field for v in field_violations(refused.value)}
    assert (knowledge.count(), knowledge.list_documents()) == before
    assert (await stub.ListDocuments(knowledge_pb2.ListDocumentsRequest())).total_size == 1  # still serving


async def test_a_word_document_and_an_html_page_are_ingested_and_retrieved_by_their_steps(library):
    """The formats a plant's SOPs often come in: a .docx as Word writes it, an HTML page from an intranet."""
    from tests.unit.test_rag_documents import _word_document

    stub, _ = library
    word = await stub.IngestDocument(
        upload(knowledge_pb2.DocumentMetadata(filename="hp-200.docx", document_id="HP-200-SEAL"), _word_document())
    )
    assert word.outcome == knowledge_pb2.INGEST_OUTCOME_CREATED
    assert word.document.format == knowledge_pb2.DOCUMENT_FORMAT_DOCX
    assert word.document.title == "Hydraulic press HP-200: seal replacement"
    page = b"<h1>Chiller CH-150: low flow</h1><h2>Low flow alarm F-21</h2><ol><li>Open the strainer.</li></ol>"
    html = await stub.IngestDocument(
        upload(
            knowledge_pb2.DocumentMetadata(document_id="CH-150-F21", format=knowledge_pb2.DOCUMENT_FORMAT_HTML),
            page,
        )
    )
    assert html.document.format == knowledge_pb2.DOCUMENT_FORMAT_HTML and html.chunks_written == 1
    found = await stub.Retrieve(knowledge_pb2.RetrieveRequest(query="replace seal PN-SEAL-45", top_k=1))
    assert found.chunks[0].sop_id == "HP-200-SEAL" and found.chunks[0].section == "Procedure"
    found = await stub.Retrieve(knowledge_pb2.RetrieveRequest(query="low flow alarm F-21", top_k=1))
    assert found.chunks[0].sop_id == "CH-150-F21"


async def test_a_changed_document_under_the_same_version_is_refused(library):
    stub, knowledge = library
    await stub.IngestDocument(upload(knowledge_pb2.DocumentMetadata(filename="hyd.md"), HYD))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.IngestDocument(
            upload(knowledge_pb2.DocumentMetadata(filename="hyd.md"), HYD.replace(b"kit", b"tool"))
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in field_violations(refused.value)] == ["metadata.version"]
    assert "kit" in knowledge.document_chunks("HYD-900")[0].text


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (knowledge_pb2.ListDocumentsRequest(page_size=-1), "page_size"),  # 501 is served as 500 (AIP-158)
        (knowledge_pb2.ListDocumentsRequest(page_token="not-a-token!"), "page_token"),
        (knowledge_pb2.ListDocumentsRequest(plant_id="p" * 65), "plant_id"),
    ],
)
async def test_list_validation(library, request_, field):
    stub, _ = library
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ListDocuments(request_)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in field_violations(refused.value)] == [field]


@pytest.mark.parametrize("role", [None, "technician", "engineer"])
async def test_only_admins_change_the_library(tmp_path, embedder, role):
    """The knowledge service checks roles itself: it is reachable inside the cluster without the orchestrator."""
    from services.rag.core import KnowledgeBase, open_store
    from services.rag.server import KnowledgeSettings, build

    knowledge = KnowledgeBase(open_store(tmp_path / "store"), embedder)
    async with serving(*build(KnowledgeSettings(port=0), knowledge=knowledge)) as server:
        async with channel_to(server, role) as channel:
            stub = knowledge_pb2_grpc.KnowledgeServiceStub(channel)
            expected = grpc.StatusCode.UNAUTHENTICATED if role is None else grpc.StatusCode.PERMISSION_DENIED

            async def nothing_yet():
                # The role is checked on the call's headers, before any message is read. A client still writing
                # pieces when the refusal arrives may see its own failed write (INTERNAL "execute_batch") instead of
                # the server's status (a race in grpc aio's client seen once in CI), so this upload sends nothing.
                await asyncio.Event().wait()
                yield knowledge_pb2.IngestDocumentRequest()

            for call in (
                stub.IngestDocument(nothing_yet()),
                stub.DeleteDocument(knowledge_pb2.DeleteDocumentRequest(document_id="HYD-900")),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call
                assert refused.value.code() == expected
                if role:
                    assert "admin" in refused.value.details()
            if role:  # reading stays open to every role
                assert (await stub.ListDocuments(knowledge_pb2.ListDocumentsRequest())).total_size == 0
    assert knowledge.list_documents() == []
