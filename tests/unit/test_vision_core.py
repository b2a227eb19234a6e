"""The vision core: PatchCore-style scoring on the packaged EfficientNet-Lite0, localisation, few-shot
types, reference persistence, and the image checks."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from services.vision import samples
from services.vision.core import GENERIC, ImageLimits, ImageRejected, VisionEngine, decode_image
from services.vision.evaluation import evaluate
from services.vision.references import ReferenceStore


def _types(findings) -> list[str]:
    return [d.type for d in findings.defects]


def test_shipped_crack_photo_finds_crack_and_corrosion_where_they_are(vision_engine, crack_photo):
    findings = vision_engine.analyze(crack_photo, "brushed-steel")
    assert set(_types(findings)) >= {"crack", "corrosion"}
    crack = next(d for d in findings.defects if d.type == "crack")
    rust = next(d for d in findings.defects if d.type == "corrosion")
    # drawn from (0.2, 0.3) to the right and down; the rust blob is centred at (0.72, 0.7)
    assert crack.box.x_min < 0.3 and crack.box.y_min < 0.45
    assert rust.box.x_min < 0.72 < rust.box.x_max and rust.box.y_min < 0.7 < rust.box.y_max
    assert findings.anomaly_score > 0.9 and findings.reference_set == "brushed-steel"
    assert findings.model == "patchcore/efficientnet-lite0" and (findings.width, findings.height) == (512, 512)


def test_clean_surface_has_no_defects(vision_engine, clean_photo):
    findings = vision_engine.analyze(clean_photo, "brushed-steel")
    assert findings.defects == () and findings.anomaly_score < 0.5
    assert "matches the brushed-steel good references" in findings.description


def test_unknown_equipment_type_uses_the_generic_set_with_lower_confidence(vision_engine, crack_photo):
    known = vision_engine.analyze(crack_photo, "brushed-steel")
    unknown = vision_engine.analyze(crack_photo, "gearbox-casing")
    assert unknown.reference_set == GENERIC and set(_types(unknown)) >= {"crack", "corrosion"}
    assert unknown.confidence < known.confidence and unknown.generic and not known.generic
    assert unknown.confidence < 0.5 and all(d.confidence < 0.5 for d in unknown.defects)


def test_held_out_generated_set_quality(vision_engine):
    """Measured on images the starter set never saw (different seeds). Same generator as the starter
    set, so this measures the pipeline, not performance on real photos."""
    result = evaluate(vision_engine, goods_per_surface=4, per_defect=2)
    assert result.auroc >= 0.95, result
    assert result.detection_rate >= 0.9 and result.false_positive_rate <= 0.25, result
    assert result.type_accuracy >= 0.8, result


def test_a_batch_is_scored_as_its_images_one_by_one(vision_engine, crack_photo, clean_photo, monkeypatch):
    """measure() scores a batch of mixed equipment types with one search per reference set, in slices of rows;
    every image's scores and findings are what it gets alone."""
    from dataclasses import astuple, replace

    from services.vision import patchcore

    items = [
        (vision_engine.decode(crack_photo), "brushed-steel"),
        (vision_engine.decode(clean_photo), "gearbox-casing"),  # no references of its own: the generic set
        (vision_engine.decode(clean_photo), "brushed-steel"),
        (vision_engine.decode(crack_photo), ""),
    ]
    alone = [vision_engine.measure([item])[0] for item in items]
    monkeypatch.setattr(patchcore, "_DISTANCES_AT_ONCE", 5000)  # slices of a few rows
    together = vision_engine.measure(items)
    assert [m.reference_set for m in together] == ["brushed-steel", GENERIC, "brushed-steel", GENERIC]
    for one, batched, (image, equipment_type) in zip(alone, together, items, strict=True):
        assert one.scores is not None and batched.scores is not None
        assert np.allclose(one.scores, batched.scores, rtol=1e-4, atol=1e-4)
        assert np.allclose(one.feature_map, batched.feature_map, atol=1e-4)
        mine, its_own = (vision_engine.score(image, m, equipment_type) for m in (batched, one))
        assert [d.type for d in mine.defects] == [d.type for d in its_own.defects]
        for a, b in zip(mine.defects, its_own.defects, strict=True):
            assert max(abs(x - y) for x, y in zip(astuple(a.box), astuple(b.box), strict=True)) < 1e-3
    assert together[0].model is vision_engine.reference_sets()["brushed-steel"]
    # the findings are read from the measured scores (scored once, where the banks are)
    calm = replace(together[0], scores=np.full_like(together[0].scores, 0.2))
    assert vision_engine.score(items[0][0], calm, "brushed-steel").defects == ()
    assert isinstance(next(iter(together[0].model.bank.groups)).patches, np.ndarray)  # where the backbone runs


def test_heatmap_is_a_png_of_the_photo(vision_engine, crack_photo):
    findings = vision_engine.analyze(crack_photo, "brushed-steel", include_heatmap=True)
    heat = Image.open(io.BytesIO(findings.heatmap_png))
    # the photo's size, though the model's input was decoded at half of it (JPEG DCT scaling)
    assert heat.format == "PNG" and heat.size == (512, 512) == (findings.width, findings.height)
    assert vision_engine.decode(crack_photo).size == (256, 256)
    without = vision_engine.analyze(crack_photo, "brushed-steel")
    assert without.heatmap_png == b"" and (without.width, without.height) == (512, 512)
    assert without.defects == findings.defects  # the model's input is the same with or without a heatmap
    png = io.BytesIO()
    Image.open(io.BytesIO(crack_photo)).save(png, "PNG")  # a PNG is decoded whole once, heatmap or not
    as_png = vision_engine.analyze(png.getvalue(), "brushed-steel", include_heatmap=True)
    assert Image.open(io.BytesIO(as_png.heatmap_png)).size == (512, 512) == (as_png.width, as_png.height)
    red = heat.getpixel((int(0.72 * 512), int(0.7 * 512)))  # over the rust: tinted red
    assert red[0] > red[2]


def test_a_camera_sized_photos_heatmap_is_drawn_at_display_scale(vision_engine, crack_photo):
    """A 12-megapixel JPEG's overlay comes from a decode whose longer side just covers 768 px (1000 x 750, not
    2000 x 1500), a large PNG's is drawn with its longer side at 1024: PNG encoding is most of a heatmap's cost.
    The findings still give the size the photo was sent at, and the same defects as without a heatmap."""
    big = Image.open(io.BytesIO(crack_photo)).convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC)
    for fmt, expected in (("JPEG", (1000, 750)), ("PNG", (1024, 768))):
        data = samples.to_bytes(big if fmt == "JPEG" else big.resize((2000, 1500)), fmt)
        findings = vision_engine.analyze(data, "brushed-steel", include_heatmap=True)
        assert Image.open(io.BytesIO(findings.heatmap_png)).size == expected, fmt
        assert (findings.width, findings.height) == ((4000, 3000) if fmt == "JPEG" else (2000, 1500))
        assert findings.defects == vision_engine.analyze(data, "brushed-steel").defects


def test_references_register_persist_and_delete(tmp_path, feature_extractor):
    store_dir = tmp_path / "refs"
    engine = VisionEngine(feature_extractor, ReferenceStore(store_dir))
    engine.seed_starter_set()
    engine.load()
    good = samples.to_bytes(samples.painted_panel(256, seed=77, colour=(160, 40, 40)), "PNG")
    ref, created = engine.register("red-panel", "good", good)
    assert created and "red-panel" in engine.reference_sets()
    assert engine.register("red-panel", "good", good) == (ref, False)  # idempotent per content
    scratched = samples.to_bytes(samples.draw_scratch(samples.painted_panel(256, 78, (160, 40, 40)), seed=3), "PNG")
    engine.register("red-panel", "scratch", scratched)

    reopened = VisionEngine(feature_extractor, ReferenceStore(store_dir))  # a restart
    assert reopened.seed_starter_set() == 0
    reopened.load()
    assert reopened.reference_sets()["red-panel"].good_images == 1
    assert reopened.reference_sets()["red-panel"].labelled_images == 1
    reopened.delete(ref.reference_id)
    assert "red-panel" not in reopened.reference_sets()  # no good image left for that type
    assert ReferenceStore(store_dir).get(ref.reference_id) is None


@pytest.mark.parametrize(
    ("equipment_type", "label", "field"),
    [("Red Panel", "good", "equipment_type"), ("red-panel", "x", "label"), ("generic", "good", "equipment_type")],
)
def test_register_rejects_bad_names(vision_engine, clean_photo, equipment_type, label, field):
    with pytest.raises(ImageRejected) as err:
        vision_engine.register(equipment_type, label, clean_photo)
    assert err.value.violation.field == field


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "empty"),
        (b"GIF89a" + b"\0" * 100, "not a JPEG, PNG or WebP"),
        (b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, "cannot read"),
    ],
)
def test_bad_images_are_rejected_with_the_field(vision_engine, data, fragment):
    with pytest.raises(ImageRejected) as err:
        vision_engine.analyze(data)
    assert err.value.violation.field == "image.data"
    assert fragment in err.value.violation.description


def test_size_and_pixel_limits(clean_photo):
    with pytest.raises(ImageRejected, match="bytes; the limit is 1000"):
        decode_image(clean_photo, ImageLimits(max_bytes=1000))
    # a decompression bomb is refused from its header, before its pixels are decoded
    bomb = io.BytesIO()
    Image.new("L", (6000, 6000)).save(bomb, "PNG")
    with pytest.raises(ImageRejected, match="6000x6000 pixels"):
        decode_image(bomb.getvalue(), ImageLimits(max_pixels=10_000_000))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_every_allowed_format_is_analysed(vision_engine, fmt):
    image = samples.make_defect("painted-panel", "coating-defect", 4242)
    assert "coating-defect" in _types(vision_engine.analyze(samples.to_bytes(image, fmt), "painted-panel"))


def test_replicas_sharing_a_reference_store_lose_no_write_and_see_each_other(tmp_path, crack_photo, clean_photo):
    """Two stores on one root stand for two vision processes (flock excludes across open files)."""
    from concurrent.futures import ThreadPoolExecutor

    from services.vision.references import ReferenceStore

    first, second = ReferenceStore(tmp_path), ReferenceStore(tmp_path)
    ref, created = first.add("pump-housing", "good", clean_photo, 64, 64)
    assert created and second.refresh() == {"pump-housing"} and second.get(ref.reference_id) == ref
    assert second.refresh() == set()  # nothing new
    # concurrent writers on both: every add lands in the one index
    labels = [f"crack-{n}" for n in range(12)]
    with ThreadPoolExecutor(6) as pool:
        list(
            pool.map(
                lambda n: (first if n % 2 else second).add("pump-housing", labels[n], crack_photo + bytes([n]), 64, 64),
                range(12),
            )
        )
    assert {r.label for r in ReferenceStore(tmp_path).all()} == {"good", *labels}
    assert first.refresh() | second.refresh() <= {"pump-housing"}
    assert len(first.all()) == len(second.all()) == 13
    # the same image twice, once on each replica: one reference
    again, created_again = second.add("pump-housing", "good", clean_photo, 64, 64)
    assert not created_again and again.reference_id == ref.reference_id
    first.delete(ref.reference_id)
    assert second.refresh() == {"pump-housing"} and second.get(ref.reference_id) is None


def test_replicas_starting_together_seed_a_fresh_store_once_and_never_see_half_of_it(tmp_path, clean_photo):
    """Three replicas starting on one empty store: one seeds it, in one index write; a replica reading the store
    meanwhile sees it empty or whole (a half-seeded set made it build models, then rebuild them all when it saw
    the rest: the competing builds right after a cold start of three replicas)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from services.vision.references import ReferenceStore

    images = [("pump-housing", f"good-{n}", clean_photo + bytes([n]), 64, 64) for n in range(40)]

    def slowly():  # the starter images are decoded while the lock is held: give the readers time to look
        for image in images:
            time.sleep(0.002)
            yield image

    seen: set[int] = set()
    done = threading.Event()

    def watch() -> None:
        reader = ReferenceStore(tmp_path)
        while not done.is_set():
            reader.refresh()
            seen.add(len(reader))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(3) as pool:
            added = list(pool.map(lambda _: ReferenceStore(tmp_path).seed(slowly()), range(3)))
    finally:
        done.set()
        watcher.join()
    assert sorted(added) == [0, 0, 40]
    assert seen <= {0, 40}, sorted(seen)
    assert len(ReferenceStore(tmp_path)) == 40
    assert ReferenceStore(tmp_path).seed(images) == 0  # a store with references is never seeded again


def test_a_burst_of_registrations_rebuilds_the_generic_model_once(tmp_path, feature_extractor):
    """A plant engineer registering a new type's references one call each waits for that type's model only; the
    generic model (every reference: seconds) is rebuilt once, after the burst, in the background."""
    from services.vision.core import EngineTuning

    engine = VisionEngine(feature_extractor, ReferenceStore(tmp_path), tuning=EngineTuning(generic_rebuild_delay_s=15))
    engine.seed_starter_set()
    engine.load()
    generic_before, built = engine.reference_sets()[GENERIC], engine.built
    for seed in range(3):
        image = samples.painted_panel(256, seed=90 + seed, colour=(160, 40, 40))
        engine.register("red-panel", "good", samples.to_bytes(image, "PNG"))
    assert engine.built == built + 3  # the type's own model, each time
    assert engine.reference_sets()["red-panel"].good_images == 3
    assert engine.reference_sets()[GENERIC] is generic_before  # meanwhile, types without references: as before
    assert engine.settle(timeout=120)
    assert engine.built == built + 4  # then the generic model, once
    assert engine.reference_sets()[GENERIC].good_images == generic_before.good_images + 3


def test_a_scheduled_generic_rebuild_is_cancelled_at_shutdown(tmp_path, feature_extractor, clean_photo):
    from services.vision.core import EngineTuning

    engine = VisionEngine(feature_extractor, ReferenceStore(tmp_path), tuning=EngineTuning(generic_rebuild_delay_s=60))
    engine.seed_starter_set()
    engine.load()
    generic, built = engine.reference_sets()[GENERIC], engine.built
    engine.register("pump-housing", "good", clean_photo)
    assert not engine.settle(timeout=0.1)  # scheduled
    engine.close()
    assert engine.settle(timeout=1) and engine.built == built + 1
    assert engine.reference_sets()[GENERIC] is generic  # not rebuilt: the next start does it
    restarted = VisionEngine(feature_extractor, ReferenceStore(tmp_path))
    restarted.load()
    assert restarted.reference_sets()[GENERIC].good_images == generic.good_images + 1


def test_a_generic_rebuild_that_outlasts_shutdown_still_settles(tmp_path, feature_extractor, clean_photo):
    from services.vision.core import EngineTuning

    engine = VisionEngine(feature_extractor, ReferenceStore(tmp_path), tuning=EngineTuning(generic_rebuild_delay_s=0))
    engine.seed_starter_set()
    engine.load()
    engine.register("pump-housing", "good", clean_photo)
    deadline = time.monotonic() + 10
    while not engine._lock.locked() and time.monotonic() < deadline:  # the rebuild is under way (seconds)
        time.sleep(0.005)
    assert engine._lock.locked()
    engine.close(timeout=0.01)
    assert not engine.settle(timeout=0)  # still running after close() gave up waiting ...
    assert engine.settle(timeout=120)  # ... and marked settled when it ends


def test_the_engine_rebuilds_the_types_another_replica_changed(tmp_path, feature_extractor, clean_photo):
    from services.vision.core import VisionEngine
    from services.vision.references import ReferenceStore

    mine = VisionEngine(feature_extractor, ReferenceStore(tmp_path))
    mine.seed_starter_set()
    mine.load()
    other = VisionEngine(feature_extractor, ReferenceStore(tmp_path))
    other.load()
    assert "pump-housing" not in mine.reference_sets()
    built, goods = mine.built, mine.reference_sets()[GENERIC].good_images
    other.register("pump-housing", "good", clean_photo)
    assert mine.sync() == {"pump-housing"}
    assert "pump-housing" in mine.reference_sets()
    assert mine.sync() == set()
    assert mine.built == built  # the other replica built it: read from the cache
    assert mine.settle(timeout=120) and other.settle(timeout=120)  # the generic model, once the change settled
    assert mine.reference_sets()[GENERIC].good_images == other.reference_sets()[GENERIC].good_images == goods + 1
    mine.close()
    other.close()


def test_replicas_loading_one_store_together_build_each_model_once(tmp_path, feature_extractor):
    """Replicas cold-starting on one store: the first to need a model builds it under its build lock, the other
    waits and reads it back (not every model built by every replica on the same cores)."""
    from concurrent.futures import ThreadPoolExecutor

    first = VisionEngine(feature_extractor, ReferenceStore(tmp_path))
    first.seed_starter_set()
    second = VisionEngine(feature_extractor, ReferenceStore(tmp_path))
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda engine: engine.load(), (first, second)))
    assert set(first.reference_sets()) == set(second.reference_sets())
    assert first.built + second.built == len(first.reference_sets())  # each model once


def _tinted(image: Image.Image, gains: tuple[float, float, float], disc: tuple[int, int, int] | None = None) -> bytes:
    """`image` with its channels scaled by `gains`, everywhere or (with `disc` = x, y, radius) inside a disc only."""
    import numpy as np

    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    scaled = np.clip(pixels * np.asarray(gains, dtype=np.float32), 0, 255)
    if disc is not None:
        ys, xs = np.mgrid[: pixels.shape[0], : pixels.shape[1]]
        inside = (xs - disc[0]) ** 2 + (ys - disc[1]) ** 2 <= disc[2] ** 2
        scaled = np.where(inside[:, :, None], scaled, pixels)
    return samples.to_bytes(Image.fromarray(scaled.astype(np.uint8)), "PNG")


def test_a_local_tint_is_a_defect_and_a_global_white_balance_is_not(vision_engine):
    """The chroma and luminance groups score a patch's colour relative to its own image: a bluish heat tint on
    part of the surface is found where it is; the same tint over the whole photo (another camera's white balance)
    is not a defect."""
    surface = samples.make_surface("brushed-steel", 4242)
    shifted = vision_engine.analyze(_tinted(surface, (0.9, 0.97, 1.06)), "brushed-steel")
    assert shifted.defects == (), shifted.description
    # a tint of a few per cent (what the texture features alone did not find), 80 px across
    tint = vision_engine.analyze(_tinted(surface, (0.96, 0.99, 1.04), disc=(150, 90, 40)), "brushed-steel")
    assert tint.defects, tint.description
    box = tint.defects[0].box
    w, h = surface.size
    assert box.x_min * w < 150 < box.x_max * w and box.y_min * h < 90 < box.y_max * h
    assert (box.x_max - box.x_min) * w < 140 and (box.y_max - box.y_min) * h < 140  # the disc, not the image


def test_a_seed_that_fails_part_way_leaves_the_store_empty(tmp_path, clean_photo):
    def images():
        yield "pump-housing", "good", clean_photo, 64, 64
        raise OSError("a starter image could not be read")

    store = ReferenceStore(tmp_path)
    with pytest.raises(OSError, match="could not be read"):
        store.seed(images())
    assert len(store) == 0 and len(ReferenceStore(tmp_path)) == 0
    assert store.seed([("pump-housing", "good", clean_photo, 64, 64)]) == 1  # and a later start seeds it


def test_a_model_build_runs_numpy_blas_on_one_thread(tmp_path, feature_extractor, monkeypatch):
    """The coreset's many small matrix products kept OpenBLAS's second thread spinning: twice the CPU for the same
    build time, taken from the replicas and services starting beside it. Requests keep every BLAS thread."""
    from threadpoolctl import threadpool_info

    from services.vision import patchcore

    def blas_threads() -> set[int]:
        return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}

    seen: list[set[int]] = []
    build = patchcore.MemoryBank.build
    monkeypatch.setattr(
        patchcore.MemoryBank, "build", staticmethod(lambda *a, **k: seen.append(blas_threads()) or build(*a, **k))
    )
    outside = blas_threads()
    engine = VisionEngine(feature_extractor, ReferenceStore(tmp_path / "refs"))
    good = samples.to_bytes(samples.painted_panel(256, seed=77, colour=(160, 40, 40)), "PNG")
    engine.register("red-panel", "good", good)
    engine.close()
    assert seen and all(threads == {1} for threads in seen), seen
    assert blas_threads() == outside  # restored once the build is done


def test_a_good_part_photographed_brighter_or_darker_than_its_references_is_still_good(vision_engine):
    """The texture features are not exposure-invariant: a query is matched to its type's references' exposure
    before the backbone sees it. Without that, good brushed-steel parts 15 % brighter got boxes (20 of 20 in the
    robustness suite)."""
    from PIL import ImageEnhance

    from services.vision.core import EngineTuning

    unmatched = VisionEngine(
        vision_engine.extractor, vision_engine.store, tuning=EngineTuning(exposure_gain=(1.0, 1.0))
    )
    unmatched.load()  # the same models, read from the cache
    model = vision_engine.reference_sets()["brushed-steel"]
    assert 0.3 < model.exposure < 0.9 and model.exposure == unmatched.reference_sets()["brushed-steel"].exposure
    flagged = {"matched": 0, "unmatched": 0}
    for seed in range(3):
        good = samples.make_surface("brushed-steel", 5000 + seed)
        for factor in (0.85, 1.15):
            photo = samples.to_bytes(ImageEnhance.Brightness(good).enhance(factor), "PNG")
            flagged["matched"] += bool(vision_engine.analyze(photo, "brushed-steel").defects)
            flagged["unmatched"] += bool(unmatched.analyze(photo, "brushed-steel").defects)
    assert flagged["matched"] == 0 and flagged["unmatched"] >= 3, flagged
    scratched = samples.make_defect("brushed-steel", "scratch", 5100)
    darker = samples.to_bytes(ImageEnhance.Brightness(scratched).enhance(0.85), "PNG")
    assert "scratch" in _types(vision_engine.analyze(darker, "brushed-steel"))  # and a defect is still one


def test_exposure_matching_scales_within_its_bounds_and_leaves_the_input_alone():
    from services.vision.backbone import exposed_as, exposure

    rng = np.random.default_rng(0)
    pixels = rng.uniform(0.2, 0.6, (64, 64, 3)).astype(np.float32)
    before = pixels.copy()
    assert exposure(pixels) == pytest.approx(0.4, abs=0.02)
    assert exposure(exposed_as(pixels, 0.5, (2 / 3, 1.5))) == pytest.approx(0.5, abs=1e-3)
    assert exposure(exposed_as(pixels, 0.9, (2 / 3, 1.5))) == pytest.approx(1.5 * exposure(pixels), abs=1e-3)
    assert exposed_as(pixels, 0.9, (1.0, 3.0)).max() <= 1.0  # clipped
    assert np.array_equal(pixels, before)


def test_a_type_with_too_few_references_to_calibrate_says_so(tmp_path, feature_extractor):
    """Its threshold comes from two folds of its good references: below two a fold, every answer says the
    threshold is a rough guess and how many to register; from then on it says nothing of the kind."""
    engine = VisionEngine(feature_extractor, ReferenceStore(tmp_path))
    panels = [samples.to_bytes(samples.painted_panel(256, seed=70 + i, colour=(40, 90, 160)), "PNG") for i in range(5)]
    for data in panels[:3]:
        engine.register("blue-panel", "good", data)
    guess = engine.analyze(panels[4], "blue-panel")
    said = guess.description
    assert "Calibrated on only 3 good reference image(s) of blue-panel" in said and "at least 4" in said
    assert guess.confidence < 0.5 and not guess.calibration.calibrated  # a guess goes to manual review
    assert guess.calibration.good_references == 3
    engine.register("blue-panel", "good", panels[3])
    answer = engine.analyze(panels[4], "blue-panel")
    assert "Calibrated on only" not in answer.description
    assert answer.calibration.calibrated and answer.calibration.good_references == 4
    assert answer.confidence >= 0.5 and not answer.defects  # an unseen good panel, now a calibrated answer


def test_the_threshold_sits_above_every_good_reference_held_out_and_is_stored_with_the_model(
    tmp_path, feature_extractor
):
    """Each good reference is scored against a bank built without it (two folds); the threshold is set above the
    largest of those scores, which the answer reports and the model cache keeps."""
    from services.vision.cache import ModelCache

    engine = VisionEngine(feature_extractor, ReferenceStore(tmp_path))
    for i in range(6):
        engine.register(
            "blue-panel", "good", samples.to_bytes(samples.painted_panel(256, 90 + i, (40, 90, 160)), "PNG")
        )
    model = engine.reference_sets()["blue-panel"]
    held_out = model.bank.reference_scores
    assert held_out.shape == (6,) and held_out.min() > 0 and held_out.max() < 1.0
    unseen = samples.to_bytes(samples.painted_panel(256, 99, (40, 90, 160)), "PNG")
    calibration = engine.analyze(unseen, "blue-panel").calibration
    assert calibration.largest_good_score == pytest.approx(float(held_out.max()), abs=1e-4)
    assert calibration.median_good_score == pytest.approx(float(np.median(held_out)), abs=1e-4)

    assert engine.settle(timeout=120)
    from services.vision.core import TypeModel

    cache = ModelCache(tmp_path, engine.cache.backbone, engine.cache.image_size)
    stored = sorted(cache.models_dir.glob("*.npz"))  # the type's model and the generic one, of the same six
    assert stored
    for path in stored:
        assert np.array_equal(TypeModel.from_state(cache.model(path.stem)).bank.reference_scores, held_out)


def test_a_large_jpeg_is_decoded_at_the_smallest_scale_that_covers_the_working_size():
    from services.vision.core import source_size

    photo = io.BytesIO()
    Image.new("RGB", (2048, 1536), (90, 90, 90)).save(photo, "JPEG", quality=90)
    decoded = decode_image(photo.getvalue(), ImageLimits(), working_size=256)
    assert decoded.size == (512, 384)  # 1/4: at 1/8 the short side (192) would be below 256
    assert source_size(decoded) == (2048, 1536)
    assert decode_image(photo.getvalue(), ImageLimits()).size == (1024, 768)  # by default: at least 768 px
    assert decode_image(photo.getvalue(), ImageLimits(), working_size=None).size == (2048, 1536)  # in full
    png = io.BytesIO()
    Image.new("RGB", (600, 400), (90, 90, 90)).save(png, "PNG")
    assert decode_image(png.getvalue(), ImageLimits(), working_size=256).size == (600, 400)  # no DCT scale in PNG
