"""Derive embedding sets the default config was never tuned on, to check that it generalises.

Issue #5 asks the default to dominate the peers on item sets it has not seen. The five shared sets are all
raw MiniLM mean-pooled vectors of one kind; the variants here change what a new catalogue would change:

* `<set>-unit`: rows divided by their norm, the embedding model's usual (normalised) output;
* `beauty-pca128`: Beauty projected on its top 128 principal axes (another dimension, centred, 86% of the
  variance), as pipelines that reduce embeddings before tokenising do;
* `mixed`: the five sets stacked into one 29k-item catalogue of several domains.

The variants are written outside the repository (the shared sets' licences forbid shipping them), then
benchmarked with `scripts/bench_quality.py --data-dir DIR --data NAME ...`; bench/VARIANTS.md has the results.

    python scripts/make_variant_sets.py --out /tmp/variants
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import DATA_SETS, default_data_dir, load_embeddings  # noqa: E402


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def pca(x: np.ndarray, dim: int) -> np.ndarray:
    """x centred and projected on its top `dim` principal axes (in float64, then back to float32)."""
    centred = x.astype(np.float64) - x.mean(0)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    return centred @ axes[:dim].T


def variants(data_dir: Path) -> dict[str, np.ndarray]:
    sets = {name: load_embeddings(name, data_dir) for name in DATA_SETS}
    return {
        "beauty-unit": unit_rows(sets["beauty"]),
        "ml-1m-unit": unit_rows(sets["ml-1m"]),
        "beauty-pca128": pca(sets["beauty"], 128),
        "mixed": np.concatenate([sets[name] for name in DATA_SETS]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=default_data_dir(), help="folder holding the shared <name>.npy")
    p.add_argument("--out", type=Path, required=True, help="folder to write <variant>.npy to (not the repository)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, x in variants(args.data_dir).items():
        np.save(args.out / f"{name}.npy", np.ascontiguousarray(x, dtype=np.float32))
        print(f"{name}: {x.shape[0]:,} x {x.shape[1]} -> {args.out / name}.npy")


if __name__ == "__main__":
    main()
