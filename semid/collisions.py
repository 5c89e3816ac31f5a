"""Collision resolution: raw codes -> final IDs that no two items share.

semid guarantees that no two items share a final semantic ID and that an item's ID never changes
once given, even when new items are encoded later. Raw codes (one per quantizer level) cannot promise
either: similar items land on the same tuple. This module turns raw codes into final IDs:

* `suffix` (TIGER): append the item's rank within its group of identical tuples (alone -> 0).
* `remap`: the best-ranked item of a group keeps its tuple; the others move to the nearest unused
  code of the last level within the same prefix, so IDs keep length L. Where a prefix is full, the
  items that found no free code move to the nearest prefix (level L-1 code) that has one, keeping
  length L (keep_length, what the registry asks for); or, where IDs have room for a suffix, keep their
  tuple and get a suffix, and where that tuple has no suffix left either, the nearest code of the
  prefix that has one (see `resolve_collisions`).
* `none`: leave the codes as they are (collisions are only reported by the metrics).

Ranking is always by `rank_key` (the item's distance to its codeword reconstruction, lower first)
and then by row order, which makes every result deterministic and independent of how items are
shuffled when the keys are distinct. Group detection is sort-based (np.unique on one packed int64
key per tuple), O(N log N); only remap's greedy choices loop, and only over colliding items.

`semid.registry.IdRegistry` remembers every assigned ID by item key and resolves new items here, against all
saved IDs.

The algorithms are numpy only, so that training (which uses remapping for its uniqueness loss) runs where
polars is not installed; only `suffix_by_groupby`, for polars callers, imports it.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import polars as pl

_INT64_MAX = np.iinfo(np.int64).max

# Remap asks for last-level distances in blocks of at most this many entries (64 MiB of float32).
_MAX_DISTANCE_ELEMENTS = 1 << 24

LastLevelDistances = Callable[[np.ndarray], np.ndarray]
# (rows, their leading codes (len(rows), l)) -> (len(rows), K_l): see `resolve_collisions`.
LevelDistances = Callable[[np.ndarray, np.ndarray], np.ndarray]


class CollisionStrategy(str, Enum):
    """How items that share a code tuple are told apart (see the module docstring)."""

    SUFFIX = "suffix"
    REMAP = "remap"
    NONE = "none"


def _strategy(strategy: CollisionStrategy | str) -> CollisionStrategy:
    try:
        return CollisionStrategy(strategy)
    except ValueError:
        choices = ", ".join(repr(s.value) for s in CollisionStrategy)
        raise ValueError(f"unknown collision strategy {strategy!r}; choose one of {choices}") from None


def tuple_group_ids(codes: np.ndarray, codebook_sizes: Sequence[int]) -> np.ndarray:
    """Dense group index per row (n,): two rows get the same index iff their code tuples are equal.

    The tuple is packed into one int64 (mixed-radix over the codebook sizes) when the product of the
    sizes fits, which makes np.unique a 1-D sort; otherwise np.unique(axis=0) compares rows.
    Codes must already be validated to lie in [0, size) per level.
    """
    n, levels = codes.shape
    if levels == 0:
        return np.zeros(n, dtype=np.int64)
    packed = _packed_rows(codes, codebook_sizes)
    if packed is not None:
        _, inverse = np.unique(packed, return_inverse=True)
    else:
        _, inverse = np.unique(codes, axis=0, return_inverse=True)
    return inverse.reshape(-1).astype(np.int64, copy=False)


def _packed_rows(rows: np.ndarray, limits: Sequence[int]) -> np.ndarray | None:
    """(n,) int64 keys of (n, m) rows whose column j holds values in [0, limits[j]): mixed radix over the
    limits, so that equal rows get equal keys and a 1-D sort compares rows. None where the keys would not fit
    in an int64."""
    if math.prod(int(k) for k in limits) > _INT64_MAX:
        return None
    strides = np.cumprod([1, *[int(k) for k in limits[:0:-1]]])[::-1].astype(np.int64)  # (m,)
    return rows @ strides


def _two_equal_rows(rows: np.ndarray, limits: Sequence[int]) -> tuple[int, int] | None:
    """Indices of two equal rows of an (n, m) matrix whose column j holds values in [0, limits[j]), or None.

    One sort of the rows packed into int64 keys where their ranges allow it (4M IDs of 3 x 256 codes and a
    suffix: 0.3 s), else a lexicographic sort of the rows; only a repeat found is then located.
    """
    if len(rows) < 2:
        return None
    keys = _packed_rows(rows, limits)
    if keys is not None:
        order = np.argsort(keys, kind="stable")
        repeats = np.flatnonzero(keys[order[1:]] == keys[order[:-1]])
    else:
        order = np.lexsort(rows.T[::-1])
        repeats = np.flatnonzero((rows[order[1:]] == rows[order[:-1]]).all(axis=1))
    if not repeats.size:
        return None
    return int(order[repeats[0]]), int(order[repeats[0] + 1])


def _rank_in_group(group: np.ndarray, rank_key: np.ndarray) -> np.ndarray:
    """Rank (0-based) of each row within its group, by rank_key then row order."""
    n = group.shape[0]
    order = np.lexsort((rank_key, group))  # lexsort is stable, so equal keys stay in row order
    g_sorted = group[order]
    run_start = np.ones(n, dtype=bool)
    run_start[1:] = g_sorted[1:] != g_sorted[:-1]
    first = np.flatnonzero(run_start)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - first[np.cumsum(run_start) - 1]
    return rank


def _free_slots(group: np.ndarray, rank: np.ndarray, taken_group: np.ndarray, taken_slot: np.ndarray) -> np.ndarray:
    """For a row of rank r in group g: the r-th smallest non-negative integer not taken in group g.

    With the distinct taken slots of a group sorted, t_0 < t_1 < ..., a_j = t_j - j counts the free
    integers below t_j and never decreases; the r-th free integer is r + #{j : a_j <= r}. That count
    is one searchsorted over (group, a) packed into int64, so the whole assignment is vectorised.
    """
    if taken_group.size == 0:
        return rank.copy()
    width = int(taken_slot.max()) + 1
    t_group, t_slot = np.divmod(np.unique(taken_group * width + taken_slot), width)  # distinct, by group then slot
    a = t_slot - _rank_in_group(t_group, t_slot)
    span = int(a.max()) + 2  # packed value of a rank is clipped below span, above every a
    packed = t_group * span + a  # ascending: groups sorted, a non-decreasing within a group
    hi = np.searchsorted(packed, group * span + np.minimum(rank, span - 1), side="right")
    lo = np.searchsorted(packed, group * span, side="left")
    return rank + (hi - lo)


class SuffixOverflowError(ValueError):
    """More items share a code tuple than the suffix vocabulary (suffix_size) can number."""

    def __init__(self, message: str, *, size: int, codes: tuple[int, ...], suffix_size: int) -> None:
        super().__init__(message)
        self.size, self.codes, self.suffix_size = size, codes, suffix_size


class PrefixFullError(ValueError):
    """Remap keeps IDs at length L, and every such ID that starts with an item's first L - 2 codes is taken."""

    def __init__(self, message: str, *, codes: tuple[int, ...], capacity: int) -> None:
        super().__init__(message)
        self.codes, self.capacity = codes, capacity


def _prefix_full(codes: tuple[int, ...], sizes: Sequence[int]) -> PrefixFullError:
    """The error for IDs of length L that start with `codes` all being taken, with advice for a CLI user."""
    levels, rest = len(sizes), [int(k) for k in sizes[len(codes):]]
    capacity = math.prod(rest)
    where = f" that start with the codes {codes}" if codes else ""
    return PrefixFullError(
        f"collision strategy 'remap' keeps IDs at length {levels}, but all {capacity} IDs{where} "
        f"({' x '.join(map(str, rest))} codes) are taken; train a new model with collisions.strategy = \"suffix\" "
        f"(IDs of length {levels + 1}, numbering the items of a tuple) or with more codes (quantizer.codebook_size)",
        codes=codes, capacity=capacity,
    )


class SuffixOverflowWarning(UserWarning):
    """Items beyond the suffix vocabulary of their tuple were remapped instead (overflow="remap")."""


class IdLengthWarning(UserWarning):
    """Collision strategy "remap" could not keep IDs at length L, and a registry's IDs get a suffix (L + 1)."""


def _largest_overflow(
    slots: np.ndarray, group: np.ndarray, taken_group: np.ndarray, codes: np.ndarray
) -> tuple[int, tuple[int, ...], int]:
    """(items on the tuple, the tuple, how many of them hold an ID already) for the row with the largest slot."""
    worst = int(np.argmax(slots))
    registered = int(np.count_nonzero(taken_group == group[worst]))
    return int(np.count_nonzero(group == group[worst])) + registered, tuple(codes[worst].tolist()), registered


def _check_suffix_bound(
    slots: np.ndarray, group: np.ndarray, taken_group: np.ndarray, codes: np.ndarray, suffix_size: int
) -> None:
    """Raise SuffixOverflowError if any suffix would not fit in the suffix vocabulary."""
    if slots.size == 0 or slots.max() < suffix_size:
        return
    size, tuple_, registered = _largest_overflow(slots, group, taken_group, codes)
    note = f" ({registered} of them already holding an ID)" if registered else ""
    raise SuffixOverflowError(
        f"{size} items share the code tuple {tuple_}{note}, but suffix_size={suffix_size} allows only "
        f"{suffix_size} IDs per tuple; use collision strategy 'remap' or a larger suffix size",
        size=size, codes=tuple_, suffix_size=suffix_size,
    )


def _validate(
    codes: np.ndarray, rank_key: np.ndarray, codebook_sizes: Sequence[int], suffix_size: int, taken: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check shapes and ranges; return int64 codes, float64 rank keys and taken IDs as (m, L + 1)."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be a 2-D matrix (items x levels), got shape {codes.shape}")
    if codes.size and not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
    codes = codes.astype(np.int64, copy=False)
    n, levels = codes.shape
    sizes = np.asarray([int(k) for k in codebook_sizes], dtype=np.int64)
    if sizes.shape != (levels,) or (sizes < 1).any():
        raise ValueError(f"codebook_sizes must give one positive size per level ({levels}), got {list(codebook_sizes)}")
    rank_key = np.asarray(rank_key, dtype=np.float64)
    if rank_key.shape != (n,):
        raise ValueError(f"rank_key must have one value per item, shape ({n},), got {rank_key.shape}")
    if not np.isfinite(rank_key).all():
        raise ValueError("rank_key contains NaN or infinite values")
    if suffix_size < 1:
        raise ValueError(f"suffix_size must be at least 1, got {suffix_size}")
    if taken is None:
        taken = np.zeros((0, levels + 1), dtype=np.int64)
    taken = np.asarray(taken)
    if taken.ndim != 2 or taken.shape[1] not in (levels, levels + 1):
        raise ValueError(f"taken IDs must have {levels} or {levels + 1} columns, got shape {taken.shape}")
    taken = taken.astype(np.int64, copy=False)
    if taken.shape[1] == levels:  # an unsuffixed ID is the tuple with suffix 0
        taken = np.column_stack([taken, np.zeros(len(taken), dtype=np.int64)])
    for name, mat in (("codes", codes), ("taken IDs", taken[:, :levels])):
        if mat.size and ((mat < 0).any() or (mat >= sizes).any()):
            level = int(np.flatnonzero(((mat < 0) | (mat >= sizes)).any(axis=0))[0])
            raise ValueError(f"{name} at level {level} fall outside [0, {sizes[level]}) (the codebook size)")
    if taken.size and (taken[:, levels] < 0).any():
        raise ValueError("taken IDs have a negative suffix")
    return codes, rank_key, taken


def resolve_collisions(
    codes: np.ndarray,
    rank_key: np.ndarray,
    strategy: CollisionStrategy | str,
    *,
    codebook_sizes: Sequence[int],
    suffix_size: int = 256,
    last_level_distances: LastLevelDistances | None = None,
    taken: np.ndarray | None = None,
    overflow: str = "raise",
    keep_length: bool = False,
    level_distances: LevelDistances | None = None,
) -> np.ndarray:
    """Final IDs for raw codes (n, L), unique among themselves and against `taken`.

    rank_key (n,): each item's distance to its codeword reconstruction; lower ranks first, ties by
    row order. taken (m, L) or (m, L + 1): IDs already given out (an L-column row is its tuple with
    suffix 0); they are never reused.

    suffix -> (n, L + 1). The last column is the item's rank among the items of its tuple; with
    `taken`, the new items of a tuple take the smallest suffixes not yet taken for it, best rank first.
    A tuple needing a suffix >= suffix_size raises SuffixOverflowError (a ValueError); with
    overflow="remap" the items ranked beyond the bound are instead remapped as below (nearest free code
    of the last level in their prefix, then suffix 0), with a SuffixOverflowWarning that names the
    largest tuple; every other item keeps its suffix. Only where their prefix is full does it still raise.

    remap -> (n, L) when every collision finds room. Colliding items (all but the best-ranked of a
    group, and all items whose tuple is already taken) claim, best rank_key first, the nearest code of
    the last level whose full tuple no item of this call or of `taken` has.
    `last_level_distances(rows)` must return, as a numpy array, the (len(rows), K_last) distances from
    those rows' last residual to the last codebook; it is called for the colliding rows only, in
    blocks that keep each answer under 2**24 entries. If a prefix is full, the items left without a
    code keep their tuple and the result is (n, L + 1): suffix 0 for every other item, and for these
    the smallest free suffixes of their tuple (1, 2, ... when nothing is registered), below suffix_size.
    Items that find none below it take the smallest free suffix of the nearest last-level code of their
    prefix that has one, so a prefix holds up to K_last * suffix_size IDs; only a prefix that holds
    them all raises SuffixOverflowError.
    With keep_length=True, remap always returns (n, L): the items left without a code in their full
    prefix move to the nearest prefix that has one, under the same first L - 2 codes (see
    `_spill_to_neighbour_prefixes`), and only where all of those are full does it raise PrefixFullError (a
    ValueError). That needs `level_distances(rows, codes)`: for codes (len(rows), l), l < L, the
    (len(rows), K_l) distances at level l from the residual those leading codes leave (with the prefix
    centre at the last level, as decoding them would), asked for the moving rows only.

    none -> the codes unchanged (n, L).
    """
    strategy = _strategy(strategy)
    if overflow not in ("raise", "remap"):
        raise ValueError(f"overflow must be 'raise' or 'remap', got {overflow!r}")
    if keep_length and strategy is CollisionStrategy.SUFFIX:
        raise ValueError("keep_length applies to collision strategy 'remap'; 'suffix' always appends a suffix")
    codes, rank_key, taken = _validate(codes, rank_key, codebook_sizes, suffix_size, taken)
    if strategy is CollisionStrategy.NONE:
        return codes.copy()
    if strategy is CollisionStrategy.SUFFIX:
        return _suffix(codes, rank_key, codebook_sizes, suffix_size, taken, overflow, last_level_distances)
    return _remap(codes, rank_key, codebook_sizes, suffix_size, last_level_distances, taken, keep_length,
                  level_distances)


def _suffix(
    codes: np.ndarray,
    rank_key: np.ndarray,
    sizes: Sequence[int],
    suffix_size: int,
    taken: np.ndarray,
    overflow: str,
    last_level_distances: LastLevelDistances | None,
) -> np.ndarray:
    """The suffix strategy; overflow="remap" remaps the items beyond the suffix bound (see
    `resolve_collisions`) instead of raising."""
    n, levels = codes.shape
    group = tuple_group_ids(np.concatenate([codes, taken[:, :levels]]), sizes)
    new_group, taken_group = group[:n], group[n:]
    rank = _rank_in_group(new_group, rank_key)
    # Registered suffixes at or above suffix_size cannot block a valid one; clipping keeps packing small.
    slots = _free_slots(new_group, rank, taken_group, np.minimum(taken[:, levels], suffix_size))
    over = slots >= suffix_size
    if overflow == "raise" or not over.any():
        _check_suffix_bound(slots, new_group, taken_group, codes, suffix_size)
        return np.column_stack([codes, slots])
    if last_level_distances is None:
        raise ValueError("overflow='remap' needs last_level_distances to choose the nearest free code")
    size, tuple_, _ = _largest_overflow(slots, new_group, taken_group, codes)
    warnings.warn(SuffixOverflowWarning(
        f"{size} items share the code tuple {tuple_}, more than suffix_size={suffix_size} can number; over all "
        f"such crowded tuples, the {int(over.sum())} items ranked beyond the suffix bound move to the nearest free "
        "last-level code of their prefix, as collision strategy 'remap' does. Set the collision strategy to "
        "'remap' or the suffix size above the largest tuple to choose yourself (collisions.strategy, "
        "collisions.suffix_size)."
    ))
    ids = np.column_stack([codes, slots])
    ids[over] = _remap_overflow(ids, over, rank_key, sizes, suffix_size, last_level_distances, taken)
    return ids


def _remap_overflow(
    ids: np.ndarray,
    over: np.ndarray,
    rank_key: np.ndarray,
    sizes: Sequence[int],
    suffix_size: int,
    last_level_distances: LastLevelDistances,
    taken: np.ndarray,
) -> np.ndarray:
    """(n_over, L + 1) IDs for the rows `over` of suffixed `ids`: remap against every other ID in use."""
    rows = np.flatnonzero(over)
    blocked = np.concatenate([taken, ids[~over]])  # the other new items keep their IDs: nobody may take them
    moved = _remap(ids[rows, :-1], rank_key[rows], sizes, suffix_size, lambda r: last_level_distances(rows[r]), blocked)
    return moved if moved.shape[1] == ids.shape[1] else np.column_stack([moved, np.zeros(len(rows), np.int64)])


def _remap(
    codes: np.ndarray,
    rank_key: np.ndarray,
    sizes: Sequence[int],
    suffix_size: int,
    last_level_distances: LastLevelDistances | None,
    taken: np.ndarray,
    keep_length: bool = False,
    level_distances: LevelDistances | None = None,
) -> np.ndarray:
    n, levels = codes.shape
    k_last = int(sizes[-1])
    tuples = np.concatenate([codes, taken[:, :levels]])  # (n + m, L): every tuple in use
    group = tuple_group_ids(tuples, sizes)
    new_group, taken_group = group[:n], group[n:]
    rank = _rank_in_group(new_group, rank_key)
    registered = np.zeros(int(group.max(initial=-1)) + 1, dtype=bool)
    registered[taken_group] = True
    movers = np.flatnonzero((rank > 0) | registered[new_group])
    if movers.size == 0:
        return codes.copy()
    movers = movers[np.lexsort((movers, rank_key[movers]))]  # best rank key first, then row order
    if last_level_distances is None:
        raise ValueError("collision strategy 'remap' needs last_level_distances to choose the nearest free code")

    # used[p, c]: the tuple (prefix p, code c) is taken, for the prefixes that movers live in.
    prefix = tuple_group_ids(tuples[:, :-1], sizes[:-1])  # (n + m,)
    touched, mover_slot = np.unique(prefix[movers], return_inverse=True)
    pos, hit = _positions(touched, prefix)
    used = np.zeros((touched.size, k_last), dtype=bool)
    used[pos[hit], tuples[hit, -1]] = True

    final = codes.copy()
    code = _claim_nearest_free(movers, mover_slot.reshape(-1), used, last_level_distances)
    final[movers[code >= 0], -1] = code[code >= 0]
    fallback = np.zeros(n, dtype=bool)
    fallback[movers[code < 0]] = True
    if not fallback.any():
        return final
    if keep_length:
        _spill_to_neighbour_prefixes(final, np.flatnonzero(fallback), rank_key, taken[:, :levels], sizes,
                                     level_distances)
        return final

    # Fallback items keep their tuple; every other new item holds suffix 0 of its (final) tuple.
    group = tuple_group_ids(np.concatenate([final, taken[:, :levels]]), sizes)
    new_group, taken_group = group[:n], group[n:]
    blocked_group = np.concatenate([taken_group, new_group[~fallback]])
    blocked_slot = np.concatenate([np.minimum(taken[:, levels], suffix_size), np.zeros((~fallback).sum(), np.int64)])
    fb_group = new_group[fallback]
    slots = _free_slots(fb_group, _rank_in_group(fb_group, rank_key[fallback]), blocked_group, blocked_slot)
    suffix = np.zeros(n, dtype=np.int64)
    suffix[fallback] = slots
    ids = np.column_stack([final, suffix])
    spill = np.flatnonzero(fallback)[slots >= suffix_size]
    if spill.size:
        _spill_to_neighbour_tuples(ids, spill, rank_key, prefix[:n], taken, prefix[n:], suffix_size,
                                   last_level_distances, k_last)
    return ids


def _positions(sorted_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position in sorted_keys, found) for each of keys: which rows of a table over sorted_keys they own."""
    pos = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
    return pos, sorted_keys[pos] == keys


def _claim_nearest_free(
    rows: np.ndarray, slots: np.ndarray, used: np.ndarray, distances: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """For `rows` in this order, claim in used[slot] (one bool row of codes per prefix) the free code nearest
    by distances(rows) (len(rows), K); returns the codes, -1 where the prefix had none left.

    Greedy and sequential by nature, so it loops over the rows that move only; the distances are asked for
    in blocks that keep each answer under _MAX_DISTANCE_ELEMENTS entries.
    """
    k = used.shape[1]
    codes = np.full(rows.size, -1, dtype=np.int64)
    chunk = max(1, _MAX_DISTANCE_ELEMENTS // k)
    for lo in range(0, rows.size, chunk):
        block = rows[lo : lo + chunk]
        for j, slot, row_dist in zip(range(lo, lo + block.size), slots[lo : lo + chunk],
                                     _block_distances(distances, block, k)):
            free = np.flatnonzero(~used[slot])
            if free.size:
                codes[j] = free[np.argmin(row_dist[free])]  # argmin keeps the lowest code among equal distances
                used[slot, codes[j]] = True
    return codes


def _spill_to_neighbour_prefixes(
    ids: np.ndarray,
    spill: np.ndarray,
    rank_key: np.ndarray,
    taken: np.ndarray,
    sizes: Sequence[int],
    level_distances: LevelDistances | None,
) -> None:
    """Give the rows `spill` of `ids` (n, L), whose prefix has no free last code, the nearest tuple that no
    other row of `ids` nor of `taken` (m, L) holds (in place).

    A suffix would make the ID longer than a registry of length L holds, so the item changes one level
    higher instead, the least it can while keeping its first L - 2 codes: its level L-1 code becomes the
    nearest one, by its distance at that level, whose prefix still has a free last code, and there it
    takes the free last code nearest to the residual that prefix leaves, so the ID decodes as close to the
    item as the free tuples allow. The items that found a code in their own prefix chose first; these
    follow, best rank key first, then row order. Which prefix an item gets depends only on how many codes
    each prefix has left, so every item's prefix is chosen first and the last codes are then claimed as
    in the prefix's own remap. Raises PrefixFullError where every tuple under an item's first L - 2 codes
    (for L = 1, the codebook) is taken.
    """
    n, levels = ids.shape
    spill = spill[np.lexsort((spill, rank_key[spill]))]
    if levels == 1:
        raise _prefix_full((), sizes)
    if level_distances is None:
        raise ValueError("collision strategy 'remap' needs level_distances to move an item whose prefix is full "
                         "to the nearest prefix with a free code")
    k_prev, k_last = int(sizes[-2]), int(sizes[-1])
    staying = np.ones(n, dtype=bool)
    staying[spill] = False
    tuples = np.concatenate([ids[staying], taken])  # every tuple in use
    # A prefix is (slot of its first L - 2 codes among the spilled items', level L-1 code), packed.
    head = tuple_group_ids(np.concatenate([ids[spill, :-2], tuples[:, :-2]]), sizes[:-2])
    touched, spill_slot = np.unique(head[: spill.size], return_inverse=True)
    pos, hit = _positions(touched, head[spill.size :])
    # (prefix, last code) pairs in use, once each (taken may list a tuple with several suffixes)
    in_use = np.unique(np.column_stack([pos[hit] * k_prev + tuples[hit, -2], tuples[hit, -1]]), axis=0)
    n_used = np.bincount(in_use[:, 0], minlength=touched.size * k_prev)  # (prefix,) codes taken

    chosen = np.empty(spill.size, dtype=np.int64)  # each item's new prefix
    chunk = max(1, _MAX_DISTANCE_ELEMENTS // k_prev)
    for lo in range(0, spill.size, chunk):
        block = spill[lo : lo + chunk]
        dist = _block_distances(lambda rows: level_distances(rows, ids[rows, :-2]), block, k_prev)
        for j, slot, order in zip(range(lo, lo + block.size), spill_slot.reshape(-1)[lo : lo + chunk],
                                  np.argsort(dist, axis=1, kind="stable")):  # nearest first, lowest code on ties
            room = slot * k_prev + order[n_used[slot * k_prev + order] < k_last]
            if room.size == 0:
                raise _prefix_full(tuple(ids[spill[j], :-2].tolist()), sizes)
            chosen[j] = room[0]
            n_used[room[0]] += 1
    ids[spill, -2] = chosen % k_prev
    prefixes, prefix_slot = np.unique(chosen, return_inverse=True)
    pos, hit = _positions(prefixes, in_use[:, 0])
    used = np.zeros((prefixes.size, k_last), dtype=bool)
    used[pos[hit], in_use[hit, 1]] = True
    ids[spill, -1] = _claim_nearest_free(spill, prefix_slot.reshape(-1), used,
                                         lambda rows: level_distances(rows, ids[rows, :-1]))


def _spill_to_neighbour_tuples(
    ids: np.ndarray,
    spill: np.ndarray,
    rank_key: np.ndarray,
    prefix: np.ndarray,
    taken: np.ndarray,
    taken_prefix: np.ndarray,
    suffix_size: int,
    last_level_distances: LastLevelDistances,
    k_last: int,
) -> None:
    """Give the rows `spill` of `ids`, whose own tuple has no suffix below suffix_size left, the smallest
    free suffix of the nearest last-level code of their prefix that still has one (in place).

    A prefix then holds up to k_last * suffix_size IDs rather than failing when one tuple is shared by more
    items than suffix_size (hundreds of near-identical items do that). Best rank key first, then row order,
    as everywhere. Raises SuffixOverflowError only when the whole prefix is full.
    """
    levels = taken.shape[1] - 1
    spill = spill[np.lexsort((spill, rank_key[spill]))]
    crowded = np.unique(prefix[spill])
    is_spill = np.zeros(len(ids), dtype=bool)
    is_spill[spill] = True
    occupied: dict[tuple[int, int], set[int]] = {}  # (prefix, last code) -> suffixes in use
    lowest_free: dict[tuple[int, int], int] = {}  # only grows, as suffixes are only ever added
    for table, table_prefix, rows in ((ids, prefix, np.flatnonzero(np.isin(prefix, crowded) & ~is_spill)),
                                      (taken, taken_prefix, np.flatnonzero(np.isin(taken_prefix, crowded)))):
        for p, code, suffix in zip(table_prefix[rows].tolist(), table[rows, levels - 1].tolist(),
                                   table[rows, levels].tolist()):
            occupied.setdefault((p, code), set()).add(suffix)
    chunk = max(1, _MAX_DISTANCE_ELEMENTS // k_last)
    for lo in range(0, spill.size, chunk):
        block = spill[lo : lo + chunk]
        for row, row_dist in zip(block.tolist(), _block_distances(last_level_distances, block, k_last)):
            for code in np.argsort(row_dist, kind="stable").tolist():  # nearest first, lowest code on ties
                tuple_key = (int(prefix[row]), code)
                used = occupied.setdefault(tuple_key, set())
                free = lowest_free.get(tuple_key, 0)
                while free in used:
                    free += 1
                lowest_free[tuple_key] = free
                if free < suffix_size:
                    used.add(free)
                    ids[row, levels - 1], ids[row, levels] = code, free
                    break
            else:
                tuple_ = tuple(ids[row, : levels - 1].tolist())
                raise SuffixOverflowError(
                    f"the prefix {tuple_} is full: each of its {k_last} last-level codes already numbers "
                    f"suffix_size={suffix_size} items; use a larger suffix size (collisions.suffix_size) or more codes",
                    size=k_last * suffix_size, codes=tuple_, suffix_size=suffix_size,
                )


def _block_distances(distances: Callable[[np.ndarray], np.ndarray], rows: np.ndarray, k: int) -> np.ndarray:
    """Ask the caller for the distances of some rows at one level and check the answer's shape."""
    dist = np.asarray(distances(rows))
    if dist.shape != (rows.size, k):
        raise ValueError(
            f"a distance callback returned shape {dist.shape}, expected ({rows.size}, {k}) "
            "(one row per requested item, one column per code of the level)"
        )
    return dist


def suffix_by_groupby(
    lf: pl.LazyFrame, code_cols: Sequence[str], rank_col: str, *, suffix_col: str = "suffix"
) -> pl.LazyFrame:
    """Add the `suffix` strategy's suffix to a (possibly streamed or sharded) lazy frame of codes.

    One global window over the code columns: the suffix is the ordinal rank of rank_col within the
    tuple, minus one; "ordinal" breaks ties by row order, exactly like `resolve_collisions`. rank_col
    must hold no nulls or NaNs. It knows no registry, and the caller checks the largest suffix
    against its suffix size after collecting.
    """
    import polars as pl

    rank = pl.col(rank_col).rank(method="ordinal").over(list(code_cols))
    return lf.with_columns((rank.cast(pl.Int64) - 1).alias(suffix_col))


def __getattr__(name: str) -> Any:
    # IdRegistry lived here before semid.registry; code that imports it from here still finds it
    if name == "IdRegistry":
        from semid.registry import IdRegistry

        return IdRegistry
    raise AttributeError(f"module 'semid.collisions' has no attribute {name!r}")
