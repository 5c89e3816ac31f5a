"""Tests for semid.quantize: the gradient each forward mode passes to the input and the codebook, the
losses, eval-mode behaviour, dead-code reseeding and the k-means initialisation of one codebook."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans

from semid.distance import nearest_code, pairwise_distance
from semid.quantize import (ForwardMode, Quantizer, gumbel_softmax_weights, rotation_trick, straight_through,
                            usage_balance_loss)

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _grad_of(fn, e: torch.Tensor, q: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward value of fn(e, q) and the gradient on e for the upstream gradient g."""
    e = e.clone().requires_grad_(True)
    out = fn(e, q)
    (out * g).sum().backward()
    return out.detach(), e.grad


def _rotation_matrix(e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """R = I - 2 r r^T + 2 q_hat e_hat^T as an explicit (d, d) matrix, for one pair of vectors (d,)."""
    e_hat, q_hat = e / e.norm(), q / q.norm()
    r = (e_hat + q_hat) / (e_hat + q_hat).norm()
    eye = torch.eye(e.shape[0], dtype=e.dtype)
    return eye - 2 * torch.outer(r, r) + 2 * torch.outer(q_hat, e_hat)


def _blobs(n_centres: int, per_centre: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points around well-separated centres: (points (n, dim), centres (n_centres, dim))."""
    g = _gen(seed)
    centres = 10.0 * torch.randn(n_centres, dim, generator=g)
    noise = spread * torch.randn(n_centres * per_centre, dim, generator=g)
    return centres.repeat_interleave(per_centre, dim=0) + noise, centres


# ---- straight-through -------------------------------------------------------------------------------
def test_straight_through_copies_the_upstream_gradient() -> None:
    g = _gen(0)
    e, q, up = (torch.randn(32, 8, generator=g) for _ in range(3))
    out, grad = _grad_of(straight_through, e, q, up)
    torch.testing.assert_close(out, q, rtol=0, atol=0)
    torch.testing.assert_close(grad, up, rtol=0, atol=0)


def test_quantizer_ste_mode_copies_the_gradient_and_outputs_the_codeword() -> None:
    torch.manual_seed(0)
    quantizer = Quantizer(8, 16, forward_mode="ste").train()
    e = torch.randn(32, 8, requires_grad=True)
    up = torch.randn(32, 8)
    out = quantizer(e)
    (out.quantized * up).sum().backward()
    torch.testing.assert_close(e.grad, up, rtol=0, atol=0)
    nearest = quantizer.codebook.detach()[nearest_code(e.detach(), quantizer.codebook, "l2")[0]]
    torch.testing.assert_close(out.quantized, nearest, rtol=0, atol=0)


# ---- rotation trick ---------------------------------------------------------------------------------
def test_rotation_trick_forward_value_is_the_codeword() -> None:
    g = _gen(1)
    e, q, up = (torch.randn(64, 16, generator=g) for _ in range(3))
    out, _ = _grad_of(rotation_trick, e, q, up)
    torch.testing.assert_close(out, q, rtol=0, atol=0)  # exactly q, not R e up to round-off


def test_rotation_trick_preserves_angles_and_scales_the_norm() -> None:
    g = _gen(2)
    e, q, up = (torch.randn(64, 16, generator=g, dtype=torch.float64) for _ in range(3))
    # Lengths spread over a wide range, so that the |q| / |e| factor is visible.
    e = e * (0.1 + 3 * torch.rand(64, 1, generator=g, dtype=torch.float64))
    q = q * (0.1 + 3 * torch.rand(64, 1, generator=g, dtype=torch.float64))
    _, grad = _grad_of(rotation_trick, e, q, up)
    # The angle between e and its gradient equals the angle between q and the upstream gradient.
    torch.testing.assert_close(F.cosine_similarity(e, grad, dim=-1), F.cosine_similarity(q, up, dim=-1))
    # |grad e| = |q| / |e| * |g|.
    torch.testing.assert_close(grad.norm(dim=-1), q.norm(dim=-1) / e.norm(dim=-1) * up.norm(dim=-1))
    # Not simply STE: the gradient differs from the upstream one.
    assert not torch.allclose(grad, up)


def test_rotation_trick_gradient_equals_explicit_rotation_matrix() -> None:
    g = _gen(3)
    e, q, up = (torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(3))
    _, grad = _grad_of(rotation_trick, e, q, up)
    for i in range(e.shape[0]):
        rot = _rotation_matrix(e[i], q[i])
        torch.testing.assert_close(rot @ rot.T, torch.eye(5, dtype=torch.float64))  # orthogonal
        torch.testing.assert_close(torch.linalg.det(rot), torch.tensor(1.0, dtype=torch.float64))  # a rotation
        torch.testing.assert_close(rot @ (e[i] / e[i].norm()), q[i] / q[i].norm())  # e_hat -> q_hat
        expected = q[i].norm() / e[i].norm() * rot.T @ up[i]
        torch.testing.assert_close(grad[i], expected)


def test_rotation_trick_antipodal_input_is_finite_and_still_norm_preserving() -> None:
    g = _gen(4)
    q = torch.randn(8, 6, generator=g, dtype=torch.float64)
    e = -2.0 * q  # opposite direction: r = e_hat + q_hat vanishes
    up = torch.randn(8, 6, generator=g, dtype=torch.float64)
    out, grad = _grad_of(rotation_trick, e, q, up)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(out, q)
    torch.testing.assert_close(grad.norm(dim=-1), 0.5 * up.norm(dim=-1))
    torch.testing.assert_close(F.cosine_similarity(e, grad, dim=-1), F.cosine_similarity(q, up, dim=-1))


@pytest.mark.parametrize("zero", ["e", "q", "both"])
def test_rotation_trick_zero_vectors_stay_finite(zero: str) -> None:
    g = _gen(5)
    e, q, up = (torch.randn(6, 4, generator=g) for _ in range(3))
    if zero in ("e", "both"):
        e[:3] = 0.0
    if zero in ("q", "both"):
        q[:3] = 0.0
    out, grad = _grad_of(rotation_trick, e, q, up)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(out, q)
    # Rows without a direction fall back to STE; the others keep the rotation gradient.
    torch.testing.assert_close(grad[:3], up[:3])
    assert not torch.allclose(grad[3:], up[3:])


def test_quantizer_rotation_mode_outputs_the_nearest_codeword_with_rotated_gradient() -> None:
    torch.manual_seed(0)
    quantizer = Quantizer(8, 16, forward_mode="rotation").train()
    e = torch.randn(64, 8, requires_grad=True)
    up = torch.randn(64, 8)
    out = quantizer(e)
    (out.quantized * up).sum().backward()
    nearest = quantizer.codebook.detach()[nearest_code(e.detach(), quantizer.codebook, "l2")[0]]
    torch.testing.assert_close(out.quantized, nearest)
    torch.testing.assert_close(out.codes, nearest_code(e.detach(), quantizer.codebook, "l2")[0])
    torch.testing.assert_close(e.grad.norm(dim=-1), nearest.norm(dim=-1) / e.detach().norm(dim=-1) * up.norm(dim=-1))


# ---- Gumbel-softmax ---------------------------------------------------------------------------------
@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_weights_sum_to_one(hard: bool) -> None:
    logits = torch.randn(128, 32, generator=_gen(6)) * 5
    weights = gumbel_softmax_weights(logits, tau=0.7, hard=hard, generator=_gen(7))
    assert weights.shape == logits.shape and (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(128))


def test_gumbel_hard_weights_are_one_hot_with_soft_gradients() -> None:
    logits = torch.randn(64, 10, generator=_gen(8), requires_grad=True)
    weights = gumbel_softmax_weights(logits, tau=1.0, hard=True, generator=_gen(9))
    assert set(weights.detach().unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(weights.detach().sum(-1), torch.ones(64), rtol=0, atol=0)
    (weights * torch.randn(64, 10, generator=_gen(10))).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_gumbel_low_temperature_picks_the_nearest_code() -> None:
    # Codewords far apart relative to the Gumbel noise, so the nearest code wins every draw.
    points, centres = _blobs(16, 16, 8, spread=0.1, seed=11)
    quantizer = Quantizer(8, 16, forward_mode="gumbel", gumbel_hard=True).train()
    with torch.no_grad():
        quantizer.codebook.copy_(centres)
    quantizer.tau.fill_(1e-3)
    nearest = nearest_code(points, centres, "l2")[0]
    logits = -torch.cdist(points, centres).pow(2)
    weights = gumbel_softmax_weights(logits, tau=1e-3, hard=True, generator=_gen(12))
    torch.testing.assert_close(weights.argmax(-1), nearest)
    e = points.clone().requires_grad_(True)
    out = quantizer(e)
    torch.testing.assert_close(out.quantized, centres[nearest], rtol=0, atol=0)
    # The one-hot mixture sends each row's upstream gradient to its own codeword (the soft part is
    # saturated at this temperature and adds nothing).
    up = torch.randn(points.shape, generator=_gen(13))
    (out.quantized * up).sum().backward()
    torch.testing.assert_close(quantizer.codebook.grad, torch.zeros(16, 8).index_add_(0, nearest, up))


def test_gumbel_temperature_anneals_the_choice_to_the_nearest_code_for_cosine(movies: torch.Tensor) -> None:
    # Cosine logits lie in [-1, 1] and real nearest codes win by small margins: the choice only becomes the
    # nearest code if tau scales the logits against the noise, and at tau = 1 it must still explore.
    rows = torch.randperm(movies.shape[0], generator=_gen(14))
    codebook, queries = movies[rows[:64]], movies[rows[64:1064]]
    nearest = nearest_code(queries, codebook, "cosine")[0]
    logits = -pairwise_distance(queries, codebook, "cosine")
    cold = gumbel_softmax_weights(logits, tau=1e-3, hard=True, generator=_gen(15)).argmax(-1)
    warm = gumbel_softmax_weights(logits, tau=1.0, hard=True, generator=_gen(16)).argmax(-1)
    assert (cold == nearest).float().mean() > 0.97
    assert (warm == nearest).float().mean() < 0.5


def test_gumbel_gradients_reach_input_and_codebook() -> None:
    torch.manual_seed(0)
    quantizer = Quantizer(8, 16, forward_mode="gumbel").train()
    e = (0.3 * torch.randn(32, 8)).requires_grad_(True)
    out = quantizer(e)
    (out.quantized * torch.randn(32, 8)).sum().backward()
    assert e.grad is not None and e.grad.abs().sum() > 0
    assert quantizer.codebook.grad is not None
    assert (quantizer.codebook.grad.abs().sum(-1) > 0).sum() > 1  # the mixture reaches several codewords
    # A soft mixture is not a single codeword.
    assert not torch.allclose(out.quantized, out.codeword)


# ---- eval mode and losses ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", list(ForwardMode))
def test_eval_mode_returns_the_hard_nearest_codeword(mode: ForwardMode) -> None:
    torch.manual_seed(0)
    quantizer = Quantizer(8, 16, forward_mode=mode).eval()
    e = torch.randn(64, 8)
    usage_before = quantizer.usage_ema.clone()
    out = quantizer(e)
    codes = nearest_code(e, quantizer.codebook, "l2")[0]
    torch.testing.assert_close(out.codes, codes)
    torch.testing.assert_close(out.quantized, quantizer.codebook.detach()[codes], rtol=0, atol=0)
    torch.testing.assert_close(quantizer.usage_ema, usage_before)  # eval does not count usage


def test_codebook_loss_reaches_only_the_codebook_and_commitment_only_the_input() -> None:
    torch.manual_seed(0)
    quantizer = Quantizer(8, 16, forward_mode="ste").train()
    e = torch.randn(32, 8, requires_grad=True)
    out = quantizer(e)
    q = quantizer.codebook.detach()[out.codes]
    expected = (e.detach() - q).pow(2).mean()
    torch.testing.assert_close(out.codebook_loss.detach(), expected)
    torch.testing.assert_close(out.commitment_loss.detach(), expected)

    out.codebook_loss.backward(retain_graph=True)
    assert e.grad is None or not e.grad.any()
    assert quantizer.codebook.grad is not None and quantizer.codebook.grad.any()
    # The codebook gradient of mean ||sg(e) - q||^2 is 2 (q - e) / numel, summed per code.
    expected_grad = torch.zeros(16, 8).index_add_(0, out.codes, 2 * (q - e.detach()) / e.numel())
    torch.testing.assert_close(quantizer.codebook.grad, expected_grad)

    quantizer.codebook.grad = None
    out.commitment_loss.backward()
    assert quantizer.codebook.grad is None or not quantizer.codebook.grad.any()
    torch.testing.assert_close(e.grad, 2 * (e.detach() - q) / e.numel())


# ---- usage balance -------------------------------------------------------------------------------------
def test_usage_balance_loss_is_zero_when_even_and_log_k_when_all_rows_pick_one_code() -> None:
    k = 8
    even = torch.full((4 * k, k), 1.0)
    even[torch.arange(4 * k), torch.arange(4 * k) % k] = -1.0  # each code nearest to 4 rows
    crowded = torch.full((4 * k, k), 1.0)
    crowded[:, 3] = -1.0
    torch.testing.assert_close(usage_balance_loss(even, 1e-3), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(usage_balance_loss(crowded, 1e-3), torch.tensor(math.log(k)))
    # A skewed assignment lies strictly between the two.
    skewed = torch.randn(64, k, generator=_gen(0))
    skewed[:, 0] -= 2.0
    assert 0.0 < usage_balance_loss(skewed, 0.5).item() < math.log(k)


def test_usage_balance_gradient_moves_rows_from_a_crowded_code_to_an_empty_one() -> None:
    """Descending the balance loss alone, rows leave the code that all of them pick for the unused code."""
    quantizer = Quantizer(2, 2, distance="cosine", balance_temperature=0.1).train()
    with torch.no_grad():
        quantizer.codebook.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    angles = torch.linspace(0.1, 0.6, 32)  # every row nearer code 0 (angle < pi / 4)
    e = torch.stack([angles.cos(), angles.sin()], dim=-1).requires_grad_(True)
    before = quantizer(e)
    assert (before.codes == 0).all()
    optimiser = torch.optim.SGD([e], lr=0.5)
    for _ in range(200):
        optimiser.zero_grad()
        quantizer(e).balance_loss.backward()
        optimiser.step()
    after = quantizer(e)
    assert after.balance_loss < 0.25 * before.balance_loss
    assert 8 <= int((after.codes == 1).sum()) <= 24


def test_usage_balance_loss_is_scale_free_under_l2_and_off_by_default_or_in_eval() -> None:
    e = torch.randn(64, 4, generator=_gen(1))
    quantizer = Quantizer(4, 8, distance="l2", balance_temperature=0.05).train()
    base = quantizer(e).balance_loss
    assert base > 0
    with torch.no_grad():
        quantizer.codebook.mul_(10.0)
    torch.testing.assert_close(quantizer(10.0 * e).balance_loss, base)
    assert quantizer.eval()(e).balance_loss == 0
    assert Quantizer(4, 8).train()(e).balance_loss == 0


# ---- dead codes ---------------------------------------------------------------------------------------
def test_reseed_uses_the_worst_quantized_inputs(lloyd_step) -> None:
    points, centres = _blobs(8, 20, 4, spread=0.5, seed=13)
    quantizer = Quantizer(4, 8).train()
    with torch.no_grad():
        quantizer.codebook.copy_(centres)
    # Give a few points a much larger error than the rest (far from every codeword), in scattered rows.
    outliers = torch.tensor([5, 42, 77, 150])
    points[outliers] += 40.0 * torch.randn(4, 4, generator=_gen(14))
    out = quantizer(points)
    brute = torch.cdist(points.double(), centres.double()).pow(2).min(-1).values
    torch.testing.assert_close(out.error.double(), brute, rtol=1e-5, atol=1e-4)

    dead = torch.tensor([6, 2, 3])
    quantizer.usage_ema[dead] = 0.0  # as if these codes had not been used for a long time
    assert set(quantizer.dead_codes(batch_size=160).tolist()) == set(dead.tolist())
    assert quantizer.reseed(dead, points, out.error) == 3
    worst_three = torch.argsort(brute, descending=True)[:3]
    assert set(worst_three.tolist()) <= set(outliers.tolist())
    seeded = centres.clone()
    seeded[dead] = points[worst_three]
    torch.testing.assert_close(quantizer.codebook.detach()[dead], lloyd_step(points, seeded, "l2")[dead])
    untouched = [0, 1, 4, 5, 7]
    torch.testing.assert_close(quantizer.codebook.detach()[untouched], centres[untouched], rtol=0, atol=0)
    assert int(quantizer.resets) == 3
    # Freshly reseeded codes get a fresh start: they are not reported dead before they have been used.
    assert not set(quantizer.dead_codes(batch_size=160).tolist()) & set(dead.tolist())


def test_cosine_reseed_takes_the_length_of_what_the_code_wins(lloyd_step) -> None:
    """Under cosine a reseeded code is picked by direction, so short rows pointing at a long outlier pick it.

    Left at the outlier's length it would lengthen their residuals (the divergence on heavy-tailed factors,
    bench/VARIANTS.md); after the Lloyd step it is the mean of what it codes, and lowers their error.
    """
    g = _gen(21)
    direction = F.normalize(torch.randn(1, 8, generator=g), dim=-1)
    short = 0.5 * direction + 0.05 * torch.randn(60, 8, generator=g)  # 60 short rows, all one way
    others = F.normalize(torch.randn(40, 8, generator=g), dim=-1)  # served by the live codes below
    outlier = 50.0 * direction
    points = torch.cat([short, others, outlier])
    quantizer = Quantizer(8, 41, distance="cosine").train()
    with torch.no_grad():
        quantizer.codebook[:40] = others
        quantizer.codebook[40] = -direction[0]  # dead: points away from every row
    out = quantizer(points)
    assert int(torch.topk(out.error, 1).indices) == 100  # the outlier is the worst-served row
    quantizer.usage_ema[40] = 0.0
    assert quantizer.reseed(torch.tensor([40]), points, out.error) == 1
    seeded = quantizer.codebook.detach().clone()
    seeded[40] = outlier[0]
    expected = lloyd_step(points, seeded, "cosine")[40]
    revived = quantizer.codebook.detach()[40]
    torch.testing.assert_close(revived, expected)
    winners = quantizer.encode(points) == 40
    assert winners[:60].sum() >= 50 and winners[100]  # the short rows and the outlier share the new code
    assert revived.norm() < 0.2 * outlier.norm()  # the length of the rows it codes, not the outlier's
    served = points[winners]
    left = lambda codeword: (served - codeword).pow(2).sum()  # noqa: E731 - squared error the code leaves
    assert left(revived) < served.pow(2).sum() < left(outlier[0])  # the mean lowers it; the outlier raised it


def test_dead_codes_far_from_the_data_are_revived_and_counted() -> None:
    torch.manual_seed(0)
    points, _ = _blobs(32, 32, 8, spread=0.5, seed=15)  # 1024 rows in 32 clusters: room for all 16 codes
    k, n_far = 16, 8
    quantizer = Quantizer(8, k, forward_mode="ste", dead_code_decay=0.5, dead_code_threshold=0.05).train()
    with torch.no_grad():
        quantizer.codebook[: k - n_far] = points[torch.randperm(len(points))[: k - n_far]]
        quantizer.codebook[k - n_far :] = 1e3 + torch.randn(n_far, 8)  # nothing is ever assigned here
    far = set(range(k - n_far, k))
    assert set(nearest_code(points, quantizer.codebook.detach(), "l2")[0].tolist()).isdisjoint(far)

    optimizer = torch.optim.Adam(quantizer.parameters(), lr=0.05)
    batch_size, reseeded, first_dead = 256, 0, None
    for step in range(60):
        batch = points[torch.randperm(len(points))[:batch_size]]
        out = quantizer(batch)
        optimizer.zero_grad()
        out.codebook_loss.backward()
        optimizer.step()
        if (step + 1) % 5 == 0:
            dead = quantizer.dead_codes(batch_size)
            if first_dead is None and dead.numel():
                first_dead = set(dead.tolist())
            reseeded += quantizer.reseed(dead, batch, out.error)
    assert first_dead == far  # exactly the unused codes are found dead, and no live one
    assert int(quantizer.resets) == reseeded >= n_far
    usage = torch.bincount(quantizer.encode(points), minlength=k)
    assert (usage > 0).all(), f"unused codes after reseeding: {torch.nonzero(usage == 0).flatten().tolist()}"


def test_dead_codes_needs_usage_history() -> None:
    quantizer = Quantizer(4, 8)
    assert quantizer.dead_codes(batch_size=100).numel() == 0  # nothing counted yet: nothing is dead
    quantizer.train()(torch.zeros(100, 4) + quantizer.codebook.detach()[0])  # every row on code 0
    assert 0 not in quantizer.dead_codes(batch_size=100).tolist()


# ---- k-means initialisation ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def movies(real_data) -> torch.Tensor:
    return torch.from_numpy(real_data("ml-1m"))


def test_init_from_data_matches_sklearn_kmeans_inertia(movies: torch.Tensor) -> None:
    k = 32
    quantizer = Quantizer(movies.shape[1], k)
    quantizer.init_from_data(movies, iters=25, generator=_gen(0))
    x64 = movies.double()
    ours = (x64 - quantizer.decode(quantizer.encode(movies)).double()).pow(2).sum().item()
    reference = KMeans(n_clusters=k, n_init=1, random_state=0).fit(movies.numpy().astype(np.float64)).inertia_
    assert ours <= 1.02 * reference
    assert (quantizer.usage_ema == -1).all()  # usage history restarts with the new codebook


def test_init_from_data_rejects_too_few_rows() -> None:
    with pytest.raises(ValueError, match="at least as many rows as codes"):
        Quantizer(4, 16).init_from_data(torch.randn(10, 4), iters=5, generator=_gen(0))


def test_cosine_init_keeps_cluster_means_not_unit_vectors(movies: torch.Tensor) -> None:
    k = 32
    x = movies[:2000]
    quantizer = Quantizer(x.shape[1], k, distance="cosine")
    quantizer.init_from_data(x, iters=10, generator=_gen(0))
    codebook = quantizer.codebook.detach()
    norms = codebook.norm(dim=-1)
    # Codewords carry the data's lengths (rows have norms of about 1.4 to 6.3), not unit length.
    assert (norms - 1).abs().min() > 0.1
    assert norms.median() > 0.5 * x.norm(dim=-1).median()
    # Scaling the data scales the codewords: direction picks the clusters, their means set the length.
    scaled = Quantizer(x.shape[1], k, distance="cosine")
    scaled.init_from_data(4.0 * x, iters=10, generator=_gen(0))
    torch.testing.assert_close(scaled.codebook.detach(), 4.0 * codebook)
    # Each codeword is (close to) the mean of the rows it codes, so the codebook reconstructs well.
    codes = quantizer.encode(x)
    error = (x - quantizer.decode(codes)).pow(2).sum()
    unit_error = (x - F.normalize(codebook, dim=-1)[codes]).pow(2).sum()
    assert error < 0.8 * unit_error


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_init_from_data_returns_the_assignment_of_the_final_codebook(movies: torch.Tensor, distance: str) -> None:
    """The returned codes are what the residual stack subtracts for the next level: for l2 the nearest
    final codeword of each row (k-means' last assignment), for cosine the clusters whose mean vectors
    became the codewords. Either way they agree with `encode` on almost every row."""
    x = movies[:2000]
    quantizer = Quantizer(x.shape[1], 32, distance=distance)
    codes = quantizer.init_from_data(x, iters=25, generator=_gen(0))
    assert codes.shape == (2000,) and codes.dtype == torch.long
    codebook = quantizer.codebook.detach()
    if distance == "cosine":
        for code in torch.unique(codes)[:8].tolist():
            torch.testing.assert_close(codebook[code], x[codes == code].mean(0), atol=1e-4, rtol=1e-4)
    else:
        assert (codes == quantizer.encode(x)).float().mean() > 0.999
    assert (codes == quantizer.encode(x)).float().mean() > 0.95
