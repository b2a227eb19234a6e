"""A small client of the public CopilotService, used by the CLI, the benchmarks and the tests."""

from __future__ import annotations

import mimetypes
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from pydantic_settings import SettingsConfigDict

from copilot.agents.v1 import knowledge_pb2, knowledge_pb2_grpc
from copilot.equipment import canonical_scope
from copilot.runtime.config import DEFAULT_MAX_MESSAGE_BYTES, TlsSettings, message_size_options
from copilot.runtime.tls import channel_credentials, channel_options
from copilot.v1 import common_pb2, copilot_pb2, copilot_pb2_grpc

DEV_TOKEN = "technician-cli"  # the dev form: accepted only by a mesh in dev mode
CHANNEL_OPTIONS = message_size_options(DEFAULT_MAX_MESSAGE_BYTES)


class ClientTlsSettings(TlsSettings):
    """`COPILOT_TLS_*`: how the CLI reaches a TLS-serving mesh (COPILOT_TLS_CA_FILE; with COPILOT_TLS_CERT_FILE
    and COPILOT_TLS_KEY_FILE it presents a client certificate, for mTLS)."""

    model_config = SettingsConfigDict(env_prefix="COPILOT_TLS_", extra="ignore")


def open_channel(address: str) -> grpc.Channel:
    """A blocking channel for the CLI: TLS when COPILOT_TLS_CA_FILE is set, else plaintext."""
    tls = ClientTlsSettings()
    credentials = channel_credentials(tls)
    options = [*CHANNEL_OPTIONS, *channel_options(tls)]
    if credentials is not None:
        return grpc.secure_channel(address, credentials, options=options)
    return grpc.insecure_channel(address, options=options)


def resolve_token(token: str | None = None, role: str = "technician", folder: Path | None = None) -> str:
    """The token a CLI call sends: an explicit one (--token / COPILOT_TOKEN) wins; else a JWT minted with the
    local secret (AUTH_JWT_SECRET(_FILE), else <data dir>/auth/dev-jwt-secret written by `copilot up`); else the
    dev form (`technician-cli`)."""
    from copilot.runtime.auth import Role, dev_secret_file, mint_token, signing_secret

    if token:
        return token
    secret = signing_secret(dev_secret_file(folder))
    parsed = Role.parse(role)
    if secret and parsed is not None:
        return mint_token(f"{role}-cli", parsed, secret=secret, ttl_s=900)
    return DEV_TOKEN


def canonical_plant(plant_id: str) -> str:
    """A plant code as the public API takes it (upper case: "pune-in" is PUNE-IN); knowledge scopes compare plants
    in `canonical_scope` form, which is the same plant."""
    return plant_id.strip().upper()


def diagnose_request(
    plant_id: str,
    equipment_id: str,
    problem: str,
    image: Path | bytes | None = None,
    image_id: str | None = None,
    equipment_type: str = "",
    request_id: str = "",
    reference_set: str = "",
) -> copilot_pb2.DiagnoseRequest:
    """`plant_id` and `equipment_type` are put in the form the API compares them in (plant codes upper case,
    machine types kebab-case), so "pune-in" and "Centrifugal Pump" reach the same plant and type."""
    request = copilot_pb2.DiagnoseRequest(
        plant_id=canonical_plant(plant_id),
        equipment_id=equipment_id,
        problem_description=problem,
        equipment_type=canonical_scope(equipment_type),
        request_id=request_id,
        reference_set=reference_set.strip(),
    )
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


def diagnose(
    address: str, request: copilot_pb2.DiagnoseRequest, *, token: str = DEV_TOKEN, timeout: float = 60.0
) -> copilot_pb2.DiagnoseResponse:
    with open_channel(address) as channel:
        response: copilot_pb2.DiagnoseResponse = copilot_pb2_grpc.CopilotServiceStub(channel).Diagnose(
            request, metadata=auth_metadata(token), timeout=timeout
        )
    return response


def stream_diagnose(
    channel: grpc.Channel, request: copilot_pb2.DiagnoseRequest, *, token: str = DEV_TOKEN, timeout: float = 60.0
) -> Any:
    """StreamDiagnose: the call (an iterator of StreamDiagnoseResponse events; `.cancel()` stops the diagnosis)."""
    return copilot_pb2_grpc.CopilotServiceStub(channel).StreamDiagnose(
        copilot_pb2.StreamDiagnoseRequest(diagnosis=request), metadata=auth_metadata(token), timeout=timeout
    )


UPLOAD_PIECE = 256 * 1024


def ingest_file(
    channel: grpc.Channel,
    path: Path,
    *,
    document_id: str = "",
    title: str = "",
    version: str = "",
    equipment_types: Iterable[str] = (),
    plant_ids: Iterable[str] = (),
    on_bytes: Callable[[int], object] | None = None,
    timeout: float = 300.0,
    token: str = DEV_TOKEN,
    metadata: tuple[tuple[str, str], ...] | None = None,
) -> knowledge_pb2.IngestDocumentResponse:
    """Stream one file to KnowledgeService.IngestDocument: metadata first, then 256 KiB pieces."""
    document = knowledge_pb2.DocumentMetadata(
        document_id=document_id,
        title=title,
        version=version,
        equipment_types=list(equipment_types),
        plant_ids=list(plant_ids),
        filename=path.name,
    )

    def messages() -> Iterator[knowledge_pb2.IngestDocumentRequest]:
        yield knowledge_pb2.IngestDocumentRequest(metadata=document)
        with path.open("rb") as handle:
            while piece := handle.read(UPLOAD_PIECE):
                if on_bytes:
                    on_bytes(len(piece))
                yield knowledge_pb2.IngestDocumentRequest(content=piece)

    response: knowledge_pb2.IngestDocumentResponse = knowledge_pb2_grpc.KnowledgeServiceStub(channel).IngestDocument(
        messages(), timeout=timeout, metadata=metadata or auth_metadata(token)
    )
    return response


def aio_channel(
    address: str,
    token: str | None = None,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """An asyncio channel whose calls carry `token` (none: no authorization header)."""
    from copilot.runtime.interceptors import bearer_interceptors

    interceptors = bearer_interceptors(token) if token else []
    opts = [*CHANNEL_OPTIONS, *options]
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, options=opts, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=opts, interceptors=interceptors)
