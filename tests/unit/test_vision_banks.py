"""Memory banks: numpy on a CPU; torch tensors where a GPU holds them. The tensor path's code runs here on CPU
tensors (what a GPU runs, on another device) and must score as the numpy path does."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from services.vision.patchcore import FEATURE_GROUPS, MemoryBank, coreset, nearest


def _maps(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, 236, 8, 8)).astype(np.float32)


def test_nearest_is_the_brute_force_distance():
    rng = np.random.default_rng(1)
    patches, bank = rng.normal(size=(50, 7)).astype(np.float32), rng.normal(size=(30, 7)).astype(np.float32)
    brute = np.sqrt(((patches[:, None, :] - bank[None, :, :]) ** 2).sum(-1)).min(axis=1)
    assert np.allclose(nearest(patches, bank), brute, atol=1e-4)


def test_the_coreset_is_a_subset_of_the_size_asked_and_covers_outliers():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(400, 16)).astype(np.float32)
    features[123] += 50  # far from everything: greedy k-centre must keep it
    kept = coreset(features, ratio=0.1, max_size=1000)
    assert kept.shape == (40, 16)
    assert any(np.array_equal(row, features[123]) for row in kept)
    assert np.array_equal(coreset(features, 0.1, 1000), kept)  # seeded: the same references, the same bank


def test_banks_held_as_tensors_score_as_numpy_banks_do():
    torch = pytest.importorskip("torch")
    bank = MemoryBank.build(list(_maps(4, 3)), ratio=0.5)
    assert [g.channels for g in bank.groups] == [g.channels for g in FEATURE_GROUPS.values()]
    on_tensors = replace(bank, groups=tuple(replace(g, patches=torch.from_numpy(g.patches)) for g in bank.groups))
    maps = _maps(3, 4)
    expected = bank.batch_scores(maps)
    assert expected.shape == (3, 8, 8) and isinstance(expected, np.ndarray)
    for scored in (
        on_tensors.batch_scores(torch.from_numpy(maps)),  # features and banks on the device
        on_tensors.batch_scores(maps),  # numpy features against banks on the device
        bank.batch_scores(torch.from_numpy(maps)),  # device features against CPU banks (--banks cpu)
    ):
        assert isinstance(scored, np.ndarray) and np.allclose(scored, expected, atol=1e-4)
    # the cache stores numpy either way, and a bank comes back to the CPU as numpy
    assert all(isinstance(g["patches"], np.ndarray) for g in on_tensors.state())
    back = on_tensors.to("cpu")
    assert all(isinstance(g.patches, np.ndarray) for g in back.groups) and bank.to("cpu") is bank
