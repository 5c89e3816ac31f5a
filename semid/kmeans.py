"""k-means in torch for codebook initialisation, and balanced (Sinkhorn) assignment.

Everything runs on the device of the input tensor, so initialising a codebook on the GPU does not
round-trip through the CPU. Random draws come from the caller's `torch.Generator` (on its own device)
and are then moved to the data's device, so a CPU generator with a fixed seed gives the same draws
whatever device the data lives on.

Per-point cost. For "l2" it is the squared Euclidean distance. For "cosine" it is 1 - cos(x, c),
which is half the squared distance between unit vectors: spherical k-means minimises it with unit
centroids, and it is non-negative, so k-means++ can sample proportionally to it and the relative
inertia improvement is well defined. (`semid.distance` reports -cos; the constant shift does not change
which codeword is nearest.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from semid.distance import Distance, nearest_code, pairwise_distance

# Seed used when the caller passes no generator: k-means results are then reproducible by default.
_DEFAULT_SEED = 0


@dataclass
class KMeansResult:
    """Outcome of `kmeans`.

    centroids: (k, d) fp32 on the input's device (unit rows for cosine).
    inertia: sum over the rows used of the per-point cost to their centroid (see module docstring).
    codes: (n_used,) int64 centroid index of each row used, in the order of the rows used. With
        sampling these are the sampled rows, in increasing original row order.
    """

    centroids: torch.Tensor
    inertia: float
    codes: torch.Tensor


def kmeans_plusplus(
    x: torch.Tensor, k: int, generator: torch.Generator, distance: Distance | str = "l2"
) -> torch.Tensor:
    """Greedy k-means++ seeds: k rows of x, as an fp32 (k, d) tensor on x's device.

    Each step draws 2 + log(k) candidates with probability proportional to their current cost
    (D² sampling for l2) and keeps the one that lowers the total cost most. The extra candidates
    make the seeding less sensitive to one unlucky draw, which lowers the final inertia.
    Rows are returned as they are in x (not normalised for cosine).
    """
    distance = Distance(distance)
    x = _check_data(x, k)
    n = x.shape[0]
    n_trials = 2 + int(math.log(k))
    seeds = torch.empty(k, x.shape[1], dtype=torch.float32, device=x.device)

    first = torch.randint(n, (1,), generator=generator, device=generator.device).item()
    seeds[0] = x[first]
    closest = _cost(x, seeds[:1], distance).squeeze(1)  # (n,)
    for j in range(1, k):
        candidates = _sample_proportional(closest, n_trials, generator)  # (trials,)
        cand_cost = torch.minimum(closest[:, None], _cost(x, x[candidates], distance))  # (n, trials)
        best = cand_cost.sum(dim=0).argmin()
        seeds[j] = x[candidates[best]]
        closest = cand_cost[:, best]
    return seeds


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    iters: int = 25,
    distance: Distance | str = "l2",
    sample_size: int | None = 65536,
    generator: torch.Generator | None = None,
    tol: float = 1e-4,
) -> KMeansResult:
    """Cluster the rows of x (n, d) into k groups: k-means++ seeding, then Lloyd iterations.

    When n > sample_size, k-means runs on a random sample of sample_size rows drawn with `generator`
    (None: all rows). `iters` bounds the Lloyd updates; iteration stops early once an update lowers
    the inertia by less than `tol` times its previous value. generator=None uses a fixed seed, so the
    result is reproducible. Raises ValueError when there are fewer rows than clusters.
    For cosine, rows are normalised and centroids stay unit length (spherical k-means).
    """
    distance = Distance(distance)
    x = _check_data(x, k)
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if generator is None:
        generator = torch.Generator().manual_seed(_DEFAULT_SEED)
    n = x.shape[0]
    if sample_size is not None:
        if sample_size < k:
            raise ValueError(f"sample_size ({sample_size}) must be at least k ({k})")
        if n > sample_size:
            rows = torch.randperm(n, generator=generator, device=generator.device)[:sample_size]
            x = x[rows.sort().values.to(x.device)]
    if distance is Distance.COSINE:
        x = F.normalize(x, dim=-1)
    seeds = kmeans_plusplus(x, k, generator, distance)
    return _lloyd(x, seeds, iters=iters, distance=distance, tol=tol)


def sinkhorn_assign(cost: torch.Tensor, *, epsilon: float = 0.05, iters: int = 50) -> torch.Tensor:
    """Balanced assignment of n items to K codes from a cost matrix (n, K); returns (n,) int64 codes.

    Solves entropic optimal transport between uniform mass over items and uniform mass over codes
    (each code receives n/K), in the log domain so that small epsilon cannot overflow, then gives each
    item the code with the largest entry in its row of the transport plan.

    epsilon is scale-free. Adding a constant to a row or to a column of the cost does not change the
    plan (the marginals absorb it), so the cost is double-centred and divided by the standard
    deviation of what remains: epsilon is in units of the spread of the part of the cost that
    actually decides the assignment, whatever the units of the cost. For squared distances that part
    is -2 <x_i - mean x, c_j - mean c>.

    Convergence slows as epsilon shrinks, so epsilon is annealed geometrically from 1 down to
    `epsilon` over the first half of the iterations (each stage warm-starts the next).
    """
    if cost.ndim != 2 or cost.shape[0] == 0 or cost.shape[1] == 0:
        raise ValueError(f"cost must be a non-empty (n, K) matrix, got shape {tuple(cost.shape)}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if not torch.isfinite(cost).all():
        raise ValueError("cost contains NaN or infinite values")
    n, n_codes = cost.shape
    with torch.autocast(device_type=cost.device.type, enabled=False):
        c = _standardise_cost(cost.float())  # (n, K)
        log_item_mass = -math.log(n)
        log_code_mass = -math.log(n_codes)
        # Dual potentials in cost units: plan_ij = exp((f_i + g_j - c_ij) / eps).
        f = torch.zeros(n, dtype=torch.float32, device=cost.device)
        g = torch.zeros(n_codes, dtype=torch.float32, device=cost.device)
        for eps in _epsilon_schedule(epsilon, iters):
            f = eps * (log_item_mass - torch.logsumexp((g[None, :] - c) / eps, dim=1))
            g = eps * (log_code_mass - torch.logsumexp((f[:, None] - c) / eps, dim=0))
        # f_i is constant along a row, so the row's largest plan entry is the largest g_j - c_ij.
        return (g[None, :] - c).argmax(dim=1)


def _standardise_cost(c: torch.Tensor) -> torch.Tensor:
    """Double-centred cost (n, K) with unit standard deviation (all zeros if it has no spread)."""
    # Bring values to at most 1 first, so sums and squares below cannot overflow fp32.
    peak = c.abs().amax()
    c = c / torch.where(peak > 0, peak, torch.ones_like(peak))
    c = c - c.mean(dim=1, keepdim=True)
    c = c - c.mean(dim=0, keepdim=True)
    spread = c.std(correction=0)
    return c / torch.where(spread > 0, spread, torch.ones_like(spread))


def _epsilon_schedule(epsilon: float, iters: int) -> list[float]:
    """Geometric decay from max(1, epsilon) to epsilon over the first half of iters, then constant."""
    start = max(1.0, epsilon)
    decay_steps = max(1, iters // 2)
    ratio = (epsilon / start) ** (1.0 / decay_steps)
    decay = [max(epsilon, start * ratio**t) for t in range(1, decay_steps + 1)]
    return decay + [epsilon] * (iters - decay_steps)


def _lloyd(
    x: torch.Tensor, centroids: torch.Tensor, *, iters: int, distance: Distance | str, tol: float
) -> KMeansResult:
    """Lloyd iterations from given centroids (k, d). The returned codes and inertia belong to the
    returned centroids. For cosine, x must already be unit rows."""
    distance = Distance(distance)
    centroids = centroids.float().clone()
    if distance is Distance.COSINE:
        centroids = F.normalize(centroids, dim=-1)
    codes, point_cost = _assign(x, centroids, distance)
    inertia = point_cost.double().sum().item()
    for _ in range(iters):
        centroids = _update(x, codes, centroids, distance)
        codes, point_cost = _assign(x, centroids, distance)
        new_inertia = point_cost.double().sum().item()
        converged = inertia - new_inertia <= tol * inertia
        inertia = new_inertia
        if converged:
            break
    return KMeansResult(centroids=centroids, inertia=inertia, codes=codes)


def _update(x: torch.Tensor, codes: torch.Tensor, old: torch.Tensor, distance: Distance) -> torch.Tensor:
    """New centroids (k, d): the mean (direction, for cosine) of each cluster; empty ones re-seeded."""
    k = old.shape[0]
    counts = torch.bincount(codes, minlength=k)  # (k,)
    sums = torch.zeros_like(old).index_add_(0, codes, x)  # (k, d)
    centroids = sums / counts.clamp_min(1).to(sums.dtype)[:, None]
    if distance is Distance.COSINE:
        centroids = F.normalize(centroids, dim=-1)
    empty = counts == 0
    if bool(empty.any()):
        centroids = _reseed_empty(x, torch.where(empty[:, None], old, centroids), empty, distance)
    return centroids


def _reseed_empty(
    x: torch.Tensor, centroids: torch.Tensor, empty: torch.Tensor, distance: Distance
) -> torch.Tensor:
    """Move each empty cluster's centroid onto the point worst served by the other centroids.

    Points are picked one at a time, and each pick lowers the remaining points' cost, so two empty
    clusters never land on the same (or a duplicated) point. When every point already sits on a
    centroid (fewer distinct rows than k), the remaining empty centroids keep their old position.
    """
    centroids = centroids.clone()
    _, point_cost = _assign(x, centroids[~empty], distance)  # (n,)
    for j in torch.nonzero(empty).flatten().tolist():
        worst = point_cost.argmax()
        if point_cost[worst].item() <= 0:
            break
        centroids[j] = x[worst]
        point_cost = torch.minimum(point_cost, _cost(x, x[worst][None], distance).squeeze(1))
    return centroids


def _assign(
    x: torch.Tensor, centroids: torch.Tensor, distance: Distance
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each row and the per-point cost to it: ((n,) int64, (n,) fp32)."""
    codes, dist = nearest_code(x, centroids, distance)
    if distance is Distance.COSINE:
        dist = (1.0 + dist).clamp_min_(0.0)
    return codes, dist


def _cost(x: torch.Tensor, points: torch.Tensor, distance: Distance) -> torch.Tensor:
    """Per-point cost (n, m) from every row of x to each of a few points (m small)."""
    d = pairwise_distance(x, points, distance)
    return (1.0 + d).clamp_min_(0.0) if distance is Distance.COSINE else d


def _sample_proportional(weights: torch.Tensor, m: int, generator: torch.Generator) -> torch.Tensor:
    """m indices drawn with replacement with probability proportional to non-negative weights (n,).

    Inverse-CDF sampling in float64 works for any n (torch.multinomial is limited to 2^24 classes)
    and needs no host sync. All-zero weights fall back to uniform sampling.
    """
    w = weights.double()
    total = w.sum()
    w = w + (total <= 0).double()
    cdf = w.cumsum(0)  # (n,)
    u = torch.rand(m, generator=generator, dtype=torch.float64, device=generator.device)
    idx = torch.searchsorted(cdf, u.to(cdf.device) * cdf[-1], right=True)
    return idx.clamp_max_(weights.shape[0] - 1)


def _check_data(x: torch.Tensor, k: int) -> torch.Tensor:
    """Validate (n, d) data for k clusters and return it as fp32."""
    if x.ndim != 2:
        raise ValueError(f"k-means expects a 2-D (n, d) tensor, got shape {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if x.shape[0] < k:
        raise ValueError(f"k-means needs at least k={k} rows, got n={x.shape[0]}")
    x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError("k-means input contains NaN or infinite values")
    return x
