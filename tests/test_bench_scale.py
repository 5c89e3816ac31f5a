"""Tests of scripts/bench_scale.py: the synthetic catalogue, the phase meter and the full-run estimate."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_scale  # noqa: E402
from conftest import DATA_DIR  # noqa: E402
from semid.config import SemidConfig  # noqa: E402
from semid.train import Trainer  # noqa: E402


def test_synthetic_catalogue_draws_noisy_copies_of_real_rows() -> None:
    base = np.random.default_rng(1).normal(size=(50, 8)).astype(np.float32) * np.arange(1, 9)
    x = bench_scale.synthetic_catalogue(base, 2000, 0.1, seed=3)
    assert x.shape == (2000, 8) and x.dtype == np.float32
    assert np.array_equal(x, bench_scale.synthetic_catalogue(base, 2000, 0.1, seed=3))  # seeded
    # Each row is within a few noise deviations of its nearest base row, per dimension.
    nearest = base[np.argmin(((x[:, None, :] - base[None]) ** 2).sum(-1), axis=1)]
    assert np.abs((x - nearest) / base.std(axis=0)).max() < 0.6
    assert np.abs(x - nearest).max() > 0  # and not a plain copy


def test_phase_meter_counts_nested_calls_and_restores_the_methods() -> None:
    meter = bench_scale.PhaseMeter(torch.device("cpu"))

    class Work:
        def inner(self) -> int:
            np.ones(4_000_000)  # 32 MB, released before the outer call ends
            return 1

        def outer(self) -> int:
            return self.inner() + self.inner()

    original = Work.__dict__["outer"]
    with meter.instrument(Work, ("inner", "outer")):
        assert Work().outer() == 2
    assert Work.__dict__["outer"] is original
    assert meter.phases["inner"]["calls"] == 2 and meter.phases["outer"]["calls"] == 1
    assert meter.phases["outer"]["seconds"] >= meter.phases["inner"]["seconds"]
    assert meter.phases["outer"]["host_peak_gb"] >= meter.phases["inner"]["host_peak_gb"]  # includes the inner peaks
    assert meter.repeated_seconds("inner", 2) == pytest.approx(meter.phases["inner"]["seconds"])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resettable peaks are Linux's")
def test_an_enclosing_calls_peak_survives_the_reset_of_a_call_inside_it() -> None:
    meter = bench_scale.PhaseMeter(torch.device("cpu"))

    class Work:
        def inner(self) -> int:
            return 1

        def outer(self) -> int:
            big = np.ones(25_000_000)  # 200 MB, released before inner() resets the high-water mark
            del big
            return self.inner()

    with meter.instrument(Work, ("inner", "outer")):
        Work().outer()
    assert meter.phases["outer"]["host_peak_gb"] - meter.phases["inner"]["host_peak_gb"] > 0.15


def test_repeated_calls_pay_the_first_calls_one_off_cost_once() -> None:
    meter = bench_scale.PhaseMeter(torch.device("cpu"))
    meter.phases = {"refresh": {"calls": 3, "seconds": 10.0 + 2.0 + 2.0, "first_seconds": 10.0, "host_peak_gb": 0.0},
                    "once": {"calls": 1, "seconds": 4.0, "first_seconds": 4.0, "host_peak_gb": 0.0}}
    assert meter.repeated_seconds("refresh", 5) == pytest.approx(10.0 + 4 * 2.0)  # a compile, then steady calls
    assert meter.repeated_seconds("once", 3) == pytest.approx(12.0)  # no later call: the first is the estimate
    assert meter.repeated_seconds("refresh", 0) == 0.0 and meter.repeated_seconds("absent", 3) == 0.0


def test_full_default_estimate_adds_the_measured_costs_of_the_run_the_default_would_take() -> None:
    config = SemidConfig.load(bench_scale.ROOT / "configs" / "default.toml")
    meter = bench_scale.PhaseMeter(torch.device("cpu"))
    meter.phases = {name: {"calls": 2, "seconds": 2.0 * s, "first_seconds": s, "host_peak_gb": 0.0} for name, s in
                    [("initialize", 3.0), ("_update_uniqueness_targets", 10.0), ("_evaluate", 16.0), ("_finish_main", 30.0)]}
    estimate = bench_scale.full_default_estimate(config, 500_000, meter, step_seconds=0.07)
    assert estimate["steps"] == 16_000  # max_steps bounds the 300 passes
    assert estimate["refreshes"] == math.ceil(16_000 / 489)
    assert estimate["evaluations"] == 16_000 // config.train.eval_every  # 500 divides 16,000: no extra last one
    expected = 3.0 + 16_000 * 0.07 + estimate["refreshes"] * 10.0 + estimate["evaluations"] * 16.0 + 30.0
    assert estimate["total_seconds"] == pytest.approx(expected)
    odd = config.with_overrides({"train.eval_every": 700})  # 22 evaluations on the way, and the last step's
    assert bench_scale.full_default_estimate(odd, 500_000, meter, step_seconds=0.07)["evaluations"] == 23


def test_bench_scale_end_to_end_on_a_small_catalogue(real_data, tmp_path) -> None:
    real_data("ml-100k")  # skips without the shared data
    config = tmp_path / "small.toml"
    SemidConfig().with_overrides({
        "model.hidden": [64], "model.latent_dim": 16, "quantizer.codebook_size": 16, "train.batch_size": 256,
        "train.eval_every": 10, "train.uniqueness_weight": 1.0, "train.uniqueness_every": 5,
        "train.decoder_refit_steps": 5,
    }).save(config)
    out = tmp_path / "scale.json"
    names = bench_scale.TRAINER_PHASES
    methods = {name: Trainer.__dict__[name] for name in names}
    assert bench_scale.main(["--data-dir", str(DATA_DIR), "--base", "ml-100k", "--n", "3000", "--steps", "20",
                             "--device", "cpu", "--config", str(config), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 3000 and result["short_run_steps"] == 20
    phases = result["phases"]
    assert phases["_evaluate"]["calls"] == 2  # steps 10 and 20
    assert phases["_update_uniqueness_targets"]["calls"] == 2  # steps 0 and 12 (a pass of 3000 rows in 256s)
    assert phases["fit"]["seconds"] >= phases["_finish_main"]["seconds"] > 0
    assert result["step_seconds"] > 0 and result["full_default_estimate"]["total_seconds"] > 0
    assert "evaluate" in phases and "neighbours_50k_queries" in phases
    assert all(Trainer.__dict__[name] is methods[name] for name in names)  # the instrumenting is undone
