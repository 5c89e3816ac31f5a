"""Distances between vectors and codewords, and the nearest codeword.

Every caller that needs "which codeword is closest" (quantizer, k-means, collision remap, evaluation)
goes through `nearest_code`, so the choice of distance and the precision it runs in live in one place.
Distances are always computed in fp32 from a matrix product, never as an (N, K, D) difference tensor,
and in row chunks so that peak memory stays bounded for large N x K.
"""
from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F

# Rows per chunk are chosen so that one chunk's (rows, K) score matrix holds at most this many floats
# (64 MiB): large enough to keep the GPU busy, small enough for a laptop.
_MAX_CHUNK_ELEMENTS = 1 << 24
# F.normalize's floor on a norm: a zero vector has no direction and is treated as one of length _EPS.
_EPS = 1e-12


class Distance(str, Enum):
    """How closeness to a codeword is measured.

    L2 is squared Euclidean distance. COSINE is negative cosine similarity: only the direction of the
    input picks the code (see `semid.quantize` for how residual magnitudes are kept).
    """

    L2 = "l2"
    COSINE = "cosine"


def pairwise_distance(x: torch.Tensor, codebook: torch.Tensor, distance: Distance | str) -> torch.Tensor:
    """Distance from every row of x (N, D) to every codeword (K, D), as an fp32 (N, K) matrix."""
    distance = Distance(distance)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x32, c32 = x.float(), codebook.float()
        if distance is Distance.COSINE:
            return -(F.normalize(x32, dim=-1) @ F.normalize(c32, dim=-1).T)
        x_sq = x32.pow(2).sum(-1, keepdim=True)
        c_sq = c32.pow(2).sum(-1)
        # addmm computes x_sq + c_sq - 2 x c^T in one kernel; clamp removes tiny negative round-off.
        return torch.addmm(x_sq + c_sq, x32, c32.T, alpha=-2.0).clamp_min_(0.0)


def score_terms(codebook: torch.Tensor, distance: Distance) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(D, K) matrix and optional (K,) bias such that x @ matrix + bias is largest at x's nearest codeword.

    The scores leave out what is the same for every codeword of a row: |x|^2 for l2 (|x - c|^2 =
    |x|^2 - 2 (x.c - |c|^2 / 2)) and the positive factor 1/|x| for cosine. So the inputs are never
    normalised or squared just to choose a code, and the choice does not lose the precision that adding
    a large |x|^2 to every score would cost.
    """
    c32 = codebook.float()
    if distance is Distance.COSINE:
        return F.normalize(c32, dim=-1).T, None
    return c32.T, c32.pow(2).sum(-1).mul_(-0.5)


def _scores(x32: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(n, K) fp32 scores of every row against every codeword: one matrix product (with the bias fused)."""
    return x32 @ matrix if bias is None else torch.addmm(bias, x32, matrix)


def _row_max_(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest value of each row and the lowest index that holds it. Overwrites `scores`.

    On CPU, torch's argmax over a dimension is far slower than amax (15x on (2048, 256) fp32 here); for
    codes of a 32-d latent it cost more than the matrix product itself. So the lowest index is found with
    passes as fast as amax instead: mark every maximum with 1 (eq_), weight the marks by K-1-index and
    take the largest weight. Inputs are finite (the readers refuse NaN and inf).
    """
    best = scores.amax(dim=-1, keepdim=True)  # (n, 1)
    if scores.device.type != "cpu":
        return best.squeeze(-1), scores.argmax(dim=-1)
    k = scores.shape[-1]
    weight = torch.arange(k - 1, -1, -1, dtype=scores.dtype, device=scores.device)  # (K,) exact below 2^24
    marks = scores.eq_(best).mul_(weight)  # (n, K): K-1-index at every maximum, 0 elsewhere
    return best.squeeze(-1), (k - 1) - marks.amax(dim=-1).long()


def _distance_from_score(x32: torch.Tensor, score: torch.Tensor, distance: Distance) -> torch.Tensor:
    """Put back the per-row term `score_terms` left out: the distance to the chosen codeword, (n,)."""
    if distance is Distance.COSINE:
        return -score / x32.norm(dim=-1).clamp_min(_EPS)
    # Clamp: |x|^2 - 2 x.c + |c|^2 can round to a tiny negative number when x sits on a codeword.
    return (x32.pow(2).sum(-1) - 2.0 * score).clamp_min_(0.0)


def nearest_code(
    x: torch.Tensor, codebook: torch.Tensor, distance: Distance | str, chunk_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest codeword for each row of x, and the distance to it (as `pairwise_distance`).

    Returns (codes: int64 (N,), dist: fp32 (N,)), without gradient: the choice is discrete. Ties go to the
    lowest index, so results do not depend on the chunk size.
    """
    distance = Distance(distance)
    x, codebook = x.detach(), codebook.detach()
    n, k = x.shape[0], codebook.shape[0]
    if chunk_rows is None:
        chunk_rows = max(1, _MAX_CHUNK_ELEMENTS // max(k, 1))
    codes = torch.empty(n, dtype=torch.long, device=x.device)
    dists = torch.empty(n, dtype=torch.float32, device=x.device)
    with torch.autocast(device_type=x.device.type, enabled=False):
        matrix, bias = score_terms(codebook, distance)
        for start in range(0, n, chunk_rows):
            stop = min(n, start + chunk_rows)
            x32 = x[start:stop].float()
            score, codes[start:stop] = _row_max_(_scores(x32, matrix, bias))
            dists[start:stop] = _distance_from_score(x32, score, distance)
    return codes, dists
