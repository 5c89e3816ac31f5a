"""Tests for semid.residual: a residual stack on real embeddings must lower the reconstruction error with
every level (for l2 and for cosine, which must keep residual magnitudes), and the training-mode forward
must agree with encode/decode."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from semid.config import QuantizerConfig
from semid.distance import nearest_code, pairwise_distance
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


def test_reset_dead_codes_reseeds_each_level_from_its_own_residuals(lloyd_step) -> None:
    torch.manual_seed(0)
    x = torch.randn(128, 8)
    config = QuantizerConfig(levels=2, codebook_size=8, forward="ste", dead_code_decay=0.5)
    stack = ResidualQuantizer(8, config).train()
    with torch.no_grad():
        stack.levels[1].codebook[4:] = 1e3  # level 1: codes 4..7 unreachable
    for _ in range(6):  # usage of the unreachable codes decays below the threshold
        out = stack(x)
    seeded = stack.levels[1].codebook.detach().clone()
    total = stack.reset_dead_codes(out.residuals, out.errors, batch_size=128)
    assert int(stack.levels[1].resets) == 4
    assert total == int(stack.levels[0].resets) + 4
    # The revived codes start at level 1's four worst residuals (worst first), then each moves to the mean
    # of the residuals it wins (`Quantizer.reseed`): level 1's own residuals, not level 0's.
    residual, worst = out.residuals[1], torch.topk(out.errors[1], 4).indices
    seeded[4:] = residual[worst]
    torch.testing.assert_close(stack.levels[1].codebook.detach()[4:], lloyd_step(residual, seeded, "l2")[4:])


# ---- prefix centres ----------------------------------------------------------------------------------
def _grouped_stack(distance: str = "cosine", shrinkage: float = 0.0):
    """A 3-level stack on 160 points in 64 prefixes (lone items, pairs and larger groups), centres fitted."""
    g = _gen(3)
    x = torch.randn(160, 8, generator=g)
    stack = ResidualQuantizer(8, QuantizerConfig(levels=3, codebook_size=[8, 8, 16], distance=distance, kmeans_iters=10))
    stack.init_from_data(x, _gen(4))
    plain = stack.encode(x)
    groups = stack.fit_prefix_centres(x, shrinkage)
    return x, stack, plain, groups


def _plain_last_residual(stack: ResidualQuantizer, x: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
    """What the last level saw before centres: x minus the codewords of the levels before it."""
    return x - stack.levels[0].decode(plain[:, 0]) - stack.levels[1].decode(plain[:, 1])


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_prefix_centres_are_group_means_of_shared_prefixes_and_leave_prefixes_alone(distance: str) -> None:
    x, stack, plain, groups = _grouped_stack(distance, shrinkage=0.0)
    codes = stack.encode(x)
    torch.testing.assert_close(codes[:, :2], plain[:, :2], rtol=0, atol=0)  # only last codes may move
    _, group, counts = torch.unique(codes[:, :2], dim=0, return_inverse=True, return_counts=True)
    assert groups == int((counts > 1).sum()) == stack.prefix_keys.numel() and (counts == 1).any()
    # With no shrinkage each shared group's centred last-level inputs sum to zero; a lone item keeps its residual.
    *_, (_, centred, _) = stack._walk(x)
    sums = torch.zeros(counts.numel(), 8).index_add_(0, group, centred)
    assert sums[counts > 1].abs().max() < 1e-4
    lone = counts[group] == 1
    torch.testing.assert_close(centred[lone], _plain_last_residual(stack, x, plain)[lone], rtol=0, atol=0)
    # decode adds the centre back: the reconstruction error is what the last level left.
    last = stack.levels[2]
    torch.testing.assert_close(x - stack.decode(codes), centred - last.decode(codes[:, 2]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shrinkage", [1e12, 1.0])
def test_fitting_centres_moves_last_codewords_to_the_means_of_what_they_code(shrinkage: float) -> None:
    g = _gen(3)
    x = torch.randn(600, 8, generator=g)
    stack = ResidualQuantizer(8, QuantizerConfig(levels=3, codebook_size=[8, 8, 16], distance="cosine", kmeans_iters=10))
    stack.init_from_data(x, _gen(4))
    before = stack.levels[2].codebook.detach().clone()
    stack.fit_prefix_centres(x, shrinkage)
    *_, (last, centred, _) = stack._walk(x)  # the last level's input does not depend on its own codebook
    if shrinkage > 1e6:  # centres vanish: the fit is one Lloyd update of the last level
        assert stack.prefix_centres.abs().max() < 1e-9
    assigned = nearest_code(centred, before, "cosine")[0]
    for code in range(16):
        rows = assigned == code
        expected = centred[rows].mean(0) if rows.any() else before[code]
        torch.testing.assert_close(last.codebook.detach()[code], expected, rtol=1e-5, atol=1e-5)


def test_two_items_of_a_prefix_never_share_a_last_code_by_direction() -> None:
    # A pair's centred residuals are exact opposites, so no codeword can be the nearest direction of both.
    x, stack, plain, _ = _grouped_stack("cosine", shrinkage=0.0)
    codes = stack.encode(x)
    _, group, counts = torch.unique(plain[:, :2], dim=0, return_inverse=True, return_counts=True)
    pairs = [torch.nonzero(group == g).squeeze(-1) for g in torch.nonzero(counts == 2).squeeze(-1)]
    assert len(pairs) >= 3
    *_, (_, centred, _) = stack._walk(x)
    for a, b in pairs:
        torch.testing.assert_close(centred[a], -centred[b], rtol=0, atol=1e-5)
        assert codes[a, 2] != codes[b, 2]


def test_shrinkage_pulls_centres_towards_zero() -> None:
    x, stack, plain, _ = _grouped_stack(shrinkage=1.0)  # a group of n >= 2 items gets sum / (n + 1)
    residual = _plain_last_residual(stack, x, plain)
    keys = stack._prefix_key(plain[:, :2])
    for key, centre in zip(stack.prefix_keys[:5], stack.prefix_centres[:5]):
        rows = keys == key
        torch.testing.assert_close(centre, residual[rows].sum(0) / (rows.sum() + 1))


def test_unknown_prefix_has_no_centre_and_eval_forward_matches_encode() -> None:
    x, stack, _, _ = _grouped_stack(shrinkage=0.0)
    stack.fit_prefix_centres(x[:60], 0.0)  # 60 items leave prefixes empty or to one item: no centre there
    probe = x
    codes = stack.encode(probe)
    known = torch.isin(stack._prefix_key(codes[:, :2]), stack.prefix_keys)
    centre = stack._centre(codes[:, :2])
    assert (centre[~known] == 0).all() and (~known).any()
    assert (centre[known].abs().sum(-1) > 0).all()
    stack.eval()
    out = stack(probe)
    torch.testing.assert_close(out.codes, codes, rtol=0, atol=0)
    torch.testing.assert_close(out.quantized, stack.decode(codes))


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_level_distances_follow_the_given_codes_and_their_prefix_centre(distance: str) -> None:
    """Remap ranks the codes of a prefix it moves an item to by these (semid.collisions)."""
    x, stack, _, _ = _grouped_stack(distance)
    codes = stack.encode(x)
    last = stack.levels[2]
    # Under the rows' own codes: what the levels see when encoding.
    torch.testing.assert_close(stack.level_distances(x, codes[:, :2]), stack.last_level_distances(x))
    torch.testing.assert_close(stack.level_distances(x, codes[:, :0]), pairwise_distance(x, stack.levels[0].codebook,
                                                                                        distance))
    # Under another prefix: what its codewords and its centre leave.
    moved = torch.stack([codes[:, 0], (codes[:, 1] + 1) % 8], 1)
    centre = stack._centre(moved)
    assert (centre.abs().sum(-1) > 0).any()
    residual = x - stack.levels[0].decode(moved[:, 0]) - stack.levels[1].decode(moved[:, 1]) - centre
    dist = stack.level_distances(x, moved)
    torch.testing.assert_close(dist, pairwise_distance(residual, last.codebook, distance))
    if distance == "l2":  # the nearest code is the one whose ID, decoded, is nearest the item
        errors = torch.stack([(x - stack.decode(torch.cat([moved, torch.full_like(moved[:, :1], c)], 1))).pow(2).sum(-1)
                              for c in range(16)], 1)
        torch.testing.assert_close(dist, errors, atol=1e-4, rtol=1e-4)


def test_prefix_centres_survive_a_state_dict_round_trip_and_old_state_dicts_load() -> None:
    x, stack, _, _ = _grouped_stack(shrinkage=0.0)
    fresh = ResidualQuantizer(8, stack.config)
    fresh.load_state_dict(stack.state_dict())  # the table has a model-dependent size
    torch.testing.assert_close(fresh.encode(x), stack.encode(x), rtol=0, atol=0)
    torch.testing.assert_close(fresh.decode(stack.encode(x)), stack.decode(stack.encode(x)))
    old = {k: v for k, v in stack.state_dict().items() if not k.startswith("prefix_")}
    fresh.load_state_dict(old)  # saved before prefix centres existed: no table
    assert not fresh.has_centres
    torch.testing.assert_close(fresh.decode(stack.encode(x)), sum(l.decode(c) for l, c in zip(stack.levels, stack.encode(x).T)))


def test_refine_drops_stale_prefix_centres() -> None:
    x, stack, _, _ = _grouped_stack(shrinkage=0.0)
    stack.refine(x, passes=1)
    assert not stack.has_centres


def test_prefix_centres_lower_collisions_on_real_items() -> None:
    # Bundled goodbooks, residual k-means 3 x 64 by direction: measured 12.5% of items collide with plain
    # residuals and 4.6% with centres, because items of a prefix no longer share an offset.
    from semid.sources import read_items
    from semid.metrics import collision_metrics

    x = torch.from_numpy(read_items(Path(__file__).resolve().parents[1] / "data" / "goodbooks.parquet").embeddings.copy())
    x = x - x.mean(0)
    x = x / x.pow(2).mean().sqrt()
    stack = ResidualQuantizer(384, QuantizerConfig(levels=3, codebook_size=64, distance="cosine", kmeans_iters=10))
    stack.init_from_data(x, _gen(0))
    before = collision_metrics(stack.encode(x).numpy())["collision_rate"]
    stack.fit_prefix_centres(x, 0.0)
    after = collision_metrics(stack.encode(x).numpy())["collision_rate"]
    assert after < 0.6 * before, (before, after)


def test_a_single_level_has_no_prefix_and_no_centres() -> None:
    x = torch.randn(100, 4, generator=_gen(5))
    stack = ResidualQuantizer(4, QuantizerConfig(levels=1, codebook_size=8, kmeans_iters=5))
    stack.init_from_data(x, _gen(6))
    codes = stack.encode(x)
    assert stack.fit_prefix_centres(x, 0.0) == 0 and not stack.has_centres
    torch.testing.assert_close(stack.encode(x), codes, rtol=0, atol=0)


@pytest.mark.parametrize("weight", [0.0, 0.7])
def test_stack_loss_adds_each_levels_balance_loss_at_its_weight(weight: float) -> None:
    torch.manual_seed(0)
    config = QuantizerConfig(levels=2, codebook_size=8, distance="cosine", balance_weight=weight)
    stack = ResidualQuantizer(4, config).train()
    out = stack(torch.randn(64, 4))
    assert all((bl > 0) == (weight > 0) for bl in out.balance_losses)
    expected = sum(cb + 0.25 * cm + weight * bl
                   for cb, cm, bl in zip(out.codebook_losses, out.commitment_losses, out.balance_losses))
    torch.testing.assert_close(stack.loss(out), expected)
