"""What the default costs on a large catalogue: time and peak memory of each phase of training, evaluation
and encoding, and the whole default run extrapolated from a short one.

No shared set is large, so the catalogue is synthetic: rows of a real set drawn with replacement, plus
Gaussian noise of `--noise` times each dimension's standard deviation (seeded). Its codes mean little (the
copies of one row are near-duplicates), but every phase does the work it would do on real items of that
size. A short run (`--steps`) measures a training step, a refresh of the uniqueness targets and an
evaluation; the full default is then their sum over the steps, refreshes and evaluations the default would
run on this catalogue. It imports no parquet stack (polars), so it runs on a bare GPU machine too.

    python scripts/bench_scale.py --n 500000 --steps 1000 --out /tmp/scale.json
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # semid itself, where it is not installed
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import default_data_dir, load_embeddings, write_json_atomic  # noqa: E402

from semid.config import DEVICE_NAMES, SemidConfig  # noqa: E402
from semid.device import resolve_device  # noqa: E402
from semid.metrics import evaluate_codes, nearest_neighbours  # noqa: E402
from semid.train import Trainer, decode_in_batches, encode_in_batches  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Trainer methods measured inside training.
TRAINER_PHASES = ("initialize", "_update_uniqueness_targets", "_evaluate", "_finish_main")


def synthetic_catalogue(base: np.ndarray, n: int, noise: float, seed: int) -> np.ndarray:
    """(n, d) float32: rows of `base` drawn with replacement, plus noise * per-dimension std."""
    rng = np.random.default_rng(seed)
    rows = base[rng.integers(0, len(base), n)]
    return (rows + noise * base.std(axis=0) * rng.standard_normal(rows.shape, dtype=np.float32)).astype(np.float32)


class PhaseMeter:
    """Seconds and peak memory of named calls, which may nest. Peak host memory is the process's resident
    high-water mark, and on CUDA the peak of allocated device memory as well. Both are reset before each
    call (where Linux allows it for the host), so a call's peak is folded into the call around it before the
    reset and again after it: an enclosing call's peak covers everything inside it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.phases: dict[str, dict[str, float]] = {}
        self._open: list[tuple[float, float]] = []  # (host, device) peaks so far of each call being measured

    def _reset_peaks(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass  # not Linux: the high-water mark then covers the whole run so far
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def _host_peak_gb(self) -> float:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1e6
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6

    def _peaks(self) -> tuple[float, float]:
        """(host, device) peak GB since the last reset."""
        device = torch.cuda.max_memory_allocated(self.device) / 1e9 if self.device.type == "cuda" else 0.0
        return self._host_peak_gb(), device

    def _fold_into_enclosing(self, peaks: tuple[float, float]) -> None:
        if self._open:
            self._open[-1] = (max(self._open[-1][0], peaks[0]), max(self._open[-1][1], peaks[1]))

    def measure(self, name: str, fn: Callable[[], Any]) -> Any:
        self._fold_into_enclosing(self._peaks())  # the reset below would forget the enclosing call's peak so far
        self._reset_peaks()
        self._open.append((0.0, 0.0))
        started = time.perf_counter()
        result = fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        inside, now = self._open.pop(), self._peaks()
        host_peak, device_peak = max(inside[0], now[0]), max(inside[1], now[1])
        self._fold_into_enclosing((host_peak, device_peak))
        phase = self.phases.setdefault(name, {"calls": 0, "seconds": 0.0, "first_seconds": seconds,
                                              "host_peak_gb": 0.0})
        phase["calls"] += 1
        phase["seconds"] += seconds
        phase["host_peak_gb"] = max(phase["host_peak_gb"], host_peak)
        if self.device.type == "cuda":
            phase["device_peak_gb"] = max(phase.get("device_peak_gb", 0.0), device_peak)
        return result

    @contextlib.contextmanager
    def instrument(self, cls: type, names: tuple[str, ...]) -> Iterator[None]:
        """Measure every call of these methods of `cls` inside the block; the originals come back after it."""
        originals = {name: cls.__dict__[name] for name in names}

        def measured(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(method)
            def call(obj, *args, **kwargs):
                return self.measure(name, lambda: method(obj, *args, **kwargs))
            return call

        try:
            for name, method in originals.items():
                setattr(cls, name, measured(name, method))
            yield
        finally:
            for name, method in originals.items():
                setattr(cls, name, method)

    def repeated_seconds(self, name: str, times: int) -> float:
        """Seconds for `times` calls of a phase: its first call once (which also pays one-off costs such as a
        kernel compile or the neighbour search), then the mean of its later calls (the first, if it had none)."""
        phase = self.phases.get(name)
        if not phase or times <= 0:
            return 0.0
        later = phase["calls"] - 1
        steady = (phase["seconds"] - phase["first_seconds"]) / later if later else phase["first_seconds"]
        return phase["first_seconds"] + (times - 1) * steady


def full_default_estimate(config: SemidConfig, n: int, meter: PhaseMeter, step_seconds: float) -> dict[str, Any]:
    """Seconds the full run would take on n items: its steps, refreshes and evaluations at the measured costs."""
    t = config.train
    steps = t.steps_for(n)
    refreshes = math.ceil(steps / t.uniqueness_interval(n)) if t.uniqueness_weight else 0
    evaluations = math.ceil(steps / t.eval_every) if t.eval_every else 1  # the last step is always evaluated
    parts = {
        "initialize": meter.repeated_seconds("initialize", 1),
        "steps": steps * step_seconds,  # the short run's mean step, its warm-up (and CUDA-graph capture) included
        "uniqueness_refreshes": meter.repeated_seconds("_update_uniqueness_targets", refreshes),
        "evaluations": meter.repeated_seconds("_evaluate", evaluations),
        "finish": meter.repeated_seconds("_finish_main", 1),
    }
    return {"steps": steps, "refreshes": refreshes, "evaluations": evaluations, "seconds": parts,
            "total_seconds": sum(parts.values())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--base", default="beauty", help="shared set whose rows seed the synthetic catalogue")
    p.add_argument("--n", type=int, default=500_000, help="items in the synthetic catalogue")
    p.add_argument("--noise", type=float, default=0.25, help="noise, in per-dimension standard deviations")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "default.toml")
    p.add_argument("--steps", type=int, default=1000, help="training steps of the short run")
    p.add_argument("--device", default="auto", help=DEVICE_NAMES)
    p.add_argument("--skip-evaluate", action="store_true", help="leave out the full report (minutes on a CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    x = synthetic_catalogue(load_embeddings(args.base, args.data_dir), args.n, args.noise, args.seed)
    full_config = SemidConfig.load(args.config).with_overrides({"train.device": str(device)})
    short = full_config.with_overrides({"train.steps": args.steps, "train.min_epochs": 0, "train.progress": False})
    print(f"{args.n:,} x {x.shape[1]} synthetic items from {args.base} (noise {args.noise}); "
          f"{args.steps} steps on {device}", file=sys.stderr)

    meter = PhaseMeter(device)
    trainer = meter.measure("trainer_setup", lambda: Trainer(short, torch.from_numpy(x)))
    with meter.instrument(Trainer, TRAINER_PHASES):
        model = meter.measure("fit", trainer.fit)
    # The loop's time less what it spent refreshing targets and evaluating: the training steps themselves.
    loop_overhead = sum(meter.phases.get(name, {}).get("seconds", 0.0)
                        for name in ("_update_uniqueness_targets", "_evaluate"))
    step_seconds = (trainer.state.loop_seconds - loop_overhead) / args.steps
    # Host arrays in and out, as `semid encode` and the tokenizer's encode_raw see them.
    codes = meter.measure("encode", lambda: encode_in_batches(model, torch.from_numpy(x).to(device)).cpu().numpy())
    meter.measure("neighbours_50k_queries", lambda: nearest_neighbours(x, device=device))
    if not args.skip_evaluate:  # the report of `semid evaluate`, less the ID registry
        meter.measure("evaluate", lambda: evaluate_codes(
            x, decode_in_batches(model, torch.from_numpy(codes).to(device)).cpu().numpy(), codes,
            model.codebook_sizes, device=device))

    estimate = full_default_estimate(full_config, args.n, meter, step_seconds)
    result = {
        "n": args.n, "dim": int(x.shape[1]), "base": args.base, "noise": args.noise, "device": str(device),
        "torch_threads": torch.get_num_threads(), "short_run_steps": args.steps,
        "step_seconds": step_seconds, "phases": meter.phases, "full_default_estimate": estimate,
        "encode_items_per_s": args.n / meter.phases["encode"]["seconds"],
    }
    for name, phase in meter.phases.items():
        extra = f"  device peak {phase['device_peak_gb']:.2f} GB" if "device_peak_gb" in phase else ""
        print(f"{name:28s} {phase['calls']:3d} calls {phase['seconds']:9.2f} s  host peak "
              f"{phase['host_peak_gb']:.2f} GB{extra}")
    print(f"training step {step_seconds * 1e3:.1f} ms; the full default ({estimate['steps']} steps, "
          f"{estimate['refreshes']} refreshes, {estimate['evaluations']} evaluations) would take about "
          f"{estimate['total_seconds'] / 60:.1f} min")
    if args.out:
        write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
