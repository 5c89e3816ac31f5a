"""Reading item embeddings and writing results: validation at the boundary, atomic writes.

Why this module exists: every entry point (Python API, CLI, benchmarks) takes embeddings from users, and
a bad row (NaN, wrong width, duplicate id) found deep inside training surfaces as a confusing tensor
error or, worse, as silently wrong IDs. So input is checked once, here, and every problem becomes an
`InputError` whose message names it (the CLI prints that message as its one line on stderr).

Every writer goes through `atomic_write` (temp file in the target's directory, fsync, `os.replace`), so
an interrupted run never leaves a half-written file that looks valid.

pyarrow is deliberately not used: polars reads and writes parquet natively, and pandas frames are
converted through numpy. torch and pandas are only looked up in `sys.modules` (an object of their type
cannot exist unless they were imported), so reading files does not pay for importing them.
"""
from __future__ import annotations

import fnmatch
import functools
import json
import numbers
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import polars as pl

from semid.atomic import atomic_write, claimed_temp, output_error
from semid.modeldir import is_model_dir

SUFFIXES = (".npy", ".parquet")
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
    _check_form(x, expected_dim, name, row_offset)
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf here; _check_values names it by `x`
        matrix = np.ascontiguousarray(x, dtype=np.float32)  # (n, d)
    _check_values(matrix, x, name, row_offset)
    return matrix


def _check_form(x: np.ndarray, expected_dim: int | None, name: str, row_offset: int = 0) -> None:
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


def _polars_to_table(
    df: pl.DataFrame,
    id_col: str | None,
    emb_col: str,
    where: str,
    *,
    row_offset: int = 0,
    expected_dim: int | None = None,
) -> ItemTable:
    _check_columns(df.columns, id_col, emb_col, where)
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
    _check_columns(list(labels), id_col, emb_col, where)
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
        table = _polars_to_table(x, id_col, emb_col, "the polars DataFrame")
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
    raise InputError(
        f"unsupported embeddings type {type(x).__name__}: expected a numpy array, a torch tensor, "
        "or a polars/pandas DataFrame"
    )


# --------------------------------------------------------------------------------------------------
# files


# Large tables leave Spark, Hive, Dask or BigQuery as a directory of part files. Names starting with "." or "_"
# beside the parts are not data: _SUCCESS, _committed_*, a _temporary/ folder, .crc checksums, semid's own temps.
_NOT_DATA_PREFIXES = (".", "_")
_GLOB_CHARACTERS = frozenset("*?[")
_SKIPPED = "names that begin with '.' or '_', and semid model directories, are skipped"


@dataclass(frozen=True)
class InputFiles:
    """The files one input path names, read as one table in this order.

    A path is one file (`.npy`, `.parquet`, `.csv` where allowed), or a directory or glob pattern of table files
    (`catalogue/`, `'exports/part-*.parquet'`): the parts a data warehouse writes, read in natural path order
    (`part.2` before `part.10`), each part named in the messages about its own rows. A `.npy` is always one file.
    """

    given: str  # the path as the user wrote it
    files: tuple[Path, ...]  # in reading order; every one has `suffix`
    suffix: str  # ".npy", ".parquet" or ".csv"
    root: Path | None = None  # a directory's or pattern's real folder; None for one file
    pattern: tuple[str, ...] = ()  # the path components below `root` that a part matches

    def __str__(self) -> str:
        if not self.sharded:
            return self.given
        count = len(self.files)
        return f"{self.given} ({count} {self.suffix.lstrip('.')} file{'s' if count > 1 else ''})"

    @property
    def sharded(self) -> bool:
        return self.root is not None

    @property
    def is_npy(self) -> bool:
        return self.suffix == ".npy"

    @functools.cached_property
    def parts(self) -> tuple[tuple[Path, pl.Schema, int], ...]:
        """Each parquet file with its schema and row count, from its footer: read once for every pass."""
        found = []
        for p in self.files:
            try:
                found.append((p, pl.read_parquet_schema(p), int(pl.scan_parquet(p).select(pl.len()).collect().item())))
            except (pl.exceptions.PolarsError, OSError) as e:
                raise InputError(f"cannot read {p} as parquet: {e}") from e
        return tuple(found)

    def would_read(self, target: str | os.PathLike) -> bool:
        """Whether a file written at `target` is, or would become, part of this input: an output written into the
        input's directory, or matching its pattern, would be read as a part by the next run. Paths are compared
        as real paths, so a link to the folder is the folder."""
        real = Path(os.path.realpath(target))
        if any(real == Path(os.path.realpath(f)) for f in self.files):
            return True
        if self.root is None or real.suffix.lower() != self.suffix or self.root not in real.parents:
            return False
        relative = real.relative_to(self.root)
        return _is_data_part(relative) and _matches(self.pattern, relative.parts)


def _is_data_part(relative: Path) -> bool:
    return not any(part.startswith(_NOT_DATA_PREFIXES) for part in relative.parts)


def _matches(pattern: Sequence[str], parts: Sequence[str]) -> bool:
    """Glob matching by path components: `**` spans any number of folders, other wildcards stay in one name."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_matches(rest, parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], head) and _matches(rest, parts[1:])


def _data_files(root: Path, depth: int | None) -> list[Path]:
    """Every file below `root`, at most `depth` components down, that may be data: folder links are followed
    (once each: a loop ends), and names that begin with "." or "_", and semid model directories (whose registry
    is parquet too), are skipped."""
    found, seen = [], set()
    for folder, folders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen or is_model_dir(Path(folder)):
            folders[:] = []
            continue
        seen.add(real)
        deeper = depth is None or len(Path(folder).relative_to(root).parts) + 1 < depth
        folders[:] = [name for name in folders if deeper and not name.startswith(_NOT_DATA_PREFIXES)]
        found += [Path(folder, name) for name in names if not name.startswith(_NOT_DATA_PREFIXES)]
    return found


def _natural_order(path: Path, root: Path) -> tuple:
    """Sort key: numbers in names compare as numbers (Dask's part.2 before part.10), then the name as written."""
    relative = path.relative_to(root)
    return (*(tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", part))
              for part in relative.parts), str(relative))


def input_files(path: str | os.PathLike, *, suffixes: Sequence[str] = SUFFIXES, what: str = "input") -> InputFiles:
    """Resolve an input path (a file, a directory of parts, or a glob pattern) or raise InputError naming why not.

    `what` names the input in messages ("input", "interactions"). Directories are searched recursively (Hive
    partitions are folders); see `_data_files` for what is skipped.
    """
    given = os.fspath(path)
    p = Path(given)
    tables = [s for s in suffixes if s != ".npy"]  # the formats whose parts form one table
    if p.is_dir():
        root, pattern = p, ("**", "*")
    elif not p.exists() and _GLOB_CHARACTERS & set(given):
        first = next(i for i, part in enumerate(p.parts) if _GLOB_CHARACTERS & set(part))
        root, pattern = Path(*p.parts[:first]) if first else Path("."), p.parts[first:]
    else:
        if not p.exists():
            raise InputError(f"{what} file not found: {p}")
        if p.suffix.lower() not in suffixes:
            raise InputError(f"unsupported file type '{p.suffix}' for the {what} {p}: expected {' or '.join(suffixes)}")
        if not p.is_file():
            raise InputError(f"{what} path is not a file: {p}")
        return InputFiles(given, (p,), p.suffix.lower())
    depth = None if "**" in pattern else len(pattern)  # `*.parquet` looks in one folder, not the whole tree below
    found = [f for f in _data_files(root, depth) if _matches(pattern, f.relative_to(root).parts)]
    kinds = sorted({f.suffix.lower() for f in found} & set(tables))
    if not kinds:
        npy = "; .npy files are read one at a time: name the file" if any(f.suffix == ".npy" for f in found) else ""
        listed = f"no {' or '.join(tables)} files ({_SKIPPED}{npy})"
        raise InputError(f"the directory {p} holds {listed}" if p.is_dir() else
                         f"{what} file not found: {p}, and as a glob pattern it matches {listed}")
    if len(kinds) > 1:
        one = f"as in {p / ('*' + kinds[0])}" if p.is_dir() else "by the pattern's ending"
        raise InputError(f"the {'directory' if p.is_dir() else 'pattern'} {p} has both {' and '.join(kinds)} files: "
                         f"name one kind, {one}")
    files = sorted((f for f in found if f.suffix.lower() == kinds[0]), key=lambda f: _natural_order(f, root))
    return InputFiles(given, tuple(files), kinds[0], Path(os.path.realpath(root)), tuple(pattern))


def _check_columns(names: list[str], id_col: str | None, emb_col: str, where: str) -> None:
    if id_col == emb_col:
        raise InputError(f"the id column and the embedding column of {where} are both '{emb_col}': name two "
                         f"columns ({_COLUMN_HINT})")
    for col in (id_col, emb_col):
        if col is not None and col not in names:
            listed = ", ".join(map(str, names[:_COLUMNS_LISTED]))
            more = f" and {len(names) - _COLUMNS_LISTED} more" if len(names) > _COLUMNS_LISTED else ""
            raise InputError(f"{where} has no column '{col}'; its columns are: {listed}{more} ({_COLUMN_HINT})")


def _open_npy(p: Path, expected_dim: int | None) -> np.ndarray:
    """Memory-map a .npy and check its header-level facts (dtype, shape, dimension) without reading rows."""
    try:
        mm = np.load(p, mmap_mode="r", allow_pickle=False)
    except EOFError as e:  # numpy's "No data left in file" names neither the file nor the problem
        raise InputError(f"cannot read {p} as .npy: the file is empty") from e
    except (ValueError, OSError) as e:
        # numpy takes a file without the .npy header for a pickle, and suggests unpickling it: never safe here
        reason = ("it has no .npy header, or holds Python objects" if "pickle" in str(e) else
                  "the file is shorter than its header says (truncated: an interrupted copy or download?)"
                  if "mmap length is greater than file size" in str(e) else e)
        raise InputError(f"cannot read {p} as .npy: {reason}") from e
    if not isinstance(mm, np.ndarray):
        raise InputError(f"{p} is not a single .npy array")
    _check_form(mm, expected_dim, f"embeddings in {p}")  # the header's dtype and shape: no row is read
    return mm


def _source(path: str | os.PathLike | InputFiles) -> InputFiles:
    """The input a path names; callers that read one input several times resolve it once and pass that on, so
    every pass sees the same parts and reads their footers once."""
    return path if isinstance(path, InputFiles) else input_files(path)


@dataclass(frozen=True)
class _Part:
    """One parquet file of an input: a lazy scan of the columns needed, and its row count (from the footer)."""

    path: Path
    scan: pl.LazyFrame
    rows: int


def _scanned_parts(source: InputFiles, id_col: str | None, emb_col: str) -> list[_Part]:
    """Every parquet file of `source`, checked for the columns before any row is read."""
    parts = []
    for p, schema, rows in source.parts:
        _check_columns(schema.names(), id_col, emb_col, str(p))
        parts.append(_Part(p, pl.scan_parquet(p).select([c for c in (id_col, emb_col) if c is not None]), rows))
    return parts


def _check_not_empty(source: InputFiles, parts: list[_Part]) -> None:
    if not any(part.rows for part in parts):
        raise InputError(f"embeddings in {source} are empty: {'its files have' if source.sharded else 'the file has'} "
                         "no rows")


def parquet_column_type(path: str | os.PathLike | InputFiles, column: str) -> pl.DataType:
    """The type an id column of `path` goes back out as: its own integer type, else a string.

    Ids are keyed as strings inside semid; an output that turned integer ids into strings would no longer
    join to the table it came from. Parts of one table may differ in width (Int32 here, Int64 there): integers
    stay integers, of a type that holds them all. Parts without rows carry no type (polars writes them as Null).
    """
    types = {schema[column] for _, schema, rows in _source(path).parts if rows and schema[column] != pl.Null}
    if not types or not all(t.is_integer() for t in types):
        return pl.String
    if len(types) == 1:
        return types.pop()
    if all(t.is_unsigned_integer() for t in types):
        return pl.UInt64
    return pl.String if pl.UInt64 in types else pl.Int64  # a UInt64 beyond Int64 has no signed type to go in


def check_unique_ids_of(source: InputFiles, ids: pl.Series, name: str) -> None:
    """`check_unique_ids` over a whole input: each part was checked alone, this finds repeats across parts and
    names the parts and rows where the first repeated id is."""
    try:
        check_unique_ids(ids, name=name)
    except InputError as e:
        if not source.sharded:
            raise
        rows = np.flatnonzero((ids == first_repeat(ids)).to_numpy())  # (k,) rows of the whole table
        starts = np.cumsum([0] + [rows_in for _, _, rows_in in source.parts])  # (parts + 1,)
        owner = np.searchsorted(starts, rows, side="right") - 1  # (k,)
        where = ", ".join(f"{source.parts[i][0]} row {r - starts[i]}" for i, r in zip(owner.tolist(), rows.tolist()))
        raise InputError(f"{e} (the first is in {where})") from None


def _collect(lf: pl.LazyFrame, p: Path) -> pl.DataFrame:
    try:
        return lf.collect()
    except (pl.exceptions.PolarsError, OSError) as e:
        raise InputError(f"cannot read {p} as parquet: {e}") from e


def _joined(tables: list[ItemTable]) -> ItemTable:
    if len(tables) == 1:
        return tables[0]
    ids = None if tables[0].ids is None else np.concatenate([t.ids for t in tables])  # (n,)
    return ItemTable(ids, np.concatenate([t.embeddings for t in tables]))  # (n, d)


def read_items(path: str | os.PathLike | InputFiles, *, id_col: str | None = "item_id",
               emb_col: str = "embedding") -> ItemTable:
    """Read and validate a whole .npy (no ids), or parquet (id + embedding columns; one file or parts), into memory."""
    source = _source(path)
    if source.is_npy:
        p = source.files[0]
        mm = _open_npy(p, None)
        matrix = validate_embeddings(mm, name=f"embeddings in {p}")  # one cast: no float64 copy of a float64 file
        return ItemTable(None, matrix.copy() if np.may_share_memory(matrix, mm) else matrix)  # in memory, not mapped
    parts = _scanned_parts(source, id_col, emb_col)
    _check_not_empty(source, parts)
    tables, dim = [], None
    for part in parts:
        if part.rows:
            tables.append(_polars_to_table(_collect(part.scan, part.path), id_col, emb_col, str(part.path),
                                           expected_dim=dim))
            dim = tables[-1].dim  # every part as wide as the first
    items = _joined(tables)
    if len(tables) > 1 and items.ids is not None:
        check_unique_ids_of(source, pl.Series(items.ids), f"column '{id_col}' in {source}")
    return items


def count_items(path: str | os.PathLike | InputFiles, *, id_col: str | None = "item_id",
                emb_col: str = "embedding") -> int:
    """Number of items in an input, from metadata only (the .npy header or the parquet footers)."""
    source = _source(path)
    if source.is_npy:
        return len(_open_npy(source.files[0], None))
    return sum(part.rows for part in _scanned_parts(source, id_col, emb_col))


def iter_item_batches(
    path: str | os.PathLike | InputFiles,
    batch_size: int,
    *,
    id_col: str | None = "item_id",
    emb_col: str = "embedding",
    expected_dim: int | None = None,
) -> Iterator[ItemTable]:
    """Yield validated batches of at most `batch_size` items, holding about one batch in memory.

    .npy is memory-mapped and sliced. Parquet is read with a lazy scan and a slice per batch, which polars
    pushes down to the reader, so only the row groups a batch overlaps are decoded: peak memory is
    about one batch plus one row group. File-level problems (missing file, columns, dimension of a .npy)
    are raised here, before the first batch. Ids are checked for duplicates within each batch only;
    uniqueness across batches is a global property the caller checks (e.g. a lazy polars group-by).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"batch size must be a positive integer, got {batch_size!r}")
    source = _source(path)
    if source.is_npy:
        p = source.files[0]
        n = len(_open_npy(p, expected_dim))  # checks the header now; the map is dropped at once
        return _npy_batches(p, n, int(batch_size), expected_dim)
    parts = _scanned_parts(source, id_col, emb_col)
    _check_not_empty(source, parts)
    return _parquet_batches(parts, int(batch_size), id_col, emb_col, expected_dim)


def _npy_batches(p: Path, n: int, batch_size: int, expected_dim: int | None) -> Iterator[ItemTable]:
    """Each batch maps the file anew and unmaps it once its rows are copied out.

    Pages of a memory map count toward the process's resident set for as long as the map is open, so a
    single map held across the whole file made peak RSS grow with the file (8.3 GB for 4M x 384 float32)
    although only one batch was in use.
    """
    for start in range(0, n, batch_size):
        rows = _npy_rows(p, start, min(n, start + batch_size))
        emb = validate_embeddings(rows, expected_dim=expected_dim, name=f"embeddings in {p}", row_offset=start)
        yield ItemTable(None, emb)


def _npy_rows(p: Path, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a .npy file, copied out of a map of their own.

    The map lives only in this call: its last reference goes on return, which unmaps it.
    """
    return np.array(np.load(p, mmap_mode="r", allow_pickle=False)[start:stop])  # (b, d)


def _parquet_batches(
    parts: list[_Part], batch_size: int, id_col: str | None, emb_col: str, expected_dim: int | None
) -> Iterator[ItemTable]:
    """Full batches across part boundaries, so that a warehouse's many small parts still make the large batches
    a GPU encodes fastest. Each slice is read and validated on its own: a message names its part and row."""
    pending: list[ItemTable] = []
    held = 0
    for part in parts:
        start = 0
        while start < part.rows:
            take = min(batch_size - held, part.rows - start)  # polars slices take lengths below 2^32
            table = _polars_to_table(_collect(part.scan.slice(start, take), part.path), id_col, emb_col,
                                     str(part.path), row_offset=start, expected_dim=expected_dim)
            expected_dim = table.dim  # later slices must match the first: a ragged input fails here
            pending.append(table)
            held += take
            start += take
            if held == batch_size:
                yield _joined(pending)
                pending, held = [], 0
    if pending:
        yield _joined(pending)


# --------------------------------------------------------------------------------------------------
# interaction logs


@dataclass
class InteractionSequences:
    """Users' histories as row numbers of an evaluated catalogue, in time order (`sequence_prefix_agreement`)."""

    sequences: list[np.ndarray]  # one (k,) int64 array of catalogue rows per user, users in sorted order
    interactions: int  # rows of the file
    skipped: int  # interactions with an item the catalogue does not hold


def _log_columns(f: Path, where: str) -> list[str]:
    scan = pl.scan_parquet if f.suffix.lower() == ".parquet" else pl.scan_csv
    try:
        return scan(f).collect_schema().names()
    except (pl.exceptions.PolarsError, OSError) as e:
        raise InputError(f"cannot read the interactions {where}: {e}") from e


def _interaction_part(f: Path, user_col: str, item_col: str, time_col: str | None, where: str) -> pl.LazyFrame:
    """One file of an interaction log as (user, item, time) columns, item ids as text."""
    names = _log_columns(f, where)
    for role, col in (("user", user_col), ("item", item_col)):
        if col not in names:
            raise InputError(f"the interactions {where} have no {role} column '{col}'; their columns are: "
                             f"{', '.join(names)} (CLI: --user-col, --id-col)")
    if time_col is not None and time_col not in names:
        raise InputError(f"the interactions {where} have no time column '{time_col}'; their columns are: "
                         f"{', '.join(names)} (CLI: --time-col)")
    if f.suffix.lower() == ".parquet":
        scan = pl.scan_parquet(f)
    else:  # ids as written: a column inferred as integers from its first rows fails on "a1"
        scan = pl.scan_csv(f, schema_overrides={user_col: pl.String, item_col: pl.String})
    return scan.select(user=pl.col(user_col), item=pl.col(item_col).cast(pl.String),
                       time=pl.col(time_col) if time_col is not None else pl.lit(0))


def read_interaction_sequences(
    path: str | os.PathLike,
    item_ids: Sequence[object],
    *,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str | None = None,
) -> InteractionSequences:
    """Users' sequences from an interaction log (.parquet or .csv: a user, an item and a time per row).

    This is the form recommendation logs come in; the metric wants each user's items as rows of the
    catalogue it evaluates (`item_ids`, in row order), in time order. A user's interactions are ordered by
    `time_col` (None: a column "timestamp" where the log has one, else file order; ties keep file order).
    Items the catalogue does not hold are skipped and counted: a log usually spans more items than one
    catalogue. A log of which no item is in the catalogue is an error: its ids are written another way.
    """
    p = input_files(path, suffixes=(".parquet", ".csv"), what="interactions")  # a file, or a log's parts
    where = {f: str(f) if p.sharded else str(p) for f in p.files}
    if time_col is None:  # the first file decides whether the log is timed
        time_col = "timestamp" if "timestamp" in _log_columns(p.files[0], where[p.files[0]]) else None
    # one part at a time: parts may differ in column order, extra columns and integer widths
    parts = [_interaction_part(f, user_col, item_col, time_col, where[f]) for f in p.files]
    catalogue = pl.LazyFrame({"item": pl.Series(list(map(str, item_ids)), dtype=pl.String),
                              "row": pl.int_range(len(item_ids), eager=True)})
    log = pl.concat(parts, how="vertical_relaxed").with_columns(order=pl.int_range(pl.len()))
    try:
        frame = log.join(catalogue, on="item", how="left").collect()
    except (pl.exceptions.PolarsError, OSError) as e:
        raise InputError(f"cannot read the interactions {p}: {e}") from e
    frame = frame.sort("order")
    for role, col, name in (("a user", "user", user_col), ("a time", "time", time_col)):
        if frame[col].null_count():
            first = int(np.argmax(frame[col].is_null().to_numpy()))
            raise InputError(f"the interactions {p} have {frame[col].null_count()} rows without {role} "
                             f"(column '{name}', first at row {first})")
    held = frame.filter(pl.col("row").is_not_null())
    if frame.height and not held.height:
        example = str(next(iter(item_ids), ""))
        raise InputError(f"none of the {frame.height:,} interactions in {p} names an item of the catalogue: the "
                         f"log writes ids as {frame['item'][0]!r}, the catalogue as {example!r} (CLI: --id-col)")
    held = held.sort("user", "time", "order")
    users = held.group_by("user", maintain_order=True).agg(pl.col("row"))
    return InteractionSequences(
        sequences=[np.asarray(rows, dtype=np.int64) for rows in users["row"].to_list()],
        interactions=frame.height,
        skipped=frame.height - held.height,
    )


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
                write_parquet_atomic(pl.scan_parquet(self._parts), self.path)
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._claim.__exit__(None, None, None)  # releases the directory's lock


def read_rows(path: str | os.PathLike | InputFiles, rows: np.ndarray, *, emb_col: str = "embedding") -> np.ndarray:
    """Embeddings of the given row numbers of an input (rows of its parts in order, counted as one table), in
    the order given: the few items a later pass needs again, such as collision remapping after a streamed encode."""
    source = _source(path)
    rows = np.asarray(rows, dtype=np.int64)  # (m,)
    if source.is_npy:
        p = source.files[0]
        return validate_embeddings(np.array(_open_npy(p, None)[rows]), name=f"embeddings in {p}")
    parts = _scanned_parts(source, None, emb_col)
    starts = np.cumsum([0] + [part.rows for part in parts])  # (parts + 1,)
    if rows.size and (rows.min() < 0 or rows.max() >= starts[-1]):
        raise IndexError(f"rows {rows.min()}..{rows.max()} asked of {source}, which has rows 0..{starts[-1] - 1}")
    owner = np.searchsorted(starts, rows, side="right") - 1  # (m,) the part of each row
    order = np.argsort(owner, kind="stable")  # (m,) the rows grouped by part
    bounds = np.searchsorted(owner[order], np.arange(len(parts) + 1))  # (parts + 1,)
    out = None
    for i in np.flatnonzero(np.diff(bounds)):
        chosen = order[bounds[i] : bounds[i + 1]]  # (k,) positions in `rows` of this part's rows
        embeddings = _part_rows(parts[i], rows[chosen] - starts[i], emb_col)  # (k, d)
        out = np.empty((len(rows), embeddings.shape[1]), dtype=np.float32) if out is None else out  # (m, d)
        out[chosen] = embeddings
    return out if out is not None else np.empty((0, 0), dtype=np.float32)


def _part_rows(part: _Part, rows: np.ndarray, emb_col: str) -> np.ndarray:
    """Rows of one parquet file, in the order given."""
    wanted = pl.Series("__row", np.unique(rows), dtype=pl.UInt32)
    df = _collect(part.scan.with_row_index("__row").filter(pl.col("__row").is_in(wanted.implode())), part.path)
    lookup = dict(zip(df["__row"].to_list(), range(len(df))))
    table = _polars_to_table(df.select(emb_col), None, emb_col, str(part.path))
    return table.embeddings[[lookup[r] for r in rows.tolist()]]
