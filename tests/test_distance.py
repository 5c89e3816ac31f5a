"""Tests for semid.distance: pairwise distances and nearest codewords against scikit-learn's brute-force
nearest neighbours on real embeddings, and chunking that must not change any result."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import pairwise_distances
from sklearn.neighbors import NearestNeighbors

from semid.distance import Distance, nearest_code, pairwise_distance


@pytest.fixture(scope="module")
def queries_and_codebook(real_data) -> tuple[np.ndarray, np.ndarray]:
    """2000 beauty rows as queries and 256 ml-1m rows as a codebook: real, unnormalised embeddings."""
    rng = np.random.default_rng(0)
    beauty, movies = real_data("beauty"), real_data("ml-1m")
    queries = beauty[np.sort(rng.choice(len(beauty), 2000, replace=False))]
    codebook = movies[np.sort(rng.choice(len(movies), 256, replace=False))]
    return queries, codebook


# semid reports squared Euclidean distance for l2 and -cos for cosine; sklearn gives |x - c| and 1 - cos.
_FROM_SKLEARN = {
    Distance.L2: (lambda d: d**2, "euclidean"),
    Distance.COSINE: (lambda d: d - 1.0, "cosine"),
}


@pytest.mark.parametrize("distance", list(Distance))
def test_pairwise_distance_matches_sklearn(queries_and_codebook, distance: Distance) -> None:
    x, c = queries_and_codebook
    to_semid, metric = _FROM_SKLEARN[distance]
    expected = to_semid(pairwise_distances(x.astype(np.float64), c.astype(np.float64), metric=metric))
    got = pairwise_distance(torch.from_numpy(x), torch.from_numpy(c), distance)
    assert got.dtype == torch.float32 and got.shape == (len(x), len(c))
    # fp32 matmul: error relative to the scale of the squared norms involved, not of the distance itself.
    scale = float(np.max((x**2).sum(1))) if distance is Distance.L2 else 1.0
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=2e-5 * scale)


@pytest.mark.parametrize("distance", list(Distance))
def test_nearest_code_matches_sklearn_brute_force(queries_and_codebook, distance: Distance) -> None:
    x, c = queries_and_codebook
    to_semid, metric = _FROM_SKLEARN[distance]
    nn_index = NearestNeighbors(n_neighbors=2, metric=metric, algorithm="brute").fit(c.astype(np.float64))
    ref_dist, ref_idx = nn_index.kneighbors(x.astype(np.float64))
    codes, dist = nearest_code(torch.from_numpy(x), torch.from_numpy(c), distance)
    assert codes.dtype == torch.int64 and dist.dtype == torch.float32
    codes, dist = codes.numpy(), dist.numpy()

    scale = float(np.max((x**2).sum(1))) if distance is Distance.L2 else 1.0
    tol = 2e-5 * scale
    np.testing.assert_allclose(dist, to_semid(ref_dist[:, 0]), rtol=0, atol=tol)
    # The code chosen is optimal in float64, and it is sklearn's code wherever the runner-up is not a
    # near-tie that fp32 cannot separate.
    exact = to_semid(pairwise_distances(x.astype(np.float64), c.astype(np.float64), metric=metric))
    chosen = exact[np.arange(len(x)), codes]
    assert np.all(chosen <= to_semid(ref_dist[:, 0]) + tol)
    clear = to_semid(ref_dist[:, 1]) - to_semid(ref_dist[:, 0]) > 2 * tol
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(codes[clear], ref_idx[clear, 0])


@pytest.mark.parametrize("distance", list(Distance))
def test_nearest_code_chunking_changes_nothing(queries_and_codebook, distance: Distance) -> None:
    x, c = (torch.from_numpy(a[:200]) for a in queries_and_codebook)
    codes, dist = nearest_code(x, c, distance)
    for chunk_rows in (1, 7, 199):
        chunked_codes, chunked_dist = nearest_code(x, c, distance, chunk_rows=chunk_rows)
        torch.testing.assert_close(chunked_codes, codes, rtol=0, atol=0)
        torch.testing.assert_close(chunked_dist, dist, rtol=1e-6, atol=1e-6)


def test_nearest_code_ties_go_to_lowest_index() -> None:
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    x = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 3.0]])
    for distance in Distance:
        codes, _ = nearest_code(x, codebook, distance, chunk_rows=1)
        assert codes.tolist() == [0, 0, 1]


def test_l2_distance_is_never_negative() -> None:
    # x_sq + c_sq - 2 x.c cancels catastrophically when x sits on a codeword far from the origin.
    codebook = 100.0 + torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    d = pairwise_distance(codebook.clone(), codebook, Distance.L2)
    assert (d >= 0).all()
    assert nearest_code(codebook.clone(), codebook, Distance.L2)[0].tolist() == list(range(8))


def test_cosine_ignores_length_and_l2_does_not() -> None:
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(64, 8, generator=g), torch.randn(16, 8, generator=g)
    lengths = torch.rand(16, 1, generator=g) * 10 + 0.1
    same = pairwise_distance(x * 3.0, c * lengths, Distance.COSINE)
    torch.testing.assert_close(same, pairwise_distance(x, c, Distance.COSINE), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(pairwise_distance(x, c * lengths, Distance.L2), pairwise_distance(x, c, Distance.L2))


@pytest.mark.parametrize("distance", list(Distance))
def test_nearest_code_is_the_argmin_of_pairwise_distance(queries_and_codebook, distance: Distance) -> None:
    """Scores that leave out the per-row term (|x|^2, 1/|x|) choose the codeword pairwise_distance ranks first."""
    x, c = (torch.from_numpy(a) for a in queries_and_codebook)
    full = pairwise_distance(x, c, distance)  # (n, K)
    codes, dist = nearest_code(x, c, distance)
    two = full.topk(2, dim=-1, largest=False).values
    scale = float(x.pow(2).sum(-1).max()) if distance is Distance.L2 else 1.0
    clear = (two[:, 1] - two[:, 0]) > 1e-5 * scale  # not a tie at fp32 precision
    assert clear.float().mean() > 0.95
    torch.testing.assert_close(codes[clear], full.argmin(-1)[clear], rtol=0, atol=0)
    torch.testing.assert_close(dist, full.gather(1, codes[:, None]).squeeze(1), rtol=0, atol=2e-5 * scale)


@pytest.mark.parametrize("distance", list(Distance))
@pytest.mark.parametrize("chunk_rows", [None, 1, 3])
def test_ties_in_a_wide_codebook_go_to_the_lowest_index(distance: Distance, chunk_rows: int | None) -> None:
    """Integer codewords make every score exact, so the ties are real ties whatever the summation order."""
    g = torch.Generator().manual_seed(0)
    codebook = torch.randint(-3, 4, (300, 6), generator=g).float()
    v, w = torch.tensor([10.0, 0, 0, 0, 0, 1]), torch.tensor([0.0, 0, 0, 0, 10, -1])
    codebook[[7, 150]] = v  # a tie for both distances
    codebook[40] = 2 * v  # same direction, other length: a tie for cosine only
    codebook[299] = w  # the last index, weighted 0 by the tie-break, alone at its place
    codes, _ = nearest_code(torch.stack([v, 3 * v, w]), codebook, distance, chunk_rows=chunk_rows)
    assert codes.tolist() == ([7, 40, 299] if distance is Distance.L2 else [7, 7, 299])


def test_nearest_code_gives_no_gradient_and_leaves_its_inputs_alone() -> None:
    g = torch.Generator().manual_seed(2)
    codebook = torch.nn.Parameter(torch.randn(32, 4, generator=g))
    x = torch.randn(50, 4, generator=g, requires_grad=True)
    before_x, before_c = x.detach().clone(), codebook.detach().clone()
    for distance in Distance:
        codes, dist = nearest_code(x, codebook, distance, chunk_rows=16)
        assert not dist.requires_grad and codes.dtype == torch.int64
    assert torch.equal(x.detach(), before_x) and torch.equal(codebook.detach(), before_c)


def test_a_zero_row_has_no_direction_and_takes_code_zero_for_cosine() -> None:
    codebook = torch.tensor([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    codes, dist = nearest_code(torch.zeros(2, 2), codebook, Distance.COSINE)
    assert codes.tolist() == [0, 0] and dist.abs().max().item() == 0.0
