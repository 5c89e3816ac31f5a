"""A residual stack of quantizers: level l quantizes what levels < l left over.

Used inside the RQ-VAE on the encoder's latent, and alone as residual k-means on raw embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from semid.config import QuantizerConfig
from semid.distance import pairwise_distance
from semid.quantize import Quantizer


@dataclass
class ResidualOutput:
    quantized: torch.Tensor  # (n, d) sum of the levels' forward values
    codes: torch.Tensor  # (n, L) int64
    codebook_losses: list[torch.Tensor]  # one per level
    commitment_losses: list[torch.Tensor]
    residuals: list[torch.Tensor]  # (n, d) per level: the input that level quantized (detached)
    errors: list[torch.Tensor]  # (n,) per level: squared error of that level's codeword


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
            )
            for size in config.sizes()
        )

    @property
    def codebook_sizes(self) -> list[int]:
        return [level.codebook_size for level in self.levels]

    def forward(self, e: torch.Tensor) -> ResidualOutput:
        residual = e.float()
        quantized = torch.zeros_like(residual)
        codes, cb_losses, commit_losses, residuals, errors = [], [], [], [], []
        for level in self.levels:
            out = level(residual)
            residuals.append(residual.detach())
            quantized = quantized + out.quantized
            codes.append(out.codes)
            cb_losses.append(out.codebook_loss)
            commit_losses.append(out.commitment_loss)
            errors.append(out.error)
            # The next level sees the hard residual; its gradient still reaches the encoder through `residual`.
            residual = residual - out.codeword.detach()
        return ResidualOutput(quantized, torch.stack(codes, dim=-1), cb_losses, commit_losses, residuals, errors)

    def loss(self, out: ResidualOutput) -> torch.Tensor:
        """Sum over levels of codebook loss + beta * commitment loss."""
        beta = self.config.commitment
        return sum(cb + beta * cm for cb, cm in zip(out.codebook_losses, out.commitment_losses))

    # ---- inference ----------------------------------------------------------------------------
    def _walk(self, e: torch.Tensor):
        """Yield (level, residual it sees, its codes) with greedy nearest codewords on successive residuals."""
        residual = e.float()
        for level in self.levels:
            codes = level.encode(residual)
            yield level, residual, codes
            residual = residual - level.decode(codes)

    @torch.no_grad()
    def encode(self, e: torch.Tensor) -> torch.Tensor:
        """(n, d) -> (n, L) codes."""
        return torch.stack([codes for _, _, codes in self._walk(e)], dim=-1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(n, L) codes -> (n, d) sum of their codewords."""
        return sum(level.decode(codes[:, i]) for i, level in enumerate(self.levels))

    @torch.no_grad()
    def last_level_distances(self, e: torch.Tensor) -> torch.Tensor:
        """(n, K_last) distances from each row's last-level residual to the last codebook.

        Collision remapping uses this to move an item to the nearest free code at the last level.
        """
        *_, (last, residual, _) = self._walk(e)
        return pairwise_distance(residual, last.codebook, last.distance)

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
        pass only keeps the final residual up to date as codewords move (no per-level targets).
        """
        e = e.float()
        for _ in range(passes):
            residual, codes = e, []
            for level in self.levels:
                codes.append(level.encode(residual))
                residual = residual - level.decode(codes[-1])
            for level, level_codes in zip(self.levels, codes):
                sums = torch.zeros_like(level.codebook).index_add_(0, level_codes, residual)
                counts = torch.bincount(level_codes, minlength=level.codebook_size).unsqueeze(-1)
                shift = sums / counts.clamp_min(1)  # (K, d), zero for codes no item uses
                level.codebook.add_(shift)
                residual = residual - shift[level_codes]

    @torch.no_grad()
    def reset_dead_codes(self, out: ResidualOutput, batch_size: int) -> int:
        """Reseed each level's dead codes from that level's worst-quantized residuals of this batch."""
        total = 0
        for level, residual, error in zip(self.levels, out.residuals, out.errors):
            total += level.reseed(level.dead_codes(batch_size), residual, error)
        return total

    def set_tau(self, tau: float) -> None:
        for level in self.levels:
            level.tau.fill_(tau)
