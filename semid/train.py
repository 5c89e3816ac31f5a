"""Training loop: the whole corpus on the device, shuffled index batches, periodic full-corpus evaluation.

Short enough to read in one sitting. The data set lives on the device as one tensor (item embeddings
are small: 1M x 384 fp32 is 1.5 GB), batches are slices of a seeded permutation (or of a seeded draw by
norm, `train.norm_sampling`), and the loop has no DataLoader and no per-item Python. The RNG that
orders batches is a CPU generator whose state is checkpointed, so a resumed run replays exactly the
batches an uninterrupted run would have seen.

Under torchrun every rank runs this loop on its slice of each global batch (`semid.distributed` says
what is shared and how); rank 0 evaluates, checkpoints and finishes, and hands the result to the others.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import math
import pickle
import sys
import time
import warnings
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from semid import distributed
from semid.atomic import atomic_write, probe_writable
from semid.config import ConfigError, SemidConfig
from semid.device import as_current, native_bf16, resolve_device
from semid.metrics import (
    is_heavy_tailed,
    Neighbours,
    codebook_metrics,
    collision_metrics,
    nearest_neighbours,
    prefix_agreement_from_neighbours,
    reconstruction_metrics,
    top_share,
)
from semid.rqvae import RQVAE, RQVAEOutput, dropout_after_activations, scaled_squares_

# Keys whose larger value is better; every other evaluate key is minimised.
_HIGHER_IS_BETTER = {"cosine"}


class TrainingDivergedError(ConfigError):
    """The training loss stopped being a finite number: the config's step sizes are too large for the data."""


class NotConvergedWarning(UserWarning):
    """The trained model reconstructs the catalogue worse than its mean vector does (fvu above 1)."""
CHECKPOINT_FORMAT = "semid-train-checkpoint-v3"  # v2: RNG states per training process; v3: data fingerprint
# Training evaluations estimate prefix agreement from this many query items (all items when fewer). The
# neighbour search is O(queries x N): on a 12k catalogue a full search costs more than fitting residual
# k-means, and on 1M items it would take minutes. The final `evaluate` searches with its own, larger sample.
MONITOR_QUERIES = 4096


def norm_sampling_probabilities(x: torch.Tensor, share: float) -> torch.Tensor | None:
    """(N, D) items -> (N,) probabilities of drawing each item into a batch: (1 - share) / N + share * w / sum(w);
    None when the catalogue is not heavy-tailed (`semid.metrics.is_heavy_tailed`: its top 1% hold little of sum(w)).

    w is the squared distance from the catalogue mean: an item's share of the variance that fvu divides by.
    In collaborative-filtering factors the top 1% of items hold 60% of it, and a uniform batch holds about
    ten of them, so their error (most of fvu) is estimated from a few rows per step and training follows the
    noise; drawn by w they fill a third of every batch. Elsewhere the draw cost collisions (Beauty 1.02 ->
    1.31 to 1.44%, bench/VARIANTS.md), so those catalogues keep shuffled passes. With share < 1 every item
    keeps a chance of at least (1 - share) / N, which bounds its reconstruction weight 1 / (N p) by
    1 / (1 - share).
    """
    w = scaled_squares_(x.float() - x.float().mean(0))[0].sum(-1).cpu().double()  # scale-free: w / sum(w) counts
    if not is_heavy_tailed(top_share(w.numpy()), w.numel()):
        return None
    uniform = torch.full_like(w, 1.0 / w.numel())
    return ((1.0 - share) * uniform + share * w / w.sum()).float()


@torch.no_grad()
def encode_in_batches(model: RQVAE, x: torch.Tensor, batch_size: int = 65536) -> torch.Tensor:
    """(n, D) -> (n, L) codes on x's device; batching bounds memory and never changes a code."""
    return torch.cat([model.encode(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


@torch.no_grad()
def decode_in_batches(model: RQVAE, codes: torch.Tensor, batch_size: int = 65536) -> torch.Tensor:
    return torch.cat([model.decode(codes[i : i + batch_size]) for i in range(0, codes.shape[0], batch_size)])


@torch.no_grad()
def quick_evaluate(model: RQVAE, x: torch.Tensor, neighbours: Neighbours | None = None) -> dict[str, Any]:
    """The Metrics-section metrics (README.md) of the raw codes on the whole corpus.

    prefix_agreement is included when the corpus's input-space neighbours are given: they never change
    during training, so the trainer searches them once instead of at every evaluation.
    """
    was_training = model.training
    model.eval()
    codes = encode_in_batches(model, x)
    x_hat = decode_in_batches(model, codes)
    model.train(was_training)
    codes_np = codes.cpu().numpy()
    report = {
        **reconstruction_metrics(x.cpu().numpy(), x_hat.cpu().numpy()),
        **collision_metrics(codes_np),
        **codebook_metrics(codes_np, model.codebook_sizes),
    }
    if neighbours is not None:
        report["prefix_agreement"] = prefix_agreement_from_neighbours(codes_np, neighbours)
        report["prefix_agreement_sampled"] = neighbours.sampled  # said with the figure: `semid info` shows it
    return report


def score(report: dict[str, Any], metric: str) -> tuple[float, float]:
    """Sort key for "best": the chosen metric (negated when higher is better), then collision_rate.

    `metric` is one of `semid.config.BEST_METRICS`, which the config checks when it is made."""
    value = float(report[metric])
    return (-value if metric in _HIGHER_IS_BETTER else value, float(report["collision_rate"]))


_CHECKPOINT_KEYS = ("data", "config", "model", "optimizer", "state", "batch_rng", "permutation", "position",
                    "unique_target", "unique_mask", "torch_rng", "cuda_rng")


class CorruptFileError(ValueError):
    """A torch file whose zip members fail their checksums: damaged after it was written."""


def load_tensors(path: Path, checksums: bool = True) -> Any:
    """torch.load of a file of tensors (weights_only), onto the CPU, after checking every zip member's CRC.

    torch reads a torch file's members without checking their checksums, so flipped bits in a checkpoint
    would resume training from other weights, silently; the check reads the file once more (35 MB: ms).
    `checksums=False` where a digest of the whole file is checked anyway (a model's weights)."""
    if checksums and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            raise CorruptFileError(f"its part {bad} fails its checksum (the file was damaged after it was written)")
    return torch.load(path, map_location="cpu", weights_only=True)


def save_tensors(obj: Any, path: Path, what: str) -> None:
    """torch.save, atomically (`semid.atomic`), with torch's write failures (disk full, no permission) named
    by path, instead of its `[enforce fail at inline_container.cc]`."""
    try:
        atomic_write(path, lambda tmp: torch.save(obj, tmp))
    except RuntimeError as exc:
        text = " ".join(str(exc).split())
        if "inline_container" not in text and "PytorchStreamWriter" not in text:  # not a failed write
            raise
        raise OSError(f"cannot write {what} {path}: {text[:300]} (is the disk full?)") from None


def weights_problem(exc: Exception) -> str:
    """torch's reason a weights file did not load, on one line, without its advice to unpickle arbitrary
    objects (weights_only=False), which would run code from a file that semid did not write."""
    if isinstance(exc, CorruptFileError):
        return str(exc)
    text = str(exc)
    if not text.strip():
        return f"{type(exc).__name__} (an empty or truncated file?)"
    if "Unsupported global" in text:
        return "it holds Python objects, not only tensors (semid writes tensors only)"
    if "Weights only load failed" in text or isinstance(exc, (KeyError, pickle.UnpicklingError)):
        return "it is not a torch file of tensors (truncated, corrupt, or another format)"
    if "PytorchStreamReader" in text or "zip archive" in text:  # the zip's directory, at its end, is missing
        return "it is truncated or corrupt (not a complete torch zip archive)"
    return " ".join(text.split())[:400]


@dataclass
class TrainState:
    """Everything a resumed run needs besides the model and optimizer."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: tuple[float, float] | None = None
    best_step: int = -1
    best_weights: dict[str, torch.Tensor] | None = None
    evals_since_best: int = 0
    dead_code_resets: int = 0
    final: dict[str, Any] = field(default_factory=dict)  # evaluation of the model `fit` returns
    init_seconds: float = 0.0
    loop_seconds: float = 0.0  # time in the training loop, evaluations included


class Trainer:
    def __init__(self, config: SemidConfig, x: torch.Tensor, checkpoint_path: str | Path | None = None) -> None:
        # Resolved once for this catalogue (train.min_epochs), so the schedule, the loop and the saved config agree.
        config.train.check_trainable()
        self.steps_note = config.train.steps_note(x.shape[0])
        self.config = config = config.with_overrides({"train.steps": config.train.steps_for(x.shape[0])})
        self.device = resolve_device(config.train.device)
        self.ranks = distributed.join(self.device.type)
        if self.ranks.active and self.device.type == "cuda":  # one GPU per rank
            self.device = torch.device("cuda", self.ranks.local_rank)
            torch.cuda.set_device(self.device)
        self.x = x.to(self.device, dtype=torch.float32)
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        # A path without train.checkpoint_every still gets checkpoints: at every evaluation (else at the end).
        self.checkpoint_every = config.train.checkpoint_every or config.train.eval_every or config.train.steps
        if self.checkpoint_path and config.model.type == "rqkmeans":
            warnings.warn(f"no training checkpoint will be written to {self.checkpoint_path}: residual k-means "
                          "has no training loop to resume", stacklevel=2)
        elif self.checkpoint_path and self.checkpoint_every > config.train.steps:
            warnings.warn(f"no training checkpoint will be written to {self.checkpoint_path}: the run's "
                          f"{config.train.steps:,} steps are fewer than the {self.checkpoint_every:,} between "
                          "checkpoints (train.checkpoint_every, else train.eval_every)", stacklevel=2)
        torch.manual_seed(config.train.seed)
        self.model = RQVAE(x.shape[1], config.model, config.quantizer).to(self.device)
        # Identical initial weights on every rank (and DDP broadcasts rank 0's anyway); dropout and Gumbel noise
        # then differ between ranks, as they would between the rows of one large batch.
        torch.manual_seed(config.train.seed + self.ranks.rank)
        world = self.ranks.world_size
        if config.train.batch_size % world:
            raise ConfigError(f"train.batch_size ({config.train.batch_size}) must be a multiple of the number of "
                              f"training processes ({world})")
        # The global batch; each rank trains on its own contiguous `local_batch` rows of it.
        self.batch_size = max(world, min(config.train.batch_size, self.x.shape[0]) // world * world)
        self.local_batch = self.batch_size // world
        self.batch_rng = torch.Generator().manual_seed(config.train.seed)
        self.permutation = torch.empty(0, dtype=torch.long)
        # Under train.norm_sampling the rows of a heavy-tailed catalogue are drawn by these probabilities, and
        # each row's reconstruction error is weighted by 1 / (N p) so that its expectation is still the
        # catalogue's mean.
        self.row_probabilities: torch.Tensor | None = None
        self.row_weights: torch.Tensor | None = None
        if config.train.norm_sampling and self.model.is_autoencoder:
            self.row_probabilities = norm_sampling_probabilities(self.x, config.train.norm_sampling)
        if self.row_probabilities is not None:
            self.row_weights = (1.0 / (self.x.shape[0] * self.row_probabilities)).to(self.device)
        self.position = 0
        self.state = TrainState()
        # residual k-means has no MLP, so no matrix products to cast
        self.use_amp = config.train.amp and native_bf16(self.device) and self.model.is_autoencoder
        # A CUDA graph replays forward, backward and optimizer step as one launch: the step of a model this
        # small is otherwise bound by Python and kernel-launch overhead, not by the GPU.
        # Not under DDP: its gradient all-reduce would have to be captured too.
        self.use_graph = (config.train.cuda_graph and self.device.type == "cuda" and config.train.optimizer == "adamw"
                          and not config.train.compile and not self.ranks.active)
        self.optimizer = self._make_optimizer() if self.model.is_autoencoder else None
        self.learning_rate = _LearningRate(config)
        self.uniqueness_interval = config.train.uniqueness_interval(self.x.shape[0])
        self._forward: torch.nn.Module = self.model  # `fit` wraps it (DDP, torch.compile) once the weights are set
        self._graph: torch.cuda.CUDAGraph | None = None
        self._warmup_steps_left = 3  # eager steps in this process before capture (a resumed run too)
        self._neighbours: Neighbours | None = None
        latent_dim = config.model.latent_dim if self.model.is_autoencoder else x.shape[1]
        self._unique_target = torch.zeros(self.x.shape[0], latent_dim, device=self.device)
        self._unique_mask = torch.zeros(self.x.shape[0], device=self.device)

    @functools.cached_property
    def data_fingerprint(self) -> str:
        """SHA-256 of the training rows: names the catalogue a model or a checkpoint was trained on."""
        return hashlib.sha256(self.x.cpu().numpy().tobytes()).hexdigest()

    # ---- set-up -------------------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Optimizer:
        t = self.config.train
        if t.optimizer == "adagrad":
            return torch.optim.Adagrad(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        if self.use_graph:  # the learning rate must live on the device for a captured step to see changes
            lr = torch.tensor(t.lr, device=self.device)
            return torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=t.weight_decay, capturable=True)
        return self._adamw(self.model.parameters(), t.lr, t.weight_decay)

    def _adamw(self, parameters: Iterable[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
        """AdamW; on a CPU the fused kernel, which updates every parameter in one pass (1.5 ms a step here
        instead of 7 ms)."""
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=self.device.type == "cpu")

    def _set_learning_rate(self, step: int) -> None:
        lr = self.config.train.lr * self.learning_rate(step)
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def initialize(self) -> None:
        """Standardiser and k-means codebooks from a seeded sample of the data (not just the first batch)."""
        q = self.config.quantizer
        self.model.fit_standardizer(self.x)
        if q.kmeans_init:
            init_rng = torch.Generator(device=self.device).manual_seed(self.config.train.seed)
            n = self.x.shape[0]
            sample = torch.randperm(n, generator=self.batch_rng)[: min(n, q.kmeans_sample)].to(self.device)
            with torch.no_grad():
                self.model.quantizer.init_from_data(self.model.latent(self.x[sample]), init_rng)

    def _next_rows(self) -> torch.Tensor:
        """This rank's rows of the next global batch.

        The order is drawn on the CPU (same batches on every device and every rank) and moved once per pass
        of N rows: a host-to-device copy per step would stall the GPU queue every step. A pass is a
        permutation, or (norm sampling of a heavy-tailed catalogue) N rows drawn with replacement by
        `row_probabilities`.
        """
        if self.position + self.batch_size > self.permutation.numel():
            n = self.x.shape[0]
            if self.row_probabilities is None:
                order = torch.randperm(n, generator=self.batch_rng)
            else:
                order = torch.multinomial(self.row_probabilities, n, replacement=True, generator=self.batch_rng)
            self.permutation = order.to(self.device)
            self.position = 0
        start = self.position + self.ranks.rank * self.local_batch
        self.position += self.batch_size
        return self.permutation[start : start + self.local_batch]

    def _wrap_model(self) -> torch.nn.Module:
        """The module the training step calls: DDP across ranks (which first broadcasts rank 0's weights and
        buffers, k-means codebooks included), compiled when asked."""
        forward: torch.nn.Module = self.model
        if self.ranks.active:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # Buffers are synced once, at wrapping, and never again: the usage statistics are shared by
            # `_reset_dead_codes` instead (newer torch names the option forward_sync_buffers).
            parameters = inspect.signature(DistributedDataParallel).parameters
            sync = "forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers"
            forward = DistributedDataParallel(self.model, device_ids=device_ids, **{sync: False})
        return torch.compile(forward) if self.config.train.compile else forward

    def _optimize(self, rows: torch.Tensor) -> RQVAEOutput:
        """Forward, backward and optimizer step on x[rows]; gradients must be None on entry."""
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_amp,
                            cache_enabled=False):
            weights = None if self.row_weights is None else self.row_weights[rows]
            out = self._forward(self.x[rows], weights)
        loss = out.loss
        if self.config.train.uniqueness_weight:
            pull = (out.latent - self._unique_target[rows]).pow(2).sum(-1) * self._unique_mask[rows]
            loss = loss + self.config.train.uniqueness_weight * pull.mean()
        loss.backward()
        self.optimizer.step()
        return out

    def _step(self, rows: torch.Tensor) -> RQVAEOutput:
        if not self.use_graph:
            self.optimizer.zero_grad(set_to_none=True)
            return self._optimize(rows)
        if self._graph is None and self._warmup_steps_left > 0:
            self._warmup_steps_left -= 1
            # Warm-up steps (cuBLAS workspaces, optimizer state) run on a side stream before capture, as
            # CUDA graph capture requires; they are ordinary training steps.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.optimizer.zero_grad(set_to_none=True)
                out = self._optimize(rows)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self._graph is None:
            self._graph_rows = rows.clone()
            self.optimizer.zero_grad(set_to_none=True)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._graph_out = self._optimize(self._graph_rows)
        self._graph_rows.copy_(rows)
        self._graph.replay()
        return self._graph_out

    # ---- loop ---------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> RQVAE:
        """Train, keep the best evaluated weights, and return the model holding exactly those weights."""
        with as_current(self.device):  # CUDA streams and graph capture follow the current device
            return self._fit(resume)

    def _fit(self, resume: bool) -> RQVAE:
        t, q = self.config.train, self.config.quantizer
        started = time.perf_counter()
        if self.checkpoint_path is not None and self.checkpoint_path.is_dir():
            raise ValueError(f"training checkpoint {self.checkpoint_path} is a directory; name a file")
        if resume:
            self.load_checkpoint()
        elif self.checkpoint_path is not None and self.checkpoint_path.exists():
            raise ValueError(f"training checkpoint {self.checkpoint_path} already exists: resume it (--resume, "
                             "resume=True), or remove it to start a new run")
        else:
            if self.checkpoint_path is not None:
                try:  # before training, not at its first checkpoint
                    probe_writable(self.checkpoint_path)
                except OSError as exc:
                    raise OSError(f"cannot write training checkpoint {self.checkpoint_path}: {exc.strerror or exc}") from None
            self.initialize()
            self.state.init_seconds = time.perf_counter() - started
        if not self.model.is_autoencoder:  # residual k-means: k-means init and refinement are the whole fit
            if q.refine_passes:
                sample = torch.randperm(self.x.shape[0], generator=self.batch_rng)[: q.kmeans_sample].to(self.device)
                self.model.quantizer.refine(self.model.latent(self.x[sample]), q.refine_passes)
            if self.ranks.is_main:
                self._evaluate(step=0)
            return self._finish()
        self._forward = self._wrap_model()
        if self.steps_note and t.progress and self.ranks.is_main:
            tqdm.write(f"train: {self.steps_note}", file=sys.stderr)
        # A bar on a terminal; in a log (a batch job, CI) a line per evaluation instead of a bar's redraws.
        shown, on_terminal = t.progress and self.ranks.is_main, sys.stderr.isatty()
        bar = tqdm(total=t.steps, initial=self.state.step, disable=not (shown and on_terminal),
                   desc="train", unit="step")
        self.model.train()
        last = {}
        loop_started = time.perf_counter()
        while self.state.step < t.steps:
            step = self.state.step
            out = None  # drop the previous step's autograd graph before the next one is built or captured
            self.model.quantizer.set_tau(self._gumbel_tau(step))
            self._set_learning_rate(step)
            if t.uniqueness_weight and step % self.uniqueness_interval == 0:
                self._update_uniqueness_targets()
            out = self._step(self._next_rows())
            if q.dead_code_reset and (step + 1) % q.dead_code_every == 0:
                self.state.dead_code_resets += self._reset_dead_codes(out)
            self.state.step += 1
            done = self.state.step == t.steps
            if (t.eval_every and self.state.step % t.eval_every == 0) or done:
                loss = distributed.average_(out.loss.detach().float().clone(), self.ranks).item()
                self._check_finite(loss)
                if self.ranks.is_main:
                    last = self._evaluate(self.state.step, loss=loss)
                if shown and not on_terminal:
                    tqdm.write(f"train: step {self.state.step:,}/{t.steps:,}, loss {loss:.4f}, fvu {last['fvu']:.4f}, "
                               f"collisions {last['collision_rate']:.2%}, usage {np.mean(last['usage']):.2f}, "
                               f"{time.perf_counter() - loop_started:.0f} s", file=sys.stderr)
                if distributed.from_main(t.early_stopping and self.state.evals_since_best >= t.early_stopping,
                                         self.ranks):
                    bar.update(1)
                    break
            if self.checkpoint_path and self.state.step % self.checkpoint_every == 0:
                self.save_checkpoint()
            bar.update(1)
            if shown and on_terminal and (step % 25 == 0 or done):
                loss = out.loss.item()  # read for the bar anyway: checking it too costs no extra sync
                if not self.ranks.active:  # across ranks only the averaged loss of an evaluation is checked,
                    self._check_finite(loss)  # by every rank alike: one rank alone raising would hang the rest
                postfix = {"loss": f"{loss:.4f}", "rec": f"{out.reconstruction_loss.item():.4f}"}
                if last:  # codebook usage and collisions exist only from the first evaluation on
                    postfix |= {"usage": f"{np.mean(last['usage']):.2f}", "coll": f"{last['collision_rate']:.3f}"}
                bar.set_postfix(postfix)
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.state.loop_seconds += time.perf_counter() - loop_started
        return self._finish()

    def _check_finite(self, loss: float) -> None:
        """Stop a run whose loss overflowed, where the loss is read anyway (evaluations, the progress bar),
        instead of training on to NaN weights and failing in an evaluation with a message that names no key."""
        if math.isfinite(loss):
            return
        t, m = self.config.train, self.config.model
        raise TrainingDivergedError(
            f"training diverged by step {self.state.step:,}: the loss is {loss}. Lower train.lr (now {t.lr:g}), "
            f"or check train.weight_decay ({t.weight_decay:g}) and model.latent_norm ({m.latent_norm:g})"
        )

    @torch.no_grad()
    def _reset_dead_codes(self, out: RQVAEOutput) -> int:
        """Reseed dead codes as one process would with the global batch.

        The usage EMA is linear in the counts, so the mean of the ranks' EMAs is the EMA of the global batch's
        counts per `local_batch` rows; the reseeded rows are the worst of the gathered global batch.
        """
        quantizer = self.model.quantizer
        for level in quantizer.levels:
            distributed.average_(level.usage_ema, self.ranks)
        residuals = [distributed.gather_rows(r, self.ranks) for r in out.residual.residuals]
        errors = [distributed.gather_rows(e, self.ranks) for e in out.residual.errors]
        return quantizer.reset_dead_codes(residuals, errors, self.local_batch)

    @torch.no_grad()
    def _update_uniqueness_targets(self) -> None:
        """Targets for the uniqueness loss: where remapping would move each colliding item, in latent space."""
        from semid.collisions import resolve_collisions

        model = self.model
        was_training = model.training
        model.eval()
        latent = self._latents()
        codes = model.quantizer.encode(latent)
        rank = (latent - model.quantizer.decode(codes)).pow(2).sum(-1)

        def last_level_distances(rows):
            return model.quantizer.last_level_distances(latent[torch.from_numpy(rows).to(latent.device)]).cpu().numpy()

        levels = codes.shape[1]
        # Items left on a full prefix keep their tuple (no target); the suffix bound does not matter here.
        final = resolve_collisions(codes.cpu().numpy(), rank.cpu().numpy(), "remap", codebook_sizes=model.codebook_sizes,
                                   suffix_size=len(codes) + 1, last_level_distances=last_level_distances)
        target_codes = torch.from_numpy(final[:, :levels]).to(codes.device)
        self._unique_target.copy_(model.quantizer.decode(target_codes))
        self._unique_mask.copy_((target_codes != codes).any(-1).float())
        model.train(was_training)

    def _gumbel_tau(self, step: int) -> float:
        q = self.config.quantizer
        decay = q.gumbel_tau_decay or (q.gumbel_tau_end / q.gumbel_tau_start) ** (2 / max(1, self.config.train.steps))
        return max(q.gumbel_tau_end, q.gumbel_tau_start * decay**step)

    def _evaluate(self, step: int, loss: float | None = None) -> dict[str, Any]:
        if self._neighbours is None and self.x.shape[0] > 1:
            self._neighbours = nearest_neighbours(self.x, max_items=MONITOR_QUERIES)
        report = quick_evaluate(self.model, self.x, self._neighbours)
        report.update(step=step, dead_code_resets=self.state.dead_code_resets)
        if loss is not None:
            report["loss"] = loss
        self.state.history.append(report)
        current = score(report, self.config.train.best_metric)
        if self.state.best_score is None or current < self.state.best_score:
            self.state.best_score, self.state.best_step = current, step
            self.state.best_weights = copy.deepcopy(self.model.state_dict())
            self.state.evals_since_best = 0
        else:
            self.state.evals_since_best += 1
        return report

    @torch.no_grad()
    def _latents(self) -> torch.Tensor:
        """Encoder output of the whole corpus, in blocks that bound the activations' memory."""
        return torch.cat([self.model.latent(self.x[i : i + 65536]).float() for i in range(0, self.x.shape[0], 65536)])

    def _finish(self) -> RQVAE:
        """Load the best weights, fit the prefix centres on them and refit the decoder; `state.final` evaluates
        the result.

        The history keeps the evaluations that chose the weights; only `final` holds the metrics of the model
        `fit` returns. Across ranks, rank 0 (which holds the evaluations) does this and every rank then gets
        its model and results.
        """
        if self.ranks.is_main:
            self._finish_main()
        if self.ranks.active:
            result = distributed.from_main(self._result() if self.ranks.is_main else None, self.ranks)
            self.model.load_state_dict(result.pop("model"))
            self.model.eval()
            for key, value in result.items():
                setattr(self.state, key, value)
        return self.model

    def _result(self) -> dict[str, Any]:
        """What the other ranks need of rank 0's finished run; tensors on the CPU, whatever the devices."""
        model = {k: v.cpu() for k, v in self.model.state_dict().items()}
        keys = ("history", "best_step", "best_score", "final", "dead_code_resets")
        return {"model": model, **{key: getattr(self.state, key) for key in keys}}

    def _finish_main(self) -> None:
        if self.state.best_weights is not None:
            self.model.load_state_dict(self.state.best_weights)
        self.model.eval()
        q, t = self.config.quantizer, self.config.train
        best = next((h for h in self.state.history if h["step"] == self.state.best_step), {})
        extra = {}
        refit = self.model.is_autoencoder and t.decoder_refit_steps
        latents = self._latents() if q.prefix_centres or refit else None  # the encoder is final: encode once
        if q.prefix_centres:
            extra["prefix_centres"] = self.model.quantizer.fit_prefix_centres(latents, q.centre_shrinkage)
        if refit:
            self._refit_decoder(latents, t.decoder_refit_steps)
            extra["decoder_refit_steps"] = t.decoder_refit_steps
        if extra:
            chosen = best
            best = {**quick_evaluate(self.model, self.x, self._neighbours), "step": self.state.best_step, **extra}
            if t.progress and chosen:  # the last training line's figures are not the model's: say what changed
                what = " and ".join(("prefix centres",) * q.prefix_centres + ("decoder refit",) * bool(refit))
                tqdm.write(f"train: after {what}: fvu {chosen['fvu']:.4f} -> {best['fvu']:.4f}, collisions "
                           f"{chosen['collision_rate']:.2%} -> {best['collision_rate']:.2%} (the model's own codes, "
                           f"before collision handling)", file=sys.stderr)
        self.state.final = best
        if best.get("fvu", 0.0) > 1.0:
            warnings.warn(NotConvergedWarning(
                f"the trained model reconstructs the items worse than their mean vector does (fvu {best['fvu']:.4f} "
                f"> 1): training did not converge. Lower train.lr (now {t.lr:g}), or check model.latent_norm "
                f"({self.config.model.latent_norm:g}) and train.weight_decay ({t.weight_decay:g})"
            ), stacklevel=2)

    def _refit_decoder(self, latents: torch.Tensor, steps: int) -> None:
        """Train the decoder alone on the quantized latents of the final codes, which stay fixed.

        The decoder learnt from the latents of an encoder and codebooks that moved under it until the last
        step, and the prefix centres move the last level's codewords once more. A short refit at the rate
        training ended with (decaying to zero) fits it to the codes as they are. It is kept short on
        purpose: longer or faster refits keep lowering training-set fvu while held-out fvu rises, the decoder
        then memorising items rather than reading their codes (Beauty, bench/COLLISIONS.md: 200 steps fvu
        0.336 -> 0.316 and held-out 0.550 -> 0.545; 500 steps at 10x the rate 0.259 but held-out 0.589).
        Codes, prefixes and the encoder are untouched. `train.decoder_refit_dropout` lets a longer refit
        generalise instead (see `semid.rqvae.dropout_after_activations`).
        """
        model, t = self.model, self.config.train
        with torch.no_grad():
            inputs = torch.cat([model.quantizer.decode(model.quantizer.encode(z)) for z in latents.split(65536)])
        start_lr = t.lr * self.learning_rate(t.steps - 1)
        optimizer = self._adamw(model.decoder.parameters(), start_lr, 0.0)
        rng = torch.Generator().manual_seed(t.seed)
        batch = min(self.batch_size, inputs.shape[0])
        with dropout_after_activations(model.decoder, t.decoder_refit_dropout):
            for step in range(steps):
                for group in optimizer.param_groups:
                    group["lr"] = start_lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                rows = torch.randint(0, inputs.shape[0], (batch,), generator=rng).to(self.device)
                with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
                    x_hat = model.decoder(inputs[rows])
                loss = F.mse_loss(x_hat.float(), model.normalize(self.x[rows]))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

    # ---- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path | None = None) -> None:
        """Write a resumable checkpoint (rank 0 writes; every rank must call this, to hand over its RNG)."""
        torch_rngs = distributed.gather_objects(torch.get_rng_state(), self.ranks)
        cuda_rngs = distributed.gather_objects(torch.cuda.get_rng_state(self.device) if self.device.type == "cuda"
                                               else None, self.ranks)
        if not self.ranks.is_main:
            return
        path = Path(path or self.checkpoint_path)
        payload = {
            "format": CHECKPOINT_FORMAT,
            "data": {"shape": list(self.x.shape), "sha256": self.data_fingerprint},
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "state": dict(vars(self.state)),
            "batch_rng": self.batch_rng.get_state(),
            "permutation": self.permutation.cpu(),
            "position": self.position,
            "unique_target": self._unique_target.cpu(),
            "unique_mask": self._unique_mask.cpu(),
            "torch_rng": torch_rngs,  # one per rank: dropout and Gumbel noise
            "cuda_rng": cuda_rngs,
        }
        save_tensors(payload, path, "training checkpoint")

    def load_checkpoint(self, path: str | Path | None = None) -> None:
        path = Path(path or self.checkpoint_path)
        try:
            # On the CPU: generator states must stay there, and each tensor below is put where it belongs.
            payload = load_tensors(path)
        except Exception as exc:  # a truncated or foreign file: say which, not a pickle traceback
            raise ValueError(f"cannot read training checkpoint {path}: {weights_problem(exc)}") from None
        if not isinstance(payload, dict) or not str(payload.get("format", "")).startswith("semid-train-checkpoint"):
            raise ValueError(f"{path} is not a semid training checkpoint")
        if payload["format"] != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is a {payload['format']} checkpoint; this semid reads {CHECKPOINT_FORMAT} "
                             "(finish that run with the semid that started it, or train anew)")
        missing = [key for key in _CHECKPOINT_KEYS if key not in payload]
        if missing:
            raise ValueError(f"{path} is an incomplete training checkpoint: it lacks {', '.join(missing)}")
        changed = _config_changes(payload["config"], self.config.to_dict())
        if changed:
            raise ValueError(f"{path} was written by a run with another config ({', '.join(changed)}); resume with "
                             "the config it started with")
        data = payload["data"]
        if data["shape"] != list(self.x.shape) or data["sha256"] != self.data_fingerprint:
            (n, d), (now_n, now_d) = data["shape"], self.x.shape
            other = (f"{n:,} x {d} items, this run has {now_n:,} x {now_d}" if [n, d] != [now_n, now_d] else
                     f"as many items of the same width, {n:,} x {d}, with other values or order")
            raise ValueError(f"{path} was written while training on other data ({other}); resume with the same items, "
                             "in the same order")
        self.model.load_state_dict(payload["model"])
        if self.optimizer:
            self._load_optimizer(payload["optimizer"])
        self.state = TrainState(**payload["state"])
        self.batch_rng.set_state(payload["batch_rng"])
        self.permutation, self.position = payload["permutation"].to(self.device), payload["position"]
        self._unique_target.copy_(payload["unique_target"])
        self._unique_mask.copy_(payload["unique_mask"])
        torch_rngs, cuda_rngs = payload["torch_rng"], payload["cuda_rng"]
        if len(torch_rngs) != self.ranks.world_size:
            raise ValueError(f"{path} was written by a run of {len(torch_rngs)} training process(es); resume it "
                             f"with as many (this run has {self.ranks.world_size})")
        torch.set_rng_state(torch_rngs[self.ranks.rank])
        if cuda_rngs[self.ranks.rank] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(cuda_rngs[self.ranks.rank], self.device)

    def _load_optimizer(self, saved: dict[str, Any]) -> None:
        """The saved optimizer state, under this run's own execution settings.

        Why: `load_state_dict` also restores the param groups' `capturable`, `fused` and `foreach` flags and
        the learning rate's type, which belong to the device that wrote the checkpoint. A checkpoint written
        on a GPU (capturable, a device-tensor rate) would fail its first step on a CPU, and one written on a
        CPU could not be captured in a CUDA graph. So this run's flags and rate are put back, and each step
        count goes where this run's AdamW keeps it: on the parameter's device when capturable or fused.
        """
        own = [{key: group[key] for key in ("capturable", "fused", "foreach", "lr") if key in group}
               for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(saved)
        for group, settings in zip(self.optimizer.param_groups, own):
            group.update(settings)
            on_device = group.get("capturable") or group.get("fused")
            for param in group["params"]:
                state = self.optimizer.state.get(param, {})
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].to(param.device if on_device else "cpu")


# Keys that change how a run is watched or where it runs, not what it computes.
_RESUMABLE_CHANGES = {"train.progress", "train.device", "train.checkpoint_every"}


def _config_changes(saved: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]]) -> list[str]:
    """`section.key: saved -> current` for every key that differs, but for those a resume may change. A key
    the saved config lacks (added to semid since) counts as its default, which is what that run used."""
    defaults = SemidConfig().to_dict()

    def saved_value(section: str, key: str) -> Any:
        return saved.get(section, {}).get(key, defaults[section][key])

    return [f"{section}.{key}: {saved_value(section, key)!r} -> {value!r}"
            for section, values in current.items() for key, value in values.items()
            if f"{section}.{key}" not in _RESUMABLE_CHANGES and saved_value(section, key) != value]


class _LearningRate:
    """Multiplier of the base rate at a step: linear warm-up, then constant or cosine decay to 10%.

    A pure function of the step, so a resumed run needs no scheduler state to follow the same schedule.
    """

    def __init__(self, config: SemidConfig) -> None:
        self.steps, self.warmup, self.schedule = config.train.steps, config.train.warmup_steps, config.train.schedule

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
