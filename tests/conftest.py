"""Shared test fixtures: the real data sets (skipped when absent) and a tiny config that trains in seconds.

torch runs on one thread: on a small shared machine two intra-op threads fighting other processes made
a tiny training run about 6x slower than one thread, and one thread also keeps CPU results reproducible.
"""
from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from semid.config import SemidConfig

torch.set_num_threads(1)
# Without a GPU, Triton kernels (semid.fused) run in Triton's CPU interpreter, which must be chosen before
# triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# SEMID_TEST_DATA points elsewhere, e.g. on a GPU machine that has no ../shared beside the checkout.
DATA_DIR = Path(os.environ.get("SEMID_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

# A model small enough to train 100 steps in about a second on one core, large enough to learn ml-100k.
TINY_OVERRIDES: dict[str, Any] = {
    "model.hidden": [64],
    "model.latent_dim": 16,
    "quantizer.levels": 3,
    "quantizer.codebook_size": 16,
    "train.device": "cpu",
    "train.steps": 100,
    "train.batch_size": 256,
    "train.lr": 0.003,
    "train.eval_every": 50,
    "train.decoder_refit_steps": 20,
    "train.progress": False,
}


@cache
def _load(name: str) -> np.ndarray | None:
    path = DATA_DIR / f"{name}.npy"
    return np.load(path) if path.is_file() else None


@pytest.fixture(scope="session")
def real_data() -> Callable[[str], np.ndarray]:
    """`real_data("ml-100k")` -> the (N, 384) float32 matrix (a fresh copy); skips when the data is absent."""

    def load(name: str) -> np.ndarray:
        x = _load(name)
        if x is None:
            pytest.skip(f"real data {name}.npy not found under {DATA_DIR}")
        return x.copy()

    return load


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., SemidConfig]:
    """`tiny_config({"quantizer.forward": "ste"})` -> the tiny CPU config with these overrides on top."""

    def make(overrides: dict[str, Any] | None = None) -> SemidConfig:
        return SemidConfig().with_overrides({**TINY_OVERRIDES, **(overrides or {})})

    return make


@pytest.fixture(scope="session")
def lloyd_step() -> Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]:
    """`lloyd_step(points, codebook, "l2" | "cosine")` -> the codebook after one brute-force float64 Lloyd
    step: each codeword at the mean of the points nearest it, unchanged where it has none. The reference
    for dead-code reseeding."""

    def step(points: torch.Tensor, codebook: torch.Tensor, distance: str) -> torch.Tensor:
        p, c = points.double(), codebook.double()
        if distance == "l2":
            codes = torch.cdist(p, c).argmin(-1)
        else:
            unit_p, unit_c = (torch.nn.functional.normalize(v, dim=-1) for v in (p, c))
            codes = (unit_p @ unit_c.T).argmax(-1)
        means = c.clone()
        for code in codes.unique():
            means[code] = p[codes == code].mean(0)
        return means.float()

    return step
