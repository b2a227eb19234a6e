"""MiniLM through ONNX Runtime gives the sentence-transformers embeddings (the shipped default must not change
retrieval), and its export is reused."""

from __future__ import annotations

import numpy as np
import pytest

from services.rag.embedders import minilm_embedder
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


def test_the_int8_graph_stays_close_to_the_float_one_and_names_its_model(tmp_path):
    """int8 weights (per output channel) move the embeddings a little: a store records which model embedded a
    document, so the two ids differ; the float graph and sentence-transformers share theirs (same vectors)."""
    int8 = minilm_embedder(kind="onnx-int8", onnx_dir=tmp_path)
    float32 = minilm_embedder(kind="onnx", onnx_dir=tmp_path)
    assert isinstance(int8, OnnxMiniLM) and onnx_path(tmp_path, "int8").exists()
    assert int8.model_id != float32.model_id == minilm_embedder(kind="torch").model_id
    texts = [*TEXTS, "Spot welder producing porous welds with spatter", "Nutrunner torque not OK on station 3"]
    a, b = np.array(int8.embed_documents(texts)), np.array(float32.embed_documents(texts))
    cosines = (a * b).sum(axis=1)
    assert cosines.min() > 0.97 and cosines.mean() > 0.98, cosines
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(a, b, atol=1e-3)  # really the int8 graph
    assert minilm_embedder(kind="onnx-int8", onnx_dir=tmp_path).model_id == int8.model_id  # the file is reused
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {onnx_path(tmp_path).name, onnx_path(tmp_path, "int8").name}
    )
