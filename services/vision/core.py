"""Vision agent core: image checks and the reference-based defect analyser. No gRPC here.

The analyser (`VisionEngine`) scores a photo against the good reference images of its equipment type with
PatchCore-style patch features (see `patchcore.py`), localises the anomalous regions as boxes and names
each region's defect type from labelled reference examples. Unknown equipment types are scored against the
generic set (all types' references) with lower confidence.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from threadpoolctl import threadpool_limits

from copilot.domain import AnomalyMap, BoundingBox, Defect, FieldViolation, ReferenceCalibration, VisionFindings
from copilot.images import ImageLimits, ImageRejected, open_checked, sniff_mime_type

__all__ = ["GENERIC", "MODEL_NAME", "ImageLimits", "ImageRejected", "NoReferenceImages", "VisionEngine", "decode_image"]
from services.vision.backbone import BACKBONE, exposed_as, exposure
from services.vision.cache import ModelCache
from services.vision.patchcore import as_numpy, quantiles
from services.vision.references import EQUIPMENT_TYPE, LABEL, Reference, ReferenceStore

log = logging.getLogger(__name__)

#: What findings name as their model: PatchCore over the backbone.
MODEL_NAME = f"patchcore/{BACKBONE}"

if TYPE_CHECKING:
    from services.vision.backbone import Extractor
    from services.vision.patchcore import DefectTyper, MemoryBank


#: the scale a photo is decoded at for a heatmap or a hosted model, and by default: JPEGs at the smallest DCT scale
#: with both sides at least this
DISPLAY_SIZE = 768

#: a heatmap's longer side at most (a larger photo's overlay is drawn smaller: PNG encoding is most of its cost)
HEATMAP_MAX_SIDE = 1024

#: where `decode_image` records the size an image was sent at, in the decoded image's `info` (PIL keeps it
#: through convert and copy): a JPEG decoded at a reduced scale is smaller than that
SOURCE_SIZE = "copilot.source_size"


def decode_image(
    data: bytes,
    limits: ImageLimits,
    field: str = "image.data",
    working_size: int | None = DISPLAY_SIZE,
    longer_side: int | None = None,
) -> Image.Image:
    """Decode an upload that passed the checks of `open_checked` into RGB. A JPEG is decoded at the smallest DCT
    scale (1/2, 1/4 or 1/8) that keeps both sides at least `working_size` (None: in full, which the memory budget
    of ImageLimits does not assume): the model sees a 256² input, so the engine decodes a 12-megapixel photo at
    about 500x375 instead of in full (libjpeg skips most of the work). With `longer_side`, the smallest scale that
    keeps the longer side at least that instead (what a picture to look at needs). The size it was sent at stays
    readable (`source_size`)."""
    image = open_checked(data, limits, field)
    mime = sniff_mime_type(data)
    source = image.size
    try:
        if longer_side is not None:
            scale = longer_side / max(source)
            image.draft("RGB", (math.ceil(source[0] * scale), math.ceil(source[1] * scale)))
        elif working_size is not None:
            image.draft("RGB", (working_size, working_size))
        decoded = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageRejected(FieldViolation(field, f"cannot decode {mime} image: {exc}")) from exc
    decoded.info[SOURCE_SIZE] = source
    return decoded


def source_size(image: Image.Image) -> tuple[int, int]:
    """The size `image` was sent at (before `decode_image` reduced a JPEG's scale); its own size otherwise."""
    size = image.info.get(SOURCE_SIZE)
    return (int(size[0]), int(size[1])) if size else image.size


GENERIC = "generic"


class NoReferenceImages(LookupError):
    """No good reference image is registered for any equipment type."""


@dataclass(frozen=True)
class EngineTuning:
    image_size: int = 256
    coreset_ratio: float = 0.1
    coreset_max: int = 20_000
    #: Answers against the generic set (an equipment type without references of its own) are guesses: their
    #: confidences are scaled into [0, ceiling], below the 0.5 that asks for manual review.
    generic_confidence_ceiling: float = 0.49
    #: A surface whose lower-quartile patch is this far towards the threshold is unlike the references as a whole
    #: (a defect, however large, leaves most of the surface as it was). Measured against the generic set:
    #: familiar kinds 0.51-0.58 (the shipped crack photo, a quarter of it defective, 0.65), unseen kinds 1.04-1.59.
    unfamiliar_quartile: float = 0.8
    unfamiliar_confidence: float = 0.2
    max_defects: int = 5
    #: Good references a type needs before its threshold is calibrated rather than guessed: the threshold comes from
    #: two folds of its references (each half scored against a bank of the other), so fewer than two per fold leave
    #: no spread to calibrate on. A type below it says so in every answer.
    min_calibration_references: int = 4
    #: A query is matched to its type's exposure (the median of its good references' `backbone.exposure`) by a gain
    #: within these bounds before the backbone sees it: a good brushed-steel part photographed 15 % brighter than its
    #: references had boxes on 20 of 20 parts, 0 matched. The generic set (mixed kinds) is not matched.
    exposure_gain: tuple[float, float] = (2 / 3, 1.5)
    #: After a RegisterReference or DeleteReference, the generic model (every type's references: the costly one,
    #: seconds with the starter set) is rebuilt once no further change came for this long, in the background; the
    #: call returns once its own type's model is rebuilt. Until then types without references use the previous one.
    generic_rebuild_delay_s: float = 2.0


@dataclass(frozen=True)
class TypeModel:
    """Everything needed to score one equipment type: its memory bank and its defect typer."""

    bank: MemoryBank
    typer: DefectTyper
    good_images: int
    labelled_images: int
    exposure: float  # the median of its good references' exposures (`backbone.exposure`): what queries are matched to

    def state(self) -> dict[str, Any]:
        """Arrays, numbers and strings only (what the cache stores and reads back without pickle)."""
        return {
            "bank": self.bank.state(),
            "labels": list(self.typer.labels),
            "prototypes": self.typer.prototypes,
            "k": self.typer.k,
            "good_images": self.good_images,
            "labelled_images": self.labelled_images,
            "exposure": self.exposure,
        }

    @functools.cached_property
    def good_scores(self) -> tuple[float, float]:
        """The largest and the median score of a good reference held out of the bank (multiples of the threshold)."""
        largest, median = float(self.bank.reference_scores.max()), float(np.median(self.bank.reference_scores))
        return round(largest, 4), round(median, 4)

    def on(self, device: str) -> TypeModel:
        """This model with its memory bank on `device` (itself when it is there already)."""
        bank = self.bank.to(device)
        return self if bank is self.bank else replace(self, bank=bank)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> TypeModel:
        from services.vision.patchcore import DefectTyper, MemoryBank

        bank = MemoryBank.from_state(list(state["bank"]), int(state["good_images"]))
        typer = DefectTyper(list(state["labels"]), state["prototypes"], int(state["k"]))
        return cls(bank, typer, int(state["good_images"]), int(state["labelled_images"]), float(state["exposure"]))


@dataclass(frozen=True)
class Measurement:
    """What the model path measured for one image: its patch features and anomaly scores (on the CPU) and the
    reference set they were scored against."""

    feature_map: np.ndarray  # [C, H, W]
    scores: np.ndarray | None  # [H, W], multiples of the threshold; None when there was no model to score against
    reference_set: str
    model: TypeModel | None


class VisionEngine:
    """Reference-based defect analysis. `load()` builds a model per equipment type from the reference store;
    `register`/`delete` rebuild the affected types. Models are swapped atomically, so concurrent analyses
    always see a consistent set."""

    model = MODEL_NAME

    def __init__(
        self,
        extractor: Extractor,
        store: ReferenceStore,
        limits: ImageLimits | None = None,
        tuning: EngineTuning | None = None,
        bank_device: str | None = None,
    ) -> None:
        """`bank_device`: where the memory banks are held and scored, "cpu" or a torch device such as "cuda:0"
        (None: where the backbone leaves its features, so on a GPU the nearest-neighbour search runs there too,
        batched with the forward pass)."""
        self.extractor = extractor
        if bank_device and bank_device != "cpu":
            from services.vision.backbone import resolve_device

            bank_device = str(resolve_device(bank_device))
        self.bank_device = bank_device or extractor.device
        self.store = store
        self.limits = limits or ImageLimits()
        self.tuning = tuning or EngineTuning()
        # reference id -> feature map and exposure, held only while models are being built (the cache keeps them)
        self._features: dict[str, tuple[np.ndarray, float]] = {}
        self._models: dict[str, TypeModel] = {}
        self._generic_key = ""  # the cache key of the generic model in self._models
        self._lock = threading.Lock()
        self._timer_lock = threading.Lock()
        self._generic_timer: threading.Timer | None = None
        self._generic_settled = threading.Event()  # cleared while a generic rebuild is scheduled or running
        self._generic_settled.set()
        self.cache = ModelCache(store.root, BACKBONE, extractor.image_size)
        self.built = 0  # models built (not read from the cache) since this engine started

    # --- references -----------------------------------------------------------------------------

    def seed_starter_set(self) -> int:
        """Load the shipped starter images into an empty store (one index write, only when the store is empty on
        disk; the images are read only then: see ReferenceStore.seed)."""
        from services.vision.starter import starter_dir

        def images() -> Iterator[tuple[str, str, bytes, int, int]]:
            for folder in sorted(p for p in starter_dir().iterdir() if p.is_dir()):
                for file in sorted(folder.glob("*.jpg")):
                    data = file.read_bytes()
                    image = self.decode(data)
                    yield folder.name, file.stem.rsplit("-", 1)[0], data, *source_size(image)

        return self.store.seed(images())

    def _feature_maps(self, refs: list[Reference]) -> None:
        """Feature maps of `refs` into self._features: from the cache, else computed (and cached)."""
        missing = []
        for ref in refs:
            if ref.reference_id in self._features:
                continue
            cached = self.cache.feature(ref.sha256)
            if cached is not None:
                self._features[ref.reference_id] = cached
            else:
                missing.append(ref)
        for start in range(0, len(missing), 16):
            batch = missing[start : start + 16]
            pixels = [self.extractor.pixels(self.decode(self.store.read(r))) for r in batch]
            maps = self.extractor.patch_features(pixels)
            for ref, fmap, ref_pixels in zip(batch, maps, pixels, strict=True):
                self._features[ref.reference_id] = fmap, exposure(ref_pixels)
                self.cache.put_feature(ref.sha256, *self._features[ref.reference_id])

    def _model_key(self, refs: list[Reference]) -> str:
        return self.cache.model_key(
            ((r.sha256, r.label) for r in refs), self.tuning.coreset_ratio, self.tuning.coreset_max
        )

    def _model(self, refs: list[Reference], key: str) -> TypeModel | None:
        """The model of these references (cache key `key`): read from the cache, else built from their
        features (and cached), by one process at a time (another replica building it meanwhile: read)."""
        if not any(r.good for r in refs):
            return None
        cached = self._cached(key)
        if cached is not None:
            return cached
        with self.cache.building(key):
            cached = self._cached(key)  # built by another replica while this one waited
            if cached is not None:
                return cached
            # numpy's BLAS on one thread: the coreset's and the calibration's many small matrix products kept
            # OpenBLAS's second thread spinning (the starter set: 18.5 s of CPU for 9.4 s, against 9.9 s of CPU on
            # one thread, as fast), CPU that the other replicas and services starting on the node need. The limit is
            # process-wide: requests served during a rebuild search with one thread too.
            with threadpool_limits(1, user_api="blas"):
                self._feature_maps(refs)
                built = self._build(refs)
            if built is not None:
                self.built += 1
                self.cache.put_model(key, built.state())
            return built

    def _cached(self, key: str) -> TypeModel | None:
        state = self.cache.model(key)
        if state is None:
            return None
        try:
            return TypeModel.from_state(state)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("ignoring a cached vision model of another shape (%s): rebuilding it", exc)
            return None

    def _build(self, refs: list[Reference]) -> TypeModel | None:
        from services.vision.patchcore import DefectTyper, MemoryBank, region_prototype

        goods = [self._features[r.reference_id][0] for r in refs if r.good]
        if not goods:
            return None
        exposures = [self._features[r.reference_id][1] for r in refs if r.good]
        bank = MemoryBank.build(goods, self.tuning.coreset_ratio, self.tuning.coreset_max)
        typer = DefectTyper()
        labelled = [r for r in refs if not r.good]
        for ref in labelled:
            fmap = self._features[ref.reference_id][0]
            typer.add(ref.label, region_prototype(fmap, bank.patch_scores(fmap), bank.threshold))
        return TypeModel(bank, typer, len(goods), len(labelled), float(np.median(exposures)))

    def load(self, equipment_types: set[str] | None = None, generic: bool = True) -> dict[str, TypeModel]:
        """(Re)build the models of the given equipment types (all when None) and, unless `generic` is False, the
        generic model (when False, the one in memory is kept as it is)."""
        with self._lock:
            refs = self.store.all()
            by_type: dict[str, list[Reference]] = {}
            for ref in refs:
                by_type.setdefault(ref.equipment_type, []).append(ref)
            models = dict(self._models)
            for name in list(models):
                if name not in by_type and name != GENERIC:
                    del models[name]
            keys = {name: self._model_key(type_refs) for name, type_refs in by_type.items()}
            keys[GENERIC] = self._model_key(refs)
            for name, type_refs in by_type.items():
                if equipment_types is None or name in equipment_types or name not in models:
                    built = self._model(type_refs, keys[name])
                    if built is None:
                        models.pop(name, None)
                    else:
                        models[name] = built
            if generic or GENERIC not in models:
                built = self._model(refs, keys[GENERIC]) if refs else None
                if built is None:
                    models.pop(GENERIC, None)
                else:
                    models[GENERIC] = built
                self._generic_key = keys[GENERIC]
            self._models = {name: model.on(self.bank_device) for name, model in models.items()}  # atomic swap
            self._features.clear()  # the cache has them; a rebuild reads them back
            self.cache.prune(set(keys.values()) | {self._generic_key}, {r.sha256 for r in refs})
            return self._models

    def _generic_later(self) -> None:
        """Rebuild the generic model once no reference changed for `generic_rebuild_delay_s` (a burst of
        registrations costs one rebuild, not one each)."""
        with self._timer_lock:
            if self._generic_timer is not None:
                self._generic_timer.cancel()
            self._generic_settled.clear()
            self._generic_timer = threading.Timer(self.tuning.generic_rebuild_delay_s, self._rebuild_generic)
            self._generic_timer.daemon = True
            self._generic_timer.start()

    def _rebuild_generic(self) -> None:
        try:
            self.load(set())
        except Exception:  # the previous generic model keeps serving; the next change or start tries again
            log.exception("rebuilding the generic vision model failed")
        finally:
            with self._timer_lock:
                # settled unless a later change scheduled another rebuild (None: close() took this one)
                if self._generic_timer in (None, threading.current_thread()):
                    self._generic_timer = None
                    self._generic_settled.set()

    def close(self, timeout: float = 5.0) -> None:
        """At shutdown: cancel a scheduled generic rebuild (the next start builds that model) and wait up to
        `timeout` for one that is running (one that ends later still marks the engine settled)."""
        with self._timer_lock:
            timer, self._generic_timer = self._generic_timer, None
            if timer is not None:
                timer.cancel()
        if timer is not None:
            timer.join(timeout)
            if not timer.is_alive():
                self._generic_settled.set()

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until no generic rebuild is scheduled or running; False when `timeout` passed first."""
        return self._generic_settled.wait(timeout)

    def register(self, equipment_type: str, label: str, data: bytes) -> tuple[Reference, bool]:
        for field_name, value, pattern in (("equipment_type", equipment_type, EQUIPMENT_TYPE), ("label", label, LABEL)):
            if not pattern.fullmatch(value) or value == GENERIC:
                raise ImageRejected(
                    FieldViolation(field_name, f"must be kebab-case, 2-40 characters, not '{GENERIC}' (got {value!r})")
                )
        image = self.decode(data)
        ref, created = self.store.add(equipment_type, label, data, *source_size(image))
        if created:
            self._changed(equipment_type)
        return ref, created

    def delete(self, reference_id: str) -> Reference | None:
        ref = self.store.delete(reference_id)
        if ref is not None:
            self._changed(ref.equipment_type)
        return ref

    def _changed(self, equipment_type: str) -> None:
        """A reference of `equipment_type` was added or deleted here: its model now, the generic one later."""
        self.load({equipment_type}, generic=False)
        self._generic_later()

    def sync(self) -> set[str]:
        """Rebuild the models of the equipment types whose references another process (a replica sharing the
        store) changed, and the generic model once such changes settle; returns those types. The models are
        usually read back from the cache: the replica that made the change built them, and one that is still
        building a model holds its build lock (ModelCache.building), so the others wait for it and read it."""
        changed = self.store.refresh()
        if changed:  # as for a change made here: those types now, the generic model once the changes settle
            self.load(changed, generic=False)
            self._generic_later()
        return changed

    def reference_sets(self) -> dict[str, TypeModel]:
        return dict(self._models)

    # --- analysis -------------------------------------------------------------------------------

    def decode(self, data: bytes) -> Image.Image:
        """An upload decoded for the model: a JPEG at the smallest scale that still covers its input size."""
        return decode_image(data, self.limits, working_size=self.tuning.image_size)

    def prepare(self, data: bytes, display: bool = False) -> tuple[Image.Image, np.ndarray]:
        """Decode an upload and prepare the backbone's input (FeatureExtractor.pixels): the per-request CPU work
        before the model path, run in the request's thread. The image returned is what the findings are sized by
        and a heatmap is drawn over: the working decode, or with `display` (a heatmap asked for) a second decode
        with its longer side at least DISPLAY_SIZE where the working one was reduced, so that only a caller who
        wants the overlay pays for a larger decode and the model's input is the same either way."""
        working = self.decode(data)
        pixels = self.extractor.pixels(working)
        if display and working.size != source_size(working):  # a PNG or small JPEG already is the whole photo
            return decode_image(data, self.limits, longer_side=DISPLAY_SIZE), pixels
        return working, pixels

    def measure(self, items: Sequence[tuple[Image.Image | np.ndarray, str]]) -> list[Measurement]:
        """The model path for a batch of (image or its prepared pixels, equipment type): one forward pass, then one
        nearest-neighbour search per reference set for the images scored against it, where the banks are (what
        the dynamic batcher calls). Regions, typing and the response are left to `score`, which runs per image."""
        models = self._models
        chosen = [equipment_type if equipment_type in models else GENERIC for _, equipment_type in items]
        maps = self.extractor.features(
            [
                self._exposed(image, None if name == GENERIC else models.get(name))
                for (image, _), name in zip(items, chosen, strict=True)
            ]
        )
        scores: list[np.ndarray | None] = [None] * len(items)
        for name in set(chosen):
            model = models.get(name)
            if model is None:
                continue
            rows = [i for i, c in enumerate(chosen) if c == name]
            for i, row_scores in zip(rows, model.bank.batch_scores(maps[rows]), strict=True):
                scores[i] = row_scores
        on_cpu = as_numpy(maps)
        return [Measurement(on_cpu[i], scores[i], name, models.get(name)) for i, name in enumerate(chosen)]

    def _exposed(self, image: Image.Image | np.ndarray, model: TypeModel | None) -> np.ndarray:
        """The backbone's input for `image`, matched to the exposure of `model`'s references (None: as it is; the
        generic set's references are of many kinds)."""
        pixels = image if isinstance(image, np.ndarray) else self.extractor.pixels(image)
        if model is None:
            return pixels
        return exposed_as(pixels, model.exposure, self.tuning.exposure_gain)

    def score(
        self, image: Image.Image, measured: Measurement, equipment_type: str = "", include_heatmap: bool = False
    ) -> VisionFindings:
        """The findings for one measured image: regions, defect types, confidences, the response."""
        from services.vision.patchcore import heatmap_png

        model, scores, reference_set = measured.model, measured.scores, measured.reference_set
        if model is None or scores is None:
            raise NoReferenceImages("no reference images are registered")
        feature_map = measured.feature_map
        generic = reference_set == GENERIC
        bank = model.bank
        peak = float(scores.max())
        anomaly = _sigmoid((peak - bank.threshold) / (0.1 * bank.threshold))
        (typical,) = quantiles(scores, (0.25,))
        typical /= bank.threshold
        calibrated = model.good_images >= self.tuning.min_calibration_references
        # a guess is never a confident answer: the generic set, or a threshold too few references calibrated
        ceiling = self.tuning.generic_confidence_ceiling if generic or not calibrated else 1.0
        against = _against(equipment_type, reference_set)
        defects = []
        if typical >= self.tuning.unfamiliar_quartile:
            # the whole surface is off the references: boxes would only outline the texture
            confidence = self.tuning.unfamiliar_confidence
            description = (
                f"Cannot judge defects: the surface as a whole is unlike {against} (three quarters of it above "
                f"{typical:.2f}x the threshold). Register good reference images of this equipment type "
                "(RegisterReference) for a real answer."
            )
        else:
            if peak > bank.threshold:
                defects = self._defects(model, feature_map, scores, ceiling)
            if defects:
                confidence = sum(d.confidence for d in defects) / len(defects)
                names = ", ".join(f"{d.label} ({d.confidence:.0%})" for d in defects)
                description = f"{len(defects)} defect(s) against {against}: {names}."
            else:
                confidence = ceiling * (1.0 - anomaly)
                description = f"No defect: the surface matches {against}."
        if not generic and not calibrated:
            description += (
                f" Calibrated on only {model.good_images} good reference image(s) of {reference_set}: its threshold "
                f"is a rough guess, and this answer's confidence stays below 0.5, until at least "
                f"{self.tuning.min_calibration_references} are registered (RegisterReference)."
            )
        width, height = source_size(image)
        return VisionFindings(
            defects=tuple(defects),
            confidence=round(confidence, 4),
            anomaly_score=round(anomaly, 4),
            description=description,
            model=self.model,
            width=width,
            height=height,
            heatmap_png=heatmap_png(image, scores, bank.threshold, HEATMAP_MAX_SIDE) if include_heatmap else b"",
            reference_set=reference_set,
            generic=generic,
            anomaly_map=anomaly_map(scores, bank.threshold),
            calibration=ReferenceCalibration(model.good_images, calibrated, *model.good_scores),
        )

    def _defects(self, model: TypeModel, feature_map: np.ndarray, scores: np.ndarray, ceiling: float) -> list[Defect]:
        from services.vision.patchcore import regions

        threshold = model.bank.threshold
        defects = []
        for region in regions(feature_map, scores, threshold)[: self.tuning.max_defects]:
            label, type_confidence = model.typer.classify(region.feature)
            strength = _sigmoid((region.score - threshold) / (0.1 * threshold))
            box = BoundingBox(*(round(v, 4) for v in region.box))
            defects.append(
                Defect(
                    type=label,
                    confidence=round(ceiling * (0.5 * strength + 0.5 * type_confidence), 4),
                    description=(
                        f"{label.replace('-', ' ').capitalize()} at x {box.x_min:.2f}-{box.x_max:.2f}, "
                        f"y {box.y_min:.2f}-{box.y_max:.2f} ({region.area:.1%} of the image, "
                        f"anomaly {region.score / threshold:.2f}x threshold)."
                    ),
                    box=box,
                )
            )
        return defects

    def analyze(self, data: bytes, equipment_type: str = "", include_heatmap: bool = False) -> VisionFindings:
        """Decode, extract and score one image without batching (unit tests, in-process use)."""
        image, pixels = self.prepare(data, display=include_heatmap)
        return self.score(image, self.measure([(pixels, equipment_type)])[0], equipment_type, include_heatmap)


def _against(equipment_type: str, reference_set: str) -> str:
    """What the answer was scored against, in words."""
    if reference_set != GENERIC:
        return f"the {reference_set} good references"
    if equipment_type:
        return (
            f"the generic references (equipment type '{equipment_type}' has no reference images of its own, "
            "so this is a guess)"
        )
    return "the generic references (no equipment type given, so this is a guess)"


def anomaly_map(scores: np.ndarray, threshold: float) -> AnomalyMap:
    """The patch scores as multiples of the threshold (what the response carries)."""
    h, w = scores.shape
    return AnomalyMap(w, h, tuple(np.round(np.asarray(scores, dtype=np.float64).ravel() / threshold, 4).tolist()))


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))
