"""Trainer (issue #3): learning, determinism, resume, best weights, early stopping, every config option.

All runs are tiny (a 64-wide MLP, 3 x 16 codes, a few hundred steps) on real item embeddings, so each
takes about a second on one CPU core.
"""
from __future__ import annotations

import argparse
import copy
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from semid.config import ConfigError, SemidConfig, tomllib  # tomllib, or tomli on Python 3.10
import semid.train
from semid.rqvae import rms_spread
from semid.train import Trainer, encode_in_batches, norm_sampling_probabilities, quick_evaluate, score


def _x(real_data, name: str = "ml-100k") -> torch.Tensor:
    return torch.from_numpy(real_data(name))


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def _heavy_tailed(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x centred with a seeded 1% of its rows scaled 30x, as popularity scales collaborative factors; and
    the mask of those rows."""
    x = x - x.mean(0)
    heavy = torch.zeros(x.shape[0], dtype=torch.bool)
    heavy[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[: x.shape[0] // 100]] = True
    x[heavy] *= 30
    return x, heavy


def _states_differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


# ---- learning ---------------------------------------------------------------------------------


def test_loss_decreases_on_real_sample(real_data, tiny_config):
    """Full-corpus reconstruction loss after training is well below the loss right after initialisation."""
    x = _x(real_data, "ml-1m")
    config = tiny_config({"train.steps": 150, "train.eval_every": 25})
    untrained = Trainer(config, x)
    untrained.initialize()  # k-means codebooks, no gradient step: the same start the trained run has
    untrained.model.eval()
    trainer = Trainer(config, x)
    model = trainer.fit()
    with torch.no_grad():
        before = untrained.model(untrained.x)
        after = model(trainer.x)
    assert float(after.reconstruction_loss) < 0.9 * float(before.reconstruction_loss)
    assert float(after.loss) < float(before.loss)
    history = trainer.state.history
    assert [h["step"] for h in history] == list(range(25, 151, 25))
    assert history[-1]["fvu"] < history[0]["fvu"] - 0.03
    # Inputs are scaled by one global RMS factor, so the standardised MSE is exactly the fraction of
    # variance unexplained: the training objective and the headline metric measure the same thing.
    assert float(after.reconstruction_loss) == pytest.approx(quick_evaluate(model, trainer.x)["fvu"], rel=1e-4)


def test_resume_with_uniqueness_loss_matches_uninterrupted_run(real_data, tiny_config, tmp_path):
    """The uniqueness targets are part of the checkpoint: a resume between target updates ends identical."""
    x = _x(real_data)
    ckpt = tmp_path / "train.ckpt"
    config = tiny_config({"train.steps": 90, "train.checkpoint_every": 50, "train.uniqueness_weight": 5.0,
                          "train.uniqueness_every": 40})
    full_model = Trainer(config, x, checkpoint_path=ckpt).fit()
    resumed_model = Trainer(config, x, checkpoint_path=ckpt).fit(resume=True)
    _assert_same_state(full_model.state_dict(), resumed_model.state_dict())


@pytest.mark.parametrize("forward", ["ste", "rotation", "gumbel"])
@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_every_distance_and_forward_mode_learns(real_data, tiny_config, distance, forward):
    # Gumbel starts cold (tau 0.1, not 1.0): the default schedule anneals over thousands of steps, and at
    # tau near 1 the sampled code is close to random for latent distances of this scale.
    config = tiny_config({"quantizer.distance": distance, "quantizer.forward": forward,
                          "quantizer.gumbel_tau_start": 0.1,
                          "train.steps": 200, "train.lr": 0.005, "train.eval_every": 100})
    trainer = Trainer(config, _x(real_data))
    model = trainer.fit()
    fvu = quick_evaluate(model, trainer.x)["fvu"]
    assert fvu < 0.9, f"{distance}/{forward}: fvu {fvu:.3f} after 200 steps"


# ---- determinism and resume -------------------------------------------------------------------


def test_same_seed_gives_same_result_and_another_seed_differs(real_data, tiny_config):
    x = _x(real_data)
    runs = []
    for seed in (0, 0, 1):
        trainer = Trainer(tiny_config({"train.seed": seed, "train.steps": 60}), x)
        model = trainer.fit()
        runs.append((model.state_dict(), encode_in_batches(model, trainer.x), trainer.state.history))
    (w0, c0, h0), (w1, c1, h1), (w2, c2, _) = runs
    _assert_same_state(w0, w1)
    assert torch.equal(c0, c1)
    assert h0 == h1
    assert _states_differ(w0, w2)
    assert not torch.equal(c0, c2)


def test_decoder_dropout_acts_in_training_only_and_training_stays_reproducible(real_data, tiny_config):
    x = _x(real_data)
    config = tiny_config({"model.decoder_dropout": 0.3, "train.steps": 40, "train.eval_every": 20})
    plain, dropped = Trainer(tiny_config({"train.steps": 40, "train.eval_every": 20}), x), Trainer(config, x)
    dropouts = [m for m in dropped.model.decoder if isinstance(m, torch.nn.Dropout)]
    assert len(dropouts) == len(config.model.hidden) and all(m.p == 0.3 for m in dropouts)
    assert not any(isinstance(m, torch.nn.Dropout) for m in [*dropped.model.encoder, *plain.model.modules()])
    # Dropout has no weights: both models start alike, and so do their k-means codebooks.
    plain.initialize()
    dropped.initialize()
    _assert_same_state(plain.model.quantizer.state_dict(), dropped.model.quantizer.state_dict())
    for a, b in zip(plain.model.parameters(), dropped.model.parameters(), strict=True):
        assert torch.equal(a, b)

    runs = []
    for _ in range(2):
        trainer = Trainer(config, x)
        runs.append((trainer.fit(), trainer))
    (model, first), (other, second) = runs
    _assert_same_state(model.state_dict(), other.state_dict())
    assert first.state.history == second.state.history
    codes = model.encode(first.x[:500])
    assert not model.training  # fit returns the model ready to encode and decode
    assert torch.equal(model.decode(codes), model.decode(codes))
    model.train()
    with torch.no_grad():
        latent = model.quantizer.decode(codes)
        assert not torch.allclose(model.decoder(latent), model.decoder(latent))
    model.eval()


@pytest.mark.parametrize("dropout, norm_sampling", [(0.0, 0.0), (0.3, 0.0), (0.0, 0.5)])
def test_resume_from_checkpoint_matches_uninterrupted_run(real_data, tiny_config, tmp_path, dropout, norm_sampling):
    """Checkpoint at step 60 of 100 (the only multiple of 60); a new trainer resumes it and ends identical.

    With dropout the masks come from torch's global generator, which the checkpoint carries; with norm
    sampling (on a heavy-tailed catalogue) the rows are drawn from the checkpointed batch generator, as
    shuffled passes are.
    """
    x = _heavy_tailed(_x(real_data))[0] if norm_sampling else _x(real_data)
    ckpt = tmp_path / "train.ckpt"
    config = tiny_config({"train.steps": 100, "train.eval_every": 20, "train.checkpoint_every": 60,
                          "quantizer.dead_code_every": 7, "model.decoder_dropout": dropout,
                          "train.norm_sampling": norm_sampling})
    full = Trainer(config, x, checkpoint_path=ckpt)
    full_model = full.fit()
    assert torch.load(ckpt, weights_only=True)["state"]["step"] == 60  # a genuine mid-run checkpoint

    resumed = Trainer(config, x, checkpoint_path=ckpt)
    assert _states_differ(resumed.model.state_dict(), full_model.state_dict())  # not trivially equal
    resumed_model = resumed.fit(resume=True)

    _assert_same_state(full_model.state_dict(), resumed_model.state_dict())
    assert resumed.state.history == full.state.history
    assert (resumed.state.step, resumed.state.best_step) == (full.state.step, full.state.best_step)
    assert resumed.state.dead_code_resets == full.state.dead_code_resets
    # The optimizer moments and the learning rate continue where they were, not from scratch.
    full_opt, resumed_opt = full.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert full_opt["param_groups"] == resumed_opt["param_groups"]
    assert float(resumed.optimizer.param_groups[0]["lr"]) < config.train.lr  # the cosine decay moved it
    for key, moments in full_opt["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, resumed_opt["state"][key][name]), f"optimizer {name} of param {key}"


def test_a_checkpoint_written_on_a_gpu_resumes_on_the_cpu_as_if_uninterrupted(real_data, tiny_config, tmp_path):
    """A CUDA-graph run's AdamW groups are capturable with the rate in a device tensor; resumed on a CPU those
    flags would fail the first step. The resumed run keeps its own flags and ends as the uninterrupted run."""
    x = _x(real_data)
    ckpt = tmp_path / "train.ckpt"
    config = tiny_config({"train.steps": 50, "train.eval_every": 10, "train.checkpoint_every": 30})
    full = Trainer(config, x, checkpoint_path=ckpt)
    full_model = full.fit()
    payload = torch.load(ckpt, weights_only=True)
    assert payload["state"]["step"] == 30  # the one checkpoint, mid-run: dress its optimizer as a GPU run's
    for group in payload["optimizer"]["param_groups"]:
        group.update(capturable=True, fused=None, foreach=None, lr=torch.tensor(float(group["lr"])))
    torch.save(payload, ckpt)

    resumed = Trainer(config, x, checkpoint_path=ckpt)
    own_flags = [(g["capturable"], g["fused"], g["foreach"]) for g in resumed.optimizer.param_groups]
    resumed_model = resumed.fit(resume=True)
    assert [(g["capturable"], g["fused"], g["foreach"]) for g in resumed.optimizer.param_groups] == own_flags
    _assert_same_state(full_model.state_dict(), resumed_model.state_dict())
    assert resumed.state.history == full.state.history


def test_load_checkpoint_rejects_corrupt_and_foreign_files(real_data, tiny_config, tmp_path):
    x = _x(real_data)
    config = tiny_config({"train.steps": 20, "train.checkpoint_every": 10})
    ckpt = tmp_path / "train.ckpt"
    Trainer(config, x, checkpoint_path=ckpt).fit()
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read training checkpoint .*: it is truncated or corrupt \(not a "
                                         r"complete torch zip archive\)$"):
        Trainer(config, x, checkpoint_path=ckpt).fit(resume=True)
    for text in ("not a checkpoint\n", "hello world\n"):  # torch fails on each with another error (KeyError '101')
        ckpt.write_text(text)  # named for what it is, without torch's advice to unpickle it
        with pytest.raises(ValueError, match="not a torch file of tensors") as err:
            Trainer(config, x, checkpoint_path=ckpt).fit(resume=True)
        assert "weights_only" not in str(err.value) and "\n" not in str(err.value)
    torch.save({"step": argparse.Namespace(step=3)}, ckpt)
    with pytest.raises(ValueError, match="holds Python objects, not only tensors"):
        Trainer(config, x, checkpoint_path=ckpt).fit(resume=True)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match="not a semid training checkpoint"):
        Trainer(config, x, checkpoint_path=foreign).fit(resume=True)
    older = tmp_path / "older.pt"  # a format this version does not read: named, not a KeyError
    torch.save({"format": "semid-train-checkpoint-v1"}, older)
    with pytest.raises(ValueError, match="is a semid-train-checkpoint-v1 checkpoint; this semid reads"):
        Trainer(config, x, checkpoint_path=older).fit(resume=True)


def test_a_damaged_empty_or_incomplete_checkpoint_is_refused_by_what_is_wrong(real_data, tiny_config, tmp_path):
    """torch reads a torch file without checking its checksums: flipped bits would resume from other weights."""
    from semid.train import _CHECKPOINT_KEYS, CHECKPOINT_FORMAT

    x = _x(real_data)
    config = tiny_config({"train.steps": 20, "train.checkpoint_every": 10})
    ckpt = tmp_path / "train.ckpt"
    Trainer(config, x, checkpoint_path=ckpt).fit()
    assert set(torch.load(ckpt, weights_only=True)) == {"format", *_CHECKPOINT_KEYS}  # what a resume requires
    data = bytearray(ckpt.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 2000] = bytes(b ^ 4 for b in data[middle : middle + 2000])
    ckpt.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"cannot read training checkpoint .*fails its checksum"):
        Trainer(config, x, checkpoint_path=ckpt).fit(resume=True)
    ckpt.write_bytes(b"")
    with pytest.raises(ValueError, match=r"cannot read training checkpoint .*: EOFError \(an empty or truncated"):
        Trainer(config, x, checkpoint_path=ckpt).fit(resume=True)
    torch.save({"format": CHECKPOINT_FORMAT, "config": config.to_dict()}, ckpt)
    with pytest.raises(ValueError, match=r"incomplete training checkpoint: it lacks data, model, optimizer"):
        Trainer(config, x, checkpoint_path=ckpt).fit(resume=True)


def test_a_checkpoint_path_that_cannot_be_written_fails_before_training(real_data, tiny_config, tmp_path, monkeypatch):
    x = _x(real_data)
    config = tiny_config({"train.steps": 20, "train.checkpoint_every": 10})
    with pytest.raises(ValueError, match=r"training checkpoint .* is a directory; name a file"):
        Trainer(config, x, checkpoint_path=tmp_path).fit()
    (tmp_path / "a_file").write_text("")
    trainer = Trainer(config, x, checkpoint_path=tmp_path / "a_file" / "train.ckpt")
    with pytest.raises(OSError, match=r"cannot write training checkpoint .*a_file/train.ckpt"):
        trainer.fit()
    assert trainer.state.step == 0  # refused before the first step

    def full_disk(*args, **kwargs):  # what torch raises when the disk fills mid-write
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 18481088 vs 18480980")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"cannot write training checkpoint .*train2.ckpt: \[enforce fail.*is the disk full"):
        Trainer(config, x, checkpoint_path=tmp_path / "train2.ckpt").fit()
    assert not list(tmp_path.glob(".train2*"))  # no temporary file left


def test_a_checkpoint_resumes_only_on_the_data_it_was_written_with(real_data, tiny_config, tmp_path):
    """Resuming on other items would continue a model fitted to the old ones as if nothing changed."""
    x = _x(real_data)
    config = tiny_config({"train.steps": 20, "train.checkpoint_every": 10})
    ckpt = tmp_path / "train.ckpt"
    Trainer(config, x, checkpoint_path=ckpt).fit()
    shuffled = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))]  # same shape, other order
    for other, why in ((shuffled, r"as many items of the same width, .* with other values or order"),
                       (x[:-7], rf"{len(x):,} x 384 items, this run has {len(x) - 7:,} x 384")):
        with pytest.raises(ValueError, match=rf"written while training on other data \({why}\)"):
            Trainer(config, other, checkpoint_path=ckpt).fit(resume=True)
    Trainer(config, x.clone(), checkpoint_path=ckpt).fit(resume=True)  # the same rows resume


def test_checkpoints_are_never_silently_replaced_or_resumed_with_another_config(real_data, tiny_config, tmp_path):
    x = _x(real_data)
    config = tiny_config({"train.steps": 20, "train.eval_every": 10})  # no train.checkpoint_every
    ckpt = tmp_path / "train.ckpt"
    Trainer(config, x, checkpoint_path=ckpt).fit()
    assert torch.load(ckpt, weights_only=True)["state"]["step"] == 20  # a path alone checkpoints at evaluations
    with pytest.raises(ValueError, match="already exists: resume it"):
        Trainer(config, x, checkpoint_path=ckpt).fit()
    changed = config.with_overrides({"train.lr": 0.5, "train.seed": 5})
    with pytest.raises(ValueError, match=r"another config \(train.seed: 0 -> 5, train.lr: 0.003 -> 0.5\)"):
        Trainer(changed, x, checkpoint_path=ckpt).fit(resume=True)
    watched = config.with_overrides({"train.progress": True, "train.checkpoint_every": 5})
    Trainer(watched, x, checkpoint_path=ckpt).fit(resume=True)  # how a run is watched may change


# ---- best weights and early stopping ----------------------------------------------------------


def test_returned_weights_are_the_reported_best(real_data, tiny_config):
    """A run that is wrecked halfway (the learning rate jumps 3,000x after step 50), so that the best
    evaluation is an early one on every host; a merely unstable run left that to chance (on one CPU the last
    of its chaotic evaluations happened to be the best)."""
    config = tiny_config({"train.schedule": "constant", "train.eval_every": 10,
                          "quantizer.prefix_centres": False, "train.decoder_refit_steps": 0})
    trainer = Trainer(config, _x(real_data))
    trainer.learning_rate = lambda step: 1.0 if step < 50 else 3000.0
    model = trainer.fit()
    history, state = trainer.state.history, trainer.state
    scores = [score(h, "fvu") for h in history]
    best = history[int(np.argmin([s[0] for s in scores]))]
    assert state.best_step == best["step"]
    assert state.best_step != history[-1]["step"], "precondition: the best evaluation should not be the last"
    again = quick_evaluate(model, trainer.x)
    assert again["fvu"] == pytest.approx(best["fvu"], abs=1e-6)
    assert again["collision_rate"] == best["collision_rate"]
    assert abs(again["fvu"] - history[-1]["fvu"]) > 1e-3  # really not the last weights
    assert state.final == best


def test_prefix_centres_are_fitted_on_the_best_weights_and_finally_evaluated(real_data, tiny_config):
    """With prefix centres the returned model keeps the best weights' prefixes; `final` evaluates its codes."""
    from semid.rqvae import RQVAE

    config = tiny_config({"train.lr": 1.0, "train.schedule": "constant", "train.eval_every": 10})
    trainer = Trainer(config, _x(real_data))
    model = trainer.fit()
    final = trainer.state.final
    assert model.quantizer.has_centres and final["prefix_centres"] == model.quantizer.prefix_keys.numel()
    assert final["step"] == trainer.state.best_step
    again = quick_evaluate(model, trainer.x, trainer._neighbours)
    assert {k: final[k] for k in again} == again
    plain = RQVAE(trainer.x.shape[1], config.model, config.quantizer)
    plain.load_state_dict(trainer.state.best_weights)  # the best weights, before centres were fitted
    plain_codes, codes = plain.encode(trainer.x), model.encode(trainer.x)
    assert torch.equal(plain_codes[:, :-1], codes[:, :-1])
    assert not torch.equal(plain_codes[:, -1], codes[:, -1])


def test_decoder_refit_changes_only_the_decoder_and_lowers_reconstruction_error(real_data, tiny_config):
    """The refit trains the decoder on the final codes: the same codes and encoder, a better reconstruction."""
    runs = {}
    for steps in (0, 200, 200):
        trainer = Trainer(tiny_config({"train.decoder_refit_steps": steps}), _x(real_data))
        model = trainer.fit()
        runs.setdefault(steps, []).append((model, trainer.state.final, model.encode(trainer.x)))
    (plain, plain_final, plain_codes), = runs[0]
    (refit, final, codes), (again, _, _) = runs[200]
    assert torch.equal(codes, plain_codes)
    for name, value in refit.state_dict().items():
        same = torch.equal(value, plain.state_dict()[name])
        assert same != name.startswith("decoder."), name  # the decoder, and only the decoder, has changed
        assert torch.equal(value, again.state_dict()[name]), name  # and the refit is reproducible
    assert final["decoder_refit_steps"] == 200
    assert final["fvu"] < plain_final["fvu"] - 0.003, (final["fvu"], plain_final["fvu"])  # measured 0.826 -> 0.817
    assert final["collision_rate"] == plain_final["collision_rate"]


def test_refit_dropout_keeps_the_codes_and_the_weight_keys_and_changes_only_the_refit(real_data, tiny_config):
    runs = {}
    for p in (0.0, 0.3, 0.3):
        trainer = Trainer(tiny_config({"train.decoder_refit_steps": 100, "train.decoder_refit_dropout": p}),
                          _x(real_data))
        model = trainer.fit()
        runs.setdefault(p, []).append((model, model.encode(trainer.x)))
    (plain, plain_codes), = runs[0.0]
    (dropped, codes), (again, _) = runs[0.3]
    assert torch.equal(codes, plain_codes)  # the codes were fixed before the refit
    assert dropped.state_dict().keys() == plain.state_dict().keys()  # no module added: saved models are alike
    for name, value in dropped.state_dict().items():
        assert torch.equal(value, plain.state_dict()[name]) != name.startswith("decoder."), name
        assert torch.equal(value, again.state_dict()[name]), name  # seeded: the masks are reproducible


def test_a_checkpoint_from_before_a_config_key_existed_resumes_as_that_keys_default():
    from semid.train import _config_changes

    current = SemidConfig().to_dict()
    saved = copy.deepcopy(current)
    del saved["train"]["decoder_refit_dropout"]  # written by a semid without the key
    assert _config_changes(saved, current) == []
    current["train"]["decoder_refit_dropout"] = 0.1
    assert _config_changes(saved, current) == ["train.decoder_refit_dropout: 0.0 -> 0.1"]


def test_dropout_after_activations_applies_inverted_dropout_inside_only():
    from semid.rqvae import dropout_after_activations, mlp

    torch.manual_seed(0)
    net = mlp([8, 64, 64, 4], "silu", layer_norm=False).eval()
    x = torch.randn(4096, 8)
    with torch.no_grad():
        before = net(x)
        hidden = net[:2](x)  # the first activation's output
        with dropout_after_activations(net, 0.5):
            first = net[:2](x)
            assert not torch.equal(net(x), net(x))  # stochastic inside, even in eval mode
        with dropout_after_activations(net, 0.0):
            assert torch.equal(net(x), before)
        assert torch.equal(net(x), before)  # the hooks are gone
    kept = first != 0
    assert abs(kept.float().mean().item() - 0.5) < 0.01  # about half of the units dropped ...
    torch.testing.assert_close(first[kept], 2 * hidden[kept])  # ... and the rest scaled by 1 / (1 - p)


# ---- norm sampling ----------------------------------------------------------------------------


def test_norm_sampling_probabilities_mix_uniform_and_squared_norm_and_keep_the_error_unbiased():
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    x[:5] *= 40  # a heavy tail: 1% of the rows
    w = (x - x.mean(0)).pow(2).sum(-1).double()
    assert torch.allclose(norm_sampling_probabilities(x, 0.0), torch.full((500,), 1 / 500))
    assert torch.allclose(norm_sampling_probabilities(x, 1.0).double(), w / w.sum(), atol=1e-7)
    p = norm_sampling_probabilities(x, 0.5).double()
    assert math.isclose(p.sum().item(), 1.0, rel_tol=1e-6)
    assert torch.allclose(p, 0.5 / 500 + 0.5 * w / w.sum(), atol=1e-7)
    assert p.min() >= 0.5 / 500 - 1e-9  # every item keeps a chance: its weight 1 / (N p) is at most 2
    assert p[:5].sum() > 0.3  # the heavy rows fill a large share of each batch
    # The reweighted expectation of any per-row error is the plain mean over the catalogue.
    error = torch.rand(500, generator=torch.Generator().manual_seed(1)).double()
    weights = 1.0 / (500 * p)
    assert math.isclose((p * weights * error).sum().item(), error.mean().item(), rel_tol=1e-9)
    # No heavy tail, or no variance at all: no draw (shuffled passes), never NaN probabilities.
    assert norm_sampling_probabilities(x[5:], 0.5) is None
    assert norm_sampling_probabilities(torch.ones(4, 3), 0.7) is None


def test_norm_sampling_leaves_text_embeddings_exactly_as_without_it(real_data, tiny_config):
    """Real text embeddings are not heavy-tailed, so they train on shuffled passes, bit-identically."""
    x = _x(real_data)
    models = [Trainer(tiny_config({"train.norm_sampling": share}), x).fit() for share in (0.0, 0.5)]
    _assert_same_state(models[0].state_dict(), models[1].state_dict())


def test_row_weights_scale_each_rows_reconstruction_term_only(real_data, tiny_config):
    x = _x(real_data)[:64]
    model = Trainer(tiny_config(), x).model
    torch.manual_seed(0)
    plain = model(x)
    weights = torch.rand(64, generator=torch.Generator().manual_seed(2)) * 3
    weighted = model(x, torch.ones(64))
    assert torch.allclose(weighted.reconstruction_loss, plain.reconstruction_loss, atol=1e-6)
    weighted = model(x, weights)
    per_row = (plain.x_hat.float() - model.normalize(x)).pow(2).mean(-1)
    assert torch.allclose(weighted.reconstruction_loss, (per_row * weights).mean(), atol=1e-6)
    assert torch.allclose(weighted.quantizer_loss, plain.quantizer_loss)  # latent-space terms are untouched


def test_norm_sampling_draws_heavy_rows_more_and_fits_a_heavy_tailed_catalogue_better(real_data, tiny_config):
    """1% of the items scaled 30x hold most of the variance. Uniform batches hold about two of them; drawn
    by norm they fill most of each batch, and fvu falls (measured 0.70 -> 0.28 in 300 tiny steps)."""
    x, is_heavy = _heavy_tailed(_x(real_data))
    fvu = {}
    for share in (0.0, 0.5):
        trainer = Trainer(tiny_config({"train.steps": 300, "train.norm_sampling": share}), x)
        drawn = torch.cat([trainer._next_rows() for _ in range(20)])
        heavy_share = is_heavy[drawn].float().mean().item()
        assert (heavy_share < 0.05) if share == 0 else (heavy_share > 0.3), (share, heavy_share)
        trainer = Trainer(tiny_config({"train.steps": 300, "train.norm_sampling": share}), x)
        trainer.fit()
        fvu[share] = trainer.state.final["fvu"]
    assert fvu[0.5] < 0.7 * fvu[0.0], fvu


def test_best_metric_higher_is_better_for_cosine():
    low, high = {"cosine": 0.5, "collision_rate": 0.0}, {"cosine": 0.9, "collision_rate": 0.0}
    assert score(high, "cosine") < score(low, "cosine")
    assert score({"fvu": 0.5, "collision_rate": 0.1}, "fvu") < score({"fvu": 0.5, "collision_rate": 0.2}, "fvu")


def test_early_stopping_stops_after_evaluations_without_improvement(real_data, tiny_config):
    """With lr 0 the model never changes, so every evaluation after the first fails to improve."""
    config = tiny_config({"train.lr": 0.0, "train.steps": 1000, "train.eval_every": 10,
                          "train.early_stopping": 2, "quantizer.dead_code_reset": False})
    trainer = Trainer(config, _x(real_data))
    trainer.fit()
    assert trainer.state.step == 30  # evals at 10 (best), 20 and 30 (no improvement) -> stop
    assert [h["step"] for h in trainer.state.history] == [10, 20, 30]
    assert trainer.state.best_step == 10


def test_no_early_stopping_runs_every_step(real_data, tiny_config):
    config = tiny_config({"train.lr": 0.0, "train.steps": 40, "train.eval_every": 10,
                          "quantizer.dead_code_reset": False})
    trainer = Trainer(config, _x(real_data))
    trainer.fit()
    assert trainer.state.step == 40
    assert [h["step"] for h in trainer.state.history] == [10, 20, 30, 40]


# ---- each option changes behaviour ------------------------------------------------------------


def test_distance_changes_codes(real_data, tiny_config):
    x = _x(real_data)
    codes = {}
    for distance in ("l2", "cosine"):
        trainer = Trainer(tiny_config({"quantizer.distance": distance, "train.steps": 40}), x)
        codes[distance] = encode_in_batches(trainer.fit(), trainer.x)
    assert (codes["l2"] != codes["cosine"]).any(dim=1).float().mean() > 0.05


def test_forward_mode_changes_trained_weights(real_data, tiny_config):
    x = _x(real_data)
    weights = {}
    for forward in ("ste", "rotation", "gumbel"):
        trainer = Trainer(tiny_config({"quantizer.forward": forward, "train.steps": 30, "train.eval_every": 0}), x)
        weights[forward] = trainer.fit().state_dict()
    assert _states_differ(weights["ste"], weights["rotation"])
    assert _states_differ(weights["ste"], weights["gumbel"])
    assert _states_differ(weights["rotation"], weights["gumbel"])


def test_kmeans_init_gives_codebooks_that_fit_the_data(real_data, tiny_config):
    x = _x(real_data)
    trainers = {}
    for on in (True, False):
        trainer = Trainer(tiny_config({"quantizer.kmeans_init": on}), x)
        trainer.initialize()
        trainers[on] = trainer
    with torch.no_grad():
        latent = trainers[True].model.latent(trainers[True].x)  # same seed: same encoder weights
        assert torch.equal(latent, trainers[False].model.latent(trainers[False].x))
        errors = {}
        for on, trainer in trainers.items():
            first = trainer.model.quantizer.levels[0]
            errors[on] = float((latent - first.decode(first.encode(latent))).pow(2).sum(-1).mean())
    assert not torch.equal(trainers[True].model.quantizer.levels[0].codebook,
                           trainers[False].model.quantizer.levels[0].codebook)
    # k-means codewords quantize the latent far better than random ones.
    assert errors[True] < 0.8 * errors[False]


def test_dead_code_reset_happens_only_when_enabled(real_data, tiny_config):
    """Random (not k-means) codebooks leave many codes unused: dead codes that only the reset revives."""
    x = _x(real_data)
    resets, usage = {}, {}
    for on in (True, False):
        trainer = Trainer(tiny_config({"quantizer.kmeans_init": False, "quantizer.dead_code_reset": on,
                                       "quantizer.codebook_size": 32, "train.steps": 60}), x)
        model = trainer.fit()
        resets[on] = trainer.state.dead_code_resets
        usage[on] = quick_evaluate(model, trainer.x)["usage"]
        assert int(sum(level.resets for level in model.quantizer.levels)) == resets[on]
    assert resets[False] == 0
    assert resets[True] > 0
    assert np.mean(usage[True]) > np.mean(usage[False])


def test_rqkmeans_fits_without_gradient_steps(real_data, tiny_config):
    trainer = Trainer(tiny_config({"model.type": "rqkmeans"}), _x(real_data))
    model = trainer.fit()
    assert trainer.optimizer is None
    assert [h["step"] for h in trainer.state.history] == [0]
    assert quick_evaluate(model, trainer.x)["fvu"] < 0.9


# ---- config -----------------------------------------------------------------------------------


def test_config_save_load_and_toml_round_trip(tmp_path):
    config = SemidConfig().with_overrides({
        "quantizer.codebook_size": [64, 32, 16], "quantizer.distance": "cosine", "train.lr": 0.01,
        "model.hidden": [128, 64], "collisions.strategy": "remap", "train.progress": False,
    })
    path = tmp_path / "config.toml"
    config.save(path)
    assert SemidConfig.load(path) == config
    assert tomllib.loads(config.to_toml()) == config.to_dict()
    assert SemidConfig.from_dict(tomllib.loads(config.to_toml())) == config


def test_bundled_configs_load_and_round_trip():
    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))
    assert configs
    for path in configs:
        config = SemidConfig.load(path)
        assert SemidConfig.from_dict(tomllib.loads(config.to_toml())) == config, path.name


@pytest.mark.parametrize("text, key", [
    ("[model]\nhiden = [8]\n", "model.hiden"),
    ("[quantizer]\ncodebok_size = 8\n", "quantizer.codebok_size"),
    ("[trian]\nsteps = 8\n", "trian"),
])
def test_unknown_config_key_is_named(tmp_path, text, key):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        SemidConfig.load(path)


def test_unknown_override_key_is_named():
    with pytest.raises(ConfigError, match="unknown config key 'train.stpes'"):
        SemidConfig().with_overrides({"train.stpes": 5})
    with pytest.raises(ConfigError, match="unknown config key 'nosection.steps'"):
        SemidConfig().with_overrides({"nosection.steps": 5})


@pytest.mark.parametrize("overrides, pattern", [
    ({"quantizer.distance": "manhattan"}, "quantizer.distance.*manhattan.*l2, cosine"),
    ({"quantizer.forward": "magic"}, "quantizer.forward.*magic"),
    ({"collisions.strategy": "drop"}, "collisions.strategy.*drop"),
    ({"train.device": "tpu"}, "train.device"),
    ({"train.steps": 0}, r"train.steps must be > 0, got 0"),
    ({"train.steps": "many"}, "train.steps.*expected int"),
    ({"train.lr": True}, "train.lr"),
    ({"quantizer.codebook_size": [16, 16]}, "codebook_size lists 2 sizes for 3 levels"),
    ({"quantizer.centre_shrinkage": -1.0}, "centre_shrinkage must be >= 0"),
    ({"model.decoder_dropout": 1.0}, r"model.decoder_dropout must be in \[0, 1\), got 1.0"),
    ({"model.decoder_dropout": -0.1}, r"model.decoder_dropout must be in \[0, 1\)"),
    ({"model.latent_norm": -1.0}, r"model.latent_norm must be in \[0, 100\] \(0 turns it off; .*\), got -1.0"),
    ({"quantizer.balance_weight": -0.5}, r"quantizer.balance_weight must be >= 0, got -0.5"),
    ({"quantizer.balance_temperature": 0.0}, r"quantizer.balance_temperature must be > 0, got 0.0"),
    ({"train.norm_sampling": 1.5}, r"train.norm_sampling must be in \[0, 1\], got 1.5"),
])
def test_bad_config_values_are_rejected(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        SemidConfig().with_overrides(overrides)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        SemidConfig.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        SemidConfig.load(bad)


# ---- bf16 on the CPU ------------------------------------------------------------------------------


def test_cpu_step_autocasts_to_bf16_only_where_native_and_learns_as_well(real_data, tiny_config, monkeypatch):
    """Where bf16 is native (forced here, whatever this CPU has) the step's matrix products run in bf16; the
    model learns about as well as in fp32. train.amp = false keeps fp32."""
    x = _x(real_data, "ml-1m")
    config = tiny_config({"train.steps": 200})
    results = {}
    for native, amp in [(False, True), (True, True), (True, False)]:
        monkeypatch.setattr(semid.train, "native_bf16", lambda device, native=native: native)
        trainer = Trainer(config.with_overrides({"train.amp": amp}), x)
        assert trainer.use_amp == (native and amp)
        assert trainer.optimizer.defaults["fused"]  # the CPU takes the fused AdamW kernel
        seen = []
        hook = trainer.model.encoder[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        trainer.fit()
        hook.remove()
        # Only the training step calls the encoder module (evaluation folds the standardiser into fp32 products).
        assert seen == [torch.bfloat16 if trainer.use_amp else torch.float32] * config.train.steps
        results[trainer.use_amp] = trainer.state.final["fvu"]
    assert results[True] < 0.9 and results[False] < 0.9
    assert abs(results[True] - results[False]) < 0.05
    assert not Trainer(config.with_overrides({"model.type": "rqkmeans"}), x).use_amp  # nothing to cast there


# ---- CUDA -------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("heavy_tailed", [False, True])
def test_cuda_bf16_training_is_finite(real_data, tiny_config, heavy_tailed):
    """Dropout, and on a heavy-tailed catalogue the norm-sampled rows and their weights, inside the
    captured CUDA graph step."""
    config = tiny_config({"train.device": "cuda", "train.amp": True, "train.steps": 200, "train.eval_every": 50,
                          "model.decoder_dropout": 0.1, "train.norm_sampling": 0.5})
    x = _heavy_tailed(_x(real_data))[0] if heavy_tailed else _x(real_data)
    trainer = Trainer(config, x)
    assert (trainer.row_weights is not None) == heavy_tailed
    model = trainer.fit()
    assert next(model.parameters()).is_cuda
    for name, tensor in model.state_dict().items():
        assert torch.isfinite(tensor.float()).all(), name
    history = trainer.state.history
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["fvu"]) for h in history)
    assert history[-1]["fvu"] < 0.95


@needs_cuda
@pytest.mark.parametrize("resume_on", ["cuda", "cpu"])
def test_a_cuda_graph_run_resumes_from_its_checkpoint(real_data, tiny_config, tmp_path, resume_on):
    """The generator states load onto the CPU, the resumed process warms up before it captures its graph,
    and the optimizer takes the flags of the device it resumes on."""
    x = _x(real_data)
    ckpt = tmp_path / "train.ckpt"
    config = tiny_config({"train.device": "cuda", "train.steps": 50, "train.eval_every": 10,
                          "train.checkpoint_every": 30})
    first = Trainer(config, x, checkpoint_path=ckpt)
    assert first.use_graph
    first.fit()
    assert torch.load(ckpt, weights_only=True)["state"]["step"] == 30  # resumed below from mid-run
    resumed = Trainer(config.with_overrides({"train.device": resume_on}), x, checkpoint_path=ckpt)
    model = resumed.fit(resume=True)
    assert resumed.state.step == 50 and next(model.parameters()).device.type == resume_on
    assert all(math.isfinite(h["fvu"]) for h in resumed.state.history)


@needs_cuda
def test_cuda_and_cpu_codes_agree_with_the_same_weights(real_data, tiny_config):
    trainer = Trainer(tiny_config({"train.steps": 100}), _x(real_data))
    model = trainer.fit()
    cpu_codes = encode_in_batches(model, trainer.x)
    gpu_codes = encode_in_batches(model.to("cuda"), trainer.x.to("cuda")).cpu()
    agree = (cpu_codes == gpu_codes).all(dim=1).float().mean()
    assert agree >= 0.999


@needs_cuda
def test_cuda_bf16_encode_matches_the_modules_and_mostly_the_fp32_codes(real_data, tiny_config, monkeypatch):
    """The autocast encode path on a GPU (ReLU inside cuBLASLt's product, bf16 latents read by the fused kernel)
    computes what the training modules compute, and gives most items their fp32 codes."""
    from semid import fused

    monkeypatch.setattr(fused, "_MIN_ROWS", 1)  # the kernel for this small catalogue too

    trainer = Trainer(tiny_config({"train.steps": 100, "model.activation": "relu"}), _x(real_data))
    model = trainer.fit().to("cuda")
    x = trainer.x.to("cuda")
    fp32_codes = model.encode(x)
    with warnings.catch_warnings(), torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        warnings.simplefilter("error", fused.FusedKernelWarning)
        fast, modules = model.latent(x), model.encoder(model.normalize(x))
        bf16_codes = model.encode(x)
    assert fast.dtype == torch.bfloat16
    assert (fast.float() - modules.float()).norm() / modules.float().norm() < 0.02
    assert (bf16_codes == fp32_codes).all(dim=1).float().mean() >= 0.95


# ---- semid's own additions: uniqueness loss, residual k-means refinement ----------------------


def test_uniqueness_targets_point_colliding_items_at_free_codes(real_data, tiny_config):
    """The uniqueness loss targets exactly the items remapping would move, at tuples no other item uses."""
    x = _x(real_data, "ml-1m")
    trainer = Trainer(tiny_config({"train.uniqueness_weight": 1.0}), x)
    trainer.initialize()
    trainer._update_uniqueness_targets()
    model = trainer.model.eval()
    with torch.no_grad():
        latent = model.latent(trainer.x)
        codes = model.quantizer.encode(latent).numpy()
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    colliding = counts[inverse.ravel()] > 1
    assert colliding.any(), "the tiny model must collide for this test to mean anything"
    mask = trainer._unique_mask.numpy().astype(bool)
    # Every moved item collides, and each colliding group keeps exactly one member in place (or all stay
    # where a prefix is full, which a 16-code last level on ml-1m can hit).
    assert not (mask & ~colliding).any()
    assert mask.sum() <= colliding.sum() - len(np.unique(inverse.ravel()[colliding]))
    assert mask.sum() > 0
    # Each target is the codeword sum of the item's own prefix plus one last-level codeword, and that
    # tuple is used by no item.
    q = model.quantizer
    prefix_sum = sum(level.decode(torch.from_numpy(codes[mask][:, i])) for i, level in enumerate(q.levels[:-1])).detach()
    last = trainer._unique_target[torch.from_numpy(mask)] - prefix_sum
    gap, last_codes = torch.cdist(last, q.levels[-1].codebook.detach()).min(dim=1)
    assert float(gap.max()) < 1e-3  # round-off of the float32 sums
    used = {tuple(row) for row in codes}
    targets = np.column_stack([codes[mask][:, :-1], last_codes.numpy()])
    assert all(tuple(row) not in used for row in targets)


def test_uniqueness_loss_pulls_latents_towards_targets(real_data, tiny_config):
    """With the loss on, the gradient step moves masked latents towards their targets; off, it does not apply."""
    x = _x(real_data, "ml-1m")
    config = tiny_config({"train.uniqueness_weight": 50.0, "train.lr": 0.001, "train.batch_size": 4096})
    trainer = Trainer(config, x)
    trainer.initialize()
    trainer._update_uniqueness_targets()
    mask = trainer._unique_mask.bool()
    rows = torch.arange(trainer.x.shape[0])

    def distance() -> float:
        with torch.no_grad():
            gap = trainer.model.latent(trainer.x)[mask] - trainer._unique_target[mask]
        return float(gap.pow(2).sum(-1).mean())

    before = distance()
    trainer.model.train()
    for _ in range(5):
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer._optimize(rows)
    assert distance() < 0.9 * before


def test_rqkmeans_refinement_lowers_reconstruction_error(real_data, tiny_config):
    x = _x(real_data, "ml-1m")
    fvu = {}
    for passes in (0, 3):
        config = tiny_config({"model.type": "rqkmeans", "quantizer.refine_passes": passes})
        trainer = Trainer(config, x)
        trainer.fit()
        fvu[passes] = trainer.state.history[-1]["fvu"]
    assert fvu[3] < fvu[0] - 0.002


def test_training_evaluations_include_prefix_agreement(real_data, tiny_config):
    """History entries carry every DESIGN.md code metric, prefix agreement included (cached neighbours,
    from a seeded sample of MONITOR_QUERIES items when the corpus is larger)."""
    from semid.metrics import prefix_agreement
    from semid.train import MONITOR_QUERIES

    x = _x(real_data)
    trainer = Trainer(tiny_config({"train.steps": 50, "train.eval_every": 25, "quantizer.prefix_centres": False}), x)
    model = trainer.fit()
    entry = next(h for h in trainer.state.history if h["step"] == trainer.state.best_step)
    codes = encode_in_batches(model, trainer.x).numpy()
    expected, sampled = prefix_agreement(trainer.x.numpy(), codes, max_items=MONITOR_QUERIES)
    assert entry["prefix_agreement"] == pytest.approx(expected, abs=1e-9)
    assert sampled == (len(x) > MONITOR_QUERIES) == entry["prefix_agreement_sampled"]
    assert {"fvu", "collision_rate", "usage", "entropy_bits", "prefix_agreement"} <= set(entry)


def test_rms_spread_is_the_plain_rms_at_any_scale_and_one_without_spread():
    d = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    plain = d.pow(2).mean().sqrt()
    for scale in (1.0, 1e-25, 1e18):
        assert rms_spread(d * scale) / scale == pytest.approx(float(plain), rel=1e-5)
    assert (d * 1e-25).pow(2).mean().sqrt() == 0  # what squaring first gave: a scale of 0, then NaN inputs
    assert rms_spread(torch.zeros(4, 3)) == 1


@pytest.mark.parametrize("model_type", ["rqvae", "rqkmeans"])
def test_training_does_not_depend_on_the_scale_of_the_embeddings(real_data, tiny_config, model_type):
    """The standardiser divides out one global factor, so a catalogue at 1e-20 or 1e14 trains as at 1: before,
    a fixed floor on that factor and float32 squares that underflow made a catalogue below 1e-13 train to
    garbage, silently. Heavy-tailed, so that the probabilities of norm sampling are computed too."""
    x = _heavy_tailed(_x(real_data))[0]
    config = tiny_config({"model.type": model_type, "train.steps": 40, "train.eval_every": 40,
                          "train.norm_sampling": 0.5})
    results = []
    for scale in (1.0, 1e-20, 1e14):
        trainer = Trainer(config, x * scale)
        trainer.fit()
        if model_type == "rqvae":
            assert trainer.row_probabilities is not None
        results.append((trainer.state.final["fvu"], trainer.state.final["collision_rate"]))
    # Rounding differs with the scale and training amplifies it (the codes of a run are not those of another),
    # so the runs are compared by quality: garbage had fvu above 100 and most items in a few tuples.
    (fvu, collisions), *others = results
    for other_fvu, other_collisions in others:
        assert other_fvu == pytest.approx(fvu, abs=0.05)
        assert other_collisions == pytest.approx(collisions, abs=0.05)
    assert fvu < 0.9


# ---- steps for larger catalogues (train.min_epochs) ---------------------------------------------


def test_min_epochs_raises_steps_for_larger_catalogues_up_to_max_steps():
    train = SemidConfig().with_overrides({"train.steps": 100, "train.batch_size": 50, "train.min_epochs": 10,
                                          "train.max_steps": 1000}).train
    assert train.steps_for(400) == 100  # 10 passes of 400 items are 80 steps: the floor of 100 holds
    assert train.steps_for(1000) == 200  # 10 passes of 1,000 items in batches of 50
    assert train.steps_for(10**6) == 1000  # bounded
    assert train.steps_for(30) == 100  # a batch larger than the catalogue is the catalogue
    assert SemidConfig().with_overrides({"train.steps": 100}).train.steps_for(10**6) == 100  # off by default
    with pytest.raises(ConfigError, match="train.max_steps"):
        SemidConfig().with_overrides({"train.steps": 100, "train.max_steps": 50})
    with pytest.raises(ConfigError, match="train.min_epochs"):
        SemidConfig().with_overrides({"train.min_epochs": -1})


def test_the_steps_note_says_which_key_decided_the_steps():
    train = SemidConfig().with_overrides({"train.steps": 100, "train.batch_size": 50, "train.min_epochs": 10,
                                          "train.max_steps": 1000}).train
    assert train.steps_note(400) is None  # train.steps holds
    assert train.steps_note(1000) == ("200 steps: train.steps = 100 is raised to train.min_epochs = 10 passes over "
                                      "1,000 items (train.min_epochs = 0 keeps train.steps)")
    assert train.steps_note(10**6).startswith("1,000 steps: train.steps = 100 is raised to train.min_epochs = 10 "
                                              "passes over 1,000,000 items, at most train.max_steps")


def test_training_says_when_the_catalogue_changed_its_steps_and_when_no_checkpoint_will_be_written(
        real_data, tiny_config, tmp_path, capsys):
    """A user who lowered train.steps for a quick run learns that min_epochs raised it, before the run; one who
    asked for a checkpoint that a short run will never write is told so, instead of finding no file."""
    x = _x(real_data)  # ml-100k: 1,682 items, 256-row batches
    config = tiny_config({"train.steps": 20, "train.min_epochs": 2, "train.eval_every": 0,
                          "train.decoder_refit_steps": 0, "train.progress": True})
    Trainer(config, x).fit()
    assert "raised to" not in capsys.readouterr().err  # 2 passes are 14 steps: train.steps = 20 holds
    Trainer(config.with_overrides({"train.min_epochs": 5}), x).fit()
    assert ("train: 33 steps: train.steps = 20 is raised to train.min_epochs = 5 passes over 1,682 items"
            in capsys.readouterr().err)
    with pytest.warns(UserWarning, match=r"no training checkpoint will be written to .*the run's 20 steps are "
                                         r"fewer than the 50 between checkpoints"):
        Trainer(config.with_overrides({"train.checkpoint_every": 50}), x, checkpoint_path=tmp_path / "c.ckpt")
    with pytest.warns(UserWarning, match="residual k-means has no training loop to resume"):
        Trainer(config.with_overrides({"model.type": "rqkmeans"}), x, checkpoint_path=tmp_path / "c.ckpt")


def test_uniqueness_targets_refresh_at_most_once_a_pass():
    train = SemidConfig().with_overrides({"train.uniqueness_every": 100, "train.batch_size": 1024}).train
    assert train.uniqueness_interval(12_101) == 100  # Beauty: 12 steps a pass, the configured interval holds
    assert train.uniqueness_interval(500_000) == 489  # one pass of 1,024-row batches
    assert train.uniqueness_interval(300) == 100  # a batch larger than the catalogue is the catalogue


def test_trainer_refreshes_uniqueness_targets_once_a_pass_on_a_large_catalogue(real_data, tiny_config, monkeypatch):
    x = _x(real_data, "ml-1m")  # 3,883 items in 64-row batches: 61 steps a pass, above uniqueness_every
    config = tiny_config({"train.uniqueness_weight": 1.0, "train.uniqueness_every": 10, "train.batch_size": 64,
                          "train.steps": 130, "train.eval_every": 0, "train.decoder_refit_steps": 0})
    refreshed = []
    monkeypatch.setattr(Trainer, "_update_uniqueness_targets", lambda self: refreshed.append(self.state.step))
    Trainer(config, x).fit()
    assert refreshed == [0, 61, 122]


def test_trainer_runs_the_steps_resolved_for_its_catalogue(real_data, tiny_config):
    """The loop, the learning-rate schedule and the returned config all use the resolved number of steps."""
    x = _x(real_data)  # ml-100k: 1,682 items, 256-row batches
    trainer = Trainer(tiny_config({"train.steps": 20, "train.min_epochs": 5, "train.eval_every": 0}), x)
    expected = math.ceil(5 * len(x) / 256)
    assert trainer.config.train.steps == expected and trainer.learning_rate.steps == expected
    trainer.fit()
    assert trainer.state.step == expected and trainer.state.history[-1]["step"] == expected


# ---- a GPU worker's image: torch, numpy and Triton, no polars ------------------------------------

_WITHOUT_POLARS = r"""
import sys, tempfile
from pathlib import Path

class NoPolars:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "polars":
            raise ImportError("polars is not installed on this worker")

sys.meta_path.insert(0, NoPolars())
import torch
from semid.config import SemidConfig
from semid.train import Trainer

out = Path(tempfile.mkdtemp())
config = SemidConfig.default().with_overrides({"train.steps": 4, "train.eval_every": 2, "train.checkpoint_every": 2,
                                               "quantizer.codebook_size": 8, "train.progress": False,
                                               "model.hidden": [32], "model.latent_dim": 8})
Trainer(config, torch.randn(300, 16), checkpoint_path=out / "run.ckpt").fit()
config.save(out / "config.toml")
print(sorted(p.name for p in out.iterdir()), "polars" in sys.modules)
"""


def test_training_checkpoints_and_configs_need_no_polars():
    """The device image has no polars: training, its checkpoints and config files must not import it."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _WITHOUT_POLARS], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "['config.toml', 'run.ckpt'] False"


def test_a_diverging_run_stops_at_the_first_evaluation_naming_the_keys(tiny_config):
    """A learning rate far too large overflows the loss: the run stops where the loss is first read, with the
    keys to change, instead of training on NaN weights to the end."""
    from semid.train import TrainingDivergedError

    x = torch.from_numpy(np.random.default_rng(0).normal(size=(400, 24)).astype(np.float32))
    trainer = Trainer(tiny_config({"train.lr": 1e4, "train.steps": 1000, "train.eval_every": 10}), x)
    with pytest.raises(TrainingDivergedError, match=r"training diverged by step \d+: the loss is (nan|inf). Lower "
                                                     r"train.lr \(now 10000\)"):
        trainer.fit()
    assert trainer.state.step < 1000 and trainer.state.step % 10 == 0  # at an evaluation, long before the end


def test_a_run_that_ends_worse_than_the_mean_is_warned(tiny_config):
    from semid.train import NotConvergedWarning

    x = torch.from_numpy(np.random.default_rng(0).normal(size=(400, 24)).astype(np.float32))
    with pytest.warns(NotConvergedWarning, match=r"worse than their mean vector does \(fvu .* > 1\)"):
        trainer = Trainer(tiny_config({"train.lr": 1.0, "train.steps": 30, "train.decoder_refit_steps": 0}), x)
        trainer.fit()
    assert trainer.state.final["fvu"] > 1


def test_training_logs_a_line_per_evaluation_where_stderr_is_no_terminal(real_data, tiny_config, capsys):
    """A batch job's log gets one readable line per evaluation, not a progress bar's carriage-return redraws."""
    Trainer(tiny_config({"train.steps": 40, "train.eval_every": 20, "train.progress": True}), _x(real_data)).fit()
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert [line.split(",")[0] for line in lines[:2]] == ["train: step 20/40", "train: step 40/40"], err
    assert [line.split(":")[1] for line in lines[2:]] == [" after prefix centres and decoder refit"], err
    assert all(" fvu " in line and " collisions " in line for line in lines) and "\r" not in err


def test_a_run_refuses_a_seed_torch_would_repeat(real_data, tiny_config):
    with pytest.raises(ConfigError, match=r"train.seed must be in \[0, 4294967295\]"):
        Trainer(tiny_config({"train.seed": 2**32}), _x(real_data))


def test_training_says_what_prefix_centres_and_the_decoder_refit_changed(real_data, tiny_config, capsys):
    """The last evaluation line is the encoder's model before both: the line after it gives the final figures,
    so that a report's lower collision rate does not read as a contradiction."""
    config = tiny_config({"train.steps": 40, "train.eval_every": 20, "train.progress": True,
                          "quantizer.prefix_centres": True, "train.decoder_refit_steps": 5})
    trainer = Trainer(config, _x(real_data))
    trainer.fit()
    chosen = next(h for h in trainer.state.history if h["step"] == trainer.state.best_step)
    final = trainer.state.final
    line = [row for row in capsys.readouterr().err.splitlines() if "after prefix centres" in row]
    Trainer(config.with_overrides({"train.progress": False}), _x(real_data)).fit()
    assert capsys.readouterr().err == ""  # train.progress off: no line at all
    assert line == [f"train: after prefix centres and decoder refit: fvu {chosen['fvu']:.4f} -> {final['fvu']:.4f}, "
                    f"collisions {chosen['collision_rate']:.2%} -> {final['collision_rate']:.2%} (the model's own "
                    f"codes, before collision handling)"]
