"""Collision resolution and the ID registry: uniqueness, stability, nearest-free remap, determinism."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl
import pytest
import torch

from semid.collisions import (
    CollisionStrategy,
    IdLengthWarning,
    PrefixFullError,
    SuffixOverflowError,
    SuffixOverflowWarning,
    resolve_collisions,
    suffix_by_groupby,
    tuple_group_ids,
)
from semid.distance import nearest_code, pairwise_distance
from semid.registry import IdRegistry


@dataclass
class RealCodes:
    """Raw codes of a quick residual quantizer with random-row codebooks on real embeddings."""

    codes: np.ndarray  # (n, levels) int64
    rank_key: np.ndarray  # (n,) squared distance to the reconstruction
    x: torch.Tensor  # (n, d): the embeddings
    codebooks: list[torch.Tensor]  # (k, d) per level
    sizes: tuple[int, ...]

    def level_distances(self, rows: np.ndarray, leading: np.ndarray) -> np.ndarray:
        """Distances at level leading.shape[1] from what the leading codes leave of the rows."""
        residual = self.x[torch.as_tensor(rows)]
        for codebook, codes in zip(self.codebooks, torch.as_tensor(leading).unbind(-1)):
            residual = residual - codebook[codes]
        return pairwise_distance(residual, self.codebooks[leading.shape[1]], "l2").numpy()

    def last_level_distances(self, rows: np.ndarray) -> np.ndarray:
        return self.level_distances(rows, self.codes[rows, :-1])


def quantize(x: np.ndarray, sizes: tuple[int, ...], seed: int = 0) -> RealCodes:
    """Per-level nearest code over successive residuals; codebooks are jittered random rows."""
    gen = torch.Generator().manual_seed(seed)
    residual = torch.from_numpy(x)
    codes, codebooks = [], []
    for k in sizes:
        codebook = residual[torch.randperm(len(residual), generator=gen)[:k]]
        # Jitter so that no item sits exactly on a codeword: exact zeros would tie many rank keys.
        codebook = codebook + 0.05 * codebook.std() * torch.randn(codebook.shape, generator=gen)
        code, _ = nearest_code(residual, codebook, "l2")
        codes.append(code)
        codebooks.append(codebook)
        residual = residual - codebook[code]
    rank_key = residual.double().pow(2).sum(1).numpy()
    return RealCodes(torch.stack(codes, 1).numpy(), rank_key, torch.from_numpy(x), codebooks, sizes)


@pytest.fixture(scope="module")
def beauty(real_data) -> np.ndarray:
    x = real_data("beauty")  # conftest: found under SEMID_TEST_DATA too, as from a worktree elsewhere
    _, first = np.unique(x, axis=0, return_index=True)  # the catalogue lists a few items twice
    x = x[np.sort(first)]
    return (x - x.mean(0)).astype(np.float32)


@pytest.fixture(scope="module")
def crowded(beauty) -> RealCodes:
    """K=16, L=3 on ~12k items: big groups and prefixes far fuller than 16 codes."""
    return quantize(beauty, (16, 16, 16))


@pytest.fixture(scope="module")
def roomy(beauty) -> RealCodes:
    """1000 items with a 256-code last level: many collisions, but every prefix has room."""
    return quantize(beauty[:1000], (16, 16, 256), seed=1)


def n_unique_rows(a: np.ndarray) -> int:
    return len(np.unique(a, axis=0))


def as_dicts(ids: np.ndarray) -> list[tuple[int, ...]]:
    return [tuple(r) for r in ids.tolist()]


# ---------------------------------------------------------------- brute-force references (plain Python)


def ref_order(rank_key: np.ndarray) -> list[int]:
    return sorted(range(len(rank_key)), key=lambda i: (rank_key[i], i))


def ref_taken_slots(taken: np.ndarray | None, levels: int) -> dict[tuple, set[int]]:
    slots: dict[tuple, set[int]] = {}
    for row in [] if taken is None else taken.tolist():
        slots.setdefault(tuple(row[:levels]), set()).add(row[levels] if len(row) > levels else 0)
    return slots


def ref_smallest_free(slots: dict[tuple, set[int]], tup: tuple) -> int:
    used = slots.setdefault(tup, set())
    s = 0
    while s in used:
        s += 1
    used.add(s)
    return s


def ref_suffix(codes, rank_key, taken=None) -> np.ndarray:
    levels = codes.shape[1]
    slots = ref_taken_slots(taken, levels)
    out = np.zeros((len(codes), levels + 1), dtype=np.int64)
    for i in ref_order(rank_key):
        out[i] = [*codes[i], ref_smallest_free(slots, tuple(codes[i]))]
    return out


def ref_remap(codes, rank_key, k_last, dist_fn, taken=None, suffix_size=None) -> np.ndarray:
    levels = codes.shape[1]
    taken_slots = ref_taken_slots(taken, levels)
    kept, movers = set(), []
    for i in ref_order(rank_key):
        tup = tuple(codes[i])
        if tup in taken_slots or tup in kept:
            movers.append(i)
        else:
            kept.add(tup)
    used = set(taken_slots) | {tuple(c) for c in codes.tolist()}
    dist = dist_fn(np.array(movers, dtype=np.int64)) if movers else None
    final = codes.copy()
    fallback = []
    for j, i in enumerate(movers):
        prefix = tuple(codes[i][:-1])
        free = [c for c in range(k_last) if prefix + (c,) not in used]
        if not free:
            fallback.append(i)
            continue
        best = min(free, key=lambda c: (dist[j][c], c))
        used.add(prefix + (best,))
        final[i, -1] = best
    if not fallback:
        return final
    slots = {t: set(s) for t, s in taken_slots.items()}
    for i in set(range(len(codes))) - set(fallback):
        slots.setdefault(tuple(final[i]), set()).add(0)
    suffix = np.zeros(len(codes), dtype=np.int64)
    spill = []
    for i in fallback:  # already in rank order
        suffix[i] = ref_smallest_free(slots, tuple(final[i]))
        if suffix_size is not None and suffix[i] >= suffix_size:
            slots[tuple(final[i])].discard(suffix[i])
            spill.append(i)
    for i in spill:  # then the nearest code of the prefix with a free suffix below the bound
        row_dist = dist_fn(np.array([i]))[0]
        for code in sorted(range(k_last), key=lambda c: (row_dist[c], c)):
            tup = (*final[i][:-1], code)
            free = ref_smallest_free(slots, tup)
            if free < suffix_size:
                final[i, -1], suffix[i] = code, free
                break
            slots[tup].discard(free)
    return np.column_stack([final, suffix])


def random_case(rng, n, sizes, n_taken=0, max_suffix=3):
    codes = np.stack([rng.integers(0, k, n) for k in sizes], 1)
    rank_key = rng.random(n)
    taken = None
    if n_taken:
        rows = np.stack([rng.integers(0, k, n_taken) for k in sizes] + [rng.integers(0, max_suffix, n_taken)], 1)
        taken = np.unique(rows, axis=0)
    return codes, rank_key, taken


# ---------------------------------------------------------------- suffix


def test_suffix_on_real_codes_is_unique_and_ranks_by_distance(crowded):
    codes, key = crowded.codes, crowded.rank_key
    assert n_unique_rows(codes) < len(codes) // 10  # the premise: collisions are everywhere
    ids = resolve_collisions(codes, key, "suffix", codebook_sizes=crowded.sizes, suffix_size=4096)
    assert ids.shape == (len(codes), 4)
    assert n_unique_rows(ids) == len(ids)
    np.testing.assert_array_equal(ids[:, :3], codes)
    # In every group the suffixes are exactly 0..size-1, in increasing order of rank key.
    _, group, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    group = group.reshape(-1)
    np.testing.assert_array_equal(np.bincount(group, weights=ids[:, 3]), counts * (counts - 1) / 2)
    assert (ids[:, 3] < counts[group]).all()
    order = np.lexsort((ids[:, 3], group))
    same_group = group[order][1:] == group[order][:-1]
    assert (np.diff(key[order])[same_group] >= 0).all()


def test_suffix_ties_go_by_row_order():
    codes = np.array([[1, 1], [1, 1], [1, 1], [0, 1]])
    ids = resolve_collisions(codes, np.array([0.5, 0.2, 0.5, 0.0]), "suffix", codebook_sizes=[2, 2])
    np.testing.assert_array_equal(ids[:, 2], [1, 0, 2, 0])


def test_suffix_against_taken_uses_smallest_free_slots():
    rng = np.random.default_rng(0)
    for _ in range(5):
        codes, key, taken = random_case(rng, 200, (3, 4, 2), n_taken=40, max_suffix=6)
        ids = resolve_collisions(codes, key, "suffix", codebook_sizes=(3, 4, 2), taken=taken)
        np.testing.assert_array_equal(ids, ref_suffix(codes, key, taken))
        assert n_unique_rows(np.concatenate([ids, taken])) == len(ids) + len(taken)


def test_suffix_size_is_a_hard_bound(crowded):
    codes, key = crowded.codes, crowded.rank_key
    biggest = int(np.unique(codes, axis=0, return_counts=True)[1].max())
    ids = resolve_collisions(codes, key, "suffix", codebook_sizes=crowded.sizes, suffix_size=biggest)
    assert ids[:, -1].max() == biggest - 1
    with pytest.raises(ValueError, match=rf"^{biggest} items share the code tuple .*'remap' or a larger suffix"):
        resolve_collisions(codes, key, "suffix", codebook_sizes=crowded.sizes, suffix_size=biggest - 1)


def test_suffix_bound_counts_registered_ids():
    codes = np.array([[0, 1]])
    taken = np.array([[0, 1, 0], [0, 1, 1], [0, 1, 3]])
    ids = resolve_collisions(codes, np.zeros(1), "suffix", codebook_sizes=[2, 2], suffix_size=3, taken=taken)
    np.testing.assert_array_equal(ids, [[0, 1, 2]])
    with pytest.raises(ValueError, match="^4 items share .*3 of them already holding an ID"):
        resolve_collisions(codes, np.zeros(1), "suffix", codebook_sizes=[2, 2], suffix_size=2, taken=taken)


def test_suffix_overflow_remaps_only_the_items_beyond_the_bound(roomy):
    codes, key = roomy.codes, roomy.rank_key
    unbounded = resolve_collisions(codes, key, "suffix", codebook_sizes=roomy.sizes, suffix_size=4096)
    biggest = int(unbounded[:, -1].max()) + 1
    assert biggest > 2  # precondition: a bound of 2 leaves items over
    with pytest.warns(SuffixOverflowWarning, match=rf"^{biggest} items share the code tuple .*'remap'"):
        ids = resolve_collisions(codes, key, "suffix", codebook_sizes=roomy.sizes, suffix_size=2,
                                 last_level_distances=roomy.last_level_distances, overflow="remap")
    assert ids.shape == unbounded.shape and n_unique_rows(ids) == len(ids)
    kept = unbounded[:, -1] < 2
    np.testing.assert_array_equal(ids[kept], unbounded[kept])  # within the bound nothing changes
    moved = np.flatnonzero(~kept)
    np.testing.assert_array_equal(ids[moved, :2], codes[moved, :2])  # same prefix, a new last code, suffix 0
    assert (ids[moved, 2] != codes[moved, 2]).all() and (ids[moved, 3] == 0).all()
    # The moved items took tuples nobody else holds, the nearest still free when each chose (best rank first).
    tuples = {tuple(t) for t in ids[kept, :3].tolist()}
    dist = roomy.last_level_distances(moved)
    for j in np.argsort(key[moved], kind="stable"):
        i = moved[j]
        in_use = {c for p0, p1, c in tuples if (p0, p1) == tuple(codes[i, :2])}
        free = np.setdiff1d(np.arange(roomy.sizes[-1]), list(in_use))
        assert ids[i, 2] == free[np.argmin(dist[j, free])]
        tuples.add(tuple(ids[i, :3].tolist()))


def test_suffix_overflow_still_raises_where_the_prefix_is_full(crowded):
    """Suffix size 2 gives a prefix of 16 last-level codes room for 32 IDs; some prefixes hold more items."""
    codes, key = crowded.codes, crowded.rank_key
    assert np.unique(codes[:, :2], axis=0, return_counts=True)[1].max() > 32
    with pytest.raises(SuffixOverflowError, match=r"the prefix \(\d+, \d+\) is full") as e:
        with pytest.warns(SuffixOverflowWarning):  # the remap is announced, then runs out of codes
            resolve_collisions(codes, key, "suffix", codebook_sizes=crowded.sizes, suffix_size=2,
                               last_level_distances=crowded.last_level_distances, overflow="remap")
    assert isinstance(e.value, ValueError) and e.value.suffix_size == 2 and e.value.size == 32
    with pytest.raises(ValueError, match="needs last_level_distances"):
        resolve_collisions(codes, key, "suffix", codebook_sizes=crowded.sizes, suffix_size=2, overflow="remap")
    with pytest.raises(ValueError, match="overflow must be"):
        resolve_collisions(codes, key, "suffix", codebook_sizes=crowded.sizes, overflow="ignore")


# ---------------------------------------------------------------- remap


def one_crowded_tuple(n: int) -> tuple[np.ndarray, np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """n items on the tuple (1, 1, 3) of sizes (2, 2, 8), ranked by row; last-level distance |code - 3|."""
    codes = np.tile([1, 1, 3], (n, 1))
    distances = lambda rows: np.tile(np.abs(np.arange(8) - 3.0), (len(rows), 1))  # noqa: E731
    return codes, np.arange(n, dtype=np.float64), distances


@pytest.mark.parametrize("strategy, overflow", [("remap", "raise"), ("suffix", "remap")])
def test_a_tuple_shared_beyond_the_suffix_bound_spills_into_the_nearest_codes(strategy, overflow):
    """100 items on one tuple, suffix size 16: the prefix's 8 codes x 16 suffixes have room for 128 IDs.

    Each item takes the smallest free suffix of the nearest code that still has one; its own tuple first.
    """
    codes, key, distances = one_crowded_tuple(100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = resolve_collisions(codes, key, strategy, codebook_sizes=(2, 2, 8), suffix_size=16,
                                 last_level_distances=distances, overflow=overflow)
    assert [w.category for w in caught] == ([SuffixOverflowWarning] if strategy == "suffix" else [])
    assert ids.shape == (100, 4) and n_unique_rows(ids) == 100
    np.testing.assert_array_equal(ids[:, :2], codes[:, :2])  # the prefix never changes
    assert ids[:, 3].max() < 16
    per_code = dict(zip(*np.unique(ids[:, 2], return_counts=True)))
    assert {int(c): int(k) for c, k in per_code.items()} == {3: 16, 2: 16, 4: 16, 1: 16, 5: 16, 0: 16, 6: 3, 7: 1}
    # remap: the best item keeps the tuple and the next 7 take the free codes, nearest first; suffix: the
    # best 16 number the tuple first. Then the tuple's free suffixes, then the spill, nearest code first.
    head = [(3, 0), *[(c, 0) for c in (2, 4, 1, 5, 0, 6, 7)], *[(3, s) for s in range(1, 16)]]
    if strategy == "suffix":
        head = [*[(3, s) for s in range(16)], *[(c, 0) for c in (2, 4, 1, 5, 0, 6, 7)]]
    spilled = [(c, s) for c in (2, 4, 1, 5, 0) for s in range(1, 16)] + [(6, 1), (6, 2)]
    assert [tuple(r) for r in ids[:, 2:].tolist()] == head + spilled


def test_spilling_matches_the_plain_python_reference_on_real_codes(crowded):
    """K=16 and suffix size 96: prefixes of up to 1,536 IDs; one tuple holds over 1,400 items."""
    codes, key = crowded.codes, crowded.rank_key
    assert np.unique(codes, axis=0, return_counts=True)[1].max() > 96
    assert np.unique(codes[:, :2], axis=0, return_counts=True)[1].max() <= 16 * 96
    ids = resolve_collisions(codes, key, "remap", codebook_sizes=crowded.sizes, suffix_size=96,
                             last_level_distances=crowded.last_level_distances)
    assert n_unique_rows(ids) == len(ids) and ids[:, 3].max() < 96
    np.testing.assert_array_equal(ids, ref_remap(codes, key, 16, crowded.last_level_distances, suffix_size=96))


def test_a_full_prefix_raises_by_name():
    codes, key, distances = one_crowded_tuple(129)  # one more than 8 codes x 16 suffixes
    with pytest.raises(SuffixOverflowError, match=r"the prefix \(1, 1\) is full") as e:
        resolve_collisions(codes, key, "remap", codebook_sizes=(2, 2, 8), suffix_size=16, last_level_distances=distances)
    assert e.value.size == 128 and e.value.codes == (1, 1)


def test_remap_keeps_length_and_picks_nearest_free_code(roomy):
    codes, key = roomy.codes, roomy.rank_key
    assert n_unique_rows(codes) < 0.5 * len(codes)
    ids = resolve_collisions(
        codes, key, "remap", codebook_sizes=roomy.sizes, last_level_distances=roomy.last_level_distances
    )
    assert ids.shape == codes.shape
    assert n_unique_rows(ids) == len(ids)
    np.testing.assert_array_equal(ids[:, :2], codes[:, :2])  # the prefix never changes
    ref = ref_remap(codes, key, roomy.sizes[-1], roomy.last_level_distances)
    np.testing.assert_array_equal(ids, ref)
    # Independent of processing order: a moved item's code is at least as near as any code its prefix
    # still has free at the end (those were free when it chose).
    moved = np.flatnonzero(ids[:, -1] != codes[:, -1])
    dist = roomy.last_level_distances(moved)
    for j, i in enumerate(moved):
        in_prefix = (ids[:, :2] == ids[i, :2]).all(1)
        free = np.setdiff1d(np.arange(roomy.sizes[-1]), ids[in_prefix, -1])
        assert dist[j, ids[i, -1]] <= dist[j, free].min()
    # The best-ranked item of every original group keeps its code.
    group = np.unique(codes, axis=0, return_inverse=True)[1].reshape(-1)
    order = np.lexsort((key, group))
    best = order[np.r_[True, group[order][1:] != group[order][:-1]]]
    np.testing.assert_array_equal(ids[best], codes[best])


def test_remap_falls_back_to_suffix_where_a_prefix_is_full(crowded, monkeypatch):
    codes, key = crowded.codes, crowded.rank_key
    monkeypatch.setattr("semid.collisions._MAX_DISTANCE_ELEMENTS", 16 * 1000)  # ask in blocks of 1000 rows
    calls = []

    def distances(rows):
        calls.append(rows)
        return crowded.last_level_distances(rows)

    ids = resolve_collisions(
        codes, key, "remap", codebook_sizes=crowded.sizes, suffix_size=4096, last_level_distances=distances
    )
    assert ids.shape == (len(codes), 4)
    assert n_unique_rows(ids) == len(ids)
    np.testing.assert_array_equal(ids, ref_remap(codes, key, 16, crowded.last_level_distances))
    # Suffixes only where the prefix has no free code left; the distances are asked for colliders only, once each.
    fell_back = ids[:, 3] > 0
    full = {tuple(p) for p in np.unique(ids[fell_back, :2], axis=0).tolist()}
    for p in full:
        in_prefix = (ids[:, :2] == p).all(1)
        assert len(np.unique(ids[in_prefix, 2])) == 16
    _, counts = np.unique(codes, axis=0, return_counts=True)
    assert max(map(len, calls)) == 1000
    asked = np.concatenate(calls)
    assert len(asked) == len(np.unique(asked)) == len(codes) - len(counts)


@pytest.mark.parametrize("sizes,n_taken", [((3, 3, 5), 20), ((3, 3, 40), 60), ((50,), 10), ((2, 3, 4), 0)])
def test_remap_matches_bruteforce_with_registered_ids(sizes, n_taken):
    rng = np.random.default_rng(sum(sizes))
    codes, key, taken = random_case(rng, 120, sizes, n_taken=n_taken)
    dist = rng.integers(0, 4, (120, sizes[-1])).astype(float)  # coarse values: ties must go to the lowest code

    ids = resolve_collisions(
        codes, key, "remap", codebook_sizes=sizes, taken=taken, last_level_distances=lambda r: dist[r]
    )
    np.testing.assert_array_equal(ids, ref_remap(codes, key, sizes[-1], lambda r: dist[r], taken))
    assert n_unique_rows(ids) == len(ids)
    if taken is not None:  # new IDs avoid registered ones (an unsuffixed ID means suffix 0)
        padded = ids if ids.shape[1] > len(sizes) else np.column_stack([ids, np.zeros(len(ids), int)])
        assert n_unique_rows(np.concatenate([padded, taken])) == len(ids) + len(taken)


def test_remap_needs_distances_only_when_something_collides():
    codes = np.array([[0, 1], [1, 1]])
    ids = resolve_collisions(codes, np.zeros(2), "remap", codebook_sizes=[2, 2])
    np.testing.assert_array_equal(ids, codes)
    with pytest.raises(ValueError, match="last_level_distances"):
        resolve_collisions(np.array([[0, 1], [0, 1]]), np.zeros(2), "remap", codebook_sizes=[2, 2])
    with pytest.raises(ValueError, match=r"expected \(1, 2\)"):
        resolve_collisions(
            np.array([[0, 1], [0, 1]]), np.zeros(2), "remap", codebook_sizes=[2, 2],
            last_level_distances=lambda rows: np.zeros((len(rows), 3)),
        )


# ---------------------------------------------------------------- remap keeping length L


def ref_remap_keep_length(codes, rank_key, sizes, level_dist, taken=None) -> np.ndarray:
    """Plain Python, one item at a time: remap within the prefix, then each item left on a full prefix (best
    rank first) takes the nearest level L-1 code, by its own distances, whose prefix has a free last code,
    and there the free last code nearest under that prefix. Raises LookupError where none is free."""
    levels = len(sizes)
    ids = ref_remap(codes, rank_key, sizes[-1], lambda r: level_dist(r, codes[r, :-1]), taken)
    if ids.shape[1] == levels:
        return ids
    final, spill = ids[:, :-1].copy(), [i for i in ref_order(rank_key) if ids[i, -1] > 0]
    used = {tuple(r) for r, s in zip(final.tolist(), ids[:, -1]) if s == 0} | set(ref_taken_slots(taken, levels))
    for i in spill:
        if levels == 1:
            raise LookupError(())
        head = tuple(codes[i, :-2].tolist())
        d_prev = level_dist(np.array([i]), codes[[i], :-2])[0]
        for c in sorted(range(sizes[-2]), key=lambda c: (d_prev[c], c)):
            free = [k for k in range(sizes[-1]) if (*head, c, k) not in used]
            if free:
                d_last = level_dist(np.array([i]), np.array([[*head, c]]))[0]
                final[i, -2:] = c, min(free, key=lambda k: (d_last[k], k))
                used.add(tuple(final[i].tolist()))
                break
        else:
            raise LookupError(head)
    return final


def hashed_level_distances(sizes):
    """Coarse distances (ties happen) that depend on the row, the leading codes and the code."""
    def distances(rows, leading):
        key = rows * 31 + (leading * np.arange(1, leading.shape[1] + 1) * 17).sum(1)
        return ((key[:, None] * 7 + np.arange(sizes[leading.shape[1]]) * 11) % 5).astype(float)
    return distances


def remap_at_length(codes, key, sizes, distances, taken=None, **kwargs):
    return resolve_collisions(codes, key, "remap", codebook_sizes=sizes, taken=taken, keep_length=True,
                              last_level_distances=lambda r: distances(r, codes[r, :-1]),
                              level_distances=distances, **kwargs)


CROWDED_SIZES = [(3, 4, 4), (8, 4), (2, 2, 3, 3)]


def crowded_case(sizes, seed):
    """18 + seed items whose codes before the last level are 0 or 1, rank keys with ties, 6 registered IDs."""
    rng = np.random.default_rng(seed)
    n = 18 + seed
    codes = np.stack([rng.integers(0, 2 if j < len(sizes) - 1 else k, n) for j, k in enumerate(sizes)], 1)
    key = np.round(rng.random(n), 1)  # rounded: ties go by row order
    taken = np.unique(np.stack([rng.integers(0, k, 6) for k in sizes], 1), axis=0)
    return codes, key, hashed_level_distances(sizes), taken


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("sizes", CROWDED_SIZES)
def test_remap_at_length_l_matches_the_item_by_item_reference(sizes, seed):
    """Random crowded cases with registered IDs: the same IDs as the plain-Python reference, or both find
    an exhausted head. The reference chooses prefix and code item by item; semid chooses every prefix first."""
    codes, key, distances, taken = crowded_case(sizes, seed)
    n = len(codes)
    try:
        want = ref_remap_keep_length(codes, key, sizes, distances, taken)
    except LookupError as e:
        with pytest.raises(PrefixFullError) as got:
            remap_at_length(codes, key, sizes, distances, taken)
        assert got.value.codes == e.args[0]
        return
    ids = remap_at_length(codes, key, sizes, distances, taken)
    np.testing.assert_array_equal(ids, want)
    assert ids.shape == codes.shape and n_unique_rows(np.concatenate([ids, taken])) == n + len(taken)


def test_remap_at_length_l_covers_both_outcomes():
    """The premise of the test above: its cases spill into other prefixes, and some exhaust a head."""
    outcomes = []
    for sizes in CROWDED_SIZES:
        for seed in range(12):
            codes, key, distances, taken = crowded_case(sizes, seed)
            try:
                ids = ref_remap_keep_length(codes, key, sizes, distances, taken)
                outcomes.append("spilled" if (ids[:, :-1] != codes[:, :-1]).any() else "in prefix")
            except LookupError:
                outcomes.append("full")
    assert outcomes.count("spilled") >= 10 and outcomes.count("full") >= 3


def test_an_item_of_a_full_prefix_moves_to_the_nearest_prefix_by_its_level_distances():
    """Sizes (2, 4, 2): the prefix (0, 0) is full. Its level-1 distances rank the codes 3, 0, 1, 2."""
    def distances(rows, leading):
        if leading.shape[1] == 1:  # level 1: code 3 is nearest, then its own code 0 (full), then 1
            return np.tile([1.0, 2.0, 5.0, 0.5], (len(rows), 1))
        # last level: under the prefix (0, 3) code 0 is nearer, anywhere else code 1
        return np.array([[0.0, 1.0] if tuple(p) == (0, 3) else [1.0, 0.0] for p in leading.tolist()])

    taken = np.array([[0, 0, 0], [0, 0, 1], [0, 3, 1]])  # (0, 3) has code 0 free, so the first item goes there
    codes = np.array([[0, 0, 1], [0, 0, 0], [0, 0, 0]])
    ids = remap_at_length(codes, np.array([0.3, 0.1, 0.2]), (2, 4, 2), distances, taken)
    # By rank: row 1 takes (0, 3, 0); then row 2 finds (0, 3) full and takes (0, 1) (its own 0 is full),
    # code 1 there; row 0 then the other code of (0, 1).
    np.testing.assert_array_equal(ids, [[0, 1, 0], [0, 3, 0], [0, 1, 1]])


def test_remap_at_length_l_raises_by_name_where_the_head_is_full():
    """Sizes (3, 2, 2): 4 IDs start with each first code. The registry holds all of (1, ...)."""
    taken = np.array([[1, 0, 0], [1, 0, 1], [1, 1, 0], [1, 1, 1]])
    distances = hashed_level_distances((3, 2, 2))
    ids = remap_at_length(np.array([[1, 1, 0], [2, 1, 0]]), np.zeros(2), (3, 2, 2), distances, taken[:3])
    np.testing.assert_array_equal(ids, [[1, 1, 1], [2, 1, 0]])  # room for one under (1,)
    with pytest.raises(PrefixFullError, match=r"^collision strategy 'remap' keeps IDs at length 3, but all 4 IDs "
                       r"that start with the codes \(1,\) \(2 x 2 codes\) are taken; train a new model with "
                       r'collisions.strategy = "suffix" .*\(quantizer.codebook_size\)$') as e:
        remap_at_length(np.array([[1, 1, 0], [2, 1, 0]]), np.zeros(2), (3, 2, 2), distances, taken)
    assert isinstance(e.value, ValueError) and e.value.codes == (1,) and e.value.capacity == 4
    with pytest.raises(PrefixFullError, match=r"all 3 IDs \(3 codes\) are taken") as e:  # L = 1: the codebook
        remap_at_length(np.array([[0], [0]]), np.zeros(2), (3,), distances, np.array([[1], [2]]))
    assert e.value.codes == ()
    with pytest.raises(ValueError, match="needs level_distances"):
        resolve_collisions(np.array([[1, 0, 0]]), np.zeros(1), "remap", codebook_sizes=(3, 2, 2), taken=taken[:2],
                           keep_length=True, last_level_distances=lambda r: np.zeros((len(r), 2)))
    with pytest.raises(ValueError, match="keep_length applies to collision strategy 'remap'"):
        resolve_collisions(np.array([[1, 1, 0]]), np.zeros(1), "suffix", codebook_sizes=(3, 2, 2), keep_length=True)


@pytest.fixture(scope="module")
def full_prefixes(beauty) -> RealCodes:
    """4,000 items, sizes (4, 128, 16): 60 prefixes hold more than 16 items, no first code more than 2,048."""
    return quantize(beauty[:4000], (4, 128, 16))


def test_a_registry_of_length_l_moves_new_items_of_full_prefixes_to_nearby_prefixes(full_prefixes):
    """Real codes in two calls: every ID of length L, unique, old ones unchanged, as the reference says,
    and the same in a second run."""
    rc = full_prefixes
    codes, key, sizes = rc.codes, rc.rank_key, rc.sizes
    keys = np.array([f"item{i}" for i in range(len(codes))])
    a, b = np.arange(0, len(codes), 2), np.arange(1, len(codes), 2)
    _, per_prefix = np.unique(codes[:, :2], axis=0, return_counts=True)
    assert (per_prefix > sizes[-1]).sum() > 20 and np.unique(codes[:, 0], return_counts=True)[1].max() <= 128 * 16

    def run():
        reg = IdRegistry()
        out = []
        for rows in (a, b):
            out.append(reg.assign(keys[rows], codes[rows], key[rows], "remap", codebook_sizes=sizes,
                                  last_level_distances=lambda r, rows=rows: rc.last_level_distances(rows[r]),
                                  level_distances=lambda r, lead, rows=rows: rc.level_distances(rows[r], lead)))
        return reg, out

    reg, (ids_a, ids_b) = run()
    assert reg.id_length == 3 and ids_a.shape == (len(a), 3) and ids_b.shape == (len(b), 3)
    assert n_unique_rows(np.concatenate([ids_a, ids_b])) == len(codes)
    np.testing.assert_array_equal(reg.lookup(keys[a])[1], ids_a)  # the second call changed no old ID
    for rows, ids, taken in ((a, ids_a, None), (b, ids_b, ids_a)):
        want = ref_remap_keep_length(codes[rows], key[rows], sizes, lambda r, lead: rc.level_distances(rows[r], lead),
                                     taken)
        np.testing.assert_array_equal(ids, want)
    moved = (ids_b[:, :2] != codes[b, :2]).any(1)
    assert moved.sum() > 50 and (ids_b[:, 0] == codes[b, 0]).all()  # spilled items keep their first code
    _, (again_a, again_b) = run()
    np.testing.assert_array_equal(again_a, ids_a)
    np.testing.assert_array_equal(again_b, ids_b)


# ---------------------------------------------------------------- determinism, none, detection


@pytest.mark.parametrize("strategy", ["suffix", "remap"])
def test_shuffled_input_gives_each_item_the_same_id(crowded, strategy):
    codes, key = crowded.codes, crowded.rank_key
    assert len(np.unique(key)) == len(key)  # distinct ranks: the premise of the guarantee
    perm = np.random.default_rng(3).permutation(len(codes))
    kwargs = dict(codebook_sizes=crowded.sizes, suffix_size=4096)
    ids = resolve_collisions(codes, key, strategy, last_level_distances=crowded.last_level_distances, **kwargs)
    shuffled = resolve_collisions(
        codes[perm], key[perm], strategy, last_level_distances=lambda r: crowded.last_level_distances(perm[r]), **kwargs
    )
    np.testing.assert_array_equal(shuffled, ids[perm])


def test_none_leaves_codes_alone(crowded):
    ids = resolve_collisions(crowded.codes, crowded.rank_key, CollisionStrategy.NONE, codebook_sizes=crowded.sizes)
    np.testing.assert_array_equal(ids, crowded.codes)


def test_group_ids_agree_between_packed_and_rowwise_paths():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 3, (500, 3))
    packed = tuple_group_ids(codes, (3, 3, 3))
    rowwise = tuple_group_ids(codes, (2**40, 2**40, 3))  # product above int64: np.unique(axis=0)
    np.testing.assert_array_equal(packed, rowwise)
    same = (codes[:, None] == codes[None]).all(-1)
    np.testing.assert_array_equal(packed[:, None] == packed[None], same)


def test_bad_input_is_rejected_with_a_clear_message():
    codes = np.array([[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="level 1 fall outside"):
        resolve_collisions(codes, np.zeros(2), "suffix", codebook_sizes=[2, 2])
    with pytest.raises(ValueError, match="NaN"):
        resolve_collisions(codes, np.array([0.0, np.nan]), "suffix", codebook_sizes=[2, 3])
    with pytest.raises(ValueError, match="unknown collision strategy 'tiger'"):
        resolve_collisions(codes, np.zeros(2), "tiger", codebook_sizes=[2, 3])
    with pytest.raises(ValueError, match="one positive size per level"):
        resolve_collisions(codes, np.zeros(2), "suffix", codebook_sizes=[3])


# ---------------------------------------------------------------- polars group-by


def test_polars_groupby_suffix_agrees(crowded):
    codes = crowded.codes
    key = np.round(crowded.rank_key, 0)  # coarse keys create ties, which must go by row order
    assert len(np.unique(key)) < len(key) // 2
    cols = [f"c{j}" for j in range(codes.shape[1])]
    lf = pl.DataFrame({**{c: codes[:, j] for j, c in enumerate(cols)}, "dist": key}).lazy()
    got = suffix_by_groupby(lf, cols, "dist").collect()["suffix"].to_numpy()
    want = resolve_collisions(codes, key, "suffix", codebook_sizes=crowded.sizes, suffix_size=4096)[:, -1]
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- registry


@pytest.mark.parametrize("strategy", ["suffix", "remap"])
def test_registry_keeps_old_ids_and_gives_new_items_fresh_ones(crowded, strategy, tmp_path):
    codes, key = crowded.codes, crowded.rank_key
    keys = np.array([f"item{i}" for i in range(len(codes))], dtype=object)
    a, b = np.arange(0, len(codes), 2), np.arange(1, len(codes), 2)
    assert {tuple(r) for r in codes[b].tolist()} & {tuple(r) for r in codes[a].tolist()}  # B collides with A
    kwargs = dict(codebook_sizes=crowded.sizes, suffix_size=4096)
    reg = IdRegistry()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids_a = reg.assign(
            keys[a], codes[a], key[a], strategy, last_level_distances=lambda r: crowded.last_level_distances(a[r]),
            level_distances=lambda r, leading: crowded.level_distances(a[r], leading), **kwargs
        )
    assert n_unique_rows(ids_a) == len(a)
    # Remap too: 16 x 16 IDs under each first code cannot hold A's items, so the first call fixes length L + 1,
    # and says so: the README's remap IDs have length L.
    assert reg.id_length == 4
    said = [str(w.message) for w in caught if issubclass(w.category, IdLengthWarning)]
    if strategy == "remap":
        assert len(said) == 1 and "cannot keep IDs at 3 codes here: all 256 IDs that start with" in said[0]
    else:
        assert said == []
    # Batch B mixes 50 known items (with scrambled codes: their saved ID wins) and every new one.
    mixed = np.concatenate([a[:50], b])
    scrambled = codes[mixed].copy()
    scrambled[:50] = scrambled[:50][::-1]
    ids_b = reg.assign(
        keys[mixed],
        scrambled,
        key[mixed],
        strategy,
        last_level_distances=lambda r: crowded.last_level_distances(mixed[r]),
        level_distances=lambda r, leading: crowded.level_distances(mixed[r], leading),
        **kwargs,
    )
    np.testing.assert_array_equal(ids_b[:50], ids_a[:50])
    assert len(reg) == len(codes)
    known, ids_a_again = reg.lookup(keys[a])
    assert known.all()
    np.testing.assert_array_equal(ids_a_again, ids_a)
    assert n_unique_rows(np.concatenate([ids_a, ids_b[50:]])) == len(codes)

    path = reg.save(tmp_path / "reg" / "ids.parquet")
    assert [p.name for p in path.parent.iterdir()] == ["ids.parquet"]  # no temporary file left behind
    loaded = IdRegistry.load(path)
    assert loaded.to_frame().equals(reg.to_frame())
    assert loaded.id_length == reg.id_length
    known, ids = loaded.lookup(np.concatenate([keys[:3], ["never-seen"]]))
    np.testing.assert_array_equal(known, [True, True, True, False])
    np.testing.assert_array_equal(ids[3], -1)


def test_registry_keys_for_inverts_lookup_and_leaves_unknown_ids_null():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 4, (300, 3))  # 64 tuples for 300 items: suffixes up to about 10
    reg = IdRegistry()
    keys = np.array([f"item{i}" for i in range(len(codes))])
    ids = reg.assign(keys, codes, rng.random(len(codes)), "suffix", codebook_sizes=[4, 4, 4])
    order = rng.permutation(len(ids))
    unknown = np.array([[3, 3, 3, 999], [0, 0, 0, ids[:, 3].max() + 1]])  # a suffix no item reached
    found = reg.keys_for(np.concatenate([ids[order], unknown]))
    assert found.dtype == pl.String and len(found) == len(ids) + 2
    assert found[: len(ids)].to_list() == keys[order].tolist()
    assert found[len(ids) :].to_list() == [None, None]
    known, looked_up = reg.lookup(found[: len(ids)])
    np.testing.assert_array_equal(looked_up, ids[order])
    with pytest.raises(ValueError, match="3 tokens but this registry's IDs have 4"):
        reg.keys_for(codes)
    with pytest.raises(ValueError, match="2-D integer"):
        reg.keys_for(ids.astype(float))
    assert IdRegistry().keys_for(np.zeros((2, 3), int)).to_list() == [None, None]
    assert reg.keys_for(np.zeros((0, 0), int)).to_list() == [] == reg.keys_for([]).to_list()  # an empty batch
    with pytest.raises(ValueError, match="ids have 0 tokens"):  # two IDs of no tokens: not an empty batch
        reg.keys_for(np.zeros((2, 0), int))
    # the lookup table is kept between calls, and rebuilt when items are registered (or a provisional undone)
    fresh = np.array([[3, 3, 3]])
    with reg.provisional():
        new_id = reg.assign(["new"], fresh, np.zeros(1), "suffix", codebook_sizes=[4, 4, 4])
        assert reg.keys_for(new_id).to_list() == ["new"]
    assert reg.keys_for(new_id).to_list() == [None]
    reg.assign(["new"], fresh, np.zeros(1), "suffix", codebook_sizes=[4, 4, 4])
    assert reg.keys_for(new_id).to_list() == ["new"]


def test_registry_keys_for_names_the_first_registered_item_of_a_shared_id():
    reg = IdRegistry()
    reg.assign(["a", "b"], np.array([[1, 1], [1, 1]]), np.zeros(2), "none", codebook_sizes=[2, 2])
    reg.assign(["c"], np.array([[1, 1]]), np.zeros(1), "none", codebook_sizes=[2, 2])
    assert reg.keys_for(np.array([[1, 1], [0, 0], [1, 1]])).to_list() == ["a", None, "a"]


def test_registry_rejects_duplicate_keys():
    reg = IdRegistry()
    with pytest.raises(ValueError, match="'b' repeats"):
        reg.assign(["a", "b", "c", "b"], np.zeros((4, 2), int), np.zeros(4), "suffix", codebook_sizes=[2, 2])
    assert len(reg) == 0
    with pytest.raises(ValueError, match="strings"):
        reg.assign([1, 2], np.zeros((2, 2), int), np.zeros(2), "suffix", codebook_sizes=[2, 2])


def test_registry_keys_are_strings_and_a_callers_series_stays_as_it_was():
    reg = IdRegistry()
    keys = pl.Series("item_id", ["a", "b", "c"])
    reg.assign(keys, np.array([[0, 0], [0, 1], [1, 0]]), np.zeros(3), "suffix", codebook_sizes=[2, 2])
    reg.assign(np.array(["d", "a"]), np.array([[1, 1], [1, 1]]), np.zeros(2), "suffix", codebook_sizes=[2, 2])
    assert keys.to_list() == ["a", "b", "c"] and len(reg) == 4
    assert reg.to_frame()["key"].to_list() == ["a", "b", "c", "d"]
    known, ids = reg.lookup(pl.Series(["d", "zz", "a"]))
    np.testing.assert_array_equal(known, [True, False, True])
    np.testing.assert_array_equal(ids, [[1, 1, 0], [-1, -1, -1], [0, 0, 0]])
    for bad in (np.array([1, 2]), ["e", None], pl.Series([1, 2]), np.array([["e"], ["f"]])):
        with pytest.raises(ValueError, match="item keys must be"):
            reg.assign(bad, np.zeros((2, 2), int), np.zeros(2), "suffix", codebook_sizes=[2, 2])
    assert len(reg) == 4


def test_registry_id_length_rule():
    def remap(reg, keys, codes, rank_key):
        def far(rows, leading=None):  # code 1 is always nearer than code 0, at either level
            return np.tile([5.0, 0.0], (len(rows), 1))

        codes, rank_key = np.array(codes), np.array(rank_key)
        return reg.assign(keys, codes, rank_key, "remap", codebook_sizes=[2, 2], last_level_distances=far,
                          level_distances=far)

    # Remap: length L is fixed; a suffix would not fit later.
    reg = IdRegistry()
    ids = remap(reg, ["a", "b"], [[0, 0], [0, 0]], [0.1, 0.2])
    np.testing.assert_array_equal(ids, [[0, 0], [0, 1]])
    with pytest.raises(ValueError, match="needs IDs of length 3 here, but the IDs this registry handed out have "
                                         "length 2: keep the strategy they were given with"):
        reg.assign(["c"], np.array([[1, 0]]), np.zeros(1), "suffix", codebook_sizes=[2, 2])
    # The prefix 0 is full: c moves to prefix 1, at length L (this used to fail, asking for id_length=3).
    np.testing.assert_array_equal(remap(reg, ["c"], [[0, 1]], [0.0]), [[1, 1]])
    np.testing.assert_array_equal(remap(reg, ["d"], [[0, 0]], [0.0]), [[1, 0]])
    with pytest.raises(PrefixFullError, match=r"all 4 IDs \(2 x 2 codes\) are taken"):  # nothing left
        remap(reg, ["e"], [[1, 1]], [0.0])
    assert len(reg) == 4 and reg.id_length == 2
    # A first call keeps length L by the same rule; only where no IDs of length L suffice does it fix L + 1.
    reg = IdRegistry()
    np.testing.assert_array_equal(remap(reg, ["a", "b", "c"], [[0, 0]] * 3, [0.1, 0.2, 0.3]), [[0, 0], [0, 1], [1, 1]])
    reg = IdRegistry()
    ids = remap(reg, list("abcde"), [[0, 0]] * 5, [0.1, 0.2, 0.3, 0.4, 0.5])
    np.testing.assert_array_equal(ids, [[0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 2], [0, 0, 3]])  # the old fallback
    assert reg.id_length == 3
    # A registry made with room for a suffix stores remap IDs with suffix 0 and can fall back later.
    reg = IdRegistry(id_length=3)
    ids = remap(reg, ["a", "b"], [[0, 0], [0, 0]], [0.1, 0.2])
    np.testing.assert_array_equal(ids, [[0, 0, 0], [0, 1, 0]])
    ids = remap(reg, ["c", "d"], [[0, 1], [1, 1]], [0.0, 0.0])
    np.testing.assert_array_equal(ids, [[0, 1, 1], [1, 1, 0]])
    ids = reg.assign(["e"], np.array([[0, 0]]), np.zeros(1), "suffix", codebook_sizes=[2, 2])
    np.testing.assert_array_equal(ids, [[0, 0, 1]])


def test_a_registry_whose_content_changed_after_saving_is_refused(tmp_path):
    """Parquet readers do not check page checksums: a value changed inside its range (a flipped bit, an edit that
    kept the file's metadata) would silently give an item another ID. The saved digest catches it."""
    reg = IdRegistry()
    keys = np.array([f"item{i}" for i in range(50)], dtype=object)
    codes = np.arange(150).reshape(50, 3) % 7
    reg.assign(keys, codes, np.zeros(50), "suffix", codebook_sizes=[7, 7, 7])
    path = reg.save(tmp_path / "registry.parquet")
    assert IdRegistry.load(path).content_digest() == reg.content_digest()
    metadata = pl.read_parquet_metadata(path)
    frame = pl.read_parquet(path)
    ids = np.array(frame["id"].to_list())
    ids[3, 1] = (ids[3, 1] + 1) % 7  # still a valid code
    changed = frame.with_columns(pl.Series("id", ids.tolist()))
    changed.write_parquet(tmp_path / "changed.parquet", metadata=metadata)
    with pytest.raises(ValueError, match=r"changed.parquet: its content does not match the digest it was saved with"):
        IdRegistry.load(tmp_path / "changed.parquet")
    frame.with_columns(pl.Series("key", [f"item{i}" for i in range(49)] + ["other"])).write_parquet(
        tmp_path / "renamed.parquet", metadata=metadata)
    with pytest.raises(ValueError, match="does not match the digest"):
        IdRegistry.load(tmp_path / "renamed.parquet")
    frame.write_parquet(tmp_path / "older.parquet")  # an earlier semid's registry, without a digest: loads
    assert IdRegistry.load(tmp_path / "older.parquet").content_digest() == reg.content_digest()


def test_the_registry_is_still_found_where_it_used_to_live():
    import semid.collisions

    assert semid.collisions.IdRegistry is IdRegistry  # moved to semid.registry
    with pytest.raises(AttributeError, match="has no attribute 'Registry'"):
        semid.collisions.Registry  # noqa: B018
