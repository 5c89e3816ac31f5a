"""Derive embedding sets the default config was never tuned on, to check that it generalises.

Issue #5 asks the default to dominate the peers on item sets it has not seen. The five shared sets are all
raw MiniLM mean-pooled vectors of one kind; the variants here change what a new catalogue would change:

* `<set>-unit`: rows divided by their norm, the embedding model's usual (normalised) output;
* `beauty-pca128`: Beauty projected on its top 128 principal axes (another dimension, centred, 86% of the
  variance), as pipelines that reduce embeddings before tokenising do;
* `beauty-pca32`: the same on 32 axes, narrower than the default's 64-d latent (as small item factors are);
* `mixed`: the five sets stacked into one 29k-item catalogue of several domains.
* `ml-1m-600`, `beauty-3000`: seeded random subsets, catalogues only a few times the size of a codebook;
* `beauty-tfidf256`: not MiniLM at all: TF-IDF of Beauty's item texts reduced to 256 dimensions by truncated
  SVD (latent semantic analysis), the embedding a team without a neural text model would use;
* `goodbooks-tfidf768`, `beauty-tfidf1024`: the same for another domain at a BERT-base width, and wider than
  any set above (embeddings of 768 to 1,536 dimensions are common);
* `beauty-cf64`: collaborative item factors: the truncated SVD of Beauty's item-by-user interaction matrix
  (`beauty_sequences.txt`) to 64 dimensions, item rows scaled by the singular values, as semantic IDs built
  on behaviour rather than content would use.

The variants are written outside the repository (the shared sets' licences forbid shipping them), then
benchmarked with `scripts/bench_quality.py --data-dir DIR --data NAME ...`; bench/VARIANTS.md has the results.

    python scripts/make_variant_sets.py --out /tmp/variants
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import polars as pl
from scipy import sparse
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import DATA_SETS, default_data_dir, load_embeddings  # noqa: E402


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def pca(x: np.ndarray, dim: int) -> np.ndarray:
    """x centred and projected on its top `dim` principal axes (in float64, then back to float32)."""
    centred = x.astype(np.float64) - x.mean(0)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    return centred @ axes[:dim].T


def subsets(x_by_name: dict[str, np.ndarray], sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """`<name>-<size>`: a seeded random choice of `size` rows of each named set, kept in row order."""
    rng = np.random.default_rng(seed)
    return {f"{name}-{size}": x_by_name[name][np.sort(rng.choice(len(x_by_name[name]), size, replace=False))]
            for name, size in sizes.items()}


def text_lsa(texts: list[str], dim: int, seed: int = 0) -> np.ndarray:
    """TF-IDF (words and word pairs, sublinear counts) reduced to `dim` dimensions by truncated SVD."""
    tfidf = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True).fit_transform(texts)
    return TruncatedSVD(dim, random_state=seed).fit_transform(tfidf)


def interaction_factors(sequences: Path, n_items: int, dim: int, seed: int = 0) -> np.ndarray:
    """Item factors U S of the truncated SVD of the binary item-by-user matrix of `user<TAB>row row ...` lines."""
    items, users = [], []
    for user, line in enumerate(sequences.read_text().splitlines()):
        rows = {int(r) for r in line.split("\t", 1)[1].split()}
        items.extend(rows)
        users.extend([user] * len(rows))
    matrix = sparse.csr_matrix((np.ones(len(items)), (items, users)), shape=(n_items, max(users) + 1))
    return TruncatedSVD(dim, random_state=seed).fit_transform(matrix)


def variants(data_dir: Path) -> dict[str, np.ndarray]:
    sets = {name: load_embeddings(name, data_dir) for name in DATA_SETS}
    beauty_texts, book_texts = (pl.read_parquet(data_dir / f"{name}.items.parquet")["text"].to_list()
                                for name in ("beauty", "goodbooks"))
    return {
        "beauty-unit": unit_rows(sets["beauty"]),
        "ml-1m-unit": unit_rows(sets["ml-1m"]),
        "beauty-pca128": pca(sets["beauty"], 128),
        "beauty-pca32": pca(sets["beauty"], 32),
        "mixed": np.concatenate([sets[name] for name in DATA_SETS]),
        **subsets(sets, {"ml-1m": 600, "beauty": 3000}),
        "beauty-tfidf256": text_lsa(beauty_texts, 256),
        "goodbooks-tfidf768": text_lsa(book_texts, 768),
        "beauty-tfidf1024": text_lsa(beauty_texts, 1024),
        "beauty-cf64": interaction_factors(data_dir / "beauty_sequences.txt", len(sets["beauty"]), 64),
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
