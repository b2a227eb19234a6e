"""The vision backbone through ONNX Runtime: the same patch features as the torch path it is exported from, and a
CPU replica that builds its models and analyses a photo without importing torch."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.vision import backbone, samples
from tests.conftest import run_python

pytestmark = pytest.mark.models


def test_the_onnx_graph_gives_the_torch_features(tmp_path, crack_photo):
    import torch

    onnx = backbone.feature_extractor(onnx_dir=tmp_path, threads=1)
    torch_path = backbone.feature_extractor(runtime="torch", threads=1)
    assert isinstance(onnx, backbone.OnnxFeatureExtractor) and isinstance(torch_path, backbone.TorchFeatureExtractor)
    images = [
        Image.open(io.BytesIO(crack_photo)),
        samples.make_surface("brushed-steel", 3),
        samples.make_defect("painted-panel", "scratch", 4),
    ]
    batch = onnx.features(images)
    assert batch.shape == (3, 236, 32, 32) and batch.dtype == np.float32
    assert np.abs(batch - torch_path.patch_features(images)).max() < 1e-3
    # one image alone is what it is in a batch (the graph's batch axis is dynamic)
    assert np.abs(onnx.features(images[1:2])[0] - batch[1]).max() < 1e-4
    # the graph is exported once: a second extractor on the folder reads the file
    again = backbone.feature_extractor(onnx_dir=tmp_path)
    assert again.path == onnx.path and len(list(tmp_path.glob("*.onnx"))) == 1
    # VISION_DEVICE=auto on a machine whose torch sees no GPU: the CPU, through ONNX Runtime
    if not torch.cuda.is_available():
        assert isinstance(backbone.feature_extractor(device="auto", onnx_dir=tmp_path), backbone.OnnxFeatureExtractor)


def test_a_folder_that_cannot_be_written_exports_to_the_temporary_directory(tmp_path, monkeypatch):
    read_only = tmp_path / "read-only"
    export = backbone.export

    def refusing(target: Path, image_size: int = 256) -> Path:
        if target.parent == read_only:
            raise PermissionError(13, "Read-only file system", str(target))
        return export(target, image_size)

    monkeypatch.setattr(backbone, "export", refusing)
    monkeypatch.setattr(backbone.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    path = backbone.prepare(read_only, 128)
    assert path.parent == tmp_path / "tmp" / "copilot-models" and path.exists()
    assert backbone.prepare(read_only, 128) == path  # found there the next time


def test_a_cpu_replica_builds_and_analyses_without_torch(tmp_path, crack_photo):
    """What a new vision pod does on a CPU: models built (or read from the cache) and a photo analysed, with the
    graph in place (the image exports it at build time) — and torch never imported."""
    models = tmp_path / "models"
    backbone.prepare(models)  # in this process: the export needs torch
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from services.vision.backbone import feature_extractor
        from services.vision.core import VisionEngine
        from services.vision.references import ReferenceStore

        engine = VisionEngine(feature_extractor(onnx_dir=Path({str(models)!r}), threads=1),
                              ReferenceStore(Path({str(tmp_path / "refs")!r})))
        engine.seed_starter_set()
        engine.load()
        found = engine.analyze(Path({str(tmp_path / "crack.jpg")!r}).read_bytes(), "brushed-steel")
        assert {{d.type for d in found.defects}} >= {{"crack"}}, found
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        print("torch modules:", loaded)
        assert not loaded
        """
    )
    (tmp_path / "crack.jpg").write_bytes(crack_photo)
    done = run_python(script, timeout=600, home=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "torch modules: []" in done.stdout


def test_a_model_build_hands_its_arena_memory_back(tmp_path):
    """ONNX Runtime's CPU arena keeps the largest run's buffers: a model build (16 references per run) left a replica
    at ~570 MiB resident where one that read its models from the cache held ~150. A build's run now hands them back
    (measured in a fresh process: ~76 MiB kept after a batch of 16, the features it returned included, vs ~208)."""
    backbone.feature_extractor(onnx_dir=tmp_path, threads=1)  # exported here, once
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        import numpy as np
        from PIL import Image
        from services.vision.backbone import feature_extractor

        def resident_mib():
            line = next(l for l in open("/proc/self/status") if l.startswith("VmRSS"))
            return int(line.split()[1]) / 1024

        extractor = feature_extractor(onnx_dir=Path({str(tmp_path)!r}), threads=1, runtime="onnx")
        image = Image.fromarray((np.random.default_rng(0).random((256, 256, 3)) * 255).astype(np.uint8))
        extractor.features([image])
        before = resident_mib()
        extractor.patch_features([image] * 16)
        print(round(resident_mib() - before))
        """
    )
    done = run_python(script, timeout=120, home=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    kept = int(done.stdout.split()[-1])
    assert kept < 130, f"a batch of 16 left {kept} MiB more resident"
