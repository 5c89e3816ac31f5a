"""Side-by-side quality benchmark: semid against the peer tokenizers, on the same real data.

Every system is fitted on the same embedding matrix, encoded and reconstructed through the same calls,
and scored by the same function (`semid.metrics.evaluate_codes`), so the numbers compare like for like.
Results go to a JSON file (merged by (system, set), so runs on different machines or subsets add up),
a PNG of fvu against collision rate (the two figures a tokenizer trades off), and optionally a markdown
table for the README.

    python scripts/bench_quality.py --data beauty --systems faiss-rq faiss-rkmeans vqtorch-rvq
    python scripts/bench_quality.py --render-only --markdown bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from bench_common import (  # noqa: E402
    DATA_SETS,
    RQKMEANS_LIKE_FAISS,
    best_of,
    default_data_dir,
    load_embeddings,
    sequences_path,
    set_file,
    write_json_atomic,
    write_text_atomic,
)
from peers import FaissResidualQuantizer, Peer, ResidualKMeans, VQPytorchRVQ  # noqa: E402

from semid.config import DEVICE_NAMES  # noqa: E402
from semid.device import resolve_device  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PEER_SYSTEMS: tuple[str, ...] = ("faiss-rq", "faiss-rkmeans", "vqtorch-rvq")
# system name -> (model.type, quantizer.forward or None where the model has no forward mode)
SEMID_SYSTEMS: dict[str, tuple[str, str | None]] = {
    "semid-rqvae-ste": ("rqvae", "ste"),
    "semid-rqvae-rotation": ("rqvae", "rotation"),
    "semid-rqvae-gumbel": ("rqvae", "gumbel"),
    "semid-rqkmeans": ("rqkmeans", None),
}
SYSTEMS: tuple[str, ...] = (*PEER_SYSTEMS, *SEMID_SYSTEMS)


@dataclass
class SemidSystem:
    """semid's public tokenizer behind the peer interface, built from a config file plus overrides."""

    name: str
    config: Path
    device: str
    steps: int | None = None  # None keeps the config's train.steps
    extra: dict[str, Any] = field(default_factory=dict)  # user overrides (--semid-set), applied last
    overrides: dict[str, Any] = field(default_factory=dict, init=False)  # what the last fit used
    _tok: Any = field(default=None, init=False, repr=False)

    def fit(self, x: np.ndarray, levels: int, codebook_size: int, seed: int) -> "SemidSystem":
        from semid import SemanticIdTokenizer

        model_type, forward = SEMID_SYSTEMS[self.name]
        overrides: dict[str, Any] = {
            "model.type": model_type,
            "quantizer.levels": levels,
            "quantizer.codebook_size": codebook_size,
            "train.device": self.device,
            "train.seed": seed,
            "train.progress": False,
        }
        if forward is not None:
            overrides["quantizer.forward"] = forward
        if model_type == "rqkmeans":
            overrides.update(RQKMEANS_LIKE_FAISS)
        if self.steps is not None:
            overrides["train.steps"] = self.steps
        self.overrides = {**overrides, **self.extra}
        self._tok = SemanticIdTokenizer.from_config(self.config, overrides=self.overrides)
        self._tok.fit(x)
        return self

    def encode(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._tok.encode_raw(x), dtype=np.int64)

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._tok.reconstruct(x), dtype=np.float32)

    @property
    def history(self) -> list[dict[str, Any]]:
        """The training evaluations (step, fvu, collision_rate, loss), to see whether more steps would pay."""
        keys = ("step", "fvu", "collision_rate", "loss")
        return [{k: h[k] for k in keys if k in h} for h in self._tok.history]

    @property
    def precision(self) -> str:
        """How the model trained: "bf16 autocast" (a GPU, or a CPU that runs bf16 natively) or "fp32"."""
        return self._tok.meta["train_precision"]

    @property
    def steps_run(self) -> int | None:
        """Training steps of the fitted RQ-VAE (None for residual k-means, which is not trained by SGD)."""
        return self._tok.meta["train_steps"] if self._tok.config.model.type == "rqvae" else None


def make_system(
    name: str, steps: int | None, device: str, semid_config: Path, semid_set: dict[str, Any] | None = None
) -> Peer:
    """A fresh, unfitted system by name. steps=None: vqtorch-rvq gets 5000 on CUDA, 3000 on CPU, and
    semid keeps its config's schedule."""
    if name == "faiss-rq":
        return FaissResidualQuantizer()
    if name == "faiss-rkmeans":
        return ResidualKMeans()
    if name == "vqtorch-rvq":
        return VQPytorchRVQ(steps=steps or (5000 if device.startswith("cuda") else 3000), device=device)
    if name in SEMID_SYSTEMS:
        return SemidSystem(name=name, config=semid_config, device=device, steps=steps, extra=dict(semid_set or {}))
    raise ValueError(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (fit rows, held-out rows), both sorted; fraction 0 holds nothing out."""
    held = int(round(n * fraction))
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[held:]), np.sort(order[:held])


def measure(
    system: Peer, x: np.ndarray, levels: int, codebook_size: int, seed: int, sequences: list | None,
    holdout: float = 0.0,
) -> dict[str, Any]:
    """Fit, encode, reconstruct and score one system on one matrix; timings and every metric.

    With holdout > 0 the system is fitted on the other rows only and `heldout_fvu` is the fvu of the
    rows it never saw: an autoencoder's fvu on its own training items can be memorisation (on a few
    thousand items a large decoder learns each item from its unique code), and this figure tells the two
    apart. What matters most about a new item is its ID, so two more figures score the held-out items'
    codes: `heldout_prefix_agreement` (d = 1..L), the share of each held-out item's 10 nearest items (fitted
    or held out) that share its first d codes, and `heldout_taken`, the share of held-out items whose raw
    tuple a fitted item already has (those need collision handling). Every other metric is scored on the
    fitted rows, so `sequences` (row indices of the full matrix) are only used without a holdout.
    """
    from semid.metrics import evaluate_codes, nearest_neighbours, prefix_agreement_from_neighbours

    fit_rows, held_rows = holdout_split(x.shape[0], holdout, seed)
    x_fit = x[fit_rows] if len(held_rows) else x
    start = time.perf_counter()
    system.fit(x_fit, levels, codebook_size, seed)
    train_s = time.perf_counter() - start
    codes = system.encode(x_fit)  # (n, l)
    x_hat = system.reconstruct(x_fit)  # (n, d)
    if codes.shape != (x_fit.shape[0], levels):
        raise ValueError(f"{system.name} returned codes of shape {codes.shape}, expected {(x_fit.shape[0], levels)}")
    encode_s = best_of(lambda: system.encode(x_fit))
    report = evaluate_codes(x_fit, x_hat, codes, [codebook_size] * levels,
                            sequences=None if len(held_rows) else sequences, seed=seed)
    row = {"train_s": train_s, "encode_items_per_s": x_fit.shape[0] / encode_s, **report}
    if getattr(system, "history", None):  # semid's training evaluations; the peers keep none
        row["history"] = system.history
    if len(held_rows):
        x_held = x[held_rows]
        row["holdout"] = holdout
        row["heldout_fvu"] = float(((x_held - system.reconstruct(x_held)) ** 2).sum()
                                   / ((x_held - x_held.mean(0)) ** 2).sum())
        all_codes = np.empty((x.shape[0], levels), dtype=np.int64)
        all_codes[fit_rows], all_codes[held_rows] = codes, system.encode(x_held)
        neighbours = nearest_neighbours(x, queries=held_rows)
        row["heldout_prefix_agreement"] = prefix_agreement_from_neighbours(all_codes, neighbours)
        fitted = {tuple(c) for c in codes.tolist()}
        row["heldout_taken"] = float(np.mean([tuple(c) in fitted for c in all_codes[held_rows].tolist()]))
    return row


# ----------------------------------------------------------------------------------------------------
# Rendering: one row formatter, two layouts (terminal and markdown)
# ----------------------------------------------------------------------------------------------------
COLUMNS = (
    "system", "set", "fvu", "collision %", "entropy bits / level", "usage % / level",
    "prefix agr. d=1", "seq. prefix agr. d=1", "held-out fvu", "held-out prefix agr. d=1", "held-out taken %",
    "train s", "encode items/s", "device",
)


def _per_level(values: list[float] | None, fmt: str) -> str:
    return "/".join(format(v, fmt) for v in values) if values else "-"


def format_row(row: dict[str, Any]) -> list[str]:
    """One result as the table's cells."""
    seq = row.get("sequence_prefix_agreement")
    return [
        row["system"],
        row["data"],
        f"{row['fvu']:.3f}",
        f"{100 * row['collision_rate']:.2f}",
        _per_level(row.get("entropy_bits"), ".2f"),
        _per_level([100 * u for u in row.get("usage", [])], ".0f"),
        f"{row['prefix_agreement'][0]:.3f}",
        f"{seq[0]:.3f}" if seq else "-",
        f"{row['heldout_fvu']:.3f}" if "heldout_fvu" in row else "-",
        f"{row['heldout_prefix_agreement'][0]:.3f}" if "heldout_prefix_agreement" in row else "-",
        f"{100 * row['heldout_taken']:.2f}" if "heldout_taken" in row else "-",
        f"{row['train_s']:.1f}",
        f"{row['encode_items_per_s']:,.0f}",
        f"{row.get('device', '-')}" + (" bf16" if row.get("precision") == "bf16 autocast" else ""),
    ]


def ordered(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows by data set (in DATA_SETS order), then system (in SYSTEMS order)."""
    def rank(value: str, order: tuple[str, ...]) -> int:
        return order.index(value) if value in order else len(order)

    return sorted(rows, key=lambda r: (rank(r["data"], DATA_SETS), r["data"], rank(r["system"], SYSTEMS), r["system"]))


def render_text(rows: list[dict[str, Any]]) -> str:
    cells = [list(COLUMNS)] + [format_row(r) for r in ordered(rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells)


def _semid_settings(row: dict[str, Any]) -> str:
    """The config file and any --semid-set overrides a semid row ran with, for the reader."""
    extra = ", ".join(f"{k}={v}" for k, v in sorted(row.get("semid_set", {}).items()))
    return f"`{row['semid_config']}`" + (f" with {extra}" if extra else "")


def render_markdown(results: dict[str, Any], plot: Path | None, markdown_path: Path) -> str:
    """The README-ready page: settings, one table per data set, the plot, and what the columns mean."""
    meta = results.get("meta", {})
    rows = ordered(results["results"])
    lines = [
        "# semid quality benchmark",
        "",
        "Generated by `scripts/bench_quality.py` from `bench/quality.json`; do not edit by hand.",
        "",
        f"Every system gets the same embeddings and is scored by `semid.metrics.evaluate_codes`. "
        f"Codes are before collision handling. Hosts: {'; '.join(sorted({r.get('host', '?') for r in rows}))}; "
        f"versions: {', '.join(f'{k} {v}' for k, v in meta.get('versions', {}).items())}.",
        "",
    ]
    for data in dict.fromkeys(r["data"] for r in rows):
        subset = [r for r in rows if r["data"] == data]
        first = subset[0]
        floor = next((r["duplicate_rate"] for r in subset if "duplicate_rate" in r), None)  # older result files lack it
        floor_note = ("" if floor is None else
                      f"; {100 * floor:.2f}% of items repeat another's embedding, the floor of collision %")
        shape = f"{first['n_items']:,} items, {first['levels']} levels x {first['codebook_size']} codes"
        lines += [
            f"## {data} ({shape}{floor_note})",
            "",
            "| " + " | ".join(COLUMNS[:1] + COLUMNS[2:]) + " | steps |",
            "|" + "---|" * (len(COLUMNS) - 1) + "---|",
        ]
        for r in subset:
            cells = format_row(r)
            lines.append("| " + " | ".join(cells[:1] + cells[2:]) + f" | {r.get('steps') or '-'} |")
        semid_runs = sorted({_semid_settings(r) for r in subset if "semid_config" in r})
        if semid_runs:
            lines += ["", "semid settings: " + "; ".join(semid_runs)]
        lines.append("")
    failures = results.get("failures", [])
    if failures:
        lines += ["## Failures", "", "| system | set | steps | error |", "|---|---|---|---|"]
        lines += [f"| {f['system']} | {f['data']} | {f['steps']} | {f['error'].replace('|', '/')} |" for f in failures]
        lines.append("")
    if plot is not None:
        rel = os.path.relpath(plot, markdown_path.parent)
        lines += [f"![fvu against collision rate, one panel per set]({rel})", ""]
    lines += [
        "Columns: `fvu` is the fraction of variance unexplained by the reconstruction (lower is better); "
        "`collision %` is 1 - distinct code tuples / items; entropy and usage are per level (maximum "
        "log2 K bits, 100 %); `prefix agr. d=1` is the share of each item's 10 nearest neighbours (cosine) "
        "that share its first code; `seq. prefix agr. d=1` the share of consecutive items in user "
        "sequences that do; `held-out fvu` is the fvu of items left out of fitting (`--holdout`), which "
        "separates reconstruction from memorisation; `held-out prefix agr. d=1` is the share of each held-out "
        "item's 10 nearest items that share its first code, and `held-out taken %` the share of held-out items "
        "whose raw tuple a fitted item already has; `steps` applies to trained systems (vqtorch-rvq and semid RQ-VAE). Encode "
        "speed is host arrays in and out, best of 3 after a warm-up.",
        "",
    ]
    return "\n".join(lines)


def plot_results(rows: list[dict[str, Any]], path: Path) -> None:
    """fvu (x) against collision rate (y), one panel per data set, one marker per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ordered(rows)
    sets = list(dict.fromkeys(r["data"] for r in rows))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    ncols = min(3, len(sets))
    nrows = math.ceil(len(sets) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.9 * nrows), squeeze=False)
    markers = "os^vDP*Xh<>"
    colors = plt.get_cmap("tab10")
    for ax, data in zip(axes.flat, sets):
        for i, system in enumerate(systems):
            pts = [r for r in rows if r["data"] == data and r["system"] == system]
            if pts:
                ax.scatter(
                    [r["fvu"] for r in pts], [100 * r["collision_rate"] for r in pts],
                    marker=markers[i % len(markers)], color=colors(i % 10), s=60, label=system,
                )
        n_items = next(r["n_items"] for r in rows if r["data"] == data)
        ax.set_title(f"{data} ({n_items:,} items)")
        ax.set_xlabel("fvu (lower is better)")
        ax.set_ylabel("collision rate % (lower is better)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(sets):]:
        ax.axis("off")
    handles, labels = [], []
    for ax in axes.flat:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), frameon=False)
    fig.tight_layout(rect=(0, 0.05 + 0.03 * math.ceil(len(labels) / 4), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    from importlib.metadata import version

    import faiss
    import torch

    return {
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "vector-quantize-pytorch": version("vector-quantize-pytorch"),
        "numpy": np.__version__,
    }


def _host(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def load_results(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"meta": {}, "results": []}
    with open(path) as fh:
        results = json.load(fh)
    if not isinstance(results, dict) or not isinstance(results.get("results"), list):
        raise ValueError(f"{path} is not a bench_quality results file (no 'results' list)")
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=list(DATA_SETS), help=f"set names or .npy paths (default: {' '.join(DATA_SETS)})")
    p.add_argument("--data-dir", type=Path, default=default_data_dir(), help="folder holding <name>.npy")
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS, metavar="SYSTEM",
                   help=f"subset of: {' '.join(SYSTEMS)}")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of vqtorch-rvq and semid (default: vqtorch-rvq 5000 on CUDA, 3000 on "
                        "CPU; semid its config's train.steps)")
    p.add_argument("--device", default="auto", help=f"{DEVICE_NAMES} (for the trained systems)")
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--codebook-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", type=float, default=0.0,
                   help="fraction of items held out of fitting to score held-out fvu (e.g. 0.1; default 0)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and FAISS (default: their own choice; 1 is fastest on a busy machine)")
    p.add_argument("--semid-config", type=Path, default=REPO / "configs" / "default.toml")
    p.add_argument("--semid-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra semid config override, TOML value, e.g. train.batch_size=1024 (repeatable)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "quality.json")
    p.add_argument("--plot", type=Path, default=None,
                   help="PNG of fvu against collision rate (default: beside --out, same name, .png): a run to a "
                        "scratch --out never overwrites the committed plot")
    p.add_argument("--markdown", type=Path, default=None, help="also write a markdown table here")
    p.add_argument("--fresh", action="store_true", help="replace --out instead of merging into it")
    p.add_argument("--render-only", action="store_true", help="only re-render table, plot and markdown from --out")
    args = p.parse_args(argv)
    unknown = [d for d in args.data if not set_file(d, args.data_dir).is_file()]
    if unknown:
        p.error(f"unknown data set(s) {', '.join(unknown)}: no {args.data_dir}/<name>.npy and no such .npy file "
                f"(known sets: {', '.join(DATA_SETS)}; pass --data-dir if the folder is elsewhere)")
    if not 0.0 <= args.holdout < 1.0:
        p.error("--holdout must be in [0, 1)")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be >= 1")
    try:
        args.semid_set = dict(parse_override(item) for item in args.semid_set)
    except ValueError as err:
        p.error(str(err))
    if args.plot is None:
        args.plot = args.out.with_suffix(".png")
    return args


def parse_override(item: str) -> tuple[str, Any]:
    """'section.key=value' -> (key, value), the value read as TOML (a bare word is taken as a string)."""
    key, sep, raw = item.partition("=")
    if not sep or "." not in key.strip():
        raise ValueError(f"--semid-set expects SECTION.KEY=VALUE, got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def _without(entries: list[dict[str, Any]], system: str, data: str) -> list[dict[str, Any]]:
    """Entries other than the one for (system, data), so a new run replaces an old one."""
    return [e for e in entries if (e["system"], e["data"]) != (system, data)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every (set, system) pair, saving the JSON after each so a long run loses nothing."""
    from semid.metrics import read_sequences

    device = str(resolve_device(args.device))
    if args.threads is not None:
        import faiss
        import torch

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    results = {"meta": {}, "results": []} if args.fresh else load_results(args.out)
    results["meta"] = {"versions": _versions(), "updated": time.strftime("%Y-%m-%d %H:%M:%S")}
    if any(s in SEMID_SYSTEMS for s in args.systems) and not args.semid_config.is_file():
        raise FileNotFoundError(f"semid config {args.semid_config} not found (pass --semid-config)")
    for data in args.data:
        x = load_embeddings(data, args.data_dir)
        seq_file = sequences_path(data, args.data_dir)
        sequences = read_sequences(seq_file) if seq_file else None
        for name in args.systems:
            system = make_system(name, args.steps, device, args.semid_config, args.semid_set)
            print(f"[{data}] {name}: fitting on {x.shape[0]:,} x {x.shape[1]} ...", flush=True)
            try:
                metrics = measure(system, x, args.levels, args.codebook_size, args.seed, sequences, args.holdout)
            except Exception as err:
                if name not in SEMID_SYSTEMS:
                    raise
                # semid is the system under test: a configuration that fails is a finding to report,
                # not a reason to lose the rest of the run.
                traceback.print_exc()
                failure = {"system": name, "data": data, "steps": args.steps, "error": f"{type(err).__name__}: {err}"}
                print(f"[{data}] {name}: FAILED ({failure['error']})", flush=True)
                results["failures"] = _without(results.get("failures", []), name, data) + [failure]
                write_json_atomic(args.out, results)
                continue
            row_device = "cpu" if name in ("faiss-rq", "faiss-rkmeans") else device
            row = {
                "system": name, "data": data, "levels": args.levels, "codebook_size": args.codebook_size,
                "seed": args.seed, "device": row_device, "host": _host(row_device),
                "steps": getattr(system, "steps_run", getattr(system, "steps", None)), **metrics,
            }
            if isinstance(system, SemidSystem):
                row["semid_config"] = os.path.relpath(system.config, REPO)
                row["semid_overrides"] = system.overrides
                row["semid_set"] = system.extra
                row["precision"] = system.precision
            results["results"] = _without(results["results"], name, data) + [row]
            results["failures"] = _without(results.get("failures", []), name, data)
            write_json_atomic(args.out, results)
            print(f"[{data}] {name}: fvu {row['fvu']:.3f}, collisions {100 * row['collision_rate']:.1f} %, "
                  f"train {row['train_s']:.1f} s, encode {row['encode_items_per_s']:,.0f} items/s", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = load_results(args.out) if args.render_only else run(args)
    if not results["results"]:
        print(f"no results in {args.out}", file=sys.stderr)
        return 1
    print(render_text(results["results"]))
    for failure in results.get("failures", []):
        print(f"FAILED {failure['system']} on {failure['data']}: {failure['error']}")
    plot_results(results["results"], args.plot)
    if args.markdown is not None:
        write_text_atomic(args.markdown, render_markdown(results, args.plot, args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
