"""MiniLM through ONNX Runtime gives the sentence-transformers embeddings (the shipped default must not change
retrieval), and its export is reused."""

from __future__ import annotations

import numpy as np
import pytest

from services.rag.core import minilm_embedder
from services.rag.onnx_embedder import OnnxMiniLM, onnx_path

pytestmark = pytest.mark.models

TEXTS = [
    "CNC machine overheating during operation",
    "Hydraulic press alarm E-0452 and oil dripping from a hose fitting " * 30,  # longer than 256 tokens
    "x",
]


def test_onnx_embeddings_equal_the_sentence_transformers_ones(tmp_path):
    onnx = minilm_embedder(kind="onnx", onnx_dir=tmp_path)
    torch_based = minilm_embedder(kind="torch")
    assert isinstance(onnx, OnnxMiniLM)
    a, b = np.array(onnx.embed_documents(TEXTS)), np.array(torch_based.embed_documents(TEXTS))
    assert a.shape == b.shape == (3, 384)
    assert np.all((a * b).sum(axis=1) > 0.99999)  # cosine of unit vectors
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.allclose(onnx.embed_query(TEXTS[0]), a[0], atol=1e-6)
    assert onnx_path(tmp_path).exists()
    assert isinstance(minilm_embedder(kind="onnx", onnx_dir=tmp_path), OnnxMiniLM)  # the export is reused
