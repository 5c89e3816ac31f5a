"""Tests for semid.kmeans: seeding (k-means|| and k-means++), Lloyd iterations, empty clusters, sampling,
Sinkhorn assignment."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from semid.distance import Distance
from semid.kmeans import _greedy_seeds, _lloyd, _Points, kmeans, kmeans_plusplus, sinkhorn_assign

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _blobs(n_blobs: int, per_blob: int, dim: int, seed: int, spread: float = 0.05):
    """Well-separated Gaussian blobs: (points (n, dim), labels (n,), centres (n_blobs, dim))."""
    g = _gen(seed)
    centres = 10.0 * torch.randn(n_blobs, dim, generator=g)
    labels = torch.arange(n_blobs).repeat_interleave(per_blob)
    points = centres[labels] + spread * torch.randn(len(labels), dim, generator=g)
    return points, labels, centres


def _sq_inertia(x: np.ndarray, centroids: np.ndarray) -> float:
    """Sum of squared distances to the nearest centroid, in float64 (independent of semid)."""
    d = torch.cdist(torch.from_numpy(x).double(), torch.from_numpy(centroids).double())
    return d.pow(2).min(dim=1).values.sum().item()


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two labelings define the same partition (a bijection between labels)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# ---------------------------------------------------------------------------- k-means quality


def _ml1m() -> np.ndarray:
    path = DATA / "ml-1m.npy"
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")
    return np.load(path).astype(np.float32)


@pytest.mark.parametrize("init", ["k-means||", "k-means++"])
def test_inertia_close_to_sklearn_on_ml1m(init):
    from sklearn.cluster import KMeans

    x = _ml1m()
    reference = KMeans(n_clusters=256, init="k-means++", n_init=1, random_state=0).fit(x)
    ours = kmeans(torch.from_numpy(x), 256, sample_size=None, generator=_gen(0), init=init)

    ref_inertia = _sq_inertia(x, reference.cluster_centers_.astype(np.float32))
    our_inertia = _sq_inertia(x, ours.centroids.numpy())
    assert our_inertia <= 1.02 * ref_inertia
    # The reported inertia is the squared-L2 cost of the returned centroids and codes.
    assert ours.inertia == pytest.approx(our_inertia, rel=1e-4)
    assert ours.codes.shape == (x.shape[0],) and ours.codes.dtype == torch.int64


def test_cosine_inertia_close_to_sklearn_on_unit_rows_of_ml1m():
    # sklearn has no spherical k-means; Euclidean k-means on unit rows, with its centroids then scaled
    # to unit length, is a strong reference for the cost 1 - cos.
    from sklearn.cluster import KMeans

    unit = F.normalize(torch.from_numpy(_ml1m()), dim=1)
    reference = KMeans(n_clusters=256, init="k-means++", n_init=1, random_state=0).fit(unit.numpy())
    ref_centroids = F.normalize(torch.from_numpy(reference.cluster_centers_).float(), dim=1)
    ref_cost = (1.0 - (unit @ ref_centroids.T).max(dim=1).values).double().sum().item()
    ours = kmeans(unit, 256, sample_size=None, distance="cosine", generator=_gen(0))
    assert ours.inertia <= 1.02 * ref_cost
    our_cost = (1.0 - (unit @ ours.centroids.T).max(dim=1).values).double().sum().item()
    assert ours.inertia == pytest.approx(our_cost, rel=1e-4)


def test_parallel_seeding_no_worse_than_exhaustive_on_heavy_tailed_residuals():
    # The residual after one level of l2 k-means is heavy-tailed: a few rows are far from everything.
    # k-means|| weighs its candidates by the rows they stand for, so it must do as well as greedy
    # k-means++ over every row (k-means++ on a uniform subsample instead wastes seeds on the tail
    # and ends about 2% worse here).
    x = torch.from_numpy(_ml1m())
    first = kmeans(x, 256, sample_size=None, generator=_gen(0))
    residual = x - first.centroids[first.codes]
    for seed in (0, 1):
        parallel = kmeans(residual, 256, sample_size=None, generator=_gen(seed))
        exhaustive = kmeans(residual, 256, sample_size=None, generator=_gen(seed), init="k-means++")
        assert parallel.inertia <= 1.01 * exhaustive.inertia


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_separated_blobs_are_recovered(distance):
    x, labels, centres = _blobs(n_blobs=8, per_blob=60, dim=16, seed=1)
    result = kmeans(x, 8, distance=distance, generator=_gen(0))
    assert _same_partition(result.codes, labels)
    assert torch.isfinite(result.centroids).all()
    if distance == "l2":
        # Each true centre has a centroid next to it (noise is 0.05, centres ~10 apart).
        nearest = torch.cdist(centres, result.centroids).min(dim=1).values
        assert nearest.max() < 0.1
    else:
        # Spherical k-means: unit centroids pointing along the blob directions.
        assert torch.allclose(result.centroids.norm(dim=1), torch.ones(8), atol=1e-5)
        cos = F.normalize(centres, dim=1) @ result.centroids.T
        assert cos.max(dim=1).values.min() > 0.999


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_converged_centroids_are_cluster_means(distance):
    x = torch.randn(600, 8, generator=_gen(3))
    result = kmeans(x, 10, iters=200, tol=0.0, distance=distance, generator=_gen(0))
    data = F.normalize(x, dim=1) if distance == "cosine" else x
    for j in range(10):
        members = data[result.codes == j]
        assert len(members) > 0
        mean = members.mean(dim=0)
        expected = F.normalize(mean, dim=0) if distance == "cosine" else mean
        torch.testing.assert_close(result.centroids[j], expected, atol=1e-5, rtol=1e-4)
    # Every row is assigned to its nearest centroid.
    expected_codes = torch.cdist(data, result.centroids).argmin(dim=1)
    assert torch.equal(result.codes, expected_codes)


def test_kmeans_plusplus_seeds_are_rows_in_distinct_blobs():
    x, labels, _ = _blobs(n_blobs=6, per_blob=50, dim=8, seed=4)
    seeds = kmeans_plusplus(x, 6, _gen(0))
    is_row = (seeds[:, None, :] == x[None, :, :]).all(dim=-1)  # (k, n)
    assert is_row.any(dim=1).all()
    match = is_row.float().argmax(dim=1)  # row index of each seed
    # D² sampling all but never picks two seeds in the same tight blob.
    assert len(set(labels[match].tolist())) == 6


def test_tolerance_stops_early():
    x = torch.randn(800, 6, generator=_gen(5))
    # Any update improves inertia by at most 100%, so tol=1 stops right after the first update.
    stopped = kmeans(x, 12, iters=50, tol=1.0, generator=_gen(0))
    one_step = kmeans(x, 12, iters=1, tol=0.0, generator=_gen(0))
    many = kmeans(x, 12, iters=50, tol=0.0, generator=_gen(0))
    assert torch.equal(stopped.centroids, one_step.centroids)
    assert many.inertia < stopped.inertia


def test_weighted_seeding_ignores_zero_weight_rows():
    # Four far-away blobs carry no weight: the seeds must all come from the four weighted blobs, one each.
    x, labels, _ = _blobs(n_blobs=8, per_blob=20, dim=6, seed=14)
    weights = (labels < 4).long()
    chosen = _greedy_seeds(_Points(x, Distance.L2), 4, _gen(0), weights=weights)
    assert sorted(labels[chosen].tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_few_distinct_rows_seed_every_distinct_row(distance):
    # 6 distinct rows repeated 100 times, k = 9: more clusters than distinct rows. Every distinct row
    # must get a centroid (the surplus ones stay duplicates) and nothing may turn NaN.
    points = torch.randn(6, 4, generator=_gen(15)) * 10
    if distance == "cosine":
        points = F.normalize(points, dim=1)
    x = points.repeat(100, 1)
    result = kmeans(x, 9, distance=distance, generator=_gen(0))
    assert torch.isfinite(result.centroids).all()
    assert result.inertia == pytest.approx(0.0, abs=1e-4)
    found = torch.cdist(points, result.centroids).min(dim=1).values
    assert found.max() < 1e-3


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_identical_rows(distance):
    # Every cost is zero after the first seed: k-means|| draws nothing and seeds from all rows instead.
    x = torch.ones(200, 3)
    result = kmeans(x, 4, distance=distance, generator=_gen(0))
    assert torch.isfinite(result.centroids).all()
    assert result.inertia == 0.0


# ---------------------------------------------------------------------------- empty clusters


def test_empty_clusters_reseeded_on_distinct_duplicated_points():
    # 5 distinct points, each repeated 20 times. Starting with three copies of the first point,
    # two clusters get nothing (ties go to the lowest index); each must move to a different point.
    points = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [20.0, 20.0], [-30.0, 5.0]])
    x = points.repeat_interleave(20, dim=0)
    init = points[[0, 0, 0, 1, 2]]
    # Already after one update both empty clusters sit on different points.
    one_update = _lloyd(x, init, iters=1, distance="l2", tol=0.0)
    assert torch.pdist(one_update.centroids).min() > 0
    result = _lloyd(x, init, iters=10, distance="l2", tol=1e-4)
    assert not torch.isnan(result.centroids).any()
    assert torch.pdist(result.centroids).min() > 0
    found = {tuple(c) for c in result.centroids.tolist()}
    assert found == {tuple(p) for p in points.tolist()}
    assert result.inertia == 0.0
    assert torch.bincount(result.codes, minlength=5).min() == 20


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_empty_cluster_far_from_data_is_reseeded(distance):
    # Data in the positive orthant; the last centroid is far away (l2) and points against every
    # row (cosine), so it wins no point.
    x = _blobs(n_blobs=4, per_blob=40, dim=5, seed=6, spread=1.0)[0].abs()
    if distance == "cosine":
        x = F.normalize(x, dim=1)
    init = torch.cat([x[[0, 40, 80]], torch.full((1, 5), -1e3)])
    before = _lloyd(x, init, iters=0, distance=distance, tol=0.0)
    assert torch.bincount(before.codes, minlength=4)[3] == 0
    result = _lloyd(x, init, iters=20, distance=distance, tol=0.0)
    assert torch.isfinite(result.centroids).all()
    assert torch.pdist(result.centroids).min() > 1e-3
    assert torch.bincount(result.codes, minlength=4).min() > 0
    assert result.inertia < before.inertia


def test_fewer_rows_than_clusters_raises():
    with pytest.raises(ValueError, match=r"k=10.*n=4"):
        kmeans(torch.randn(4, 3), 10)
    with pytest.raises(ValueError, match="2-D"):
        kmeans(torch.randn(40), 4)
    with pytest.raises(ValueError, match="NaN"):
        kmeans(torch.full((40, 3), float("nan")), 4)
    with pytest.raises(ValueError, match="init"):
        kmeans(torch.randn(40, 3), 4, init="random")


# ---------------------------------------------------------------------------- sampling, determinism


@pytest.mark.parametrize("init", ["k-means||", "k-means++"])
@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_same_seed_same_result_and_seed_matters(init, distance):
    x = torch.randn(3000, 8, generator=_gen(7))
    a = kmeans(x, 16, sample_size=1000, generator=_gen(11), init=init, distance=distance)
    b = kmeans(x, 16, sample_size=1000, generator=_gen(11), init=init, distance=distance)
    c = kmeans(x, 16, sample_size=1000, generator=_gen(12), init=init, distance=distance)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.codes, b.codes)
    assert a.inertia == b.inertia
    assert not torch.equal(a.centroids, c.centroids)


def test_default_generator_is_reproducible():
    x = torch.randn(2000, 5, generator=_gen(16))
    assert torch.equal(kmeans(x, 32).centroids, kmeans(x, 32).centroids)


def test_sample_is_random_not_the_first_rows():
    # The first half of the rows is one blob, the second half another: a prefix would see only one.
    g = _gen(8)
    first = torch.randn(3000, 4, generator=g) * 0.1
    second = torch.randn(3000, 4, generator=g) * 0.1 + 50.0
    x = torch.cat([first, second])
    result = kmeans(x, 2, sample_size=500, generator=_gen(0))
    assert result.codes.shape == (500,)
    counts = torch.bincount(result.codes, minlength=2)
    assert counts.min() > 150  # about 250 sampled rows from each half
    centres = torch.stack([torch.zeros(4), torch.full((4,), 50.0)])
    assert torch.cdist(centres, result.centroids).min(dim=1).values.max() < 0.2


def test_sample_size_none_uses_all_rows():
    x = torch.randn(700, 3, generator=_gen(9))
    result = kmeans(x, 5, sample_size=None, generator=_gen(0))
    assert result.codes.shape == (700,)
    recomputed = torch.cdist(x.double(), result.centroids.double()).pow(2).min(dim=1).values.sum()
    assert result.inertia == pytest.approx(recomputed.item(), rel=1e-5)


# ---------------------------------------------------------------------------- Sinkhorn


def _one_code_cost(n: int, n_codes: int, seed: int):
    """Items on [0, 1], codes at 5, 6, ...: every item's nearest code is code 0.

    The balanced optimum under squared distance is monotone: sorting items by position and cutting
    them into n_codes equal groups gives group j code j.
    """
    pos = torch.rand(n, generator=_gen(seed))
    code_pos = 5.0 + torch.arange(n_codes, dtype=torch.float32)
    return (pos[:, None] - code_pos[None, :]) ** 2, pos


def test_sinkhorn_spreads_items_that_argmin_puts_on_one_code():
    n, n_codes = 1000, 10
    cost, pos = _one_code_cost(n, n_codes, seed=10)
    assert torch.bincount(cost.argmin(dim=1)).max() == n
    codes = sinkhorn_assign(cost)
    counts = torch.bincount(codes, minlength=n_codes)
    assert counts.max() <= 1.1 * n / n_codes
    assert counts.min() >= 0.9 * n / n_codes
    # Close to the optimal balanced assignment: monotone in position, and cheaper than a random one.
    ordered = codes[pos.argsort()]
    assert (ordered.diff() >= 0).all()
    optimal = torch.arange(n) * n_codes // n
    assert (ordered == optimal).float().mean() > 0.9
    random_balanced = optimal[torch.randperm(n, generator=_gen(0))]
    chosen = cost.gather(1, codes[:, None]).sum()
    assert chosen < cost.gather(1, random_balanced[:, None]).sum()


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6, 1e30])
def test_sinkhorn_small_epsilon_any_scale(scale):
    n, n_codes = 400, 8
    cost, _ = _one_code_cost(n, n_codes, seed=11)
    reference = sinkhorn_assign(cost, epsilon=0.01)
    codes = sinkhorn_assign(cost * scale, epsilon=0.01)
    assert codes.dtype == torch.int64 and codes.shape == (n,)
    assert codes.min() >= 0 and codes.max() < n_codes
    # epsilon is scale-free: rescaling the cost barely changes the assignment.
    assert (codes == reference).float().mean() > 0.98
    assert torch.bincount(codes, minlength=n_codes).max() <= 1.15 * n / n_codes


def test_sinkhorn_ignores_row_and_column_offsets():
    n, n_codes = 300, 6
    cost, _ = _one_code_cost(n, n_codes, seed=12)
    g = _gen(1)
    shifted = cost + torch.rand(n, 1, generator=g) * 3 + torch.rand(1, n_codes, generator=g) * 3
    same = (sinkhorn_assign(shifted, epsilon=0.02) == sinkhorn_assign(cost, epsilon=0.02))
    assert same.float().mean() > 0.98


def test_sinkhorn_random_costs_balanced_and_finite():
    cost = torch.rand(512, 32, generator=_gen(13)) * 1e4
    codes = sinkhorn_assign(cost, epsilon=0.01, iters=100)
    counts = torch.bincount(codes, minlength=32)
    assert counts.max() <= 1.5 * 512 / 32


def test_sinkhorn_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        sinkhorn_assign(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_assign(torch.rand(4, 2), epsilon=0.0)
    with pytest.raises(ValueError, match="matrix"):
        sinkhorn_assign(torch.rand(4))
