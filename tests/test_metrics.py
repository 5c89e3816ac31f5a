"""Tests for semid.metrics: each metric against a slow reference written differently (Python loops,
collections.Counter, sklearn NearestNeighbors) on real embeddings, and against tiny cases whose answer
is known by construction."""
from __future__ import annotations

import math
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

import semid.metrics

from semid.distance import nearest_code
from semid.metrics import (
    codebook_metrics,
    collision_metrics,
    duplicate_rate,
    evaluate_codes,
    format_report,
    nearest_neighbours,
    prefix_agreement,
    prefix_agreement_from_neighbours,
    read_sequences,
    reconstruction_metrics,
    sequence_prefix_agreement,
    top_share,
    outlier_rows,
    squared_from_mean,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPORT_KEYS = {
    "n_items", "mse", "fvu", "cosine", "collision_rate", "duplicate_rate", "colliding_items", "max_group", "usage",
    "entropy_bits", "prefix_agreement", "prefix_agreement_sampled", "unique_after", "id_length",
}


# ----------------------------------------------------------------------------------------------------
# Helpers: real data, a cheap residual quantizer to get realistic codes, and slow references
# ----------------------------------------------------------------------------------------------------
def _load(name: str) -> np.ndarray:
    path = DATA / f"{name}.npy"
    if not path.exists():
        pytest.skip(f"{path} not available")
    return np.load(path)


def _residual_codes(x: np.ndarray, sizes: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Residual quantization, one Lloyd step per level from codewords drawn among the residual rows:
    cheap, but the codes are semantic and every level lowers the residual energy.

    Returns (codes (n, l) int64, x_hat (n, d) float32, the sum of the chosen codewords).
    """
    gen = torch.Generator().manual_seed(seed)
    residual = torch.from_numpy(x).float()
    x_hat = torch.zeros_like(residual)
    codes = []
    for k in sizes:
        codebook = residual[torch.randperm(residual.shape[0], generator=gen)[:k]]
        level_codes, _ = nearest_code(residual, codebook, "l2")
        counts = torch.bincount(level_codes, minlength=k).clamp_min(1).unsqueeze(1)  # (k, 1)
        codebook = torch.zeros_like(codebook).index_add_(0, level_codes, residual) / counts  # cluster means
        codes.append(level_codes)
        x_hat += codebook[level_codes]
        residual = residual - codebook[level_codes]
    return torch.stack(codes, dim=1).numpy(), x_hat.numpy()


@pytest.fixture(scope="module")
def ml100k() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = _load("ml-100k")
    codes, x_hat = _residual_codes(x, [8, 16, 16])
    return x, x_hat, codes


def _prefix_share(a: tuple, b: tuple, depth: int) -> bool:
    return all(a[j] == b[j] for j in range(depth))


def _reference_prefix_agreement(x: np.ndarray, codes: np.ndarray, k: int, queries: np.ndarray) -> list[float]:
    """Per-item loop over sklearn's exact cosine neighbours (self excluded), averaged over `queries`."""
    nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(x)
    neighbours = nn.kneighbors(return_distance=False)  # without X, an item is not its own neighbour
    tuples = [tuple(row) for row in codes.tolist()]
    levels = codes.shape[1]
    out = []
    for depth in range(1, levels + 1):
        per_item = [
            sum(_prefix_share(tuples[i], tuples[j], depth) for j in neighbours[i]) / k for i in queries
        ]
        out.append(sum(per_item) / len(per_item))
    return out


# ----------------------------------------------------------------------------------------------------
# Reconstruction
# ----------------------------------------------------------------------------------------------------
def test_reconstruction_matches_loop_reference(ml100k):
    x, x_hat, _ = ml100k
    n, d = x.shape
    rows = [[float(v) for v in r] for r in x.tolist()]
    hats = [[float(v) for v in r] for r in x_hat.tolist()]
    mean = [math.fsum(r[j] for r in rows) / n for j in range(d)]
    sse = math.fsum(math.fsum((a - b) ** 2 for a, b in zip(r, h)) for r, h in zip(rows, hats))
    sst = math.fsum(math.fsum((a - m) ** 2 for a, m in zip(r, mean)) for r in rows)
    cos = [
        math.fsum(a * b for a, b in zip(r, h)) / (math.sqrt(math.fsum(a * a for a in r)) * math.sqrt(math.fsum(b * b for b in h)))
        for r, h in zip(rows, hats)
    ]
    got = reconstruction_metrics(x, x_hat)
    assert got["mse"] == pytest.approx(sse / n / d, rel=1e-9)
    assert got["fvu"] == pytest.approx(sse / sst, rel=1e-9)
    assert got["cosine"] == pytest.approx(sum(cos) / n, rel=1e-9)
    assert 0.0 < got["fvu"] < 1.0  # the quantizer explains some but not all of the variance


def test_reconstruction_known_cases():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 7))
    perfect = reconstruction_metrics(x, x.copy())
    assert perfect == {"mse": 0.0, "fvu": 0.0, "cosine": pytest.approx(1.0)}
    assert reconstruction_metrics(x, np.broadcast_to(x.mean(0), x.shape))["fvu"] == pytest.approx(1.0)
    offset = rng.normal(size=7)
    shifted = reconstruction_metrics(x, x + offset)
    assert shifted["mse"] == pytest.approx(float(offset @ offset) / 7)
    assert reconstruction_metrics(x, 3 * x)["cosine"] == pytest.approx(1.0)
    assert reconstruction_metrics(x, -x)["cosine"] == pytest.approx(-1.0)


def test_reconstruction_zero_rows_and_constant_input():
    x = np.array([[1.0, 0.0], [0.0, 2.0]])
    # Row 0 reconstructed as the zero vector: its cosine counts as 0, row 1 is exact -> mean 0.5.
    assert reconstruction_metrics(x, np.array([[0.0, 0.0], [0.0, 5.0]]))["cosine"] == pytest.approx(0.5)
    constant = np.ones((4, 3))
    assert math.isnan(reconstruction_metrics(constant, constant)["fvu"])  # no variance to explain


def test_reconstruction_in_row_blocks_equals_one_block(ml100k, monkeypatch):
    """A large catalogue is summed in row blocks, so its float64 temporaries are one block's; the blocks
    (7 rows here, the last one short) give the metrics of a single pass."""
    x, x_hat, _ = ml100k
    whole = reconstruction_metrics(x, x_hat)
    monkeypatch.setattr(semid.metrics, "_BLOCK_ELEMENTS", 7 * x.shape[1] + 3)
    assert len(x) % 7 and reconstruction_metrics(x, x_hat) == pytest.approx(whole, rel=1e-12)
    assert reconstruction_metrics(x.astype(np.float64), x_hat) == pytest.approx(whole, rel=1e-12)


def test_reconstruction_accepts_torch(ml100k):
    x, x_hat, _ = ml100k
    assert reconstruction_metrics(torch.from_numpy(x), torch.from_numpy(x_hat)) == reconstruction_metrics(x, x_hat)


# ----------------------------------------------------------------------------------------------------
# Collisions and codebooks
# ----------------------------------------------------------------------------------------------------
def test_collisions_match_counter(ml100k):
    _, _, codes = ml100k
    counts = Counter(map(tuple, codes.tolist()))
    n = len(codes)
    got = collision_metrics(codes)
    assert got["collision_rate"] == pytest.approx(1 - len(counts) / n)
    assert got["colliding_items"] == pytest.approx(sum(c for c in counts.values() if c > 1) / n)
    assert got["max_group"] == max(counts.values())
    assert got["collision_rate"] > 0  # 8 * 16 * 16 tuples for 1682 items must collide somewhere


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ([[3, 1]] * 5, {"collision_rate": 1 - 1 / 5, "colliding_items": 1.0, "max_group": 5}),
        ([[0, 0], [0, 1], [1, 0], [1, 1]], {"collision_rate": 0.0, "colliding_items": 0.0, "max_group": 1}),
        (
            [[0, 0], [0, 0], [0, 1], [1, 1], [1, 1], [1, 1]],
            {"collision_rate": 0.5, "colliding_items": 5 / 6, "max_group": 3},
        ),
        ([[7]], {"collision_rate": 0.0, "colliding_items": 0.0, "max_group": 1}),
    ],
)
def test_collisions_known_cases(codes, expected):
    got = collision_metrics(np.array(codes))
    assert got == {key: pytest.approx(value) for key, value in expected.items()}


def test_collisions_with_huge_and_negative_codes():
    """Codes whose value ranges cannot be packed into one int64 key give the same answer."""
    small = np.array([[0, 1, 2], [0, 1, 2], [1, 1, 2], [1, 0, 0], [1, 0, 0], [1, 0, 0]])
    huge = np.where(small == 1, 2**62, np.where(small == 2, -(2**62), small))
    assert collision_metrics(huge) == collision_metrics(small)
    assert collision_metrics(small - 5) == collision_metrics(small)


def test_codebook_matches_reference(ml100k):
    _, _, codes = ml100k
    sizes = [8, 16, 16]
    got = codebook_metrics(codes, sizes)
    n = len(codes)
    for level, k in enumerate(sizes):
        counts = Counter(codes[:, level].tolist())
        assert got["usage"][level] == pytest.approx(len(counts) / k)
        entropy = -sum((c / n) * math.log2(c / n) for c in counts.values())
        assert got["entropy_bits"][level] == pytest.approx(entropy)
        assert got["entropy_bits"][level] <= math.log2(k) + 1e-12


def test_codebook_known_cases():
    uniform = np.repeat(np.arange(8), 3)[:, None]  # every one of 8 codes used 3 times
    assert codebook_metrics(uniform, [8]) == {"usage": [1.0], "entropy_bits": [pytest.approx(3.0)]}
    assert codebook_metrics(uniform, [16]) == {"usage": [0.5], "entropy_bits": [pytest.approx(3.0)]}
    single = np.zeros((10, 2), dtype=np.int64)
    assert codebook_metrics(single, 4) == {"usage": [0.25, 0.25], "entropy_bits": [0.0, 0.0]}
    two_to_one = np.array([[0], [0], [1]])  # p = (2/3, 1/3)
    expected = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert codebook_metrics(two_to_one, [2])["entropy_bits"][0] == pytest.approx(expected)


def test_codebook_rejects_bad_sizes_and_codes():
    codes = np.array([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="levels"):
        codebook_metrics(codes, [4])
    with pytest.raises(ValueError, match=r"level 2 must lie in \[0, 3\)"):
        codebook_metrics(codes, [4, 3])
    with pytest.raises(ValueError, match="level 1"):
        codebook_metrics(-codes, [4, 4])


# ----------------------------------------------------------------------------------------------------
# prefix_agreement
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [10, 3])
def test_prefix_agreement_matches_sklearn(ml100k, k):
    x, _, codes = ml100k
    got, sampled = prefix_agreement(x, codes, k=k)
    expected = _reference_prefix_agreement(x, codes, k, np.arange(len(x)))
    assert sampled is False
    # fp32 vs fp64 neighbour order may differ on near ties (ml-100k has duplicate rows): a few items at most.
    assert got == pytest.approx(expected, abs=2e-3)
    assert got[0] >= got[1] >= got[2]  # a longer prefix is harder to share


def test_prefix_agreement_sampled_path(ml100k):
    x, _, codes = ml100k
    got, sampled = prefix_agreement(x, codes, max_items=300, seed=7)
    assert sampled is True
    # The documented rule for the sample; neighbours are still searched among all items.
    queries = np.sort(np.random.default_rng(7).choice(len(x), size=300, replace=False))
    assert got == pytest.approx(_reference_prefix_agreement(x, codes, 10, queries), abs=2e-3)
    assert prefix_agreement(x, codes, max_items=300, seed=7)[0] == got
    assert prefix_agreement(x, codes, max_items=len(x))[1] is False


def test_neighbours_of_chosen_queries(ml100k):
    """`queries` scores only the given items (a held-out set, say) against neighbours among all items."""
    x, _, codes = ml100k
    queries = np.arange(0, len(x), 7)
    neighbours = nearest_neighbours(x, queries=queries)
    assert neighbours.indices.shape == (len(queries), 10) and not (neighbours.indices == torch.from_numpy(queries)[:, None]).any()
    got = prefix_agreement_from_neighbours(codes, neighbours)
    assert got == pytest.approx(_reference_prefix_agreement(x, codes, 10, queries), abs=2e-3)
    with pytest.raises(ValueError, match="queries must be"):
        nearest_neighbours(x, queries=np.array([len(x)]))


def test_neighbour_search_in_chunks_with_a_progress_bar(ml100k, monkeypatch, capsys):
    """Chunks of 50 query rows find neighbours as close as one chunk does, and the bar counts every query."""
    x, _, _ = ml100k
    unit = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)

    def similarities(found):  # (q, k) cosine of each query to its neighbours, robust to the order of exact ties
        return torch.einsum("qd,qkd->qk", unit[found.queries], unit[found.indices])

    whole = nearest_neighbours(x)
    assert "neighbours" not in capsys.readouterr().err  # no bar unless asked
    monkeypatch.setattr(semid.metrics, "_MAX_CHUNK_ELEMENTS", 50 * len(x))
    chunked = nearest_neighbours(x, progress=True)
    assert torch.allclose(similarities(chunked), similarities(whole), atol=1e-6)
    err = capsys.readouterr().err
    assert "neighbours" in err and f"{len(x)}/{len(x)}" in err


def _two_clusters() -> np.ndarray:
    """Two tight clusters of 11 points each around orthogonal directions (each point's 10 nearest
    other points are exactly its cluster mates)."""
    rng = np.random.default_rng(1)
    centres = np.eye(4)[[0, 1]] * 5.0
    return np.concatenate([c + 0.01 * rng.normal(size=(11, 4)) for c in centres])


def test_prefix_agreement_known_clusters():
    x = _two_clusters()
    cluster = np.repeat([0, 1], 11)
    second = np.tile(np.array([0] * 6 + [1] * 5), 2)  # within a cluster: six 0s, five 1s
    got, _ = prefix_agreement(x, np.stack([cluster, second], axis=1))
    # d=1: all 10 neighbours share the cluster code. d=2: a "0" item has 5 of 10 mates with 0, a "1"
    # item 4 of 10, so the mean is (6 * 0.5 + 5 * 0.4) / 11.
    assert got == pytest.approx([1.0, (6 * 0.5 + 5 * 0.4) / 11])


def test_prefix_agreement_needs_the_whole_prefix():
    x = _two_clusters()
    alternating = np.arange(22) % 2  # per cluster: one code on 6 items, the other on 5
    codes = np.stack([alternating, np.zeros(22, dtype=int)], axis=1)  # the second code always agrees
    got, _ = prefix_agreement(x, codes)
    assert got[0] == pytest.approx((6 * 0.5 + 5 * 0.4) / 11)
    assert got[1] == pytest.approx(got[0])  # not 1.0: depth 2 counts only where the first code matched


def test_prefix_agreement_fewer_items_than_k_and_zero_rows():
    x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    got, _ = prefix_agreement(x, np.array([[0], [0], [1]]), k=10)  # each item uses its 2 other items
    assert got == pytest.approx([(0.5 + 0.5 + 0.0) / 3])
    with_zero = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    got, _ = prefix_agreement(with_zero, np.array([[0], [0], [1], [1]]), k=2)
    assert all(math.isfinite(v) for v in got)
    with pytest.raises(ValueError, match="at least 2 items"):
        prefix_agreement(np.ones((1, 3)), np.zeros((1, 2), dtype=int))
    with pytest.raises(ValueError, match="k must be"):
        prefix_agreement(x, np.zeros((3, 1), dtype=int), k=0)


def test_prefix_agreement_accepts_torch(ml100k):
    x, _, codes = ml100k
    got = prefix_agreement(torch.from_numpy(x), torch.from_numpy(codes), k=5)
    assert got == prefix_agreement(x, codes, k=5)


# ----------------------------------------------------------------------------------------------------
# Sequences
# ----------------------------------------------------------------------------------------------------
def _naive_sequences(path: Path) -> list[list[int]]:
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            _, rest = line.split("\t")
            out.append([int(tok) for tok in rest.split(" ") if tok])
    return out


def test_sequence_prefix_agreement_matches_loop():
    path = DATA / "scientific_sequences.txt"
    x = _load("scientific")
    codes, _ = _residual_codes(x, [8, 8, 8], seed=2)
    sequences = read_sequences(path)
    naive = _naive_sequences(path)
    assert [s.tolist() for s in sequences] == naive
    pairs = [(seq[i], seq[i + 1]) for seq in naive for i in range(len(seq) - 1)]
    tuples = [tuple(row) for row in codes.tolist()]
    expected = [sum(_prefix_share(tuples[a], tuples[b], d) for a, b in pairs) / len(pairs) for d in (1, 2, 3)]
    assert sequence_prefix_agreement(codes, sequences) == pytest.approx(expected)


def test_sequence_prefix_agreement_known_cases():
    codes = np.array([[0, 0], [0, 1], [1, 1], [1, 1], [0, 0]])
    # pairs (0,1): d1 yes, d2 no; (1,2): no; (2,3): both; (3,4) is split by the user boundary.
    sequences = [np.array([0, 1, 2, 3]), np.array([4]), np.array([], dtype=np.int64)]
    assert sequence_prefix_agreement(codes, sequences) == pytest.approx([2 / 3, 1 / 3])
    # Pairs never cross users: [3] then [2] would agree fully, but they are different users.
    assert sequence_prefix_agreement(codes, [np.array([0, 4]), np.array([3, 2])]) == pytest.approx([1.0, 1.0])
    assert sequence_prefix_agreement(codes, [np.array([1, 4]), np.array([2]), np.array([3])]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="no consecutive item pairs"):
        sequence_prefix_agreement(codes, [np.array([0]), np.array([1])])
    with pytest.raises(ValueError, match="refer to rows"):
        sequence_prefix_agreement(codes, [np.array([0, 5])])


def test_read_sequences_format_and_errors(tmp_path):
    good = tmp_path / "s.txt"
    good.write_text("u1\t3 1 2\n\nu2\t\nu3\t0\n")
    assert [s.tolist() for s in read_sequences(good)] == [[3, 1, 2], [], [0]]
    for bad_text, message in [("u1 3 1\n", "no tab"), ("u1\t3 x\n", "integers"), ("u1\t-1\n", "non-negative")]:
        bad = tmp_path / "bad.txt"
        bad.write_text(bad_text)
        with pytest.raises(ValueError, match=message):
            read_sequences(bad)


# ----------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------
def test_bad_inputs_are_rejected_with_clear_messages():
    x = np.ones((4, 3))
    codes = np.zeros((4, 2), dtype=int)
    nan_x = x.copy()
    nan_x[1, 2] = np.nan
    with pytest.raises(ValueError, match="must match"):
        reconstruction_metrics(x, np.ones((3, 3)))
    with pytest.raises(ValueError, match="NaN"):
        reconstruction_metrics(nan_x, x)
    with pytest.raises(ValueError, match="NaN"):
        prefix_agreement(torch.from_numpy(nan_x), codes)
    with pytest.raises(ValueError, match="empty"):
        reconstruction_metrics(np.ones((0, 3)), np.ones((0, 3)))
    with pytest.raises(ValueError, match="empty"):
        collision_metrics(np.zeros((0, 2), dtype=int))
    with pytest.raises(ValueError, match="integer"):
        collision_metrics(np.zeros((4, 2)))
    with pytest.raises(ValueError, match="2-D"):
        collision_metrics(np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="same items"):
        prefix_agreement(x, codes[:3])
    with pytest.raises(ValueError, match="same items"):
        evaluate_codes(x, x, codes, 4, final_ids=codes[:2])


# ----------------------------------------------------------------------------------------------------
# evaluate_codes and the report
# ----------------------------------------------------------------------------------------------------
def _suffix_ids(codes: np.ndarray) -> np.ndarray:
    """TIGER suffix by a plain loop: an item's rank among the earlier items with the same tuple."""
    seen: Counter = Counter()
    suffix = []
    for row in map(tuple, codes.tolist()):
        suffix.append(seen[row])
        seen[row] += 1
    return np.concatenate([codes, np.array(suffix)[:, None]], axis=1)


def test_duplicate_rate_counts_repeated_rows_and_bounds_any_per_item_code(ml100k):
    """Identical rows count once (also when one holds -0.0 where the other holds 0.0); rows that differ
    in one float32 ulp count apart. And it is the floor, reached: codes that are each row's nearest row of
    the catalogue itself (a function of the row alone, distinct for distinct rows) collide exactly that
    much, and coarser per-row codes more."""
    x = np.array([[0.0, 1.0], [-0.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [2.0, 0.5]], dtype=np.float32)
    assert duplicate_rate(x) == pytest.approx(1 - 3 / 6)
    nudged = x.copy()
    nudged[3, 0] = np.nextafter(np.float32(1.0), np.float32(2.0))
    assert duplicate_rate(nudged) == pytest.approx(1 - 4 / 6)
    assert duplicate_rate(torch.from_numpy(x)) == duplicate_rate(x.astype(np.float64))

    real, _, _ = ml100k
    doubled = np.concatenate([real, real[:100]])  # 100 more rows that each repeat one
    base = duplicate_rate(real)
    assert duplicate_rate(doubled) == pytest.approx(1 - (1 - base) * len(real) / len(doubled))
    rows = torch.from_numpy(doubled)
    own_row = nearest_code(rows, rows, "l2")[0].numpy()[:, None]
    assert collision_metrics(own_row)["collision_rate"] == pytest.approx(duplicate_rate(doubled))
    coarser = nearest_code(rows, rows[:1000], "l2")[0].numpy()[:, None]
    assert collision_metrics(coarser)["collision_rate"] > duplicate_rate(doubled)
    with pytest.raises(ValueError, match="NaN"):
        duplicate_rate(np.array([[np.nan, 1.0]]))


def test_evaluate_codes_combines_the_metrics(ml100k):
    x, x_hat, codes = ml100k
    sequences = read_sequences(DATA / "ml-100k_sequences.txt")
    final = _suffix_ids(codes)
    report = evaluate_codes(x, x_hat, codes, [8, 16, 16], final_ids=final, sequences=sequences)
    assert set(report) == REPORT_KEYS | {"sequence_prefix_agreement"}
    assert report["n_items"] == len(x)
    assert report["unique_after"] == 1.0 and report["id_length"] == 4
    for part in (reconstruction_metrics(x, x_hat), collision_metrics(codes), codebook_metrics(codes, [8, 16, 16])):
        assert {key: report[key] for key in part} == part
    assert report["duplicate_rate"] == duplicate_rate(x) > 0  # ml-100k holds 18 exact-duplicate pairs
    assert report["prefix_agreement"] == prefix_agreement(x, codes)[0]
    assert report["sequence_prefix_agreement"] == sequence_prefix_agreement(codes, sequences)

    without = evaluate_codes(x, x_hat, codes, 16)
    assert set(without) == REPORT_KEYS
    assert without["unique_after"] == pytest.approx(1 - without["collision_rate"])
    assert without["id_length"] == 3


def test_evaluate_codes_of_a_single_item_reports_the_undefined_metrics_as_nan(ml100k):
    x, x_hat, codes = ml100k
    report = evaluate_codes(x[:1], x_hat[:1], codes[:1], 16)
    assert set(report) == REPORT_KEYS and report["n_items"] == 1
    assert math.isnan(report["fvu"]) and all(math.isnan(v) for v in report["prefix_agreement"])
    assert len(report["prefix_agreement"]) == codes.shape[1] and report["prefix_agreement_sampled"] is False
    assert report["collision_rate"] == 0.0 and report["mse"] == reconstruction_metrics(x[:1], x_hat[:1])["mse"]
    assert "nan" in format_report(report)
    with pytest.raises(ValueError, match="at least 2 items"):  # asked for by itself, it still says why
        prefix_agreement(x[:1], codes[:1])


def test_evaluate_codes_on_beauty_is_finite_and_complete():
    x = _load("beauty")
    codes, x_hat = _residual_codes(x, [256, 256, 256])
    sequences = read_sequences(DATA / "beauty_sequences.txt")
    start = time.perf_counter()
    report = evaluate_codes(x, x_hat, codes, 256, final_ids=_suffix_ids(codes), sequences=sequences)
    print(f"evaluate_codes on beauty {x.shape}: {time.perf_counter() - start:.2f} s")
    assert set(report) == REPORT_KEYS | {"sequence_prefix_agreement"}
    assert report["prefix_agreement_sampled"] is False
    numbers = [v for v in report.values() if isinstance(v, float)]
    numbers += [v for v in report.values() if isinstance(v, list) for v in v]
    assert all(math.isfinite(v) for v in numbers)
    assert all(len(report[key]) == 3 for key in ("usage", "entropy_bits", "prefix_agreement"))


def test_format_report(ml100k):
    x, x_hat, codes = ml100k
    report = evaluate_codes(x, x_hat, codes, 16, max_items=200)
    text = format_report(report)
    for key in REPORT_KEYS - {"n_items", "prefix_agreement_sampled"}:
        assert key in text
    assert f"{report['fvu']:.4f}" in text
    levels = "  ".join(f"L{i} {v:.4f}" for i, v in enumerate(report["prefix_agreement"], start=1))
    assert levels in text
    assert "sample" in text.splitlines()[-1]
    # Values start in one column.
    value_lines = [line for line in text.splitlines() if line.startswith("  ")]
    columns = {re.match(r"  \S.*?\s{2,}(?=\S)", line).end() for line in value_lines}
    assert len(value_lines) == 12 and len(columns) == 1
    unsampled = format_report(evaluate_codes(x, x_hat, codes, 16))
    assert "sample" not in unsampled


def test_top_share_of_the_variance_finds_the_few_rows_that_hold_it() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 8))
    even = top_share(squared_from_mean(x))
    assert 0.01 < even < 0.05  # 10 of 1000 Gaussian rows: a little above their 1% share
    assert top_share(np.array([1.0, 1.0, 2.0]), fraction=0.3) == pytest.approx(0.5)  # the largest entry
    assert len(outlier_rows(squared_from_mean(x, centred=False))) == 0
    x[:10] *= 100.0  # ten items 100x longer: 10,000x the squared norm, as far as collaborative factors go
    assert top_share(squared_from_mean(x)) > 0.95 and top_share(np.zeros(3)) == 0.0
    centred = ((x - x.mean(0)) ** 2).sum(1)
    np.testing.assert_allclose(squared_from_mean(x), centred, rtol=1e-5)
    assert top_share(squared_from_mean(x), fraction=0.5) == pytest.approx(np.sort(centred)[-500:].sum() / centred.sum())
    assert len(outlier_rows(squared_from_mean(x, centred=False))) == 0  # heavy-tailed, not on another scale
    x[3] *= 1e4  # a row a million times the rest's length, and one 2,000 times: not normalised as they were
    x[500] *= 2e3
    assert outlier_rows(squared_from_mean(x, centred=False)).tolist() == [3, 500]
    np.testing.assert_allclose(squared_from_mean(x, centred=False), (x**2).sum(1), rtol=1e-5)
    assert top_share(squared_from_mean(np.ones((5, 3)))) == 0.0 and len(outlier_rows(np.zeros(4))) == 0
