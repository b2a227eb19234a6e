"""Knowledge service process: settings and wiring."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic_settings import SettingsConfigDict

from copilot.contracts import KNOWLEDGE_SERVICE
from copilot.runtime.config import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, ServerSettings
from copilot.runtime.server import ServiceSpec, run_service
from copilot.v1 import knowledge_pb2_grpc
from services.rag.corpus import load_folder, starter_corpus
from services.rag.servicer import KnowledgeServicer

if TYPE_CHECKING:
    from services.rag.core import KnowledgeBase

SERVICE_NAME = KNOWLEDGE_SERVICE


class KnowledgeSettings(ServerSettings):
    model_config = SettingsConfigDict(env_prefix="KNOWLEDGE_", extra="ignore")

    port: int = DEFAULT_PORTS["knowledge"]
    metrics_port: int = DEFAULT_METRICS_PORTS["knowledge"]
    chroma_path: Path = Path(".copilot-data/chroma")  # embedded persistent store (default)
    chroma_host: str | None = None  # set to use a `chroma run` server instead
    chroma_port: int = 8000
    corpus_dir: Path | None = None  # extra Markdown SOPs loaded at start, beside the starter corpus
    top_k: int = 3
    min_score: float = 0.30


def build(settings: KnowledgeSettings | None = None,
          knowledge: "KnowledgeBase | None" = None) -> tuple[ServiceSpec, KnowledgeSettings]:
    """Wire the service; `knowledge` injects an already loaded knowledge base (tests, benchmarks)."""
    settings = settings or KnowledgeSettings()
    servicer = KnowledgeServicer()  # the knowledge base is attached by warm_up

    def load() -> None:
        if knowledge is not None:
            servicer.knowledge = knowledge
            return
        from services.rag.core import AdvisorTuning, KnowledgeBase, minilm_embedder, open_collection

        collection = open_collection(settings.chroma_path, settings.chroma_host, settings.chroma_port)
        loaded = KnowledgeBase(collection, minilm_embedder(),
                               AdvisorTuning(top_k=settings.top_k, min_score=settings.min_score))
        documents = starter_corpus() + (load_folder(settings.corpus_dir) if settings.corpus_dir else [])
        loaded.ensure_documents(documents)
        loaded.retrieve("warm-up query", 1)
        servicer.knowledge = loaded

    async def warm_up() -> None:
        await asyncio.to_thread(load)

    spec = ServiceSpec(
        name="knowledge",
        service_names=[SERVICE_NAME],
        register=lambda server: knowledge_pb2_grpc.add_KnowledgeServiceServicer_to_server(servicer, server),
        warm_up=warm_up,
    )
    return spec, settings


def main() -> None:
    run_service("knowledge", build)
