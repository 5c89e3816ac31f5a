"""Data-parallel training (DESIGN.md, Scale): 2 CPU processes with the gloo backend.

Each test starts two real processes that join through torchrun's environment variables (RANK,
WORLD_SIZE, MASTER_ADDR, ...), exactly as `torchrun --nproc-per-node 2` would set them, and train on the
bundled goodbooks sample. Every rank writes what it ended with to a file that the test then compares.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from semid.config import SemidConfig
from semid.train import Trainer, quick_evaluate

from conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "goodbooks.parquet"
WORLD = 2
# The tiny config, on 2,000 books, with dead-code checks often enough that reseeding happens on the way.
OVERRIDES: dict[str, Any] = {**TINY_OVERRIDES, "train.steps": 80, "train.eval_every": 40, "train.batch_size": 128,
                             "quantizer.dead_code_every": 5, "quantizer.dead_code_threshold": 0.5,
                             "train.uniqueness_weight": 3.0, "train.uniqueness_every": 30,
                             # fp32 on every CPU: in bf16 each rank's half-batch products round differently from
                             # one process's full batch, and 80 steps grow that past the round-off compared below
                             "train.amp": False}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def books(tmp_path_factory) -> Path:
    """The first 2,000 rows of the bundled sample as a .npy file the worker processes can read."""
    from semid.sources import read_items

    path = tmp_path_factory.mktemp("books") / "books.npy"
    np.save(path, read_items(SAMPLE).embeddings[:2000])
    return path


def _worker(rank: int, port: int, data: str, overrides: dict[str, Any], out_dir: str, checkpoint: str | None,
            resume: bool) -> None:
    """One training process: joins the group from the environment, trains, saves what it holds."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from semid import distributed

    config = SemidConfig().with_overrides(overrides)
    trainer = Trainer(config, torch.from_numpy(np.load(data)), checkpoint_path=checkpoint)
    finish = trainer._finish
    loop_end: dict[str, torch.Tensor] = {}

    def keep_loop_end() -> Any:  # the weights each rank trained itself, before rank 0 hands out the result
        loop_end.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
        return finish()

    trainer._finish = keep_loop_end
    model = trainer.fit(resume=resume)
    torch.save({"loop_end": loop_end, "final_model": model.state_dict(), "final": trainer.state.final,
                "history": trainer.state.history, "resets": trainer.state.dead_code_resets,
                "step": trainer.state.step}, Path(out_dir) / f"rank{rank}.pt")
    distributed.leave()


def _train_two_ranks(data: Path, out_dir: Path, overrides: dict[str, Any] | None = None,
                     checkpoint: Path | None = None, resume: bool = False) -> list[dict[str, Any]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    args = (_free_port(), str(data), {**OVERRIDES, **(overrides or {})}, str(out_dir),
            str(checkpoint) if checkpoint else None, resume)
    mp.spawn(_worker, args=args, nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


@pytest.fixture(scope="module")
def two_rank_run(books, tmp_path_factory) -> list[dict[str, Any]]:
    return _train_two_ranks(books, tmp_path_factory.mktemp("ddp"))


def test_ranks_train_identical_weights_and_codebooks(two_rank_run):
    """Each rank saw other rows, yet both end the loop with bitwise identical weights, codebooks and usage
    statistics: gradients are averaged, dead-code statistics shared and reseeds taken from the same rows."""
    first, second = two_rank_run
    assert first["resets"] > 0  # dead codes were reseeded along the way, so that path was exercised
    assert first["resets"] == second["resets"]
    _assert_same_state(first["loop_end"], second["loop_end"])
    assert any("usage_ema" in k for k in first["loop_end"])
    _assert_same_state(first["final_model"], second["final_model"])  # and every rank gets rank 0's result
    assert first["final"] == second["final"]
    assert first["history"] == second["history"] and [h["step"] for h in first["history"]] == [40, 80]


def test_two_ranks_match_one_process_with_the_same_global_batch(books, two_rank_run):
    """2 ranks x 64 rows is the step one process takes on 128 rows: same batches, same averaged gradient.

    Only the order of the gradient sums differs, so weights agree to float round-off and the codes of all
    but a few items are the same.
    """
    config = SemidConfig().with_overrides(OVERRIDES)
    x = torch.from_numpy(np.load(books))
    single = Trainer(config, x)
    model = single.fit()
    assert single.state.dead_code_resets == two_rank_run[0]["resets"]
    ddp_model = Trainer(config, x).model
    ddp_model.load_state_dict(two_rank_run[0]["final_model"])
    ddp_model.eval()
    codes = model.encode(x)
    agree = (codes == ddp_model.encode(x)).all(-1).float().mean().item()
    assert agree > 0.99, f"only {agree:.1%} of items got the same codes"
    ddp_fvu = quick_evaluate(ddp_model, x)["fvu"]
    assert ddp_fvu == pytest.approx(single.state.final["fvu"], abs=0.01)


def test_resume_across_two_ranks_matches_uninterrupted_run(books, tmp_path):
    """A checkpoint written mid-run by 2 ranks (rank 0 writes, with every rank's RNG) resumes to the same end."""
    ckpt = tmp_path / "train.ckpt"
    settings = {"train.steps": 70, "train.checkpoint_every": 40, "model.decoder_dropout": 0.1}
    full = _train_two_ranks(books, tmp_path / "full", settings, checkpoint=ckpt)
    assert torch.load(ckpt, weights_only=True)["state"]["step"] == 40
    resumed = _train_two_ranks(books, tmp_path / "resumed", settings, checkpoint=ckpt, resume=True)
    for a, b in zip(full, resumed):
        _assert_same_state(a["final_model"], b["final_model"])
        assert a["history"] == b["history"]
    with pytest.raises(ValueError, match="2 training process"):  # one process cannot continue a 2-rank run
        Trainer(SemidConfig().with_overrides({**OVERRIDES, **settings}), torch.from_numpy(np.load(books)),
                checkpoint_path=ckpt).fit(resume=True)


def test_batch_size_must_split_evenly_across_ranks(books, tmp_path):
    with pytest.raises(Exception, match=r"train.batch_size \(127\) must be a multiple of the number of training"):
        _train_two_ranks(books, tmp_path, {"train.batch_size": 127})


def test_torchrun_trains_from_the_command_line(books, tmp_path):
    """`torchrun --nproc-per-node 2 -m semid train ...`: one model directory, written by rank 0."""
    out = tmp_path / "model"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
               "--master-port", str(_free_port()), "-m", "semid", "train", "--data", str(books), "--out", str(out),
               "--config", str(REPO / "configs" / "demo.toml"), "--device", "cpu",
               *[f"--set={k}={json.dumps(v)}" for k, v in OVERRIDES.items()]]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("model saved to") == 1 and "by 2 processes" in result.stdout
    from semid.tokenizer import SemanticIdTokenizer

    tok = SemanticIdTokenizer.load(out)
    x = np.load(books)
    ids = tok.encode(x)
    assert len(np.unique(ids, axis=0)) == len(x)  # every item has its own ID
