"""The vision model cache: a restarted engine reads its models back instead of rebuilding them, an unchanged
reference set keeps its key, a damaged cache file is rebuilt from the images."""

from __future__ import annotations

import time

import pytest

from services.vision import samples
from services.vision.core import VisionEngine
from services.vision.references import ReferenceStore

pytestmark = pytest.mark.models


def _engine(root, feature_extractor) -> VisionEngine:
    engine = VisionEngine(feature_extractor, ReferenceStore(root))
    for seed in range(4):
        engine.store.add(
            "blue-panel", "good", samples.to_bytes(samples.painted_panel(256, seed, (40, 60, 160))), 256, 256
        )
    scratched = samples.draw_scratch(samples.painted_panel(256, 9, (40, 60, 160)), seed=2)
    engine.store.add("blue-panel", "scratch", samples.to_bytes(scratched), 256, 256)
    return engine


def test_a_restarted_engine_reads_its_models_back_and_scores_the_same(tmp_path, feature_extractor):
    first = _engine(tmp_path, feature_extractor)
    first.load()
    assert first.built == 1  # blue-panel; the generic set has the same references, so the same key
    photo = samples.to_bytes(samples.draw_scratch(samples.painted_panel(256, 11, (40, 60, 160)), seed=5))
    before = first.analyze(photo, "blue-panel")

    again = VisionEngine(feature_extractor, ReferenceStore(tmp_path))
    again.load()
    assert again.built == 0
    after = again.analyze(photo, "blue-panel")
    assert after.anomaly_score == before.anomaly_score
    assert [(d.type, d.confidence) for d in after.defects] == [(d.type, d.confidence) for d in before.defects]


def test_a_cached_feature_map_holds_one_image(tmp_path, feature_extractor):
    """Feature maps are computed in batches; each file holds its own image's map, not the batch's storage."""
    engine = _engine(tmp_path, feature_extractor)
    engine.load()
    files = list((tmp_path / "cache" / "features").rglob("*.npz"))
    one_map = 236 * 32 * 32 * 4  # channels x patches x float32
    assert len(files) == 5 and all(p.stat().st_size < 1.2 * one_map for p in files), [p.stat().st_size for p in files]


def test_a_changed_reference_set_is_rebuilt_and_a_damaged_file_is_not_trusted(tmp_path, feature_extractor):
    engine = _engine(tmp_path, feature_extractor)
    engine.load()
    ref, _ = engine.register("blue-panel", "good", samples.to_bytes(samples.painted_panel(256, 21, (40, 60, 160))))
    assert engine.settle(timeout=120)  # the generic model is rebuilt in the background
    assert engine.built == 2  # the new reference set has a new key
    assert len(list((tmp_path / "cache" / "models").glob("*.npz"))) == 1  # the old key's file was pruned
    for path in (tmp_path / "cache" / "models").glob("*.npz"):
        path.write_bytes(b"not a numpy archive")
    reopened = VisionEngine(feature_extractor, ReferenceStore(tmp_path))
    reopened.load()
    assert reopened.built == 1 and reopened.reference_sets()["blue-panel"].good_images == 5
    assert ref.reference_id in {r.reference_id for r in reopened.store.all()}


def test_a_cache_that_cannot_be_written_costs_a_rebuild_not_the_service(
    tmp_path, feature_extractor, monkeypatch, caplog
):
    """A full disk (the archive's write fails with ENOSPC part-way). The models are built and serve; nothing half
    written is left behind; the next start builds them again."""
    import errno

    import numpy as np

    def full_disk(file, *args, **kwargs):
        file.write(b"PK\x03\x04 half an archive")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    engine = _engine(tmp_path, feature_extractor)
    engine.load()
    assert engine.reference_sets()["blue-panel"].good_images == 4
    assert "vision cache not written" in caplog.text
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.suffix != ".lock"]  # build locks
    monkeypatch.undo()
    again = VisionEngine(feature_extractor, ReferenceStore(tmp_path))
    again.load()
    assert again.built == 1  # built from the images (generic: the same references, the same key)
    assert list((tmp_path / "cache" / "models").glob("*.npz"))  # and cached this time


def test_the_build_lock_lets_one_builder_in_and_never_stops_a_build(tmp_path, monkeypatch, caplog):
    """ModelCache.building: one holder per key at a time (separate opens stand for separate replicas); a
    filesystem without locks or a cache that cannot be written still builds."""
    import fcntl
    import threading

    from services.vision.cache import ModelCache

    first, second = ModelCache(tmp_path, "b", 256), ModelCache(tmp_path, "b", 256)
    inside, order = threading.Event(), []

    def hold() -> None:
        with first.building("k"):
            inside.set()
            time.sleep(0.3)
            order.append("first done")

    holder = threading.Thread(target=hold)
    holder.start()
    assert inside.wait(5)
    with second.building("other-key"):  # another key is not held up
        order.append("other key")
    with second.building("k"):  # waits for the first
        order.append("second in")
    holder.join()
    assert order == ["other key", "first done", "second in"]

    def no_locks(*_args):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with first.building("k"):
        order.append("built without a lock")
    assert "without its build lock" in caplog.text
    monkeypatch.undo()
    read_only = ModelCache(tmp_path / "file", "b", 256)
    (tmp_path / "file").write_text("not a folder")
    with read_only.building("k"):
        order.append("built without a lock file")
    assert order[-2:] == ["built without a lock", "built without a lock file"]
