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

# Rows per chunk are chosen so that one chunk's (rows, K) distance matrix holds at most this many
# floats (64 MiB): large enough to keep the GPU busy, small enough for a laptop.
_MAX_CHUNK_ELEMENTS = 1 << 24


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


def nearest_code(
    x: torch.Tensor, codebook: torch.Tensor, distance: Distance | str, chunk_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest codeword for each row of x, and the distance to it.

    Returns (codes: int64 (N,), dist: fp32 (N,)). Ties go to the lowest index, so results do not
    depend on the chunk size.
    """
    n, k = x.shape[0], codebook.shape[0]
    if chunk_rows is None:
        chunk_rows = max(1, _MAX_CHUNK_ELEMENTS // max(k, 1))
    codes = torch.empty(n, dtype=torch.long, device=x.device)
    dists = torch.empty(n, dtype=torch.float32, device=x.device)
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        d = pairwise_distance(x[start:stop], codebook, distance)
        dists[start:stop], codes[start:stop] = d.min(dim=-1)
    return codes, dists
