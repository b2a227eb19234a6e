"""Derived data kept on disk beside the reference store, so that a restarted or added vision replica serves
in seconds instead of recomputing every reference image and memory bank.

    <root>/cache/features/<backbone>-<size>-v<FEATURE_FORMAT>/<sha256>.npz  one reference image's features, exposure
    <root>/cache/models/<key>.npz                         a built equipment-type model (memory bank + typer)

A model's key is the SHA-256 of everything it is built from: the cache format, the backbone, the image size,
the coreset settings and each reference's content hash and label. A reference set that changes gets a new
key; an unchanged one is read back as it was built. Everything here can be rebuilt from the images: a file
that is missing, unreadable or of another format is logged, ignored and written again, never trusted over
the images. Writes go to a temporary file renamed into place, so replicas sharing the root never read half a
file; a cache that cannot be written (a read-only volume) only costs the rebuild next time. Files are numpy
archives read without pickle: the arrays, and the rest of a model's state as JSON beside them.

Bump FORMAT when what a model is built from or holds changes in code (the keys then change and old files are
unused; `prune` removes model files no current key names), and FEATURE_FORMAT as well when a reference image's
features change."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import uuid
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# 2: regions by hysteresis (labelled prototypes changed); 3: three feature blocks + colour, a bank per group;
# 4: numpy archives instead of torch files, the coreset drawn by numpy; 5: each reference's exposure beside its
# features, a model's exposure (what queries are matched to); 6: JPEGs decoded at the working size (DCT scaling), so
# reference features change too: the feature folder carries FORMAT since then; 7: each feature group's calibration
# scores (every good reference's when held out) with the model (the features are as in 6: FEATURE_FORMAT)
FORMAT = 7
FEATURE_FORMAT = 6
SUFFIX = ".npz"


class ModelCache:
    """Backbone features and fitted models on disk, keyed by backbone, image size and content."""

    def __init__(self, root: Path, backbone: str, image_size: int) -> None:
        self.features_dir = root / "cache" / "features" / f"{backbone}-{image_size}-v{FEATURE_FORMAT}"
        self.models_dir = root / "cache" / "models"
        self.backbone = backbone
        self.image_size = image_size

    # --- keys -----------------------------------------------------------------------------------

    def model_key(self, references: Iterable[tuple[str, str]], coreset_ratio: float, coreset_max: int) -> str:
        """`references`: (sha256, label) of every reference image the model is built from."""
        digest = hashlib.sha256(f"{FORMAT}|{self.backbone}|{self.image_size}|{coreset_ratio}|{coreset_max}".encode())
        for sha, label in sorted(references):
            digest.update(f"|{sha}:{label}".encode())
        return digest.hexdigest()

    # --- reads ----------------------------------------------------------------------------------

    def feature(self, sha256: str) -> tuple[np.ndarray, float] | None:
        """The patch feature map of one reference image and its exposure (`backbone.exposure`), or None."""
        state = self._read(self.features_dir / f"{sha256}{SUFFIX}", FEATURE_FORMAT)
        if state is None:
            return None
        feature, exposure = state.get("feature"), state.get("exposure")
        if not isinstance(feature, np.ndarray) or not isinstance(exposure, int | float):
            return None
        return feature, float(exposure)

    def model(self, key: str) -> dict[str, Any] | None:
        """The state `put_model` wrote under `key`, or None."""
        return self._read(self.models_dir / f"{key}{SUFFIX}", FORMAT)

    def _read(self, path: Path, fmt: int) -> dict[str, Any] | None:
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
            state = _unpack(json.loads(str(arrays.pop("state"))), arrays)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            # a damaged or foreign file: rebuilt from the images
            log.warning("ignoring unreadable vision cache file %s: %s", path, exc)
            return None
        if not isinstance(state, dict) or state.get("format") != fmt:
            return None
        return state

    # --- writes ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def building(self, key: str) -> Iterator[None]:
        """Held while the model of `key` is built: replicas sharing the root that need the same model wait for the
        one building it and read what it wrote (three replicas cold-starting on one store, or picking up one
        registration, build each model once instead of three times on the same cores). An exclusive `flock` on
        <models>/.<key>.lock, released by the kernel if the builder dies; where the lock file cannot be made or
        locked (a read-only cache, a filesystem without locks) the model is built without it."""
        try:
            self.models_dir.mkdir(parents=True, exist_ok=True)
            handle = open(self.models_dir / f".{key}.lock", "a+")  # noqa: SIM115 - closed below
        except OSError:
            yield
            return
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX)
            except OSError as exc:  # a filesystem without locks (ENOLCK): replicas may build the model twice
                log.warning("vision model built without its build lock (%s)", exc)
                yield
                return
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def put_feature(self, sha256: str, feature: np.ndarray, exposure: float) -> None:
        self._write(self.features_dir / f"{sha256}{SUFFIX}", {"feature": feature, "exposure": exposure}, FEATURE_FORMAT)

    def put_model(self, key: str, state: dict[str, Any]) -> None:
        self._write(self.models_dir / f"{key}{SUFFIX}", state, FORMAT)

    def _write(self, path: Path, state: dict[str, Any], fmt: int) -> None:
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        arrays: dict[str, np.ndarray] = {}
        try:
            rest = json.dumps(_pack({**state, "format": fmt}, arrays))
            path.parent.mkdir(parents=True, exist_ok=True)
            contents: dict[str, Any] = {"state": np.array(rest), **arrays}
            with open(temporary, "wb") as handle:
                np.savez(handle, **contents)
            os.replace(temporary, path)
        except OSError as exc:  # a full disk, a read-only volume
            log.warning("vision cache not written (%s): the next start rebuilds this", exc)
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)

    def prune(self, keep_keys: set[str], keep_features: set[str]) -> int:
        """Remove model files no current key names and features of images no longer referenced. Files of earlier
        formats (`.pt`, FORMAT <= 3) are left alone: replicas of the previous release may share the store during a
        rolling upgrade (delete them once none runs)."""
        removed = 0
        for directory, keep in ((self.models_dir, keep_keys), (self.features_dir, keep_features)):
            if not directory.is_dir():
                continue
            for path in directory.glob(f"*{SUFFIX}"):
                if path.stem not in keep:
                    path.unlink(missing_ok=True)
                    removed += 1
        if self.models_dir.is_dir():
            for path in self.models_dir.glob(".*.lock"):
                if path.name[1 : -len(".lock")] not in keep_keys:
                    path.unlink(missing_ok=True)
        return removed


def _pack(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    """`value` as JSON, each array in it replaced by {"array": name} and kept in `arrays` under that name."""
    if isinstance(value, np.ndarray):
        name = f"a{len(arrays)}"
        arrays[name] = value
        return {"array": name}
    if isinstance(value, dict):
        return {str(k): _pack(v, arrays) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_pack(v, arrays) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _unpack(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"array"}:
            return arrays[value["array"]]
        return {k: _unpack(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_unpack(v, arrays) for v in value]
    return value
