"""Vision on surface families it was never tuned on (issue #34): the protocol's own rules (the recorded split, the
sources, references apart from the parts judged) and the held-out half's gate."""

from __future__ import annotations

import hashlib

import pytest

from services.vision import families as fam
from services.vision.core import VisionEngine
from services.vision.references import ReferenceStore


def test_the_recorded_split_is_the_one_its_seed_makes_with_the_families_seen_before_in_tuning():
    recorded = fam.load_split()
    assert {half: list(names) for half, names in recorded.items()} == fam.make_split(seed=34)
    assert set(fam.SEEN_BEFORE) <= set(recorded["tuning"])
    assert not set(recorded["tuning"]) & set(recorded["held_out"])
    assert set(recorded["tuning"]) | set(recorded["held_out"]) == set(fam.FAMILIES)


def test_eight_families_or_more_from_three_sources_or_more_none_of_them_the_projects_generator():
    sources = {f.source for f in fam.FAMILIES.values()}
    assert len(fam.FAMILIES) >= 8 and len(sources) >= 3
    assert all("generator" not in f.source and "samples" not in f.source for f in fam.FAMILIES.values())
    held_out_sources = {fam.FAMILIES[name].source for name in fam.load_split()["held_out"]}
    assert len(held_out_sources) >= 2


@pytest.mark.models  # renders each family's textures (seconds): in `make test`, not in the fast loop
@pytest.mark.parametrize("family", sorted(fam.FAMILIES))
def test_references_and_judged_parts_are_different_images(family):
    refs = {hashlib.sha256(data).hexdigest() for data in fam.references(family, 2)}
    parts = {hashlib.sha256(fam.samples.to_bytes(fam.part(family, 1_000 + i), "PNG")).hexdigest() for i in range(2)}
    assert len(refs) == 2 and len(parts) == 2 and not refs & parts


def test_the_interval_says_what_a_handful_of_images_can_tell():
    low, high = fam.wilson(38, 40)
    assert low < 0.95 < high  # 38 of 40 cannot tell 0.95 from 0.90
    assert fam.wilson(0, 120)[1] <= 0.031 and fam.wilson(120, 120)[0] >= 0.969


@pytest.fixture(scope="module")
def held_out(tmp_path_factory, feature_extractor) -> dict:
    engine = VisionEngine(feature_extractor, ReferenceStore(tmp_path_factory.mktemp("vision-families")))
    engine.seed_starter_set()
    engine.load()
    return fam.family_suite(engine, halves=("held_out",))["halves"]["held_out"]


def test_the_held_out_families(held_out):
    """The held-out half (six families, 240 defective parts, 120 good ones) against the issue's targets. Measured
    (benchmarks/recorded/vision-families-2core.json): image AUROC 0.991 at the lowest family, 228 of 240 defective
    parts detected (0.950), 221 boxed at IoU >= 0.3 (0.921), 1.06 boxes per defect, 0 of 120 good parts flagged.
    The gate leaves two images of slack on the rates and 0.005 on the AUROC (threads may order float sums
    differently); a change that costs more fails here."""
    assert held_out["image_auroc_min"] >= 0.985, held_out
    assert held_out["detected"] >= 0.94, held_out
    assert held_out["box_hits"] >= 0.90, held_out
    assert held_out["boxes_per_defect"] <= 1.3, held_out
    assert held_out["flagged"] <= 0.05, held_out
