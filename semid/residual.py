"""A residual stack of quantizers: level l quantizes what levels < l left over.

Used inside the RQ-VAE on the encoder's latent, and alone as residual k-means on raw embeddings.

Prefix centres. Every codebook is shared by all the prefixes before it, so a level-2 codeword is a mean
over many level-1 groups and each (c1, c2) group keeps an offset of its own, about as large as the spread
inside it. The last level, which tells the items of a group apart, sees that shared offset first and
gives many of them the same code (bench/COLLISIONS.md). With prefix centres the last level quantizes the
residual minus its group's centre, the group's mean residual: items of a group then point in different
directions and spread over the last codebook. Only groups of two or more items get a centre: a lone item
has nothing to be told apart from. The table is fitted once on the training items and then frozen, so an
item's code still depends only on the item and the model; a prefix not in the table has centre zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from semid import fused
from semid.config import QuantizerConfig
from semid.distance import pairwise_distance
from semid.kmeans import cluster_means
from semid.quantize import Quantizer


@dataclass
class ResidualOutput:
    quantized: torch.Tensor  # (n, d) sum of the levels' forward values
    codes: torch.Tensor  # (n, L) int64
    codebook_losses: list[torch.Tensor]  # one per level
    commitment_losses: list[torch.Tensor]
    residuals: list[torch.Tensor]  # (n, d) per level: the input that level quantized (detached)
    errors: list[torch.Tensor]  # (n,) per level: squared error of that level's codeword
    balance_losses: list[torch.Tensor]  # () per level: usage-balance loss (zero when off or not training)


class ResidualQuantizer(nn.Module):
    def __init__(self, dim: int, config: QuantizerConfig) -> None:
        super().__init__()
        self.config = config
        self.levels = nn.ModuleList(
            Quantizer(
                dim,
                size,
                distance=config.distance,
                forward_mode=config.forward,
                commitment=config.commitment,
                gumbel_hard=config.gumbel_hard,
                dead_code_decay=config.dead_code_decay,
                dead_code_threshold=config.dead_code_threshold,
                balance_temperature=config.balance_temperature if config.balance_weight else 0.0,
            )
            for size in config.sizes()
        )
        # Prefix centres, empty until `fit_prefix_centres`: sorted prefix keys (G,) and their centres (G, d).
        self.register_buffer("prefix_keys", torch.zeros(0, dtype=torch.long))
        self.register_buffer("prefix_centres", torch.zeros(0, dim))
        sizes = config.sizes()
        # Only prefix centres key prefixes, and the config refuses them where the keys do not fit an int64.
        fits = config.prefixes_fit_a_key()
        strides = [math.prod(sizes[i + 1 : -1]) for i in range(len(sizes) - 1)] if fits else []
        self.register_buffer("prefix_strides", torch.tensor(strides, dtype=torch.long), persistent=False)

    @property
    def codebook_sizes(self) -> list[int]:
        return [level.codebook_size for level in self.levels]

    def forward(self, e: torch.Tensor) -> ResidualOutput:
        residual = e.float()
        quantized = torch.zeros_like(residual)
        codes, cb_losses, commit_losses, residuals, errors, balance = [], [], [], [], [], []
        for i, level in enumerate(self.levels):
            if i == self.last and self.has_centres:
                centre = self._centre(torch.stack(codes, dim=-1))
                residual, quantized = residual - centre, quantized + centre
            out = level(residual)
            residuals.append(residual.detach())
            quantized = quantized + out.quantized
            codes.append(out.codes)
            cb_losses.append(out.codebook_loss)
            commit_losses.append(out.commitment_loss)
            errors.append(out.error)
            balance.append(out.balance_loss)
            # The next level sees the hard residual; its gradient still reaches the encoder through `residual`.
            residual = residual - out.codeword.detach()
        return ResidualOutput(quantized, torch.stack(codes, dim=-1), cb_losses, commit_losses, residuals, errors,
                              balance)

    def loss(self, out: ResidualOutput) -> torch.Tensor:
        """Sum over levels of codebook loss + beta * commitment loss + balance weight * usage-balance loss."""
        beta, balance = self.config.commitment, self.config.balance_weight
        return sum(cb + beta * cm + balance * bl
                   for cb, cm, bl in zip(out.codebook_losses, out.commitment_losses, out.balance_losses))

    # ---- inference ----------------------------------------------------------------------------
    def _walk(self, e: torch.Tensor):
        """Yield (level, residual it sees, its codes) with greedy nearest codewords on successive residuals.

        The last level sees its residual minus the prefix centre (when fitted).
        """
        residual, codes = e.float(), []
        for i, level in enumerate(self.levels):
            if i == self.last and self.has_centres:
                residual = residual - self._centre(torch.stack(codes, dim=-1))
            codes.append(level.encode(residual))
            yield level, residual, codes[-1]
            residual = residual - level.decode(codes[-1])

    @torch.no_grad()
    def encode(self, e: torch.Tensor) -> torch.Tensor:
        """(n, d) -> (n, L) codes; on a GPU one fused kernel walks every level (`semid.fused`)."""
        codes = fused.checked_codes(self, e, self._walk_codes) if fused.usable(e) else None
        return self._walk_codes(e) if codes is None else codes

    def _walk_codes(self, e: torch.Tensor) -> torch.Tensor:
        return torch.stack([codes for _, _, codes in self._walk(e)], dim=-1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(n, L) codes -> (n, d) sum of their codewords (and of their prefix's centre)."""
        total = sum(level.decode(codes[:, i]) for i, level in enumerate(self.levels))
        if self.has_centres:
            total = total + self._centre(codes[:, : self.last])
        return total

    # ---- prefix centres -----------------------------------------------------------------------
    @property
    def last(self) -> int:
        return len(self.levels) - 1

    @property
    def has_centres(self) -> bool:
        return self.prefix_keys.numel() > 0

    def _prefix_key(self, prefix: torch.Tensor) -> torch.Tensor:
        """(n, L-1) codes of the levels before the last -> (n,) int64 key, unique per prefix."""
        return (prefix * self.prefix_strides).sum(-1)

    def _centre(self, prefix: torch.Tensor) -> torch.Tensor:
        """(n, L-1) prefixes -> (n, d) centres from the table; zero for a prefix the table does not hold."""
        key = self._prefix_key(prefix)
        position = torch.searchsorted(self.prefix_keys, key).clamp_max(self.prefix_keys.numel() - 1)
        known = (self.prefix_keys[position] == key).unsqueeze(-1)
        return torch.where(known, self.prefix_centres[position], torch.zeros((), device=key.device))

    @torch.no_grad()
    def fit_prefix_centres(self, e: torch.Tensor, shrinkage: float) -> int:
        """Fit the centre table on the rows of e (the training items); returns the number of centres.

        A group of n >= 2 items gets centre sum / (n + shrinkage). With no shrinkage (the default) the
        centred residuals of a group sum to zero, so under cosine distance a pair can never share a last
        code: its two centred residuals point in opposite directions. A lone item gets no centre: it needs
        no telling apart, and a centre would only store part of its own residual in the table, which then
        memorises the item instead of its codes describing it. The levels before the last are unaffected
        by the table, so every item keeps its prefix; only last codes move. A single level has no prefix
        and gets no table.

        The last codebook was trained on uncentred residuals; each of its codewords then moves to the mean
        of the (centred) residuals it now codes: one Lloyd update; codes no item uses stay. More updates
        change nothing measurable (bench/COLLISIONS.md).
        """
        self._drop_centres()
        if self.last == 0:
            return 0
        *prefix_steps, (last, residual, _) = self._walk(e)  # without a table the last level sees the plain residual
        prefix = torch.stack([level_codes for _, _, level_codes in prefix_steps], dim=-1)
        keys, group, counts = torch.unique(self._prefix_key(prefix), return_inverse=True, return_counts=True)
        sums = torch.zeros(keys.numel(), residual.shape[1], device=residual.device).index_add_(0, group, residual)
        shared = counts > 1  # (groups,)
        centres = torch.where(shared.unsqueeze(-1), sums / (counts.unsqueeze(-1) + shrinkage), 0.0)  # lone: 0
        self.prefix_keys, self.prefix_centres = keys[shared], centres[shared]
        centred = residual - centres[group]
        last.codebook.copy_(cluster_means(centred, last.encode(centred), last.codebook))
        return int(self.prefix_keys.numel())

    def _drop_centres(self) -> None:
        self.prefix_keys = self.prefix_keys[:0]
        self.prefix_centres = self.prefix_centres[:0]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Take the centre table at its saved size (it varies by model); a model saved without one has none."""
        for name in ("prefix_keys", "prefix_centres"):
            saved = state_dict.setdefault(prefix + name, getattr(self, name)[:0])
            setattr(self, name, getattr(self, name).new_empty(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def last_level_distances(self, e: torch.Tensor) -> torch.Tensor:
        """(n, K_last) distances from each row's last-level residual to the last codebook.

        Collision remapping uses this to move an item to the nearest free code at the last level.
        """
        *_, (last, residual, _) = self._walk(e)
        return pairwise_distance(residual, last.codebook, last.distance)

    @torch.no_grad()
    def level_distances(self, e: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """(n, d) rows and (n, l) leading codes, l < L -> (n, K_l) distances at level l under those codes.

        The residual is what the given codes leave (minus their prefix's centre at the last level), as
        `decode` would reconstruct them, not the rows' own greedy codes: collision remapping uses it to
        rank the codes of a prefix it moves an item to (`semid.collisions`).
        """
        residual = e.float()
        for level, level_codes in zip(self.levels, codes.unbind(-1)):
            residual = residual - level.decode(level_codes)
        depth = codes.shape[-1]
        if depth == self.last and self.has_centres:
            residual = residual - self._centre(codes)
        return pairwise_distance(residual, self.levels[depth].codebook, self.levels[depth].distance)

    # ---- codebook health ----------------------------------------------------------------------
    @torch.no_grad()
    def init_from_data(self, e: torch.Tensor, generator: torch.Generator) -> None:
        """k-means on each level's residual of the same sample, level by level.

        Each level's residual is taken against the codeword of the cluster k-means put the row in.
        """
        residual = e.float()
        for level in self.levels:
            codes = level.init_from_data(residual, self.config.kmeans_iters, generator)
            residual = residual - level.decode(codes)

    @torch.no_grad()
    def refine(self, e: torch.Tensor, passes: int) -> None:
        """Joint refinement of greedily trained levels (used by residual k-means).

        Greedy level-by-level k-means fits each codebook to the residual the earlier levels left, never
        revisiting them. Each pass here re-encodes greedily and then moves every codeword to the mean of
        what its items still miss once all *other* levels' codewords are subtracted, so early levels adapt
        to the later ones. That mean is the codeword plus the mean final residual of its items, so the
        pass only keeps the final residual up to date as codewords move (no per-level targets). Prefix
        centres belong to the codebooks they were fitted with, so refinement drops them.
        """
        self._drop_centres()
        e = e.float()
        for _ in range(passes):
            residual, codes = e, []
            for level in self.levels:
                codes.append(level.encode(residual))
                residual = residual - level.decode(codes[-1])
            for level, level_codes in zip(self.levels, codes):
                shift = cluster_means(residual, level_codes, torch.zeros_like(level.codebook))  # zero where unused
                level.codebook.add_(shift)
                residual = residual - shift[level_codes]

    @torch.no_grad()
    def reset_dead_codes(self, residuals: list[torch.Tensor], errors: list[torch.Tensor], batch_size: int) -> int:
        """Reseed each level's dead codes from that level's worst-quantized residuals of a batch.

        `residuals` and `errors` are a forward pass's per-level lists (`ResidualOutput`), possibly gathered
        from several ranks; `batch_size` is the number of rows each level's usage counts were taken over.
        """
        total = 0
        for level, residual, error in zip(self.levels, residuals, errors):
            total += level.reseed(level.dead_codes(batch_size), residual, error)
        return total

    def set_tau(self, tau: float) -> None:
        for level in self.levels:
            level.tau.fill_(tau)
