"""Tests of scripts/collision_anatomy.py: the statistics that explain where collisions come from."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import collision_anatomy as ca  # noqa: E402


def test_loss_by_group_size_counts_lost_tuples_per_prefix_group() -> None:
    codes = np.array([
        [0, 0, 1], [0, 0, 1], [0, 0, 2],  # prefix (0,0): 3 items, 2 distinct tuples -> 1 lost
        [1, 5, 3], [1, 5, 4],  # prefix (1,5): 2 items, none lost
        [2, 2, 2],  # alone: not counted
    ])
    table = ca.loss_by_group_size(codes)
    assert table == {"2": {"groups": 1, "items": 2, "lost": 0}, "3": {"groups": 1, "items": 3, "lost": 1}}
    total_lost = sum(v["lost"] for v in table.values())
    assert total_lost == len(codes) - len(np.unique(codes, axis=0))


def test_within_group_residual_cosine_separates_shared_and_spread_directions() -> None:
    """Groups whose level-2 residuals share a direction score near 1; groups of random directions near 0."""
    rng = np.random.default_rng(0)
    n, d = 400, 64
    codes = np.stack([np.repeat(np.arange(20), 20), np.zeros(n, dtype=int)], axis=1)  # 20 groups of 20
    shared = torch.from_numpy(rng.normal(size=(20, d))).float()
    biased = shared[codes[:, 0]] + 0.1 * torch.randn(n, d)
    spread = torch.randn(n, d)
    level1 = torch.zeros(n, d)
    assert ca.within_group_residual_cosine([level1, biased], codes)[0] > 0.9
    assert abs(ca.within_group_residual_cosine([level1, spread], codes)[0]) < 0.05


def test_within_group_residual_cosine_matches_explicit_pairs() -> None:
    rng = np.random.default_rng(1)
    codes = np.array([[0, 0], [0, 1], [0, 2], [1, 0], [1, 1]])
    res = torch.from_numpy(rng.normal(size=(5, 3))).float()
    unit = torch.nn.functional.normalize(res, dim=-1)
    pairs = [(i, j) for i in range(5) for j in range(5) if i != j and codes[i, 0] == codes[j, 0]]
    expected = float(np.mean([float(unit[i] @ unit[j]) for i, j in pairs]))
    assert ca.within_group_residual_cosine([torch.zeros(5, 3), res], codes)[0] == pytest.approx(expected, abs=1e-6)


def test_nearest_neighbour_cosine_ignores_self_and_finds_duplicates() -> None:
    x = np.array([[1, 0], [0, 1], [1, 0.001], [-1, 0]], dtype=np.float32)
    nn = ca.nearest_neighbour_cosine(x, block=3)  # a block boundary inside the data
    assert nn[0] > 0.999 and nn[2] > 0.999
    assert nn[1] == pytest.approx(0.001, abs=1e-3)  # its best other row is nearly orthogonal


def test_level_residuals_follow_the_models_own_encoding() -> None:
    """Codes equal RQVAE.encode, each level's residual is the previous one minus its codeword."""
    from semid.config import SemidConfig
    from semid.rqvae import RQVAE

    config = SemidConfig.from_dict({"model": {"type": "rqkmeans"}, "quantizer": {"levels": 3, "codebook_size": 8}})
    model = RQVAE(6, config.model, config.quantizer).eval()
    x = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    codes, residuals = ca.level_residuals(model, x)
    assert np.array_equal(codes, model.encode(torch.from_numpy(x)).numpy())
    for level in range(1, 3):
        previous = model.quantizer.levels[level - 1]
        expected = residuals[level - 1] - previous.decode(torch.from_numpy(codes[:, level - 1])).detach()
        torch.testing.assert_close(residuals[level], expected)
