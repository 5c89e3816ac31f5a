"""Data-parallel training over several processes (torchrun), and the few collectives it needs.

Every rank holds the whole corpus (item embeddings are small: 10M x 384 fp32 is 15 GB) and the same
seeded row order (a permutation, or a draw by norm under train.norm_sampling), and trains on its
own contiguous slice of each global batch. Gradients are averaged by DDP, so a step on W ranks with
batch_size/W rows each is the step one process takes on batch_size rows. What is not a gradient is made
identical explicitly:

* the k-means codebooks: every rank initialises from the same sample, then DDP broadcasts rank 0's
  parameters and buffers when it wraps the model (float sums on a GPU are not bitwise reproducible, so
  "computed the same" is not relied on);
* dead-code statistics: the per-code usage EMA is linear in the counts, so the ranks' EMAs are averaged
  before each dead-code check, which gives the EMA of the global batch; dead codes are reseeded from the
  worst residuals of the gathered global batch;
* not made identical: the usage-balance loss (`quantizer.balance_weight`) is taken over each rank's slice
  of the batch. An entropy is not linear in the counts, so with it on, W ranks take nearly, not exactly,
  the step of one process (an exact version needs a differentiable all-reduce of the soft assignments);
* evaluations, early stopping, prefix centres, decoder refit and checkpoint files belong to rank 0, which
  broadcasts its decisions and the final model.

Outside torchrun (no WORLD_SIZE, or 1) everything here is a no-op and training is one process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the training group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> Ranks:
    """This process's place in the initialised process group; rank 0 of 1 when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def join(device_type: str) -> Ranks:
    """The group this process trains in: one already initialised, else torchrun's (started here), else alone.

    The backend follows the device: NCCL between GPUs, gloo between CPU processes.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return current()


def leave() -> None:
    """End the process group, if there is one (the command line's runs own theirs)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def average_(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Replace `tensor` on every rank by its mean over the ranks (in place)."""
    if ranks.active:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(ranks.world_size)
    return tensor


def gather_rows(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """(n, ...) on each rank -> (world_size * n, ...) on every rank, rank 0's rows first."""
    if not ranks.active:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(ranks.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_objects(obj: Any, ranks: Ranks) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not ranks.active:
        return [obj]
    out: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(out, obj)
    return out


def from_main(obj: Any, ranks: Ranks) -> Any:
    """Rank 0's `obj` on every rank (picklable objects; tensors travel on the CPU)."""
    if not ranks.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
