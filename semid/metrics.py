"""Quality metrics for semantic IDs, exactly as the Metrics section of README.md defines them.

Every function is pure: it reads its inputs and returns plain Python numbers and lists, so reports can
go straight to JSON. Inputs may be numpy arrays or torch tensors; they are converted at the boundary.
Reconstruction and counting metrics run in numpy (float64, so sums over millions of items stay exact
enough); the nearest-neighbour search behind `prefix_agreement` runs in torch on the input's device,
because it is the one metric whose cost grows as N^2.

Notation: x (N, D) inputs, x_hat (N, D) reconstructions, codes (N, L) the code tuples
before collision handling, final_ids (N, L or L + 1) the IDs after it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Sequence
from os import PathLike
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

# Query rows per chunk in `prefix_agreement` are chosen so one chunk's (rows, N) similarity matrix holds
# at most this many floats (256 MiB in fp32): the N x N matrix is never built at once. A smaller chunk makes
# the matrix product too thin to run at full speed: 50,000 queries into 500k items took 251 s at 64 MiB
# (33 rows a chunk) and 173 s at 128 rows on a 2-core CPU.
_MAX_CHUNK_ELEMENTS = 1 << 26
# Entries per row block of the numpy metrics (`_row_slices`).
_BLOCK_ELEMENTS = 1 << 22

ArrayLike = Any  # numpy array, torch tensor, or anything np.asarray accepts


# ----------------------------------------------------------------------------------------------------
# Input validation (one place, so every metric rejects bad input with the same clear message)
# ----------------------------------------------------------------------------------------------------
def _to_numpy(a: ArrayLike) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach()
        if a.is_floating_point():
            a = a.float()  # bfloat16 / half have no exact numpy counterpart everywhere
        return a.cpu().numpy()
    return np.asarray(a)


def _check_matrix_shape(shape: tuple[int, ...], name: str) -> None:
    if len(shape) != 2:
        raise ValueError(f"{name} must be a 2-D matrix (N, ...), got shape {tuple(shape)}")
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(shape)}); metrics need at least one item")


def _float_matrix(a: ArrayLike, name: str, dtype: type[np.floating] | None = np.float64) -> np.ndarray:
    """Validated (N, D) float matrix of the given dtype (float64 by default, for exact sums); dtype=None keeps
    a float matrix's own dtype (integers become float64), so a large float32 catalogue is not copied."""
    arr = _to_numpy(a)
    _check_matrix_shape(arr.shape, name)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must hold numbers, got dtype {arr.dtype}")
    if dtype is None:
        dtype = arr.dtype.type if np.issubdtype(arr.dtype, np.floating) else np.float64
    arr = arr.astype(dtype, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _row_slices(n: int, d: int) -> list[slice]:
    """Row slices of an (n, d) matrix of at most _BLOCK_ELEMENTS entries each: the float64 temporaries of a
    metric over a large catalogue stay a few tens of MB instead of several copies of the catalogue."""
    rows = max(1, _BLOCK_ELEMENTS // d)
    return [slice(lo, lo + rows) for lo in range(0, n, rows)]


def _code_matrix(codes: ArrayLike, name: str = "codes") -> np.ndarray:
    """Validated int64 (N, L) code matrix."""
    arr = _to_numpy(codes)
    if arr.ndim == 1:
        raise ValueError(f"{name} must be 2-D (N, L); for a single level pass codes[:, None]")
    _check_matrix_shape(arr.shape, name)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer codes, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_same_items(n: int, other: np.ndarray | torch.Tensor, name: str, what: str = "x") -> None:
    if other.shape[0] != n:
        raise ValueError(f"{name} has {other.shape[0]} rows but {what} has {n}; they must describe the same items")


# ----------------------------------------------------------------------------------------------------
# Reconstruction
# ----------------------------------------------------------------------------------------------------
def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """cos(a_i, b_i) per row; a zero-length row has cosine 0 (no direction to agree with), never NaN."""
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)  # (n,)
    dots = np.einsum("nd,nd->n", a, b)  # (n,)
    return np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)


def reconstruction_metrics(x: ArrayLike, x_hat: ArrayLike) -> dict[str, float]:
    """`mse`, `fvu` and `cosine` of a reconstruction x_hat of x (both (N, D)).

    fvu is undefined when every x_i is the same point (zero total variance, e.g. N = 1); it is then
    returned as NaN rather than raising, so the other metrics of a report stay available.
    """
    x_np = _float_matrix(x, "x", dtype=None)
    x_hat_np = _float_matrix(x_hat, "x_hat", dtype=None)
    if x_hat_np.shape != x_np.shape:
        raise ValueError(f"x_hat has shape {x_hat_np.shape} but x has shape {x_np.shape}; they must match")
    n, d = x_np.shape
    mean = x_np.mean(axis=0, dtype=np.float64)  # (d,)
    sse = total = cosine_sum = 0.0
    for rows in _row_slices(n, d):  # float64 sums, one block of rows at a time
        a, b = x_np[rows].astype(np.float64), x_hat_np[rows].astype(np.float64)
        sse += float(np.square(a - b).sum())
        total += float(np.square(a - mean).sum())
        cosine_sum += float(_row_cosine(a, b).sum())
    return {
        "mse": sse / (n * d),
        "fvu": sse / total if total > 0 else float("nan"),
        "cosine": cosine_sum / n,
    }


# Above this share of the variance in the top 1% of items a catalogue is heavy-tailed (text embeddings:
# 0.013 to 0.027; Beauty's collaborative factors 0.60).
HEAVY_TAIL_SHARE = 0.2


def squared_from_mean(x: ArrayLike, centred: bool = True) -> np.ndarray:
    """(n,) squared distance of each row to the mean row (each row's part of the catalogue's variance), or
    with centred=False its squared norm.

    An input diagnostic (`top_share`, `outlier_rows`): in text embeddings the top 1% of items hold 1 to 3% of
    the variance, but in collaborative factors, whose norms grow with popularity, 60% (bench/VARIANTS.md), and
    fvu is then decided by a few items. Rows are taken in blocks, so a catalogue is never copied whole.
    """
    x = _float_matrix(x, "x", dtype=np.float32)
    mean = x.mean(axis=0, dtype=np.float64) if centred else 0.0
    return np.concatenate([np.square(x[rows] - mean).sum(axis=1) for rows in _row_slices(*x.shape)])


# Collaborative factors reach 106x the median row's norm (Beauty's item factors), text embeddings 2x; a row
# 1,000x longer than the median is on another scale than the rest, such as one never normalised as they were.
OUTLIER_NORM_RATIO = 1000.0


def outlier_rows(squared_norms: np.ndarray) -> np.ndarray:
    """Rows (indices) over OUTLIER_NORM_RATIO times as long as the median row, given their squared norms
    (`squared_from_mean(x, centred=False)`: norms, as a mean that such rows pull along would hide them)."""
    median = float(np.median(squared_norms))
    if median == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(squared_norms > OUTLIER_NORM_RATIO**2 * median)


def top_share(squared: np.ndarray, fraction: float = 0.01) -> float:
    """Share of sum(squared) that its largest `fraction` of entries hold (0 when the sum is 0)."""
    total = squared.sum()
    if total == 0:
        return 0.0
    top = max(1, math.ceil(fraction * len(squared)))
    return float(np.partition(squared, len(squared) - top)[-top:].sum() / total)


def is_heavy_tailed(share: float, n_items: int) -> bool:
    """Whether a catalogue whose top 1% of items hold `share` of the variance is heavy-tailed: above
    HEAVY_TAIL_SHARE, judged from 100 items on. Below 100 the "top 1%" is one item, more than 1% of them, and
    one of 5 random items holds 29% of their variance."""
    return n_items >= 100 and share > HEAVY_TAIL_SHARE


# ----------------------------------------------------------------------------------------------------
# Collisions and codebooks
# ----------------------------------------------------------------------------------------------------
def _row_group_counts(codes: np.ndarray) -> np.ndarray:
    """Size of each group of identical rows (one entry per distinct row), in O(N log N).

    Rows are packed into one int64 key (mixed radix over each column's value range) when the ranges
    allow it, which makes the sort a plain 1-D sort; otherwise np.unique(axis=0) sorts the rows.
    """
    lows = codes.min(axis=0)
    spans = [int(hi) - int(lo) + 1 for lo, hi in zip(lows, codes.max(axis=0))]
    if math.prod(spans) > np.iinfo(np.int64).max:
        _, counts = np.unique(codes, axis=0, return_counts=True)
        return counts
    key = np.zeros(codes.shape[0], dtype=np.int64)
    for j, span in enumerate(spans):
        key = key * span + (codes[:, j] - lows[j])
    _, counts = np.unique(key, return_counts=True)
    return counts


def collision_metrics(codes: ArrayLike) -> dict[str, float | int]:
    """`collision_rate` (1 - U/N), `colliding_items` (share of items in a group of size > 1), `max_group`."""
    codes_np = _code_matrix(codes)
    n = codes_np.shape[0]
    counts = _row_group_counts(codes_np)
    return {
        "collision_rate": float(1.0 - counts.size / n),
        "colliding_items": float(counts[counts > 1].sum() / n),
        "max_group": int(counts.max()),
    }


def duplicate_rate(x: ArrayLike) -> float:
    """1 - distinct rows of x / N: the share of items whose embedding repeats an earlier item's exactly.

    It is the floor of `collision_rate` for any codes that depend only on each item's embedding (two
    identical rows always get the same tuple), so a report shows how much of a collision rate the data
    forces: ml-100k's 1.07% is all duplicates, and the 29k-item mixed catalogue of bench/VARIANTS.md
    cannot go below 4.9%. Rows are compared bytewise after folding -0.0 into 0.0.
    """
    sizes = duplicate_group_sizes(x)
    return float(1.0 - sizes.size / sizes.sum())


def duplicate_group_sizes(x: ArrayLike) -> np.ndarray:
    """How many items hold each distinct embedding (rows compared bytewise, -0.0 folded into 0.0): (groups,)."""
    x_np = _float_matrix(x, "x", dtype=None)  # compared as stored
    x_np = np.ascontiguousarray(x_np + x_np.dtype.type(0))  # a copy, -0.0 folded
    rows = x_np.view(np.dtype((np.void, x_np.dtype.itemsize * x_np.shape[1]))).ravel()  # one opaque key per row
    return np.unique(rows, return_counts=True)[1]


def _level_sizes(codebook_sizes: Sequence[int] | int, levels: int) -> list[int]:
    """One codebook size per level; a single int means the same K at every level (as in the config)."""
    sizes = [int(codebook_sizes)] * levels if isinstance(codebook_sizes, (int, np.integer)) else list(codebook_sizes)
    if len(sizes) != levels:
        raise ValueError(f"codebook_sizes has {len(sizes)} entries but codes have {levels} levels")
    if any(k < 1 for k in sizes):
        raise ValueError(f"codebook sizes must be positive, got {sizes}")
    return [int(k) for k in sizes]


def codebook_metrics(codes: ArrayLike, codebook_sizes: Sequence[int] | int) -> dict[str, list[float]]:
    """Per level: `usage` (share of the K codes used by at least one item) and `entropy_bits`.

    Entropy is -sum p log2 p over the level's code frequencies; its maximum log2 K means every code is
    used equally often.
    """
    codes_np = _code_matrix(codes)
    n, levels = codes_np.shape
    sizes = _level_sizes(codebook_sizes, levels)
    usage, entropy = [], []
    for level, k in enumerate(sizes):
        column = codes_np[:, level]
        if column.min() < 0 or column.max() >= k:
            raise ValueError(
                f"codes at level {level + 1} must lie in [0, {k}), found values in [{column.min()}, {column.max()}]"
            )
        counts = np.bincount(column, minlength=k)  # (k,)
        p = counts[counts > 0] / n
        usage.append(float(p.size / k))
        entropy.append(float(-(p * np.log2(p)).sum()) + 0.0)  # + 0.0: one code gives 0.0, not -0.0
    return {"usage": usage, "entropy_bits": entropy}


# ----------------------------------------------------------------------------------------------------
# Semantic agreement
# ----------------------------------------------------------------------------------------------------
def _prefix_match(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Element [..., d] is true where the first d + 1 codes of a and b are all equal."""
    if isinstance(a, torch.Tensor):
        return torch.cummin((a == b).to(torch.uint8), dim=-1).values.bool()
    return np.logical_and.accumulate(a == b, axis=-1)


def sample_queries(n: int, max_items: int, seed: int) -> np.ndarray | None:
    """The query items `prefix_agreement` uses when n > max_items, sorted; None when it uses all items.

    Public so that a report's sample can be reproduced: it is
    `np.sort(np.random.default_rng(seed).choice(n, max_items, replace=False))`.
    """
    if n <= max_items:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=max_items, replace=False))


@dataclass
class Neighbours:
    """Each query item's k nearest other items by cosine in input space.

    The input never changes during training, so the trainer searches once and scores every evaluation's
    codes against the same neighbours.
    """

    queries: torch.Tensor  # (q,) int64 item rows
    indices: torch.Tensor  # (q, k) int64 neighbour rows
    sampled: bool  # True when only a seeded sample of the items are queries


def nearest_neighbours(
    x: ArrayLike, *, k: int = 10, max_items: int = 50_000, seed: int = 0, device: str | torch.device | None = None,
    queries: ArrayLike | None = None, progress: bool = False,
) -> Neighbours:
    """k-NN by cosine (excluding the item itself) for every item, or a seeded sample when N > max_items.

    `queries` (row indices) searches for those items only, e.g. the items a model was not fitted on.
    Neighbours are searched among all N items. With N <= k every item uses its N - 1 other items; N = 1 has
    no neighbours and raises ValueError. An all-zero row has cosine 0 to everything, never NaN. Runs on
    `device`, by default x's device when x is a tensor, else the CPU; fp32 similarities in row chunks
    (never a full N x N matrix). Its cost is queries x N x D: minutes on a laptop CPU for 50,000 queries
    into 500k items, hence the optional progress bar.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if max_items < 1:
        raise ValueError(f"max_items must be at least 1, got {max_items}")
    if device is None:
        device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    x_t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.require(_float_matrix(x, "x", np.float32), requirements="W"))
    _check_matrix_shape(tuple(x_t.shape), "x")
    x_t = x_t.to(device=device, dtype=torch.float32)
    if not torch.isfinite(x_t).all():
        raise ValueError("x contains NaN or infinite values")
    n = x_t.shape[0]
    if n < 2:
        raise ValueError("prefix_agreement needs at least 2 items: a single item has no neighbours")
    k_eff = min(k, n - 1)
    sample = sample_queries(n, max_items, seed) if queries is None else np.asarray(queries, dtype=np.int64)
    if queries is not None and (sample.ndim != 1 or not ((0 <= sample) & (sample < n)).all()):
        raise ValueError(f"queries must be a 1-D array of row indices in [0, {n})")
    queries = torch.arange(n, device=device) if sample is None else torch.from_numpy(sample).to(device)
    # Normalised once here rather than per chunk (as semid.distance would): for large N the repeated
    # (N, D) normalisation would cost as much as the chunk's matrix product. Zero rows stay zero.
    unit = F.normalize(x_t, dim=1)  # (n, d)
    chunk_rows = max(1, _MAX_CHUNK_ELEMENTS // n)
    found = []
    bar = tqdm(total=queries.numel(), disable=not progress, desc="neighbours", unit="item")
    for start in range(0, queries.numel(), chunk_rows):
        rows = queries[start : start + chunk_rows]  # (q,)
        with torch.autocast(device_type=unit.device.type, enabled=False):  # fp32 even inside a caller's autocast
            sim = unit[rows] @ unit.T  # (q, n): cosine
        sim[torch.arange(rows.numel(), device=device), rows] = -float("inf")  # an item is not its own neighbour
        found.append(sim.topk(k_eff, dim=1).indices)  # (q, k)
        bar.update(rows.numel())
    bar.close()
    return Neighbours(queries, torch.cat(found) if found else queries.new_empty(0, k_eff), sample is not None)


def prefix_agreement_from_neighbours(codes: ArrayLike, neighbours: Neighbours) -> list[float]:
    """Share of each query item's neighbours whose first d codes equal its own, averaged, for d = 1..L."""
    device = neighbours.indices.device
    codes_t = torch.from_numpy(np.require(_code_matrix(codes), requirements="W")).to(device)
    own = codes_t[neighbours.queries].unsqueeze(1)  # (q, 1, l)
    match = _prefix_match(codes_t[neighbours.indices], own)  # (q, k, l)
    return match.to(torch.float64).mean(dim=(0, 1)).tolist()


def prefix_agreement(
    x: ArrayLike,
    codes: ArrayLike,
    *,
    k: int = 10,
    max_items: int = 50_000,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> tuple[list[float], bool]:
    """Share of each item's k nearest other items (cosine, input space) that share its first d codes.

    Returns (values for d = 1..L, sampled). When N > max_items only a seeded sample of max_items query
    items (see `sample_queries`) is averaged, but their neighbours are still searched among all N items;
    `sampled` says whether that happened. See `nearest_neighbours` for the search itself.
    """
    n = x.shape[0] if hasattr(x, "shape") else len(x)
    _check_same_items(n, codes if isinstance(codes, (np.ndarray, torch.Tensor)) else np.asarray(codes), "codes")
    neighbours = nearest_neighbours(x, k=k, max_items=max_items, seed=seed, device=device, progress=progress)
    return prefix_agreement_from_neighbours(codes, neighbours), neighbours.sampled


def sequence_prefix_agreement(final_or_codes: ArrayLike, sequences: Sequence[np.ndarray]) -> list[float]:
    """Share of consecutive item pairs in users' sequences whose IDs share their first d codes.

    d runs over all columns given (1..L): pass codes, or final_ids[:, :L] to ignore a suffix token.
    A sequence is the time-ordered 0-based rows of one user's items; pairs never cross users. An item
    followed by itself counts as a pair (and agrees). Raises ValueError when there is no pair at all.
    """
    ids = _code_matrix(final_or_codes, "final_or_codes")
    seqs = [seq for seq in (_to_numpy(s).reshape(-1) for s in sequences) if seq.size]
    if not seqs:
        raise ValueError("sequences hold no consecutive item pairs (all sequences are empty)")
    lengths = np.array([s.size for s in seqs], dtype=np.int64)
    rows = np.concatenate(seqs)
    if not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"sequences must hold integer row numbers, got dtype {rows.dtype}")
    if rows.min() < 0 or rows.max() >= ids.shape[0]:
        raise ValueError(
            f"sequences refer to rows in [{rows.min()}, {rows.max()}] but there are {ids.shape[0]} items"
        )
    # Pair p joins rows[p] and rows[p + 1]; it is invalid where rows[p] ends one user's sequence.
    valid = np.ones(rows.size - 1, dtype=bool)
    ends = np.cumsum(lengths) - 1
    valid[ends[:-1]] = False
    if not valid.any():
        raise ValueError("sequences hold no consecutive item pairs (every sequence has fewer than 2 items)")
    match = _prefix_match(ids[rows[:-1][valid]], ids[rows[1:][valid]])  # (pairs, l)
    return match.mean(axis=0).tolist()


def read_sequences(path: str | PathLike[str]) -> list[np.ndarray]:
    """Users' item sequences from a text file with one user per line: `user<TAB>row row ...`.

    Rows are 0-based row numbers of the embedding matrix, in time order. Blank lines are skipped; a
    user with no rows gets an empty sequence.
    """
    sequences = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            user, sep, rest = line.rstrip("\n").partition("\t")
            if not sep:
                raise ValueError(f"{path}:{line_no}: expected 'user<TAB>row row ...', found no tab")
            try:
                rows = np.array(rest.split(), dtype=np.int64)
            except ValueError:
                raise ValueError(f"{path}:{line_no}: rows of user {user!r} must be integers") from None
            if rows.size and rows.min() < 0:
                raise ValueError(f"{path}:{line_no}: rows of user {user!r} must be non-negative")
            sequences.append(rows)
    return sequences


# ----------------------------------------------------------------------------------------------------
# Full report
# ----------------------------------------------------------------------------------------------------
def evaluate_codes(
    x: ArrayLike,
    x_hat: ArrayLike,
    codes: ArrayLike,
    codebook_sizes: Sequence[int] | int,
    *,
    final_ids: ArrayLike | None = None,
    sequences: Sequence[np.ndarray] | None = None,
    max_items: int = 50_000,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Every metric of the README's Metrics section in one JSON-ready dict, plus `n_items` and
    `prefix_agreement_sampled`.

    codes are the tuples before collision handling; final_ids the IDs after it (defaults to codes, as
    with the `none` strategy). `sequence_prefix_agreement` is computed on the first L columns of the
    final IDs and is present only when sequences are given. `device` and `progress` are those of the
    neighbour search behind prefix_agreement, the one metric whose cost grows as N^2. For a single
    item, fvu and prefix_agreement are NaN (undefined) and the rest of the report stands.
    """
    codes_np = _code_matrix(codes)
    n, levels = codes_np.shape
    final_np = codes_np if final_ids is None else _code_matrix(final_ids, "final_ids")
    _check_same_items(n, final_np, "final_ids", "codes")
    if final_np.shape[1] < levels:
        raise ValueError(f"final_ids have {final_np.shape[1]} columns but codes have {levels} levels")

    recon = reconstruction_metrics(x, x_hat)
    if n < 2:  # a single item has no neighbours: undefined, like its fvu, rather than failing the report
        agreement, sampled = [float("nan")] * levels, False
    else:
        agreement, sampled = prefix_agreement(x, codes_np, max_items=max_items, seed=seed, device=device,
                                              progress=progress)
    report: dict[str, Any] = {
        "n_items": n,
        **recon,
        **collision_metrics(codes_np),
        "duplicate_rate": duplicate_rate(x),
        **codebook_metrics(codes_np, codebook_sizes),
        "prefix_agreement": agreement,
        "prefix_agreement_sampled": sampled,
        "unique_after": float(_row_group_counts(final_np).size / n),
        "id_length": int(final_np.shape[1]),
    }
    if sequences is not None:
        report["sequence_prefix_agreement"] = sequence_prefix_agreement(final_np[:, :levels], sequences)
    return report


_LABELS = {
    "n_items": "items",
    "mse": "mse",
    "fvu": "fvu (fraction of variance unexplained)",
    "cosine": "cosine(x, x_hat)",
    "collision_rate": "collision_rate (1 - unique/N)",
    "duplicate_rate": "duplicate_rate (collision floor)",
    "colliding_items": "colliding_items",
    "max_group": "max_group",
    "usage": "usage",
    "entropy_bits": "entropy_bits",
    "prefix_agreement": "prefix_agreement (10-NN)",
    "unique_after": "unique_after",
    "id_length": "id_length",
    "sequence_prefix_agreement": "sequence_prefix_agreement",
}
_SECTIONS = {
    "reconstruction": ("mse", "fvu", "cosine"),
    "codes (before collision handling)": (
        "collision_rate", "duplicate_rate", "colliding_items", "max_group", "usage", "entropy_bits",
    ),
    "semantics": ("prefix_agreement", "sequence_prefix_agreement"),
    "final IDs": ("unique_after", "id_length"),
}


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4f}"
    if isinstance(value, (list, tuple)):
        return "  ".join(f"L{i} {_format_value(v)}" for i, v in enumerate(value, start=1))
    return str(value)


def format_report(report: dict[str, Any]) -> str:
    """A readable, aligned text table of an `evaluate_codes` report (missing keys are left out).

    Lists are shown per level ("L1 0.9980  L2 ..."); keys the table does not know go last under
    "other", so nothing in the report is hidden.
    """
    known = {key for keys in _SECTIONS.values() for key in keys} | {"n_items", "prefix_agreement_sampled"}
    sections = dict(_SECTIONS)
    extra = tuple(key for key in report if key not in known)
    if extra:
        sections["other"] = extra
    shown = [key for keys in sections.values() for key in keys if key in report]
    width = max((len(_LABELS.get(key, key)) for key in shown), default=0)

    lines = ["semid evaluation" + (f" ({_format_value(report['n_items'])} items)" if "n_items" in report else "")]
    for title, keys in sections.items():
        present = [key for key in keys if key in report]
        if not present:
            continue
        lines.append(title)
        lines.extend(f"  {_LABELS.get(key, key):<{width}}  {_format_value(report[key])}" for key in present)
    if report.get("prefix_agreement_sampled"):
        lines.append("note: prefix_agreement was computed on a seeded sample of the items, not all of them")
    return "\n".join(lines)
