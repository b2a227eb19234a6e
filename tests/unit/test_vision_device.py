"""The vision model path on a GPU: the backbone and the memory banks' nearest-neighbour search both run there,
batched, and answer what the CPU answers. Runs where torch sees a CUDA device (the lent GPU machine:
`VISION_DEVICE=cuda`); skipped, with the reason, everywhere else."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.vision.backbone import feature_extractor
from services.vision.core import GENERIC, VisionEngine
from services.vision.references import ReferenceStore

pytestmark = [
    pytest.mark.models,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (VISION_DEVICE=cuda)"),
]


def test_banks_on_the_gpu_score_batches_as_the_cpu_does(tmp_path, crack_photo, clean_photo):
    on_gpu = VisionEngine(feature_extractor(device="cuda"), ReferenceStore(tmp_path))
    on_gpu.seed_starter_set()
    on_gpu.load()
    models = on_gpu.reference_sets()
    assert models and all(g.patches.device.type == "cuda" for m in models.values() for g in m.bank.groups)

    # the same store, everything on the CPU (ONNX Runtime, numpy banks): its models come from the cache the GPU
    # engine wrote
    on_cpu = VisionEngine(feature_extractor(device="cpu"), ReferenceStore(tmp_path))
    on_cpu.load()
    assert on_cpu.built == 0
    assert all(isinstance(g.patches, np.ndarray) for m in on_cpu.reference_sets().values() for g in m.bank.groups)

    items = [
        (on_gpu.decode(crack_photo), "brushed-steel"),
        (on_gpu.decode(clean_photo), "brushed-steel"),
        (on_gpu.decode(crack_photo), "gearbox-casing"),
        (on_gpu.decode(clean_photo), ""),
    ] * 4
    gpu, cpu = on_gpu.measure(items), on_cpu.measure(items)
    for a, b, (image, equipment_type) in zip(gpu, cpu, items, strict=True):
        assert a.reference_set == b.reference_set
        assert isinstance(a.scores, np.ndarray) and isinstance(b.scores, np.ndarray)
        assert np.allclose(a.scores, b.scores, rtol=0.02, atol=0.02), float(np.abs(a.scores - b.scores).max())
        found_gpu, found_cpu = on_gpu.score(image, a, equipment_type), on_cpu.score(image, b, equipment_type)
        assert [d.type for d in found_gpu.defects] == [d.type for d in found_cpu.defects]
    assert gpu[2].reference_set == GENERIC and {d.type for d in on_gpu.score(items[0][0], gpu[0]).defects} >= {
        "crack",
        "corrosion",
    }
