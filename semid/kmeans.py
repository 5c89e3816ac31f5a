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

Cost. A Lloyd iteration is one (n, k) matrix product; everything else is kept linear in n and done once
per run where it can be (row norms, normalisation). Greedy k-means++ is sequential in k, one pass over
the rows per seed, so `kmeans` seeds with k-means|| instead: a few rounds of many draws at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from semid.distance import Distance, nearest_code

# Seed used when the caller passes no generator: k-means results are then reproducible by default.
_DEFAULT_SEED = 0

# k-means++ tabulates all pairwise costs of its rows when the (n, n) table holds at most this many floats.
_TABLE_MAX_ELEMENTS = 1 << 24


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
    x: torch.Tensor,
    k: int,
    generator: torch.Generator,
    distance: Distance | str = "l2",
    *,
    trials: int | None = None,
) -> torch.Tensor:
    """Greedy k-means++ seeds: k rows of x, as an fp32 (k, d) tensor on x's device.

    Each step draws `trials` candidates (default 2 + log(k)) with probability proportional to their
    current cost (D² sampling for l2) and keeps the one that lowers the total cost most. The extra
    candidates make the seeding less sensitive to one unlucky draw, which lowers the final inertia.
    Rows are returned as they are in x (not normalised for cosine).
    """
    distance = Distance(distance)
    x = _check_data(x, k)
    return x[_greedy_seeds(_Points(x, distance), k, generator, trials=trials)]


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    iters: int = 25,
    distance: Distance | str = "l2",
    sample_size: int | None = 65536,
    generator: torch.Generator | None = None,
    tol: float = 5e-3,
    init: str = "k-means||",
) -> KMeansResult:
    """Cluster the rows of x (n, d) into k groups: k-means|| seeding, then Lloyd iterations.

    When n > sample_size, k-means runs on a random sample of sample_size rows drawn with `generator`
    (None: all rows). init="k-means||" seeds as `_parallel_seeds` does: a few rounds that each draw
    about k rows at once, then greedy k-means++ on those candidates weighted by the rows they stand
    for. It places seeds as well as greedy k-means++ over all rows (init="k-means++"; measured on
    real embeddings), for the price of about three Lloyd iterations instead of k sequential passes
    over the rows.

    `iters` bounds the Lloyd updates; iteration stops early once an update lowers the inertia by less
    than `tol` times its previous value (tol=0 runs all of them). The default stops once an update
    gains less than half a percent, after about five updates on real embeddings: the later updates
    each gain less than that and cost as much, and every caller here goes on improving the codebook
    (training, or the joint refinement of residual k-means). generator=None uses a fixed seed, so the
    result is reproducible. Raises ValueError when there are fewer rows than clusters.
    For cosine, rows are normalised and centroids stay unit length (spherical k-means).
    """
    distance = Distance(distance)
    x = _check_data(x, k)
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if init not in ("k-means||", "k-means++"):
        raise ValueError(f"init must be 'k-means||' or 'k-means++', got {init!r}")
    if generator is None:
        generator = torch.Generator().manual_seed(_DEFAULT_SEED)
    if sample_size is not None:
        if sample_size < k:
            raise ValueError(f"sample_size ({sample_size}) must be at least k ({k})")
        if x.shape[0] > sample_size:
            x = x[_random_rows(x.shape[0], sample_size, generator, x.device)]
    points = _Points(x, distance)
    if init == "k-means||":
        seeds = _parallel_seeds(points, k, generator)
    else:
        seeds = points.x[_greedy_seeds(points, k, generator)]
    return _run_lloyd(points, seeds, iters=iters, tol=tol)


def _parallel_seeds(
    points: _Points, k: int, generator: torch.Generator, rounds: int = 3, oversample: float = 3.0
) -> torch.Tensor:
    """k-means|| seeds (Bahmani et al., 2012): k rows of points.x, (k, d).

    Starting from one random row, each of `rounds` rounds keeps every row independently with
    probability min(1, l * cost / total cost), l = oversample * k / rounds, so a round draws about l
    rows at once, D²-style, and costs one assignment of all rows to them. Each candidate is then
    weighted by the number of rows nearest to it, and greedy k-means++ on the weighted candidates
    picks the k seeds. The weights carry the density that a subsample would lose: an outlier stands
    for one row and a candidate in a dense region for many, so seeds are not wasted on outliers (as
    they are by k-means++ on a uniform subsample, where the tails weigh as much as the dense regions).
    With few rows, or when the rounds find fewer than k candidates (few distinct rows), seeding is
    greedy k-means++ over all rows.
    """
    n, device = points.n, points.x.device
    per_round = oversample * k / rounds
    if n <= oversample * k:
        return points.x[_greedy_seeds(points, k, generator)]
    found = [torch.randint(n, (1,), generator=generator, device=generator.device).to(device)]
    owner, cost = points.nearest(points.x[found[0]])  # (n,): nearest candidate so far, and the cost to it
    count = 1
    for _ in range(rounds):
        total = cost.double().sum()
        if total.item() <= 0:
            break
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device).to(device)
        new = torch.nonzero(u * total < per_round * cost.double()).flatten()  # P = min(1, l cost / total)
        if new.numel() == 0:
            continue
        nearest, new_cost = points.nearest(points.x[new])
        closer = new_cost < cost
        owner = torch.where(closer, nearest + count, owner)
        cost = torch.where(closer, new_cost, cost)
        found.append(new)
        count += new.numel()
    if count < k:
        return points.x[_greedy_seeds(points, k, generator)]
    candidates = _Points(points.x[torch.cat(found)], points.distance)
    weights = torch.bincount(owner, minlength=count)
    return candidates.x[_greedy_seeds(candidates, k, generator, weights=weights)]


def _greedy_seeds(
    points: _Points,
    k: int,
    generator: torch.Generator,
    *,
    trials: int | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices (k,) of greedy k-means++ seeds among the rows of `points` (see `kmeans_plusplus`).

    With `weights` (n,), row i counts as weights[i] rows: the first seed and the candidates are drawn
    in proportion to weight (times cost), and the kept candidate lowers the weighted total cost most.
    """
    if trials is None:
        trials = 2 + int(math.log(k))
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    w = None if weights is None else weights.to(torch.float32)
    # Costs between every pair of rows as one matrix product when they fit: far faster than k
    # sequential thin products, and the steps below then only read rows of the table.
    table = points.cost_from(points.x) if points.n**2 <= _TABLE_MAX_ELEMENTS else None  # (n, n)
    chosen = torch.empty(k, dtype=torch.long, device=points.x.device)
    if w is None:
        first = torch.randint(points.n, (1,), generator=generator, device=generator.device)
    else:
        first = _sample_proportional(w, 1, generator)
    chosen[:1] = first.to(chosen.device)
    closest = _cost_rows(points, table, chosen[:1])[0]  # (n,)
    for j in range(1, k):
        candidates = _sample_proportional(closest if w is None else closest * w, trials, generator)
        cand_cost = torch.minimum(closest[None, :], _cost_rows(points, table, candidates))  # (trials, n)
        best = (cand_cost.sum(dim=1) if w is None else cand_cost @ w).argmin()
        chosen[j] = candidates[best]
        closest = cand_cost[best]
    return chosen


def _cost_rows(points: _Points, table: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """Cost (m, n) from each of the given rows of `points` to every row, from the table when there is one."""
    rows = rows.to(points.x.device)
    return table[rows] if table is not None else points.cost_from(points.x[rows])


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


class _Points:
    """The rows of one k-means run, prepared once: unit rows for cosine, squared norms for l2.

    Assignments go through `semid.distance.nearest_code` like every other nearest-codeword choice;
    the per-row terms here serve the costs to a few points at a time (seeding, empty clusters), which
    would otherwise recompute them at each of k steps. Points compared with cosine rows must be unit.
    """

    def __init__(self, x: torch.Tensor, distance: Distance) -> None:
        self.distance = distance
        self.x = F.normalize(x, dim=-1) if distance is Distance.COSINE else x  # (n, d)
        self.sq_norms = None if distance is Distance.COSINE else x.pow(2).sum(-1)  # (n,)

    @property
    def n(self) -> int:
        return self.x.shape[0]

    def cost_from(self, points: torch.Tensor) -> torch.Tensor:
        """Per-point cost (m, n) from each of the given points (unit rows for cosine) to every row."""
        dots = points @ self.x.T  # (m, n)
        if self.sq_norms is None:
            return dots.neg_().add_(1.0).clamp_min_(0.0)
        return dots.mul_(-2.0).add_(points.pow(2).sum(-1)[:, None]).add_(self.sq_norms).clamp_min_(0.0)

    def nearest(self, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest centroid (unit rows for cosine) of each row and the per-point cost to it:
        ((n,) int64, (n,) fp32)."""
        codes, dist = nearest_code(self.x, centroids, self.distance)
        if self.distance is Distance.COSINE:
            dist = dist.add_(1.0).clamp_min_(0.0)  # -cos -> 1 - cos
        return codes, dist


def _lloyd(
    x: torch.Tensor, centroids: torch.Tensor, *, iters: int, distance: Distance | str, tol: float
) -> KMeansResult:
    """Lloyd iterations from given centroids (k, d). The returned codes and inertia belong to the
    returned centroids. For cosine, x must already be unit rows."""
    return _run_lloyd(_Points(x.float(), Distance(distance)), centroids, iters=iters, tol=tol)


def _run_lloyd(points: _Points, centroids: torch.Tensor, *, iters: int, tol: float) -> KMeansResult:
    """Lloyd iterations on prepared rows; stops early once the relative inertia gain is <= tol."""
    centroids = centroids.float().clone()
    if points.distance is Distance.COSINE:
        centroids = F.normalize(centroids, dim=-1)
    codes, point_cost = points.nearest(centroids)
    inertia = point_cost.double().sum().item()
    for _ in range(iters):
        centroids = _update(points, codes, centroids)
        codes, point_cost = points.nearest(centroids)
        new_inertia = point_cost.double().sum().item()
        converged = inertia - new_inertia <= tol * inertia
        inertia = new_inertia
        if converged:
            break
    return KMeansResult(centroids=centroids, inertia=inertia, codes=codes)


def cluster_means(rows: torch.Tensor, codes: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """(k, d) mean of the rows each code holds; `fallback`'s row for a code that holds none.

    Residual stacks keep codewords at their clusters' mean vectors (not unit directions) for cosine too,
    because the next level quantizes what the codeword leaves over.
    """
    sums = torch.zeros_like(fallback).index_add_(0, codes, rows)
    counts = torch.bincount(codes, minlength=fallback.shape[0]).unsqueeze(-1)
    return torch.where(counts > 0, sums / counts.clamp_min(1), fallback)


def _update(points: _Points, codes: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """New centroids (k, d): the mean (direction, for cosine) of each cluster; empty ones re-seeded."""
    k = old.shape[0]
    counts = torch.bincount(codes, minlength=k)  # (k,)
    sums = torch.zeros_like(old).index_add_(0, codes, points.x)  # (k, d)
    if points.distance is Distance.COSINE:
        centroids = F.normalize(sums, dim=-1)  # the sum points the same way as the mean
    else:
        centroids = sums / counts.clamp_min(1).to(sums.dtype)[:, None]
    empty = counts == 0
    if bool(empty.any()):
        centroids = _reseed_empty(points, torch.where(empty[:, None], old, centroids), empty)
    return centroids


def _reseed_empty(points: _Points, centroids: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """Move each empty cluster's centroid onto the point worst served by the other centroids.

    Points are picked one at a time, and each pick lowers the remaining points' cost, so two empty
    clusters never land on the same (or a duplicated) point. When every point already sits on a
    centroid (fewer distinct rows than k), the remaining empty centroids keep their old position.
    """
    centroids = centroids.clone()
    _, point_cost = points.nearest(centroids[~empty])  # (n,)
    for j in torch.nonzero(empty).flatten().tolist():
        worst = point_cost.argmax()
        if point_cost[worst].item() <= 0:
            break
        centroids[j] = points.x[worst]
        point_cost = torch.minimum(point_cost, points.cost_from(points.x[worst][None])[0])
    return centroids


def _random_rows(n: int, m: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """m distinct row indices out of n, drawn with `generator`, in increasing order, on `device`."""
    rows = torch.randperm(n, generator=generator, device=generator.device)[:m]
    return rows.sort().values.to(device)


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
