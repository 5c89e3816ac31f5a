"""Encode and train throughput of semid, with ratios to peers measured in the same process.

    python scripts/bench_speed.py                   # CPU: Beauty, host numpy in and out -> bench/speed_cpu.json
    python scripts/bench_speed.py --device cuda     # GPU: data already on the device   -> bench/speed_cuda.json
    python scripts/bench_speed.py --only encode     # CPU: re-measure one part (encode, fit, train), keep the others

CPU mode compares, on the same rows and through the calls a user makes:
- encode: semid's TIGER-shaped RQ-VAE (`configs/tiger.toml`: 384 -> 512-256-128 -> 32, 3 x 256 codes) via
  `SemanticIdTokenizer.encode_raw`, against vector-quantize-pytorch's `ResidualVQ` in an autoencoder of the
  same shape (`scripts/peers.py`). Only speed is measured, so both are trained for a handful of steps.
- fit: semid residual k-means (`model.type = "rqkmeans"`) against FAISS `ResidualQuantizer`, both 3 x 256 on
  the raw embeddings, with the fvu each reaches (`semid.metrics.reconstruction_metrics`).
- train: training steps/s of semid's RQ-VAE against the vector-quantize-pytorch autoencoder, both of TIGER's
  shape, and of semid's default recipe with bf16 autocast (where the CPU runs it natively) and without.
GPU mode measures `RQVAE.encode` on a large resampled catalogue already on the device, in fp32 and under
bf16 autocast, with and without the fused residual-encode kernel (`semid.fused`), against a plain-PyTorch
encoder of the same shape that holds the same weights (MLP, then three chained argmins over 256 codes),
the time of each phase of encode apart (`encode_phases`), and training steps/s of `semid.train.Trainer` on
`configs/default.toml`.
It imports neither polars, faiss nor vector_quantize_pytorch: those are needed by the CPU mode only.

Every time is the best of --repeats runs after one warm-up run (see `bench_common.best_of`; the CPU encode
systems take turns within each round, so a drifting load hits them alike); on CUDA each timed call ends
with a synchronize, so queued kernels are counted.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import RQKMEANS_LIKE_FAISS, best_of, default_data_dir, load_embeddings, write_json_atomic  # noqa: E402
from semid.config import DEVICE_NAMES  # noqa: E402
from semid.device import resolve_device  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TIGER = REPO / "configs" / "tiger.toml"
DEFAULT = REPO / "configs" / "default.toml"
LEVELS, CODEBOOK = 3, 256  # the shape every system here is given


def quick_overrides(device: str, steps: int) -> dict:
    """Training cut to `steps` (one evaluation at the end), silent, on `device`: for speed runs only."""
    return {"train.steps": steps, "train.min_epochs": 0, "train.eval_every": steps, "train.device": device,
            "train.progress": False}


def rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1)


# ---- CPU: semid against peers, host arrays in and out ----------------------------------------------
def cpu_encode(x: np.ndarray, steps: int, repeats: int, seed: int) -> dict:
    """Encode items/s of semid's TIGER-shaped RQ-VAE and of the vector-quantize-pytorch peer of that shape."""
    from peers import VQPytorchRVQ

    from semid.tokenizer import SemanticIdTokenizer

    # A model trained for a few steps can put hundreds of items on one tuple, more than a suffix can
    # number; encode_raw returns codes before collision handling, so collisions are left unresolved.
    overrides = {**quick_overrides("cpu", steps), "collisions.strategy": "none"}
    tok = SemanticIdTokenizer.from_config(TIGER, overrides=overrides).fit(x)
    # One pass over the whole set, as semid's encode_raw does (it works in chunks of 65,536 rows).
    peer = VQPytorchRVQ(steps=steps, device="cpu", encode_batch=65536).fit(x, LEVELS, CODEBOOK, seed)
    model = tok.model
    timings = best_of_interleaved({
        "semid_encode_raw": lambda: tok.encode_raw(x),
        "semid_model_encode": lambda: model.encode(torch.from_numpy(x)).numpy(),
        "vqtorch_rvq_encode": lambda: peer.encode(x),
    }, repeats)
    items = {k: rate(len(x), s) for k, s in timings.items()}
    return {
        "items_per_second": items,
        "ratio_semid_over_vqtorch": round(items["semid_encode_raw"] / items["vqtorch_rvq_encode"], 2),
        "ratio_semid_core_over_vqtorch": round(items["semid_model_encode"] / items["vqtorch_rvq_encode"], 2),
        "train_steps": steps,
        "notes": "semid_encode_raw is the public API (validated host array in, int64 codes out); "
                 "semid_model_encode is RQVAE.encode alone on a tensor view of the same array. Each "
                 "figure is the best of `repeats` rounds that time every system once, in turn.",
    }


def cpu_train(x: np.ndarray, steps: int, repeats: int, seed: int) -> dict:
    """Training steps/s on the CPU: semid against the vector-quantize-pytorch autoencoder of TIGER's shape, and
    semid's default recipe with and without bf16 autocast (`train.amp`, on where the CPU runs bf16 natively)."""
    from peers import VQPytorchRVQ

    from semid.config import SemidConfig
    from semid.device import native_bf16
    from semid.train import Trainer

    data = torch.from_numpy(x)

    def semid_fit(config: Path, amp: bool) -> Callable[[], None]:
        overrides = {**quick_overrides("cpu", steps), "train.seed": seed, "train.amp": amp,
                     "train.decoder_refit_steps": 0}
        return lambda: Trainer(SemidConfig.load(config).with_overrides(overrides), data).fit()

    def vqtorch_fit() -> None:
        VQPytorchRVQ(steps=steps, device="cpu").fit(x, LEVELS, CODEBOOK, seed)

    native = native_bf16(torch.device("cpu"))
    precisions = ("fp32", "bf16") if native else ("fp32",)  # bf16 only where it is native, as train.amp does
    fits: dict[str, Callable[[], object]] = {"vqtorch_rvq_tiger_shape": vqtorch_fit}
    for precision in precisions:
        for shape, config in (("tiger_shape", TIGER), ("default", DEFAULT)):
            fits[f"semid_{shape}_{precision}"] = semid_fit(config, precision == "bf16")
    per_second = {name: rate(steps, s) for name, s in best_of_interleaved(fits, repeats).items()}

    def ratio(a: str, b: str) -> float:
        return round(per_second[a] / per_second[b], 2)

    fastest = precisions[-1]
    result = {
        "steps_per_second": per_second,
        "ratio_semid_over_vqtorch_tiger_shape": ratio(f"semid_tiger_shape_{fastest}", "vqtorch_rvq_tiger_shape"),
        "ratio_semid_fp32_over_vqtorch_tiger_shape": ratio("semid_tiger_shape_fp32", "vqtorch_rvq_tiger_shape"),
        "native_bf16": native,
        "steps": steps,
        "notes": "Each figure is steps / wall seconds of a whole fit of `steps` steps of 1,024 items (initialisation "
                 "and one evaluation included), best of `repeats` interleaved rounds. TIGER shape: 384 -> "
                 "512-256-128 -> 32, 3 x 256 (semid: configs/tiger.toml; vector-quantize-pytorch trains in fp32); "
                 "default: configs/default.toml (1024-512-256 -> 64). bf16 runs only where the CPU has it natively.",
    }
    if native:
        result["speedup_default_bf16_over_fp32"] = ratio("semid_default_bf16", "semid_default_fp32")
    return result


def print_cpu_train(r: dict) -> None:
    print(f"\ntraining, {r['steps']} steps of 1,024 items (steps/s; native bf16: {r['native_bf16']}):")
    for name, value in r["steps_per_second"].items():
        print(f"  {name:24} {value:>8.1f}")
    print(f"  semid / vqtorch, TIGER shape: {r['ratio_semid_over_vqtorch_tiger_shape']}x "
          f"(both fp32: {r['ratio_semid_fp32_over_vqtorch_tiger_shape']}x)")
    if "speedup_default_bf16_over_fp32" in r:
        print(f"  default, bf16 / fp32: {r['speedup_default_bf16_over_fp32']}x")


def best_of_interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Fastest wall time of each function over `repeats` rounds, every round calling each function once.

    On a shared host the load drifts over a run; taking turns exposes every system to the same drift, so
    their ratio is fairer than that of back-to-back best_of runs. One untimed round warms them all up.
    """
    best = {name: float("inf") for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def cpu_fit(x: np.ndarray, repeats: int, seed: int) -> dict:
    """Fit seconds and fvu of semid residual k-means against FAISS ResidualQuantizer (3 x 256, raw input)."""
    from peers import FaissResidualQuantizer

    from semid.metrics import reconstruction_metrics
    from semid.tokenizer import SemanticIdTokenizer

    overrides = {"model.type": "rqkmeans", "train.device": "cpu", "train.progress": False, "train.seed": seed,
                 "quantizer.levels": LEVELS, "quantizer.codebook_size": CODEBOOK, **RQKMEANS_LIKE_FAISS}
    fitted: dict[str, object] = {}

    def fit_semid() -> None:
        fitted["semid"] = SemanticIdTokenizer.from_config(DEFAULT, overrides=overrides).fit(x)

    def fit_faiss() -> None:
        fitted["faiss"] = FaissResidualQuantizer().fit(x, LEVELS, CODEBOOK, seed)

    seconds = best_of_interleaved({"semid_rqkmeans": fit_semid, "faiss_rq": fit_faiss}, repeats)
    phases = semid_fit_phases(fit_semid)
    semid, faiss_rq = fitted["semid"], fitted["faiss"]
    encode_seconds = best_of_interleaved({"semid_rqkmeans": lambda: semid.encode_raw(x),
                                          "faiss_rq": lambda: faiss_rq.encode(x)}, repeats)
    encode = {k: rate(len(x), v) for k, v in encode_seconds.items()}
    return {
        "fit_seconds": {k: round(v, 3) for k, v in seconds.items()},
        "ratio_fit_speed_semid_over_faiss": round(seconds["faiss_rq"] / seconds["semid_rqkmeans"], 2),
        "semid_fit_phase_seconds": phases,
        "fvu": {"semid_rqkmeans": round(reconstruction_metrics(x, semid.reconstruct(x))["fvu"], 4),
                "faiss_rq": round(reconstruction_metrics(x, faiss_rq.reconstruct(x))["fvu"], 4)},
        "encode_items_per_second": encode,
        "ratio_encode_semid_over_faiss": round(encode["semid_rqkmeans"] / encode["faiss_rq"], 2),
        "notes": "semid fit is SemanticIdTokenizer.fit (k-means per level, joint refinement, one evaluation and "
                 "the ID assignment); FAISS is ResidualQuantizer.train with beam 1 (scripts/peers.py). The two "
                 "fits take turns in every round. semid_fit_phase_seconds splits one further semid fit.",
    }


def semid_fit_phases(fit: Callable[[], None]) -> dict[str, float]:
    """Seconds of each phase of one call of `fit` (a semid rqkmeans fit), by timing the methods it goes through.

    The phases are what a faster fit has to shrink: k-means initialisation of every level, the joint
    refinement, the evaluation at the end of training (which searches every item's input-space neighbours
    for prefix_agreement) and the collision-free ID assignment; "other" is the rest of the call.
    """
    from semid.residual import ResidualQuantizer
    from semid.tokenizer import SemanticIdTokenizer
    from semid.train import Trainer

    targets = {"kmeans_init": (Trainer, "initialize"), "refine": (ResidualQuantizer, "refine"),
               "evaluate": (Trainer, "_evaluate"), "assign_ids": (SemanticIdTokenizer, "_assign")}
    spent = dict.fromkeys(targets, 0.0)
    originals = {name: getattr(owner, method) for name, (owner, method) in targets.items()}

    def timed_method(name: str, method: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start
        return wrapper

    for name, (owner, method) in targets.items():
        setattr(owner, method, timed_method(name, originals[name]))
    try:
        start = time.perf_counter()
        fit()
        total = time.perf_counter() - start
    finally:
        for name, (owner, method) in targets.items():
            setattr(owner, method, originals[name])
    return {**{k: round(v, 3) for k, v in spent.items()}, "other": round(total - sum(spent.values()), 3),
            "total": round(total, 3)}


def run_cpu(x: np.ndarray, args: argparse.Namespace) -> dict:
    import faiss
    import vector_quantize_pytorch  # noqa: F401  (fail here, before any timing, when the bench extra is missing)

    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    started = time.perf_counter()
    result = {}
    if args.only in (None, "encode"):
        result["encode"] = cpu_encode(x, args.train_steps, args.repeats, args.seed)
        print_cpu_encode(result["encode"])
    if args.only in (None, "fit"):
        result["fit"] = cpu_fit(x, args.repeats, args.seed)
        print_cpu_fit(result["fit"])
    if args.only in (None, "train"):
        result["train"] = cpu_train(x, args.cpu_train_steps, args.repeats, args.seed)
        print_cpu_train(result["train"])
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def print_cpu_encode(r: dict) -> None:
    print("\nencode, host numpy in and out (items/s):")
    for name, value in r["items_per_second"].items():
        print(f"  {name:22} {value:>12,.0f}")
    print(f"  semid / vqtorch: {r['ratio_semid_over_vqtorch']}x (API), {r['ratio_semid_core_over_vqtorch']}x (core)")


def print_cpu_fit(r: dict) -> None:
    print("\nresidual quantizer fit, 3 x 256 on raw embeddings:")
    for name in r["fit_seconds"]:
        print(f"  {name:16} fit {r['fit_seconds'][name]:7.2f} s   fvu {r['fvu'][name]:.4f}   "
              f"encode {r['encode_items_per_second'][name]:>10,.0f} items/s")
    print(f"  fit speed semid / faiss: {r['ratio_fit_speed_semid_over_faiss']}x; "
          f"encode: {r['ratio_encode_semid_over_faiss']}x")
    print("  semid fit phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in r["semid_fit_phase_seconds"].items()))


# ---- GPU: data on the device -----------------------------------------------------------------------
class ReferenceEncoder(nn.Module):
    """The encode path written plainly in PyTorch: standardise, MLP, then greedy nearest codeword per level.

    It holds a copy of a trained semid model's weights, so its codes can be checked against semid's and its
    speed is the one to beat. Distances are |r|^2 - 2 r.c + |c|^2 as one (n, K) matrix per level.
    """

    def __init__(self, model) -> None:
        super().__init__()
        self.mlp = copy.deepcopy(model.encoder)
        self.register_buffer("mean", model.mean.clone())
        self.register_buffer("scale", model.scale.clone())
        self.register_buffer("codebooks", torch.stack([q.codebook.detach().clone() for q in model.quantizer.levels]))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.mlp((x - self.mean) / self.scale)  # (n, d)
        codes = []
        for cb in self.codebooks:  # (k, d)
            dist = (r * r).sum(-1, keepdim=True) - 2 * r @ cb.T + (cb * cb).sum(-1)  # (n, k)
            idx = dist.argmin(-1)  # (n,)
            codes.append(idx)
            r = r - cb[idx]
        return torch.stack(codes, -1)  # (n, L)


def without_fused_kernel(encode: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """`encode` with semid's fused residual-encode kernel switched off (SEMID_FUSED=0): the PyTorch walk."""

    def unfused(x: torch.Tensor) -> torch.Tensor:
        previous = os.environ.get("SEMID_FUSED")
        os.environ["SEMID_FUSED"] = "0"
        try:
            return encode(x)
        finally:
            if previous is None:
                os.environ.pop("SEMID_FUSED")
            else:
                os.environ["SEMID_FUSED"] = previous

    return unfused


def resampled(base: np.ndarray, n: int, device: torch.device, seed: int, noise: float = 0.05) -> torch.Tensor:
    """n rows of `base` drawn with replacement plus small seeded noise, made on the device: (n, D) fp32."""
    g = torch.Generator(device=device).manual_seed(seed)
    src = torch.from_numpy(base).to(device)
    rows = src[torch.randint(0, len(base), (n,), generator=g, device=device)]
    return rows + noise * float(base.std()) * torch.randn(rows.shape, generator=g, device=device)


def encode_all(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int, amp: bool) -> torch.Tensor:
    """Codes of every row of x, `batch` rows per call, into one preallocated (n, L) tensor."""
    out = torch.empty(x.shape[0], LEVELS, dtype=torch.long, device=x.device)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        for start in range(0, x.shape[0], batch):
            out[start : start + batch] = fn(x[start : start + batch])
    return out


def each_batch(fn: Callable[[torch.Tensor], object], x: torch.Tensor, batch: int, amp: bool) -> None:
    """fn on every `batch` rows of x, its results dropped: for timing one phase of encode."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        for start in range(0, x.shape[0], batch):
            fn(x[start : start + batch])


@torch.inference_mode()  # as RQVAE.encode runs: no autograd records, and `_linear` takes its inference kernels
def encode_phases(model, x: torch.Tensor, batch: int, repeats: int) -> dict:
    """Where encode's time goes, in items/s per phase and precision.

    `latent` is the encoder pass as `RQVAE.latent` runs it (standardiser folded, ReLU inside the products);
    `latent_modules` the same pass through the training modules (standardise, then the nn.Sequential, under
    autocast casting each layer's input), which `latent` replaced in session 22; `quantizer_fused` and
    `quantizer_unfused` the residual walk on latents computed beforehand, with and without `semid.fused`.
    """
    phases = {}
    for amp in (False, True):
        precision = "bf16" if amp else "fp32"
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            latents = torch.cat([model.latent(x[start : start + batch]) for start in range(0, x.shape[0], batch)])
        runs = {"latent": (model.latent, x), "latent_modules": (lambda rows: model.encoder(model.normalize(rows)), x),
                "quantizer_fused": (model.quantizer.encode, latents),
                "quantizer_unfused": (without_fused_kernel(model.quantizer.encode), latents)}
        for name, (fn, data) in runs.items():
            seconds = timed(lambda: each_batch(fn, data, batch, amp), x.device, repeats)
            phases[f"{name}_{precision}"] = rate(x.shape[0], seconds)
    return phases


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """best_of with a synchronize at the end of every call, so the time covers the work queued on the device."""

    def call() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return best_of(call, repeats)


def device_encode(base: np.ndarray, device: torch.device, args: argparse.Namespace) -> dict:
    from semid.config import SemidConfig
    from semid.train import Trainer

    config = SemidConfig.load(TIGER).with_overrides(quick_overrides(device.type, args.train_steps))
    model = Trainer(config, torch.from_numpy(base)).fit().eval()
    reference = ReferenceEncoder(model).to(device).eval()
    x = resampled(base, args.rows, device, args.seed)  # (n, D), on the device before any timing
    systems = {"semid": model.encode, "semid_unfused": without_fused_kernel(model.encode), "reference": reference}
    codes, seconds = {}, {}
    for amp in (False, True):
        for name, fn in systems.items():
            key = f"{name}_{'bf16' if amp else 'fp32'}"
            seconds[key] = timed(lambda: encode_all(fn, x, args.batch, amp), device, args.repeats)
            codes[key] = encode_all(fn, x, args.batch, amp)
    items = {k: rate(args.rows, s) for k, s in seconds.items()}

    def agreement(a: str, b: str) -> float:
        return round((codes[a] == codes[b]).all(-1).float().mean().item(), 6)

    from semid import fused

    return {
        "rows": args.rows, "batch": args.batch, "train_steps": args.train_steps,
        # set when the kernel failed or failed its first-use check: "semid" then timed the PyTorch walk
        "fused_kernel_off_because": fused._state["off_because"],
        "items_per_second": items,
        "ratio_semid_over_reference": {p: round(items[f"semid_{p}"] / items[f"reference_{p}"], 2) for p in ("fp32", "bf16")},
        "speedup_bf16_over_fp32": {n: round(items[f"{n}_bf16"] / items[f"{n}_fp32"], 2) for n in systems},
        "ratio_fused_over_unfused": {p: round(items[f"semid_{p}"] / items[f"semid_unfused_{p}"], 2) for p in ("fp32", "bf16")},
        "phases_items_per_second": encode_phases(model, x, args.batch, args.repeats),
        "code_agreement": {"semid_fp32_vs_reference_fp32": agreement("semid_fp32", "reference_fp32"),
                           "semid_fp32_vs_semid_unfused_fp32": agreement("semid_fp32", "semid_unfused_fp32"),
                           "semid_bf16_vs_semid_fp32": agreement("semid_bf16", "semid_fp32"),
                           "reference_bf16_vs_reference_fp32": agreement("reference_bf16", "reference_fp32")},
    }


def device_train(base: np.ndarray, device: torch.device, steps: int | None) -> dict:
    from semid.config import SemidConfig
    from semid.train import Trainer

    overrides = {"train.device": str(device), "train.progress": False}
    if steps:
        overrides["train.steps"] = steps
    config = SemidConfig.load(DEFAULT).with_overrides(overrides)
    trainer = Trainer(config, torch.from_numpy(base))
    trainer.fit()
    state = trainer.state
    return {"config": "configs/default.toml", "items": len(base), "steps": state.step,
            "batch_size": config.train.batch_size, "init_seconds": round(state.init_seconds, 2),
            "loop_seconds": round(state.loop_seconds, 2), "steps_per_second": rate(state.step, state.loop_seconds),
            "final_fvu": round(state.final["fvu"], 4), "cuda_graph": trainer.use_graph, "amp": trainer.use_amp,
            "notes": "loop_seconds includes the periodic full-corpus evaluations (train.eval_every)."}


def run_device(base: np.ndarray, args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    started = time.perf_counter()
    result = {"encode": device_encode(base, device, args)}
    print("\nencode, data on the device (items/s):")
    for name, value in result["encode"]["items_per_second"].items():
        print(f"  {name:16} {value:>14,.0f}")
    print(f"  semid / reference: {result['encode']['ratio_semid_over_reference']}")
    print(f"  fused / unfused: {result['encode']['ratio_fused_over_unfused']}")
    if result["encode"]["fused_kernel_off_because"]:
        print(f"  the fused kernel was OFF: {result['encode']['fused_kernel_off_because']}")
    print(f"  code agreement: {result['encode']['code_agreement']}")
    print("  phases (items/s):")
    for name, value in result["encode"]["phases_items_per_second"].items():
        print(f"    {name:24} {value:>14,.0f}")
    result["train"] = device_train(base, device, args.full_train_steps)
    t = result["train"]
    print(f"\ntrain ({t['config']}, {t['items']:,} items): {t['steps_per_second']:,.1f} steps/s "
          f"over {t['steps']} steps ({t['loop_seconds']} s loop, {t['init_seconds']} s init)")
    if device.type == "cuda":
        result["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


# ---- main ------------------------------------------------------------------------------------------
def host_info(device: torch.device) -> dict:
    info = {"machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    if hasattr(os, "getloadavg"):  # other processes on the host slow every figure down: record how busy it was
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        import faiss
        from importlib.metadata import version

        info["faiss"] = faiss.__version__
        info["vector_quantize_pytorch"] = version("vector-quantize-pytorch")
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help=f"{DEVICE_NAMES} (default: cpu)")
    parser.add_argument("--data", default="beauty", help="shared set name or a .npy path")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure (best is kept), after a warm-up")
    parser.add_argument("--train-steps", type=int, default=20, help="training steps of models used for encode speed")
    parser.add_argument("--threads", type=int, default=0, help="CPU: torch and FAISS threads (0: library default)")
    parser.add_argument("--rows", type=int, default=1_000_000, help="GPU: rows encoded per timed run")
    parser.add_argument("--batch", type=int, default=262144, help="GPU: rows per encode call")
    parser.add_argument("--full-train-steps", type=int, default=0,
                        help="GPU: steps of the train-speed run (0: the config's own, 3000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON output (default: bench/speed_<device>.json)")
    parser.add_argument("--cpu-train-steps", type=int, default=150, help="CPU: steps of each timed training run")
    parser.add_argument("--only", choices=["encode", "fit", "train"],
                        help="CPU: measure one part and update it in the existing output, keeping the others")
    args = parser.parse_args()
    if min(args.repeats, args.train_steps, args.rows, args.batch, args.cpu_train_steps) < 1:
        parser.error("--repeats, --train-steps, --cpu-train-steps, --rows and --batch must be positive")
    device = resolve_device(args.device)  # the GPU is checked before any data is read
    if args.only and device.type != "cpu":
        parser.error("--only applies to the CPU mode")
    x = load_embeddings(args.data, args.data_dir)
    print(f"{args.data}: {x.shape[0]:,} x {x.shape[1]} on {args.device}", flush=True)
    result = run_cpu(x, args) if device.type == "cpu" else run_device(x, args)
    out = args.out or REPO / "bench" / f"speed_{device.type}.json"
    run = {"device": args.device, "data": args.data, "items": len(x), "dim": x.shape[1], "levels": LEVELS,
           "codebook_size": CODEBOOK, "repeats": args.repeats, "threads": args.threads or "library default",
           "host": host_info(device)}
    write_json_atomic(out, merge_part(out, args.only, run, result) if args.only else {**run, **result})
    print(f"\nwritten to {out}")


def merge_part(out: Path, part: str, run: dict, result: dict) -> dict:
    """The existing results with one part re-measured: that part carries its own run settings and host
    snapshot (load average included), the others keep theirs from the run that measured them."""
    merged = json.loads(out.read_text()) if out.is_file() else {}
    merged[part] = {**result[part], "run": {**run, "seconds": result["seconds"]}}
    return merged


if __name__ == "__main__":
    main()
