"""Training benchmark: wall time to final metrics, steps/s and peak memory, on CPU and CUDA.

    python scripts/bench_train.py --config configs/tiger.toml --data beauty --devices cpu cuda

Prints one row per (config, device) and writes JSON. Final metrics are the DESIGN.md ones
(`semid.metrics.evaluate_codes` on the whole corpus, raw codes).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import default_data_dir, load_embeddings, write_json_atomic  # noqa: E402
from semid.cli import _parse_overrides  # noqa: E402
from semid.config import SemidConfig  # noqa: E402
from semid.device import resolve_device  # noqa: E402
from semid.metrics import evaluate_codes  # noqa: E402
from semid.train import Trainer, decode_in_batches, encode_in_batches  # noqa: E402

def run(config: SemidConfig, x: np.ndarray, device: str) -> dict:
    config = config.with_overrides({"train.device": device, "train.progress": False})
    named = resolve_device(device)
    on_gpu = named.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(named)  # the named GPU, not the current one
    started = time.perf_counter()
    trainer = Trainer(config, torch.from_numpy(x))
    model = trainer.fit()
    wall = time.perf_counter() - started
    xt = trainer.x
    codes = encode_in_batches(model, xt)
    report = evaluate_codes(xt, decode_in_batches(model, codes), codes.cpu().numpy(), model.codebook_sizes)
    steps = trainer.state.step
    peak = (torch.cuda.max_memory_allocated(trainer.device) if on_gpu else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {
        "device": torch.cuda.get_device_name(trainer.device) if on_gpu else f"cpu x{torch.get_num_threads()}",
        "wall_seconds": round(wall, 2),
        "init_seconds": round(trainer.state.init_seconds, 2),
        "steps": steps,
        "steps_per_second": round(steps / max(trainer.state.loop_seconds, 1e-9), 1),
        "peak_memory_mb": round(peak / 2**20, 1),
        "best_step": trainer.state.best_step,
        **{k: report[k] for k in ("fvu", "collision_rate", "usage", "entropy_bits", "prefix_agreement")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=[], help="config TOML (repeatable)")
    parser.add_argument("--data", default="beauty", help="shared set name or .npy path")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="bench/train.json")
    args = parser.parse_args()
    x = load_embeddings(args.data, args.data_dir)
    rows = []
    for path in args.config or ["configs/default.toml"]:
        config = SemidConfig.load(path).with_overrides(_parse_overrides(args.set))
        for device in args.devices:
            row = {"config": path, "data": args.data, "overrides": args.set, **run(config, x, device)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_json_atomic(Path(args.out), rows)


if __name__ == "__main__":
    main()
