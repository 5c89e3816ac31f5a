"""One vector-quantization level: a codebook, its forward modes, losses and codebook health.

The three training-time forward modes differ only in how the gradient crosses the non-differentiable
nearest-codeword choice:

* STE copies the output gradient onto the input unchanged.
* ROTATION (Fifty et al., ICLR 2025) rotates the gradient by the rotation that takes the input's
  direction onto the codeword's and rescales it by |q|/|e|, so that the angle between input and
  gradient equals the angle between codeword and gradient. Points that share a codeword then get
  different gradients, which STE cannot give.
* GUMBEL replaces the hard choice by a Gumbel-softmax mixture of codewords at temperature tau.

In eval mode every forward mode returns the hard nearest codeword, so IDs never depend on the mode.

Cosine distance picks the code by direction only, but the codeword keeps its own length and the residual
passed on is the full difference e - q. Normalising codewords (as some peers do) throws away residual
magnitudes and with them most of the reconstruction; here the magnitude of every level survives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from semid.distance import Distance, nearest_code, pairwise_distance
from semid.kmeans import cluster_means, kmeans

# Below this norm a vector has no usable direction: the rotation trick falls back to STE for it.
_TINY = 1e-6


class ForwardMode(str, Enum):
    STE = "ste"
    ROTATION = "rotation"
    GUMBEL = "gumbel"


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (n, d) forward value: the codeword (or Gumbel mixture in training)
    codes: torch.Tensor  # (n,) int64 nearest codeword
    codeword: torch.Tensor  # (n, d) hard nearest codeword, differentiable w.r.t. the codebook
    codebook_loss: torch.Tensor  # ||sg(e) - q||^2, mean over elements
    commitment_loss: torch.Tensor  # ||e - sg(q)||^2, mean over elements
    error: torch.Tensor  # (n,) detached squared L2 error ||e - q||^2, for dead-code reseeding
    balance_loss: torch.Tensor  # log K - entropy of the batch's mean soft assignment (0 when off)


def straight_through(e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Forward value q, gradient copied onto e unchanged.

    Written as q + (e - e) rather than e + (q - e) so that the value is q exactly, not q up to round-off.
    """
    return q.detach() + (e - e.detach())


def rotation_trick(e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Forward value exactly q; gradient w.r.t. e is (|q|/|e|) R^T g, with R rotating e's direction onto q's.

    R = I - 2 r r^T + 2 q_hat e_hat^T with r = (e_hat + q_hat)/|e_hat + q_hat| is applied without ever
    forming a (d, d) matrix. When e and q point in opposite directions r is undefined, and the reflection
    I - 2 e_hat e_hat^T (which also maps e_hat onto q_hat and is orthogonal) takes its place. Rows where e
    or q is (near) zero have no direction and fall back to STE, so every output stays finite.
    """
    e_norm = e.detach().norm(dim=-1, keepdim=True)  # (n, 1)
    q_norm = q.detach().norm(dim=-1, keepdim=True)
    usable = (e_norm > _TINY) & (q_norm > _TINY)
    e_hat = e.detach() / e_norm.clamp_min(_TINY)
    q_hat = q.detach() / q_norm.clamp_min(_TINY)
    r = e_hat + q_hat
    r_norm = r.norm(dim=-1, keepdim=True)
    antipodal = r_norm < _TINY
    r = torch.where(antipodal, e_hat, r / r_norm.clamp_min(_TINY))
    keep_q_term = (~antipodal).to(e.dtype)  # the antipodal reflection has no q_hat e_hat^T term
    scale = torch.where(usable, q_norm / e_norm.clamp_min(_TINY), torch.ones_like(e_norm))

    def transform(v: torch.Tensor) -> torch.Tensor:
        rotated = (
            v
            - 2 * r * (r * v).sum(-1, keepdim=True)
            + 2 * keep_q_term * q_hat * (e_hat * v).sum(-1, keepdim=True)
        )
        return torch.where(usable, scale * rotated, v)

    moved = transform(e)
    # The value is replaced by q exactly (no round-off from the rotation); only the gradient path of
    # `moved` survives, and that is the constant linear map scale * R.
    return q.detach() + (moved - moved.detach())


def gumbel_softmax_weights(
    logits: torch.Tensor, tau: float | torch.Tensor, hard: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gumbel-softmax weights over codes (rows sum to 1); hard=True gives one-hot values with soft gradients.

    The noise is added to logits / tau, so tau anneals the sampling as well as the relaxation: as tau -> 0
    the choice becomes the nearest code. With the textbook (logits + g) / tau, tau only sharpens the
    mixture and codes stay drawn from softmax(logits) at every tau; for cosine (logits = cos in [-1, 1])
    that is close to uniform over K, so training would see a random codeword instead of the nearest one.
    """
    uniform = torch.rand(logits.shape, device=logits.device, generator=generator).clamp_(1e-10, 1.0 - 1e-7)
    gumbel = -torch.log(-torch.log(uniform))
    soft = torch.softmax(logits / tau + gumbel, dim=-1)
    if not hard:
        return soft
    one_hot = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
    # Parenthesised so the value is exactly one-hot: (one_hot + soft) - soft is not, in floating point.
    return one_hot + (soft - soft.detach())


def usage_balance_loss(dist: torch.Tensor, temperature: float) -> torch.Tensor:
    """log K minus the entropy of the batch's mean soft assignment softmax(-dist / temperature): (n, k) -> ().

    Zero when the batch spreads evenly over the codes, log K when it all goes to one. The nearest-code
    counts themselves have no gradient; the soft assignment does, and lowering this loss moves latents
    and codewords so that crowded codes give up their marginal rows to sparse ones. An item's code at
    encode time still depends only on the item: the balancing happens to the model, during training.
    """
    mean_assignment = torch.softmax(-dist / temperature, dim=-1).mean(0)  # (k,)
    entropy = -(mean_assignment * mean_assignment.clamp_min(1e-12).log()).sum()
    return math.log(dist.shape[-1]) - entropy


class Quantizer(nn.Module):
    """A codebook of K vectors of dimension d with a configurable distance and forward mode."""

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        distance: Distance | str = Distance.L2,
        forward_mode: ForwardMode | str = ForwardMode.STE,
        commitment: float = 0.25,
        gumbel_hard: bool = False,
        dead_code_decay: float = 0.9,
        dead_code_threshold: float = 0.05,
        balance_temperature: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim, self.codebook_size = dim, codebook_size
        self.distance = Distance(distance)
        self.forward_mode = ForwardMode(forward_mode)
        self.commitment = commitment
        self.gumbel_hard = gumbel_hard
        self.dead_code_decay = dead_code_decay
        self.dead_code_threshold = dead_code_threshold
        self.balance_temperature = balance_temperature  # 0: no usage-balance loss
        # Gumbel temperature: a buffer updated in place, so that a captured CUDA graph sees the schedule move.
        self.register_buffer("tau", torch.ones(()), persistent=False)
        self.codebook = nn.Parameter(torch.randn(codebook_size, dim) / dim**0.5)
        # EMA of how many rows of a batch each code receives; starts at the uniform expectation so that no
        # code counts as dead before it has had a chance.
        self.register_buffer("usage_ema", torch.full((codebook_size,), -1.0))
        self.register_buffer("resets", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, K={self.codebook_size}, distance={self.distance.value}, forward={self.forward_mode.value}"

    # ---- inference ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, e: torch.Tensor) -> torch.Tensor:
        """Nearest code for each row: (n, d) -> (n,) int64."""
        return nearest_code(e, self.codebook, self.distance)[0]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return F.embedding(codes, self.codebook)

    # ---- training -----------------------------------------------------------------------------
    def forward(self, e: torch.Tensor) -> QuantizerOutput:
        e = e.float()  # distances and codebook updates stay in fp32 under autocast
        dist = pairwise_distance(e, self.codebook, self.distance)  # (n, k)
        codes = dist.argmin(dim=-1)
        q = F.embedding(codes, self.codebook)  # (n, d), gradient reaches the codebook
        codebook_loss = F.mse_loss(q, e.detach())
        commitment_loss = F.mse_loss(e, q.detach())
        if self.training:
            self._track_usage(codes)
            if self.forward_mode is ForwardMode.STE:
                quantized = straight_through(e, q.detach())
            elif self.forward_mode is ForwardMode.ROTATION:
                quantized = rotation_trick(e, q.detach())
            else:
                weights = gumbel_softmax_weights(-dist, self.tau, self.gumbel_hard)  # (n, k)
                quantized = weights @ self.codebook
        else:
            quantized = q.detach()
        error = (e.detach() - q.detach()).pow(2).sum(-1)
        balance_loss = dist.new_zeros(())
        if self.training and self.balance_temperature > 0:
            # L2 distances carry the residual's scale; dividing by its mean square makes the temperature
            # scale-free, as cosine distances (in [-1, 1]) already are.
            if self.distance is not Distance.COSINE:
                dist = dist / e.detach().pow(2).sum(-1).mean().clamp_min(1e-12)
            balance_loss = usage_balance_loss(dist, self.balance_temperature)
        return QuantizerOutput(quantized, codes, q, codebook_loss, commitment_loss, error, balance_loss)

    @torch.no_grad()
    def _track_usage(self, codes: torch.Tensor) -> None:
        counts = torch.zeros_like(self.usage_ema).index_add_(0, codes, torch.ones_like(codes, dtype=torch.float))
        expected = codes.numel() / self.codebook_size
        # -1 marks "never updated": start from the expectation, not from zero.
        start = torch.where(self.usage_ema < 0, torch.full_like(self.usage_ema, expected), self.usage_ema)
        self.usage_ema.copy_(self.dead_code_decay * start + (1 - self.dead_code_decay) * counts)

    # ---- codebook health ----------------------------------------------------------------------
    @torch.no_grad()
    def init_from_data(self, e: torch.Tensor, iters: int, generator: torch.Generator) -> torch.Tensor:
        """k-means codebook; returns the (n,) code of each row of e under it, so that a residual stack
        can form the next level's input without encoding e again.

        For cosine, clusters are found by direction but each codeword is its cluster's mean vector, so it
        keeps the length that a residual stack needs. The returned codes are the k-means assignment (by
        direction to the unit centroids); `encode` picks by direction to the mean vectors instead, which
        can differ for a few rows. Returning the assignment saves that extra pass over e, and each row's
        residual is then taken against the mean of the cluster it belongs to.
        """
        e = e.float()
        if e.shape[0] < self.codebook_size:
            raise ValueError(
                f"k-means initialisation needs at least as many rows as codes: got {e.shape[0]} rows for "
                f"K={self.codebook_size}; use fewer codes (quantizer.codebook_size) or more items, or turn "
                f"quantizer.kmeans_init off"
            )
        result = kmeans(e, self.codebook_size, iters=iters, distance=self.distance, sample_size=None, generator=generator)
        centroids = result.centroids
        if self.distance is Distance.COSINE:
            centroids = cluster_means(e, result.codes, centroids)
        self.codebook.copy_(centroids)
        self.usage_ema.fill_(-1.0)
        return result.codes

    def dead_codes(self, batch_size: int) -> torch.Tensor:
        """Indices of codes whose recent use fell below threshold * batch_size / K."""
        floor = self.dead_code_threshold * batch_size / self.codebook_size
        return torch.nonzero((self.usage_ema >= 0) & (self.usage_ema < floor)).flatten()

    @torch.no_grad()
    def reseed(self, dead: torch.Tensor, e: torch.Tensor, error: torch.Tensor) -> int:
        """Move dead codes onto the rows of e that this level quantizes worst, then to the mean of the rows
        of e they win (one Lloyd step), and reset their usage.

        The worst-served inputs are where a new codeword lowers the error most; random rows would mostly
        land in regions that are already covered. The Lloyd step gives each new codeword the length of what
        it codes, as the k-means initialisation does. Left at the worst row, a codeword is as long as the
        longest residuals, and under cosine distance short rows pointing its way pick it too: their residual
        then grows instead of shrinking, and the commitment loss drags their latents outwards. Adam moves a
        codeword by about the learning rate per step, too slowly to undo that, so on heavy-tailed inputs
        (collaborative factors, bench/VARIANTS.md) latents and codewords grew without bound.
        """
        n_dead = min(int(dead.numel()), e.shape[0])
        if n_dead == 0:
            return 0
        reseeded = dead[:n_dead]
        e = e.float()
        self.codebook[reseeded] = e[torch.topk(error, n_dead).indices]
        self.codebook[reseeded] = cluster_means(e, self.encode(e), self.codebook)[reseeded]
        self.usage_ema[reseeded] = -1.0
        self.resets += n_dead
        return n_dead
