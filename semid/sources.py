"""Item sources on disk: which files an input path names, read as one validated table.

A path is one `.npy` or parquet file, or the parts of a large table as a warehouse exports it (a directory, or
a glob pattern, of parquet files). Readers here stream them in bounded memory, name a bad row by its file and
its row there, and hand out `semid.io.ItemTable`s; interaction logs (parquet or csv, in parts too) become
users' sequences of catalogue rows. Validation itself is `semid.io`'s, as for frames and arrays in memory.
"""
from __future__ import annotations

import fnmatch
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import polars as pl

from semid.io import (
    InputError,
    ItemTable,
    check_columns,
    check_form,
    check_unique_ids,
    first_repeat,
    polars_to_table,
    validate_embeddings,
)
from semid.modeldir import is_model_dir
from semid.parquet_footer import row_group_rows

SUFFIXES = (".npy", ".parquet")
LOG_SUFFIXES = (".parquet", ".csv")  # interaction logs
_READ_BATCH = 65536  # rows converted at a time when a whole input is read into memory

# Large tables leave Spark, Hive, Dask or BigQuery as a directory of part files. Names starting with "." or "_"
# beside the parts are not data: _SUCCESS, _committed_*, a _temporary/ folder, .crc checksums, semid's own temps.
_NOT_DATA_PREFIXES = (".", "_")
_GLOB_CHARACTERS = frozenset("*?[")
_SKIPPED = "names that begin with '.' or '_', and semid model directories, are skipped"


@dataclass(frozen=True)
class _Footer:
    """A parquet file's schema, rows and rows per row group (None where its footer could not be read for them)."""

    path: Path
    schema: pl.Schema
    rows: int
    groups: list[int] | None


@dataclass(frozen=True)
class InputFiles:
    """The files one input path names, read as one table in this order.

    A path is one file (`.npy`, `.parquet`, `.csv` where allowed), or a directory or glob pattern of table files
    (`catalogue/`, `'exports/part-*.parquet'`, `'exports/date=2024-*'`): the parts a data warehouse writes, read
    in natural path order (`part.2` before `part.10`), each part named in the messages about its own rows. A
    `.npy` is always one file.
    """

    given: str  # the path as the user wrote it
    files: tuple[Path, ...]  # in reading order; every one has `suffix`
    suffix: str  # ".npy", ".parquet" or ".csv"
    # For parts: the real path of the folder searched, and of every linked folder followed below it, each with
    # its components below that folder as the walk reached it (empty for one file).
    folders: tuple[tuple[Path, tuple[str, ...]], ...] = ()
    pattern: tuple[str, ...] = ()  # the components below the folder searched that a part, or a folder of it, matches

    def __str__(self) -> str:
        if not self.in_parts:
            return self.given
        count = len(self.files)
        return f"{self.given} ({count} {self.suffix.lstrip('.')} file{'s' if count > 1 else ''})"

    @property
    def in_parts(self) -> bool:
        return bool(self.folders)

    @property
    def is_npy(self) -> bool:
        return self.suffix == ".npy"

    @functools.cached_property
    def footers(self) -> tuple[_Footer, ...]:
        """What each parquet file's footer says: read once for every pass over the input."""
        found = []
        for p in self.files:
            try:
                scan = pl.scan_parquet(p, glob=False)
                schema, rows = scan.collect_schema(), int(scan.select(pl.len()).collect().item())
            except (pl.exceptions.PolarsError, OSError) as e:
                raise InputError(f"cannot read {p} as parquet: {e}") from e
            groups = row_group_rows(p)
            found.append(_Footer(p, schema, rows, groups if groups is not None and sum(groups) == rows else None))
        return tuple(found)

    def would_read(self, target: str | os.PathLike) -> bool:
        """Whether a file written at `target` is, or would become, part of this input: an output written into the
        input's directory, or matching its pattern, would be read as a part by the next run. Paths are compared
        as real paths, so a link to the folder, or a folder the walk reached through a link, is the folder."""
        real = Path(os.path.realpath(target))
        if any(real == Path(os.path.realpath(f)) for f in self.files):
            return True
        if real.suffix.lower() != self.suffix:
            return False
        return any(_takes(self.pattern, (*below, *real.relative_to(folder).parts))
                   for folder, below in self.folders if folder in real.parents)


def _matches(pattern: Sequence[str], parts: Sequence[str]) -> bool:
    """Glob matching by path components: `**` spans any number of folders, other wildcards stay in one name."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_matches(rest, parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], head) and _matches(rest, parts[1:])


def _takes(pattern: Sequence[str], parts: Sequence[str]) -> bool:
    """Whether a file (its components below the folder searched) is data the pattern names: the pattern matches
    the file or a folder it lies in (Spark writes a table as a folder, `items.parquet/`), and no component
    begins with "." or "_"."""
    return (not any(part.startswith(_NOT_DATA_PREFIXES) for part in parts)
            and any(_matches(pattern, parts[:i]) for i in range(1, len(parts) + 1)))


def _may_hold(pattern: Sequence[str], parts: Sequence[str]) -> bool:
    """Whether a folder (its components below the folder searched) can hold files the pattern takes: any folder
    under `**`, a folder on the way to the pattern's last component, or one inside a folder the pattern names."""
    return "**" in pattern or all(fnmatch.fnmatchcase(part, name) for part, name in zip(parts, pattern))


def _walk(root: Path, pattern: Sequence[str]) -> tuple[list[Path], list[tuple[Path, tuple[str, ...]]]]:
    """The files below `root` that `pattern` takes, and the folders searched (`InputFiles.folders`).

    Folder links are followed, but never into a folder of their own branch (a loop ends). Names that begin with
    "." or "_" and semid model directories (whose registry is parquet too) are skipped. A file reached by two
    routes (a partition and a link to it) is kept once, by its route without links where it has one.
    """
    found, folders = [], [(Path(os.path.realpath(root)), ())]
    branch = {os.fspath(root): frozenset()}  # folder -> the real paths of the folders above it on its branch
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real, above = os.path.realpath(folder), branch.pop(folder)
        below = Path(folder).relative_to(root).parts
        if real in above or is_model_dir(Path(folder)):
            subfolders[:] = []
            continue
        if os.path.islink(folder):
            folders.append((Path(real), below))
        subfolders[:] = [name for name in subfolders
                         if not name.startswith(_NOT_DATA_PREFIXES) and _may_hold(pattern, (*below, name))]
        branch.update((os.path.join(folder, name), above | {real}) for name in subfolders)
        found += [Path(folder, name) for name in names if _takes(pattern, (*below, name))]
    target = {f: os.path.realpath(f) for f in found}
    by_target: dict[str, Path] = {}
    for f in sorted(found, key=lambda f: (target[f] != os.path.abspath(f), _natural_order(f, root))):
        by_target.setdefault(target[f], f)  # the first of each: without links, else first in order
    return list(by_target.values()), folders


def _natural_order(path: Path, root: Path) -> tuple:
    """Sort key: numbers in names compare as numbers (Dask's part.2 before part.10), then the path as written.

    Splitting a name on its digit runs alternates text and digits (text first, maybe empty), so each position
    holds the same kind in every name.
    """
    relative = path.relative_to(root)
    names = tuple(tuple(int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", part)))
                  for part in relative.parts)
    return names, str(relative)


def input_files(path: str | os.PathLike | InputFiles, *, suffixes: Sequence[str] = SUFFIXES,
                what: str = "input") -> InputFiles:
    """Resolve an input path (a file, a directory of parts, or a glob pattern) or raise InputError naming why not.

    `what` names the input in messages ("input", "interactions"). Directories are searched recursively (Hive
    partitions are folders), and so are the folders a pattern names; see `_walk` for what is skipped. An
    `InputFiles` is returned as it is: a caller that reads one input several times resolves it once and passes
    that on, so every pass sees the same parts and reads their footers once.
    """
    if isinstance(path, InputFiles):
        return path
    given = os.fspath(path)
    p = Path(given)
    tables = [s for s in suffixes if s != ".npy"]  # the formats whose parts form one table
    if p.is_dir():
        root, pattern = p, ("**",)
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
    found, folders = _walk(root, pattern)
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
    return InputFiles(given, tuple(files), kinds[0], tuple(folders), tuple(pattern))


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
    check_form(mm, expected_dim, f"embeddings in {p}")  # the header's dtype and shape: no row is read
    return mm


@dataclass(frozen=True)
class _Part:
    """One parquet file of an input: what its footer says, and a lazy scan of the columns needed."""

    footer: _Footer
    scan: pl.LazyFrame


def _scanned_parts(source: InputFiles, id_col: str | None, emb_col: str) -> list[_Part]:
    """Every parquet file of `source`, checked for the columns before any row is read."""
    parts = []
    for footer in source.footers:
        check_columns(footer.schema.names(), id_col, emb_col, str(footer.path))
        scan = pl.scan_parquet(footer.path, glob=False).select([c for c in (id_col, emb_col) if c is not None])
        parts.append(_Part(footer, scan))
    return parts


def _check_not_empty(source: InputFiles, parts: list[_Part]) -> None:
    if not any(part.footer.rows for part in parts):
        raise InputError(f"embeddings in {source} are empty: {'its files have' if source.in_parts else 'the file has'} "
                         "no rows")


def parquet_column_type(path: str | os.PathLike | InputFiles, column: str) -> pl.DataType:
    """The type an id column of `path` goes back out as: its own integer type, else a string.

    Ids are keyed as strings inside semid; an output that turned integer ids into strings would no longer
    join to the table it came from. Parts of one table may differ in width (Int32 here, Int64 there): integers
    stay integers, of a type that holds them all. Parts without rows carry no type (polars writes them as Null).
    """
    types = {f.schema[column] for f in input_files(path).footers if f.rows and f.schema[column] != pl.Null}
    if not types or not all(t.is_integer() for t in types):
        return pl.String
    if len(types) == 1:
        return types.pop()
    if all(t.is_unsigned_integer() for t in types):
        return pl.UInt64
    return pl.String if pl.UInt64 in types else pl.Int64  # a UInt64 beyond Int64 has no signed type to go in


def check_unique_ids_of(source: InputFiles, ids: pl.Series, name: str) -> None:
    """`check_unique_ids` over a whole input, whose slices were each checked alone: this finds repeats across
    slices and parts, and names the files and rows where the first repeated id is."""
    try:
        check_unique_ids(ids, name=name)
    except InputError as e:
        rows = np.flatnonzero((ids == first_repeat(ids)).to_numpy())  # (k,) rows of the whole table
        starts = np.cumsum([0] + [footer.rows for footer in source.footers])  # (parts + 1,)
        owner = np.searchsorted(starts, rows, side="right") - 1  # (k,)
        where = ", ".join(f"{source.footers[i].path} row {r - starts[i]}"
                          for i, r in zip(owner.tolist(), rows.tolist()))
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
    source = input_files(path)
    if source.is_npy:
        p = source.files[0]
        mm = _open_npy(p, None)
        matrix = validate_embeddings(mm, name=f"embeddings in {p}")  # one cast: no float64 copy of a float64 file
        return ItemTable(None, matrix.copy() if np.may_share_memory(matrix, mm) else matrix)  # in memory, not mapped
    parts = _scanned_parts(source, id_col, emb_col)
    _check_not_empty(source, parts)
    # Batch by batch into one matrix: memory holds the matrix, one read and one batch, not a second copy of all.
    matrix, ids, filled = None, [], 0
    for batch in _parquet_batches(parts, _READ_BATCH, id_col, emb_col, None):
        if matrix is None:
            matrix = np.empty((sum(part.footer.rows for part in parts), batch.dim), dtype=np.float32)  # (n, d)
        matrix[filled : filled + len(batch)] = batch.embeddings
        filled += len(batch)
        if batch.ids is not None:
            ids.append(batch.ids)
    items = ItemTable(np.concatenate(ids) if ids else None, matrix)
    if items.ids is not None:  # each slice was checked alone: this finds repeats across slices and parts
        check_unique_ids_of(source, pl.Series(items.ids), f"column '{id_col}' in {source}")
    return items


def count_items(path: str | os.PathLike | InputFiles, *, id_col: str | None = "item_id",
                emb_col: str = "embedding") -> int:
    """Number of items in an input, from metadata only (the .npy header or the parquet footers)."""
    source = input_files(path)
    if source.is_npy:
        return len(_open_npy(source.files[0], None))
    return sum(part.footer.rows for part in _scanned_parts(source, id_col, emb_col))


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
    are raised here, before the first batch. Ids are checked for duplicates within each part's slice only;
    uniqueness across slices is a global property the caller checks (`check_unique_ids_of`).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"batch size must be a positive integer, got {batch_size!r}")
    source = input_files(path)
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


def _windows(footer: _Footer, batch_size: int) -> Iterator[tuple[int, int]]:
    """(start, rows) reads that cover a part, each decoding whole row groups once: groups are joined up to a
    batch, and a group larger than a batch is read whole (polars decodes a group whole for any slice of it).
    Without the groups, batch-sized slices."""
    if footer.groups is None:
        yield from ((start, min(batch_size, footer.rows - start)) for start in range(0, footer.rows, batch_size))
        return
    start = length = 0
    for rows in footer.groups:
        if length and length + rows > batch_size:
            yield start, length
            start, length = start + length, 0
        length += rows
    if length:
        yield start, length


def _parquet_batches(
    parts: list[_Part], batch_size: int, id_col: str | None, emb_col: str, expected_dim: int | None
) -> Iterator[ItemTable]:
    """Full batches across part boundaries, so that a warehouse's many small parts still make the large batches
    a GPU encodes fastest. Each read is cut into slices that are validated on their own (a message names the
    part and its row), so memory holds one read, as decoded, and one batch."""
    pending: list[ItemTable] = []
    held = 0
    dim_from: Path | None = None  # the part whose rows set the dimension, where no model set it
    for part in parts:
        for start, rows in _windows(part.footer, batch_size):
            frame = _collect(part.scan.slice(start, rows), part.footer.path)  # polars slices take lengths below 2^32
            offset = 0
            while offset < rows:
                take = min(batch_size - held, rows - offset)
                earlier_part = dim_from is not None and dim_from != part.footer.path
                table = polars_to_table(frame.slice(offset, take), id_col, emb_col, str(part.footer.path),
                                        row_offset=start + offset, expected_dim=None if earlier_part else expected_dim)
                if earlier_part and table.dim != expected_dim:
                    raise InputError(f"embeddings in {part.footer.path} have dimension {table.dim}, expected "
                                     f"{expected_dim} as in {dim_from}, read before it: every part needs the same")
                if expected_dim is None:
                    dim_from = part.footer.path
                expected_dim = table.dim  # later slices must match the first: a ragged input fails here
                pending.append(table)
                held += take
                offset += take
                if held == batch_size:
                    yield _joined(pending)
                    pending, held = [], 0
            del frame  # before the next read: one read's frame in memory at a time
    if pending:
        yield _joined(pending)


# --------------------------------------------------------------------------------------------------
# interaction logs


@dataclass
class InteractionSequences:
    """Users' histories as row numbers of an evaluated catalogue, in time order (`sequence_prefix_agreement`)."""

    sequences: list[np.ndarray]  # one (k,) int64 array of catalogue rows per user, users in sorted order
    interactions: int  # rows of the log
    skipped: int  # interactions with an item the catalogue does not hold


def _log_columns(f: Path, where: str) -> list[str]:
    scan = pl.scan_parquet if f.suffix.lower() == ".parquet" else pl.scan_csv
    try:
        return scan(f, glob=False).collect_schema().names()
    except (pl.exceptions.PolarsError, OSError) as e:
        raise InputError(f"cannot read the interactions {where}: {e}") from e


def _interaction_part(f: Path, index: int, user_col: str, item_col: str, time_col: str | None, where: str,
                      time_hint: str) -> pl.LazyFrame:
    """One file of an interaction log as (user, item, time) columns, item ids as text, with the file's `index`
    and each row's number in it, for messages."""
    names = _log_columns(f, where)
    for role, col in (("user", user_col), ("item", item_col)):
        if col not in names:
            raise InputError(f"the interactions {where} have no {role} column '{col}'; their columns are: "
                             f"{', '.join(names)} (CLI: --user-col, --id-col)")
    if time_col is not None and time_col not in names:
        raise InputError(f"the interactions {where} have no time column '{time_col}'; their columns are: "
                         f"{', '.join(names)} ({time_hint})")
    if f.suffix.lower() == ".parquet":
        scan = pl.scan_parquet(f, glob=False)
    else:  # ids as written: a column inferred as integers from its first rows fails on "a1"
        scan = pl.scan_csv(f, glob=False, schema_overrides={user_col: pl.String, item_col: pl.String})
    return scan.select(user=pl.col(user_col), item=pl.col(item_col).cast(pl.String),
                       time=pl.col(time_col) if time_col is not None else pl.lit(0),
                       part=pl.lit(index, dtype=pl.UInt32), part_row=pl.int_range(pl.len(), dtype=pl.UInt32))


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
    p = input_files(path, suffixes=LOG_SUFFIXES, what="interactions")  # a file, or a log's parts
    where = [str(f) if p.in_parts else str(p) for f in p.files]
    time_hint = "CLI: --time-col"
    if time_col is None:  # the first file decides whether the log is timed
        time_col = "timestamp" if "timestamp" in _log_columns(p.files[0], where[0]) else None
        time_hint = f"{where[0]}, the first part, has one, so every part must; CLI: --time-col"
    # one part at a time: parts may differ in column order, extra columns and integer widths
    parts = [_interaction_part(f, i, user_col, item_col, time_col, where[i], time_hint) for i, f in enumerate(p.files)]
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
            first = frame.filter(pl.col(col).is_null()).row(0, named=True)  # in file order
            in_part = f" of {where[first['part']]}" if p.in_parts else ""
            raise InputError(f"the interactions {p} have {frame[col].null_count()} rows without {role} "
                             f"(column '{name}', first at row {first['part_row']}{in_part})")
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


def read_rows(path: str | os.PathLike | InputFiles, rows: np.ndarray, *, emb_col: str = "embedding") -> np.ndarray:
    """Embeddings of the given row numbers of an input (rows of its parts in order, counted as one table), in
    the order given: the few items a later pass needs again, such as collision remapping after a streamed encode."""
    source = input_files(path)
    rows = np.asarray(rows, dtype=np.int64)  # (m,)
    if source.is_npy:
        p = source.files[0]
        return validate_embeddings(np.array(_open_npy(p, None)[rows]), name=f"embeddings in {p}")
    parts = _scanned_parts(source, None, emb_col)
    starts = np.cumsum([0] + [part.footer.rows for part in parts])  # (parts + 1,)
    if rows.size and (rows.min() < 0 or rows.max() >= starts[-1]):
        held = f"rows 0..{starts[-1] - 1}" if starts[-1] else "no rows"
        raise IndexError(f"rows {rows.min()}..{rows.max()} asked of {source}, which has {held}")
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
    chosen = part.scan.with_row_index("__row").filter(pl.col("__row").is_in(wanted.implode()))
    df = _collect(chosen, part.footer.path)
    lookup = dict(zip(df["__row"].to_list(), range(len(df))))
    table = polars_to_table(df.select(emb_col), None, emb_col, str(part.footer.path))
    return table.embeddings[[lookup[r] for r in rows.tolist()]]
