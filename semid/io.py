"""Validating item embeddings at the boundary, and writing results atomically.

Why this module exists: every entry point (Python API, CLI, benchmarks) takes embeddings from users, and
a bad row (NaN, wrong width, duplicate id) found deep inside training surfaces as a confusing tensor
error or, worse, as silently wrong IDs. So input is checked once, here, and every problem becomes an
`InputError` whose message names it (the CLI prints that message as its one line on stderr). Files are
found and read in `semid.sources`, which validates what it reads with the functions here.

Every writer goes through `atomic_write` (temp file in the target's directory, fsync, `os.replace`), so
an interrupted run never leaves a half-written file that looks valid.

pyarrow is deliberately not used: polars reads and writes parquet natively, and pandas frames are
converted through numpy. torch and pandas are only looked up in `sys.modules` (an object of their type
cannot exist unless they were imported), so reading files does not pay for importing them.
"""
from __future__ import annotations

import json
import numbers
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from semid.atomic import atomic_write, claimed_temp, output_error

# Hint appended to missing-column errors, since the usual fix is to name the right column.
_COLUMN_HINT = "set id_col/emb_col (CLI: --id-col/--emb-col; id_col=None, --id-col '', for rows without ids)"
_COLUMNS_LISTED = 20  # a frame with a column per dimension would otherwise print hundreds of names


class InputError(ValueError):
    """Bad user input; the message names the problem (the CLI prints it as one line)."""


# --------------------------------------------------------------------------------------------------
# validation


def validate_embeddings(
    x: np.ndarray, *, expected_dim: int | None = None, name: str = "embeddings", row_offset: int = 0
) -> np.ndarray:
    """Return `x` as a C-contiguous float32 (n, d) matrix, or raise InputError saying what is wrong.

    `row_offset` is added to row numbers in messages, so that a streamed batch reports rows of the file.
    """
    x = np.asarray(x)
    if x.dtype.kind == "O" and x.ndim == 2 and x.size:  # a mixed DataFrame's .values: numbers held as objects
        if hint := _not_numbers_hint(x, row_offset):
            raise InputError(f"{name} must be real numbers, got dtype object{hint}")
        x = np.asarray(x.tolist())
    check_form(x, expected_dim, name, row_offset)
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf here; _check_values names it by `x`
        matrix = np.ascontiguousarray(x, dtype=np.float32)  # (n, d)
    _check_values(matrix, x, name, row_offset)
    return matrix


def check_form(x: np.ndarray, expected_dim: int | None, name: str, row_offset: int = 0) -> None:
    """Refuse what is not a non-empty (n, d) matrix of numbers from its dtype and shape alone: a memory-mapped
    .npy is checked by its header, before any row is read."""
    if x.dtype.kind not in "fiu":
        hint = (" (an array of per-row arrays, as a DataFrame column's .to_numpy() gives: pass np.stack(column), "
                "or the DataFrame itself)" if x.dtype.kind == "O" and x.ndim == 1 else "")
        raise InputError(f"{name} must be real numbers, got dtype {x.dtype}{hint}")
    if x.ndim != 2:
        raise InputError(f"{name} must be a 2-D matrix (items x dimensions), got shape {x.shape}")
    n, d = x.shape
    if n == 0 or d == 0:
        raise InputError(f"{name} are empty: shape {x.shape}")
    if expected_dim is not None and d != expected_dim:
        # a streamed batch past the first: the rows before it had the expected length, so the file is ragged
        where = f" (in the rows from {row_offset} on; the rows before have {expected_dim})" if row_offset else ""
        raise InputError(f"{name} have dimension {d}, expected {expected_dim}{where}")


def _not_numbers_hint(x: np.ndarray, row_offset: int) -> str:
    """": row r holds ..." for the first row of an (n, d) object matrix holding a None or a string (lists with
    a missing value make numpy fall back to objects); "" when every cell is a number."""
    for start in range(0, len(x), 1024):  # numpy judges a block at C speed; only a bad block is read in Python
        block = x[start : start + 1024]
        if np.asarray(block.tolist()).dtype.kind in "fiub":
            continue
        for row, values in enumerate(block, start):
            if (found := _first_non_number(values)) is not None:
                return f": row {row + row_offset} holds {found}"
    return ""


def _first_non_number(values: Any) -> str | None:
    """'<what> at position <j>' for the first entry of a row that is not a real number, else None."""
    for j, v in enumerate(values):
        if v is None or type(v).__name__ == "NAType":  # pandas' NA, without importing pandas here
            return f"a missing value at position {j}"
        if not isinstance(v, numbers.Real):
            return f"{type(v).__name__} {v!r:.30} at position {j}"
    return None


# Beyond this, float32 squared distances of a few thousand dimensions come near overflow (3.4e38): the
# cosine of such rows, k-means and the reconstruction error would turn into inf and NaN mid-training.
MAX_ABS_VALUE = 1e15
# A catalogue whose every value is below this is near float32's subnormal range (under 1.2e-38), where it loses
# its precision, and standardising it gives the model inf and NaN (`check_trainable_scale`).
MIN_PEAK_VALUE = 1e-30


def _check_values(x: np.ndarray, source: np.ndarray, name: str, row_offset: int) -> None:
    """Refuse NaN, inf, values whose squares overflow float32 and input that float32 turns to zeros, naming rows.

    `x` is the float32 matrix, `source` what it was cast from (a float64 value beyond float32's range is
    inf in `x` only, and is named as the large value it is). The fast path is `_peak`: a NaN anywhere makes it
    NaN, and an inf or a value too large shows in it. Only a bad matrix has its rows inspected.
    """
    peak = _peak(x)
    if peak == 0 and source.dtype.kind == "f" and source.dtype.itemsize > 4 and source.any():
        raise InputError(f"{name} are all zero in float32, in which semid computes, although not in the input "
                         f"(largest {float(np.abs(source).max()):.1e}); rescale the embeddings (for example to unit norm)")
    if peak <= MAX_ABS_VALUE:  # False for NaN as well
        return
    exact = source if source.dtype.kind == "f" else x  # integers are finite, and become floats as large
    nan_rows = np.isnan(exact).any(axis=1)  # (n,)
    inf_rows = np.isinf(exact).any(axis=1)  # (n,)
    if nan_rows.any() or inf_rows.any():
        parts = [f"{int(m.sum())} rows with {what}" for m, what in ((nan_rows, "NaN"), (inf_rows, "inf")) if m.any()]
        first = int(np.argmax(nan_rows | inf_rows)) + row_offset
        raise InputError(f"{name} contain non-finite values: {', '.join(parts)} (first bad row: {first})")
    rows = (np.abs(x) > MAX_ABS_VALUE).any(axis=1)
    raise InputError(f"{name} hold values beyond ±{MAX_ABS_VALUE:.0e} ({int(rows.sum())} rows, first bad row: "
                     f"{int(np.argmax(rows)) + row_offset}): semid computes in float32, whose squares overflow; "
                     "rescale the embeddings (for example to unit norm)")


def _peak(x: np.ndarray) -> float:
    """The largest |value|, NaN if any is NaN: two passes at memory speed, with no (n, d) temporary."""
    with np.errstate(invalid="ignore"):
        return float(np.maximum(x.max(), -x.min()))  # np.maximum keeps a NaN, Python's max may not


def check_trainable_scale(x: np.ndarray) -> None:
    """Refuse a catalogue too small in every value to train on in float32. Judged on the whole catalogue at
    fit, not per batch: items that small can still be encoded with the scale a model learned elsewhere."""
    peak = _peak(x)
    if 0 < peak < MIN_PEAK_VALUE:
        raise InputError(f"the embeddings are all below {MIN_PEAK_VALUE:.0e} in magnitude (largest {peak:.1e}): too "
                         "small to train on in float32; rescale them (for example to unit norm)")


def validate_ids(ids: Any, *, name: str = "item ids") -> np.ndarray:
    """Return ids as a 1-D numpy str array; raise InputError on nulls, float ids or duplicates.

    Float ids are refused because they usually come from an integer column with missing values, and
    "17.0" would silently differ from "17" elsewhere.
    """
    if isinstance(ids, pl.Series):
        nulls = ids.is_null().to_numpy()
        arr = (ids.cast(pl.String) if ids.dtype == pl.Categorical else ids).to_numpy()
    else:
        # pandas' nullable columns (Int64, string) mark missing values themselves; as numpy, an Int64 column
        # with a missing id would turn into floats and be refused for that instead of for the null
        isna = getattr(ids, "isna", None)
        nulls = np.asarray(isna(), dtype=bool) if callable(isna) else None
        arr = np.asarray(ids, dtype=object) if nulls is not None and nulls.any() else np.asarray(ids)
        if nulls is None:
            nulls = _null_mask(arr) if arr.dtype.kind == "O" else np.zeros(arr.shape, dtype=bool)
    if arr.ndim == 0:  # a single string, a set or a generator: numpy makes one object of it
        raise InputError(f"{name} must be a list or array with one id per row, got {type(ids).__name__}")
    if arr.ndim != 1:
        raise InputError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if nulls.any():
        first = int(np.argmax(nulls))
        raise InputError(f"{name}: {int(nulls.sum())} missing (null) ids, the first at row {first}")
    if arr.dtype.kind not in "OUiu":
        raise InputError(f"{name} must be strings or integers, got {arr.dtype}")
    arr = arr.astype(str)  # (n,)
    values, counts = np.unique(arr, return_counts=True)
    dup = counts > 1
    if dup.any():
        raise InputError(_duplicates_message(name, values[dup].tolist(), counts[dup].tolist()))
    return arr


def check_unique_ids(ids: pl.Series, *, name: str = "item ids") -> None:
    """Raise InputError, worded as by `validate_ids`, when an id occurs more than once.

    For ids kept as a polars column (all ids of a streamed file): the check runs in polars instead of
    making a Python or numpy string per id.
    """
    if first_repeat(ids) is None:
        return
    repeated = ids.is_duplicated()
    counts = ids.filter(repeated).value_counts(name="count").sort(ids.name)
    raise InputError(_duplicates_message(name, counts[ids.name].to_list(), counts["count"].to_list()))


def first_repeat(values: pl.Series) -> Any | None:
    """The smallest value that occurs more than once, or None when all are distinct.

    Sorting and comparing neighbours: for 4M string ids that took 0.1 s here, where polars' hash-based
    is_duplicated took 4.6 s and np.unique on a numpy str array 18 s.
    """
    if len(values) < 2:
        return None
    ordered = values.sort()
    later = ordered.slice(1)
    same = later == ordered.slice(0, len(ordered) - 1)
    return later.filter(same)[0] if same.any() else None


def _duplicates_message(name: str, values: list[Any], counts: list[int]) -> str:
    """The error for repeated ids: how many repeat, and the first three (in sorted order) with counts."""
    examples = ", ".join(f"'{v}' ({c}x)" for v, c in zip(values[:3], counts[:3]))
    return f"{name} must be unique: {len(values)} ids occur more than once, e.g. {examples}"


def _null_mask(values: np.ndarray) -> np.ndarray:
    """Elementwise None / NaN / pd.NA test for an object array (pandas is a dependency already)."""
    import pandas as pd

    return np.asarray(pd.isna(values), dtype=bool)


def _check_rows(null_rows: np.ndarray, lengths: np.ndarray, what: str, row_offset: int) -> None:
    """Shared null and ragged checks for per-row embedding vectors (polars lists, pandas objects)."""
    if null_rows.any():
        first = int(np.argmax(null_rows)) + row_offset
        raise InputError(f"{what} has {int(null_rows.sum())} null embeddings (first at row {first})")
    ragged = lengths != lengths[:1]  # no rows: nothing is ragged (emptiness is validate_embeddings' call)
    if ragged.any():
        j = int(np.argmax(ragged))
        raise InputError(
            f"{what} has embeddings of different lengths (ragged): row {row_offset} has {lengths[0]} "
            f"values, row {row_offset + j} has {lengths[j]}"
        )


@dataclass
class ItemTable:
    """A block of items: ids (None when the input has none, as in .npy) and their embeddings."""

    ids: np.ndarray | None  # (n,) str
    embeddings: np.ndarray  # (n, d) float32

    def __post_init__(self) -> None:
        if self.ids is not None and len(self.ids) != len(self.embeddings):
            raise InputError(f"{len(self.ids)} item ids for {len(self.embeddings)} embeddings")

    def __len__(self) -> int:
        return len(self.embeddings)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])


# --------------------------------------------------------------------------------------------------
# in-memory conversion


def polars_to_table(
    df: pl.DataFrame,
    id_col: str | None,
    emb_col: str,
    where: str,
    *,
    row_offset: int = 0,
    expected_dim: int | None = None,
) -> ItemTable:
    check_columns(df.columns, id_col, emb_col, where)
    emb = df.get_column(emb_col)
    if isinstance(emb.dtype, pl.Array):
        emb = emb.cast(pl.List(emb.dtype.inner))
    if not (isinstance(emb.dtype, pl.List) and emb.dtype.inner.is_numeric()):
        raise InputError(f"column '{emb_col}' in {where} must hold lists of numbers, got {emb.dtype}")
    lengths = emb.list.len().fill_null(0).to_numpy()  # (n,)
    _check_rows(emb.is_null().to_numpy(), lengths, where, row_offset)
    n, d = len(emb), int(lengths[0]) if len(emb) else 0
    flat = emb.explode() if d else pl.Series(emb_col, [], dtype=pl.Float32)  # (n * d,)
    if flat.null_count():
        row = int(np.argmax(flat.is_null().to_numpy())) // d + row_offset
        raise InputError(f"{where} has null values inside embeddings (first at row {row})")
    matrix = flat.to_numpy().reshape(n, d)  # (n, d)
    name = f"embeddings in {where}"
    embeddings = validate_embeddings(matrix, expected_dim=expected_dim, name=name, row_offset=row_offset)
    ids = validate_ids(df.get_column(id_col), name=f"column '{id_col}' in {where}") if id_col else None
    return ItemTable(ids, embeddings)


def _pandas_to_table(df: Any, id_col: str | None, emb_col: str) -> ItemTable:
    where = "the pandas DataFrame"
    # pandas labels may be numbers (0, 1): columns are matched by their text, whichever way they are named
    labels = {str(label): label for label in df.columns}
    id_col, emb_col = (None if id_col is None else str(id_col)), str(emb_col)
    if id_col is not None and id_col not in labels and id_col in map(str, df.index.names):
        raise InputError(f"'{id_col}' is the index of {where}, not a column (pandas moved it there): pass "
                         "df.reset_index()")
    check_columns(list(labels), id_col, emb_col, where)
    values = df[labels[emb_col]].to_numpy()  # (n,) objects: lists or arrays
    nulls = _null_mask(values)
    scalar = next((i for i, (v, null) in enumerate(zip(values, nulls)) if not null and np.ndim(v) != 1), None)
    if scalar is not None:
        raise InputError(f"column '{emb_col}' in {where} must hold one list of numbers per row; row {scalar} holds "
                         f"{type(values[scalar]).__name__} {values[scalar]!r:.40}")
    lengths = np.fromiter((0 if null else len(v) for v, null in zip(values, nulls)), dtype=np.int64, count=len(values))
    _check_rows(nulls, lengths, where, 0)
    rows = [np.asarray(v) for v in values]
    # one row of text or None turns the whole stacked matrix into text or objects: name that row first
    bad = next((i for i, row in enumerate(rows) if row.dtype.kind not in "fiub"), None)
    if bad is not None:
        found = _first_non_number(values[bad]) or f"dtype {rows[bad].dtype}"
        raise InputError(f"embeddings in {where} must be real numbers: row {bad} holds {found}")
    matrix = np.stack(rows) if rows else np.empty((0, 0))  # (n, d)
    embeddings = validate_embeddings(matrix, name=f"embeddings in {where}")
    ids = validate_ids(df[labels[id_col]], name=f"column '{id_col}' in {where}") if id_col else None
    return ItemTable(ids, embeddings)


def to_numpy_embeddings(
    x: Any, *, id_col: str | None = "item_id", emb_col: str = "embedding"
) -> tuple[np.ndarray | None, np.ndarray]:
    """Turn user input into (ids or None, validated float32 (n, d) matrix).

    Accepts a numpy array, nested lists, a torch tensor (any device; bf16/fp16 are upcast), or a polars
    or pandas DataFrame with an id column and a list-of-numbers embedding column (id_col=None: no ids).
    """
    torch = sys.modules.get("torch")
    pd = sys.modules.get("pandas")
    if torch is not None and isinstance(x, torch.Tensor):
        t = x.detach()
        if t.is_floating_point():
            t = t.float()  # bf16 has no numpy dtype
        return None, validate_embeddings(t.cpu().numpy())
    if isinstance(x, pl.DataFrame):
        table = polars_to_table(x, id_col, emb_col, "the polars DataFrame")
        return table.ids, table.embeddings
    if pd is not None and isinstance(x, pd.DataFrame):
        table = _pandas_to_table(x, id_col, emb_col)
        return table.ids, table.embeddings
    if isinstance(x, (np.ndarray, list, tuple)):
        try:
            arr = np.asarray(x)
        except ValueError as e:  # numpy refuses inhomogeneous nested lists
            raise InputError(f"embeddings have rows of different lengths (ragged): {e}") from e
        return None, validate_embeddings(arr)
    if isinstance(x, (str, os.PathLike)):  # fit("items.parquet"): files are read by semid.sources
        raise InputError(f"embeddings given as the path {os.fspath(x)!r}: read the file first, "
                         "items = semid.sources.read_items(path), then fit(items.embeddings, ids=items.ids); "
                         "tok.encode_file(path, out) streams a file through encode")
    raise InputError(
        f"unsupported embeddings type {type(x).__name__}: expected a numpy array, a torch tensor, "
        "or a polars/pandas DataFrame"
    )


def check_columns(names: list[str], id_col: str | None, emb_col: str, where: str) -> None:
    if id_col == emb_col:
        raise InputError(f"the id column and the embedding column of {where} are both '{emb_col}': name two "
                         f"columns ({_COLUMN_HINT})")
    for col in (id_col, emb_col):
        if col is not None and col not in names:
            listed = ", ".join(map(str, names[:_COLUMNS_LISTED]))
            more = f" and {len(names) - _COLUMNS_LISTED} more" if len(names) > _COLUMNS_LISTED else ""
            raise InputError(f"{where} has no column '{col}'; its columns are: {listed}{more} ({_COLUMN_HINT})")


# --------------------------------------------------------------------------------------------------
# atomic writers


def write_parquet_atomic(df: pl.DataFrame | pl.LazyFrame, path: str | os.PathLike) -> None:
    """Write a DataFrame, or stream a LazyFrame (bounded memory), to parquet atomically."""
    if isinstance(df, pl.LazyFrame):
        atomic_write(path, lambda tmp: df.sink_parquet(tmp))
    else:
        atomic_write(path, lambda tmp: df.write_parquet(tmp))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


def _finite_or_null(obj: Any) -> Any:
    """obj with every NaN or infinite float replaced by None: bare NaN is not JSON, and strict readers fail."""
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    if isinstance(obj, np.ndarray) and obj.dtype.kind == "f":
        return _finite_or_null(obj.tolist())
    return obj


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write strict JSON (numpy scalars and arrays allowed; NaN and inf as null) atomically, indented for humans."""
    # serialise first: a bad object writes nothing
    text = json.dumps(_finite_or_null(obj), indent=2, default=_json_default, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_npy_atomic(arr: np.ndarray, path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: np.save(tmp, np.asarray(arr), allow_pickle=False))


class ParquetShardWriter:
    """Collect DataFrame batches into one parquet file without holding them all in memory.

    Each batch goes to a part file in a hidden temp directory next to the target (`claimed_temp`: one that a
    killed run left is removed by the next write of the target). On a clean exit of the `with` block the parts
    are concatenated lazily (scan + sink, streaming) into the target through `atomic_write`; the directory is
    removed however the block ends, so nothing, old or partial, appears at the target path.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._claim = claimed_temp(Path(os.path.realpath(path)), directory=True)
        self._parts: list[Path] = []

    def __enter__(self) -> ParquetShardWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._dir = self._claim.__enter__()
        except OSError as exc:
            raise (output_error(exc, self.path) or exc) from None
        return self

    def write(self, df: pl.DataFrame) -> None:
        part = self._dir / f"part-{len(self._parts):06d}.parquet"
        df.write_parquet(part)
        self._parts.append(part)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                if not self._parts:
                    raise ValueError(f"no batches were written to {self.path}")
                write_parquet_atomic(pl.scan_parquet(self._parts, glob=False), self.path)
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._claim.__exit__(None, None, None)  # releases the directory's lock


# The file readers live in semid.sources; code written when they were here (`semid.io.read_items`) keeps working.
_MOVED_TO_SOURCES = frozenset({"SUFFIXES", "InputFiles", "input_files", "read_items", "count_items",
                               "iter_item_batches", "read_rows", "parquet_column_type", "InteractionSequences",
                               "read_interaction_sequences"})


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_SOURCES:
        from semid import sources

        return getattr(sources, name)
    raise AttributeError(f"module 'semid.io' has no attribute {name!r}")
