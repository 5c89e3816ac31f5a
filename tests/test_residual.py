"""Tests for semid.residual: a residual stack on real embeddings must lower the reconstruction error with
every level (for l2 and for cosine, which must keep residual magnitudes), and the training-mode forward
must agree with encode/decode."""
from __future__ import annotations

import pytest
import torch

from semid.config import QuantizerConfig
from semid.distance import nearest_code
from semid.residual import ResidualQuantizer

# Per-level codebook sizes of the real-data stacks: three levels of 256 as in the default config, and a
# smaller fourth so that "does one more level still help" is tested without a slow fourth k-means.
SIZES = [256, 256, 256, 64]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def standardized_movies(real_data) -> torch.Tensor:
    """ml-1m embeddings centred and divided by one global RMS factor, as the RQ-VAE standardises them."""
    x = torch.from_numpy(real_data("ml-1m"))
    x = x - x.mean(0)
    return x / x.pow(2).mean().sqrt()


@pytest.fixture(scope="module")
def fvu_by_depth(standardized_movies: torch.Tensor) -> dict[str, list[float]]:
    """For each distance: fvu after 1, 2, 3, 4 levels of a k-means-initialised stack on ml-1m."""
    x = standardized_movies
    x64 = x.double()
    total = (x64 - x64.mean(0)).pow(2).sum().item()
    result = {}
    for distance in ("l2", "cosine"):
        config = QuantizerConfig(levels=len(SIZES), codebook_size=SIZES, distance=distance, kmeans_iters=15)
        stack = ResidualQuantizer(x.shape[1], config)
        stack.init_from_data(x, _gen(0))
        codes = stack.encode(x)
        assert codes.shape == (x.shape[0], len(SIZES))
        # Reconstruction from the first l levels, summed here in float64, independent of decode().
        partial = torch.zeros_like(x64)
        fvus = []
        for level, quantizer in enumerate(stack.levels):
            partial += quantizer.codebook.detach().double()[codes[:, level]]
            fvus.append((x64 - partial).pow(2).sum().item() / total)
        torch.testing.assert_close(stack.decode(codes).double(), partial, rtol=1e-5, atol=1e-4)
        result[distance] = fvus
    return result


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_error_does_not_increase_with_depth(fvu_by_depth: dict[str, list[float]], distance: str) -> None:
    fvus = fvu_by_depth[distance]
    assert fvus[0] < 1.0
    for shallower, deeper in zip(fvus, fvus[1:]):
        assert deeper <= shallower, f"{distance}: fvu by depth {fvus}"
    assert fvus[-1] < 0.9 * fvus[0]  # the extra levels do real work, not just "no worse"


def test_cosine_stack_keeps_residual_magnitudes(fvu_by_depth: dict[str, list[float]]) -> None:
    # Measured on ml-1m (3 x 256, 15 k-means iterations): l2 about 0.42, cosine about 0.42. A stack that
    # normalises its codewords cannot remove the residuals' length and stays far above that.
    l2, cosine = fvu_by_depth["l2"][2], fvu_by_depth["cosine"][2]
    assert cosine < 0.6
    assert cosine < 1.5 * l2


def test_init_levels_quantize_successive_residuals() -> None:
    # Three scales of structure: the first level must find the coarse clusters, later levels the finer
    # offsets within them; the stack then reconstructs almost exactly.
    g = _gen(1)
    coarse, mid, fine = (scale * torch.randn(4, 6, generator=g) for scale in (20.0, 4.0, 1.0))
    index = torch.cartesian_prod(torch.arange(4), torch.arange(4), torch.arange(4))  # (64, 3)
    x = coarse[index[:, 0]] + mid[index[:, 1]] + fine[index[:, 2]] + 0.01 * torch.randn(64, 6, generator=g)
    stack = ResidualQuantizer(6, QuantizerConfig(levels=3, codebook_size=4, kmeans_iters=20))
    stack.init_from_data(x, _gen(2))
    codes = stack.encode(x)
    for level in range(3):  # each level's codes are a relabelling of the true index at that scale
        pairs = set(zip(codes[:, level].tolist(), index[:, level].tolist()))
        assert len(pairs) == 4
    assert (x - stack.decode(codes)).pow(2).sum() < 1e-2 * (x - x.mean(0)).pow(2).sum()


# ---- training-mode forward ---------------------------------------------------------------------------
@pytest.mark.parametrize("forward", ["ste", "rotation", "gumbel"])
@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_train_forward_agrees_with_encode_and_decode(forward: str, distance: str) -> None:
    torch.manual_seed(0)
    n, dim, levels = 200, 16, 3
    x = torch.randn(n, dim)
    config = QuantizerConfig(
        levels=levels, codebook_size=[16, 8, 8], distance=distance, forward=forward, kmeans_iters=5
    )
    stack = ResidualQuantizer(dim, config)
    stack.init_from_data(x, _gen(0))
    stack.train()
    e = x.clone().requires_grad_(True)
    out = stack(e)

    assert out.codes.shape == (n, levels) and out.codes.dtype == torch.int64
    torch.testing.assert_close(out.codes, stack.encode(x), rtol=0, atol=0)
    codewords = stack.decode(out.codes)
    if forward != "gumbel":  # Gumbel's training value is a soft mixture; the others are the codewords
        torch.testing.assert_close(out.quantized, codewords)
    # Each level saw the residual left by the levels before it, and coded it with its nearest codeword.
    residual = x.clone()
    for level, quantizer in enumerate(stack.levels):
        codeword = quantizer.decode(out.codes[:, level]).detach()
        torch.testing.assert_close(out.residuals[level], residual)
        nearest = nearest_code(residual, quantizer.codebook.detach(), distance)[0]
        torch.testing.assert_close(out.codes[:, level], nearest)
        torch.testing.assert_close(out.errors[level], (residual - codeword).pow(2).sum(-1))
        residual = residual - codeword

    assert len(out.codebook_losses) == len(out.commitment_losses) == levels
    assert all(torch.isfinite(loss) for loss in out.codebook_losses + out.commitment_losses)
    loss = stack.loss(out)
    expected = sum(cb + config.commitment * cm for cb, cm in zip(out.codebook_losses, out.commitment_losses))
    torch.testing.assert_close(loss, expected)
    (loss + out.quantized.pow(2).sum()).backward()
    assert torch.isfinite(e.grad).all() and e.grad.any()
    for quantizer in stack.levels:
        assert quantizer.codebook.grad is not None and quantizer.codebook.grad.any()


def test_reset_dead_codes_reseeds_each_level_from_its_own_residuals() -> None:
    torch.manual_seed(0)
    x = torch.randn(128, 8)
    config = QuantizerConfig(levels=2, codebook_size=8, forward="ste", dead_code_decay=0.5)
    stack = ResidualQuantizer(8, config).train()
    with torch.no_grad():
        stack.levels[1].codebook[4:] = 1e3  # level 1: codes 4..7 unreachable
    for _ in range(6):  # usage of the unreachable codes decays below the threshold
        out = stack(x)
    total = stack.reset_dead_codes(out, batch_size=128)
    assert int(stack.levels[1].resets) == 4
    assert total == int(stack.levels[0].resets) + 4
    revived = stack.levels[1].codebook.detach()[4:]
    worst = torch.topk(out.errors[1], 4).indices
    torch.testing.assert_close(revived, out.residuals[1][worst], rtol=0, atol=0)
