"""Tests for semid.io and semid.sources: validation messages, readers, streaming, inputs in parts, atomic
writers, the bundled sample."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest
import torch

from semid import sources
from semid.atomic import atomic_write, claimed_temp
from semid.io import (
    InputError,
    ItemTable,
    ParquetShardWriter,
    check_trainable_scale,
    check_unique_ids,
    to_numpy_embeddings,
    validate_embeddings,
    validate_ids,
    write_json_atomic,
    write_npy_atomic,
    write_parquet_atomic,
)
from semid.sources import (
    count_items,
    input_files,
    iter_item_batches,
    read_interaction_sequences,
    parquet_column_type,
    read_items,
    read_rows,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _matrix(n: int = 103, d: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _frame(x: np.ndarray, ids: list | None = None) -> pl.DataFrame:
    ids = [f"item{i}" for i in range(len(x))] if ids is None else ids
    return pl.DataFrame({"item_id": ids, "embedding": pl.Series(x).cast(pl.List(pl.Float32))})


def _write_rows(path: Path, rows: list, ids: list | None = None) -> Path:
    """Parquet whose embedding column is built from Python lists (allows ragged and null rows)."""
    ids = [str(i) for i in range(len(rows))] if ids is None else ids
    pl.DataFrame({"item_id": ids, "embedding": pl.Series(rows, dtype=pl.List(pl.Float64))}).write_parquet(path)
    return path


def _dir_entries(path: Path) -> list[str]:
    return sorted(os.listdir(path))


# ----------------------------------------------------------------------------------- validate_embeddings


def test_validate_embeddings_returns_same_values_as_contiguous_float32():
    x = np.asfortranarray(np.random.default_rng(1).standard_normal((20, 5)))  # float64, F-order
    out = validate_embeddings(x)
    assert out.dtype == np.float32 and out.flags.c_contiguous and out.shape == (20, 5)
    np.testing.assert_array_equal(out, x.astype(np.float32))
    ints = validate_embeddings(np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(ints, [[0, 1, 2], [3, 4, 5]])


def test_nan_rows_are_counted_and_first_row_named():
    x = _matrix(10, 4)
    x[3, 1] = np.nan
    x[7, 0] = np.nan
    x[7, 2] = np.nan  # two NaNs in one row still count as one row
    with pytest.raises(InputError, match=r"2 rows with NaN.*first bad row: 3"):
        validate_embeddings(x)


def test_inf_and_nan_reported_separately():
    x = _matrix(10, 4)
    x[5, 0] = -np.inf
    x[6, 0] = np.inf
    x[8, 3] = np.nan
    with pytest.raises(InputError) as e:
        validate_embeddings(x)
    msg = str(e.value)
    assert "1 rows with NaN" in msg and "2 rows with inf" in msg and "first bad row: 5" in msg


def test_a_float64_value_beyond_float32_is_named_as_large_not_as_inf(tmp_path):
    """1e300 is finite in the user's file: a message about inf would send them looking for one."""
    x = np.ones((3, 2))
    x[1, 1] = 1e300  # finite in float64, inf in float32
    with pytest.raises(InputError, match=r"beyond ±1e\+15 \(1 rows, first bad row: 1\)"):
        validate_embeddings(x)
    x[2, 0] = np.inf
    with pytest.raises(InputError, match=r"non-finite values: 1 rows with inf \(first bad row: 2\)"):
        validate_embeddings(x)


def test_a_truncated_npy_and_a_frame_of_many_columns_get_short_clear_errors(tmp_path):
    np.save(tmp_path / "whole.npy", _matrix(100, 8))
    data = (tmp_path / "whole.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[: len(data) // 2])  # an interrupted copy
    with pytest.raises(InputError, match=r"cut\.npy as \.npy: the file is shorter than its header says"):
        read_items(tmp_path / "cut.npy")
    wide = pl.DataFrame({f"dim_{j}": _matrix(5, 384)[:, j] for j in range(384)})  # a column per dimension
    with pytest.raises(InputError) as info:
        to_numpy_embeddings(wide)
    assert "dim_19 and 364 more (" in str(info.value) and "dim_20" not in str(info.value)


def test_a_bad_npy_file_is_counted_over_all_its_rows(tmp_path):
    """The header is checked when a .npy is opened, the values when they are read: every bad row is counted,
    not only the first row's."""
    x = _matrix(300, 8).astype(np.float64)
    x[:, 5] = np.nan
    x[100:, 2] = np.inf
    np.save(tmp_path / "bad.npy", x)
    with pytest.raises(InputError, match=r"300 rows with NaN, 200 rows with inf \(first bad row: 0\)"):
        read_items(tmp_path / "bad.npy")
    np.save(tmp_path / "large.npy", _matrix(300, 8) * 1e16)
    with pytest.raises(InputError, match=r"beyond ±1e\+15 \(300 rows, first bad row: 0\)"):
        read_items(tmp_path / "large.npy")


def test_a_float64_npy_is_read_without_a_float64_copy(tmp_path):
    x = _matrix(50, 4).astype(np.float64)
    np.save(tmp_path / "f64.npy", x)
    np.save(tmp_path / "f32.npy", x.astype(np.float32))
    for name in ("f64.npy", "f32.npy"):
        table = read_items(tmp_path / name)
        assert table.embeddings.dtype == np.float32 and not isinstance(table.embeddings, np.memmap)
        assert table.embeddings.base is None or not isinstance(table.embeddings.base, np.memmap)
        np.testing.assert_array_equal(table.embeddings, x.astype(np.float32))


def test_embeddings_too_small_for_float32_are_refused_before_training():
    """Too small to train on is judged on the whole catalogue (fit); values that float32 turns to zeros are
    refused wherever they are read."""
    tiny = _matrix(20, 4).astype(np.float64) * 1e-39  # subnormal in float32
    with pytest.raises(InputError, match="all below 1e-30 in magnitude"):
        check_trainable_scale(validate_embeddings(tiny))
    with pytest.raises(InputError, match=r"all zero in float32.*although not in the input \(largest"):
        validate_embeddings(_matrix(20, 4).astype(np.float64) * 1e-50)
    mixed = np.concatenate([tiny[:2], _matrix(10, 4)])  # a streamed batch of small rows encodes as the rest does
    validate_embeddings(mixed[:2])
    check_trainable_scale(validate_embeddings(mixed))
    check_trainable_scale(validate_embeddings(_matrix(20, 4) * 1e-20))  # small but well inside float32: fine
    check_trainable_scale(validate_embeddings(np.zeros((3, 4))))  # all zeros: nothing too small to learn


def test_a_missing_value_inside_list_rows_is_named_with_its_row():
    rows = pd.DataFrame({"item_id": ["a", "b", "c"], "embedding": [[1.0, 2.0], [3.0, None], [5.0, 6.0]]})
    with pytest.raises(InputError, match="row 1 holds a missing value at position 1"):
        to_numpy_embeddings(rows)
    with pytest.raises(InputError, match=r"'item_id' is the index of the pandas DataFrame.*df\.reset_index\(\)"):
        to_numpy_embeddings(rows.set_index("item_id"))
    with pytest.raises(InputError, match="row 2 holds str '7' at position 0"):
        validate_embeddings(np.array([[1.0, 2.0], [3.0, 4.0], ["7", 8.0]], dtype=object))
    text = pd.DataFrame({"item_id": ["a", "b", "c"], "embedding": [[1.0, 2.0], [3.0, 4.0], ["7", 8.0]]})
    with pytest.raises(InputError, match="row 2 holds str '7' at position 0"):  # not the row-0 text numpy makes
        to_numpy_embeddings(text)
    with pytest.raises(InputError, match="row 1 holds a missing value at position 1"):
        to_numpy_embeddings([[1.0, 2.0], [3.0, None]])
    numbers_as_objects = np.array([[1.0, 2], [np.float32(3.5), np.int64(4)]], dtype=object)
    np.testing.assert_array_equal(validate_embeddings(numbers_as_objects), [[1.0, 2.0], [3.5, 4.0]])
    from decimal import Decimal

    with pytest.raises(InputError, match=r"row 1 holds Decimal Decimal\('4'\) at position 1"):
        validate_embeddings(np.array([[1.0, 2.0], [3.0, Decimal(4)]], dtype=object))


def test_values_whose_squares_overflow_float32_are_refused_with_their_rows():
    """3e38 is finite, but its square (a distance term) is not: refused before any training, with rows named."""
    x = np.full((4, 3), 1e15, dtype=np.float32)
    x[1] = -1e15
    np.testing.assert_array_equal(validate_embeddings(x), x)  # up to the limit: accepted
    x[2, 0], x[3, 1] = 3e38, -2e15
    with pytest.raises(InputError, match=r"values beyond ±1e\+15 \(2 rows, first bad row: 12\).*rescale"):
        validate_embeddings(x, row_offset=10)


@pytest.mark.parametrize(
    ("x", "pattern"),
    [
        (np.zeros((0, 4), np.float32), "empty"),
        (np.zeros((4, 0), np.float32), "empty"),
        (np.zeros(4, np.float32), "2-D"),
        (np.zeros((2, 3, 4), np.float32), "2-D"),
        (np.array([["a", "b"]]), "real numbers"),
        (np.zeros((2, 2), np.complex64), "real numbers"),
        (np.zeros((2, 2), bool), "real numbers"),
    ],
)
def test_bad_shapes_and_dtypes(x, pattern):
    with pytest.raises(InputError, match=pattern):
        validate_embeddings(x)


def test_wrong_dimension_names_expected_and_got():
    with pytest.raises(InputError, match="dimension 5, expected 4"):
        validate_embeddings(_matrix(3, 5), expected_dim=4)
    assert validate_embeddings(_matrix(3, 4), expected_dim=4).shape == (3, 4)


def test_input_error_is_a_value_error():
    assert issubclass(InputError, ValueError)


# ---------------------------------------------------------------------------------------- validate_ids


def test_duplicate_ids_give_count_and_at_most_three_examples():
    ids = ["w", "x", "y", "z", "w", "x", "y", "z", "z", "solo"]
    with pytest.raises(InputError) as e:
        validate_ids(ids)
    msg = str(e.value)
    assert "4 ids occur more than once" in msg
    assert sum(f"'{v}'" in msg for v in "wxyz") == 3 and "solo" not in msg


def test_check_unique_ids_on_a_polars_column_words_repeats_like_validate_ids():
    ids = np.array(["d", "a", "b", "a", "c", "b", "e", "d", "c", "a"])
    with pytest.raises(InputError) as from_numpy:
        validate_ids(ids)
    with pytest.raises(InputError) as from_polars:
        check_unique_ids(pl.Series("item_id", ids))
    assert str(from_polars.value) == str(from_numpy.value)
    assert "4 ids occur more than once, e.g. 'a' (3x), 'b' (2x), 'c' (2x)" in str(from_polars.value)
    for distinct in (["x", "y"], ["x"], []):  # no error
        check_unique_ids(pl.Series("item_id", distinct, dtype=pl.String))


@pytest.mark.parametrize(
    "ids",
    [
        ["a", None, "c"],
        np.array(["a", np.nan, "c"], dtype=object),
        pl.Series(["a", None, "c"]),
        pd.Series(["a", None, "c"]).to_numpy(),
    ],
)
def test_null_ids_are_refused(ids):
    with pytest.raises(InputError, match=r"1 missing \(null\) ids, the first at row 1"):
        validate_ids(ids)


@pytest.mark.parametrize("ids", ["abc", {"a", "b"}, (i for i in range(3))])
def test_ids_that_are_not_one_per_row_are_named_by_type(ids):
    with pytest.raises(InputError, match=f"a list or array with one id per row, got {type(ids).__name__}"):
        validate_ids(ids)


def test_a_column_of_row_arrays_gets_a_hint_to_stack_it():
    column = pd.Series([np.zeros(3), np.ones(3)]).to_numpy()  # what df["embedding"].to_numpy() gives
    with pytest.raises(InputError, match=r"got dtype object \(an array of per-row arrays.*np.stack"):
        validate_embeddings(column)


def test_ids_become_strings_and_floats_are_refused():
    out = validate_ids(np.array([3, 1, 2]))
    assert out.dtype.kind == "U" and out.tolist() == ["3", "1", "2"]  # order kept
    assert validate_ids(pl.Series([10, 20])).tolist() == ["10", "20"]
    with pytest.raises(InputError, match="strings or integers"):
        validate_ids(np.array([1.0, 2.0]))
    with pytest.raises(InputError, match="one-dimensional"):
        validate_ids(np.array([["a", "b"]]))


def test_item_table_checks_lengths():
    with pytest.raises(InputError, match="2 item ids for 3 embeddings"):
        ItemTable(np.array(["a", "b"]), _matrix(3, 2))


# ------------------------------------------------------------------------------------------- read files


def test_parquet_round_trip(tmp_path):
    x = _matrix()
    path = tmp_path / "sub" / "items.parquet"
    write_parquet_atomic(_frame(x), path)
    table = read_items(path)
    np.testing.assert_array_equal(table.embeddings, x)
    assert table.ids.tolist() == [f"item{i}" for i in range(len(x))]
    assert count_items(path) == len(x)
    assert read_items(path, id_col=None).ids is None


def test_parquet_column_variants(tmp_path):
    """Array and float64 list columns, integer ids, custom column names."""
    x = _matrix(12, 3)
    df = pl.DataFrame({"book": list(range(12)), "vec": pl.Series(x.astype(np.float64))})  # Array(f64, 3)
    path = tmp_path / "v.parquet"
    df.write_parquet(path)
    table = read_items(path, id_col="book", emb_col="vec")
    np.testing.assert_array_equal(table.embeddings, x)
    assert table.ids.tolist() == [str(i) for i in range(12)]


def test_npy_round_trip(tmp_path):
    x = _matrix()
    path = tmp_path / "x.npy"
    write_npy_atomic(x, path)
    assert _dir_entries(tmp_path) == ["x.npy"]  # np.save did not append a second suffix to the temp name
    table = read_items(path)
    assert table.ids is None and not isinstance(table.embeddings, np.memmap)
    np.testing.assert_array_equal(table.embeddings, x)
    assert count_items(path) == len(x)


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_items(tmp_path / "nope.npy")
    csv = tmp_path / "items.csv"
    csv.write_text("a,b\n")
    for fn in (read_items, count_items, lambda p: iter_item_batches(p, 10)):
        with pytest.raises(InputError, match=r"unsupported file type '\.csv'"):
            fn(csv)


def test_missing_column_lists_existing_columns(tmp_path):
    path = tmp_path / "items.parquet"
    pl.DataFrame({"id": ["a"], "vector": [[1.0, 2.0]], "title": ["t"]}).write_parquet(path)
    with pytest.raises(InputError, match=r"no column 'item_id'.*id, vector, title"):
        read_items(path)
    with pytest.raises(InputError, match=r"no column 'embedding'.*id, vector, title"):
        read_items(path, id_col="id")
    with pytest.raises(InputError, match="no column 'embedding'"):
        iter_item_batches(path, 4, id_col="id")  # raised at the call, before the first batch
    assert read_items(path, id_col="id", emb_col="vector").embeddings.shape == (1, 2)


def test_ragged_parquet(tmp_path):
    path = _write_rows(tmp_path / "r.parquet", [[1.0, 2.0], [1.0, 2.0], [1.0, 2.0, 3.0]])
    with pytest.raises(InputError, match=r"ragged.*row 0 has 2 values, row 2 has 3"):
        read_items(path)


def test_ragged_across_streamed_batches(tmp_path):
    path = _write_rows(tmp_path / "r.parquet", [[1.0, 2.0]] * 5 + [[1.0, 2.0, 3.0]] * 5)
    batches = iter_item_batches(path, 5)
    assert next(batches).dim == 2
    with pytest.raises(InputError, match="dimension 3, expected 2"):
        next(batches)


def test_null_embeddings_in_parquet(tmp_path):
    path = _write_rows(tmp_path / "n.parquet", [[1.0, 2.0], None, [1.0, 2.0], None])
    with pytest.raises(InputError, match=r"2 null embeddings \(first at row 1\)"):
        read_items(path)
    path = _write_rows(tmp_path / "m.parquet", [[1.0, 2.0], [1.0, 2.0], [3.0, None]])
    with pytest.raises(InputError, match=r"null values inside embeddings \(first at row 2\)"):
        read_items(path)


def test_empty_parquet_embeddings(tmp_path):
    with pytest.raises(InputError, match="empty"):
        read_items(_write_rows(tmp_path / "e.parquet", [[], []]))
    no_rows = _write_rows(tmp_path / "z.parquet", [])
    for fn in (read_items, lambda p: iter_item_batches(p, 4)):
        with pytest.raises(InputError, match="empty"):
            fn(no_rows)
    with pytest.raises(InputError, match="empty"):
        to_numpy_embeddings(pd.DataFrame({"item_id": [], "embedding": []}))


def test_a_zero_byte_npy_is_named_as_empty(tmp_path):
    path = tmp_path / "e.npy"
    path.touch()  # an interrupted download or copy; numpy's own error names neither file nor problem
    for fn in (read_items, count_items, lambda p: iter_item_batches(p, 4)):
        with pytest.raises(InputError, match=r"cannot read .*e\.npy as \.npy: the file is empty"):
            fn(path)


def test_an_npy_of_no_columns_is_named_with_its_shape(tmp_path):
    np.save(tmp_path / "z.npy", np.zeros((10, 0), dtype=np.float32))
    for fn in (count_items, lambda p: iter_item_batches(p, 4)):
        with pytest.raises(InputError, match=r"z\.npy are empty: shape \(10, 0\)"):
            fn(tmp_path / "z.npy")


def test_non_numeric_embedding_column(tmp_path):
    path = tmp_path / "s.parquet"
    pl.DataFrame({"item_id": ["a"], "embedding": ["0.1 0.2"]}).write_parquet(path)
    with pytest.raises(InputError, match="must hold lists of numbers, got String"):
        read_items(path)


def test_duplicate_and_null_ids_in_parquet(tmp_path):
    path = _write_rows(tmp_path / "d.parquet", [[1.0], [2.0], [3.0]], ids=["a", "b", "a"])
    with pytest.raises(InputError, match=r"column 'item_id' in .* must be unique: 1 ids.*'a' \(2x\)"):
        read_items(path)
    path = _write_rows(tmp_path / "n.parquet", [[1.0], [2.0]], ids=["a", None])
    with pytest.raises(InputError, match="missing \\(null\\) ids"):
        read_items(path)


def test_corrupt_files(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(InputError, match="cannot read .* as parquet"):
        read_items(bad)
    bad_npy = tmp_path / "bad.npy"
    bad_npy.write_text("not npy")
    with pytest.raises(InputError, match="cannot read .* as .npy: it has no .npy header") as info:
        read_items(bad_npy)
    assert "allow_pickle" not in str(info.value)  # numpy's advice to unpickle an unknown file is not passed on


def test_npy_with_wrong_rank_fails_before_reading(tmp_path):
    np.save(tmp_path / "v.npy", np.zeros(5, np.float32))
    with pytest.raises(InputError, match="2-D"):
        count_items(tmp_path / "v.npy")


# --------------------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("batch_size", [1, 7, 16, 64, 103, 500, 2**40])  # 2**40: beyond a polars slice
@pytest.mark.parametrize("fmt", ["npy", "parquet"])
def test_streamed_batches_concatenate_to_full_read(tmp_path, fmt, batch_size):
    x = _matrix(103, 6, seed=batch_size)
    path = tmp_path / f"items.{fmt}"
    if fmt == "npy":
        np.save(path, x)
    else:  # row groups of 10 so that batches straddle row-group boundaries
        _frame(x).write_parquet(path, row_group_size=10)
    full = read_items(path)
    batches = list(iter_item_batches(path, batch_size))
    sizes = [len(b) for b in batches]
    assert sizes == [batch_size] * (103 // batch_size) + ([103 % batch_size] if 103 % batch_size else [])
    assert all(not isinstance(b.embeddings, np.memmap) for b in batches)
    np.testing.assert_array_equal(np.concatenate([b.embeddings for b in batches]), full.embeddings)
    np.testing.assert_array_equal(full.embeddings, x)
    if fmt == "npy":
        assert all(b.ids is None for b in batches)
    else:
        np.testing.assert_array_equal(np.concatenate([b.ids for b in batches]), full.ids)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the process's maps from Linux /proc")
def test_npy_batches_hold_no_map_of_the_file_between_batches(tmp_path):
    """A map held across the file keeps every page read so far in the resident set; one per batch does not."""
    path = tmp_path / "items.npy"
    np.save(path, _matrix(50, 4))
    batches = iter_item_batches(path, 20)
    assert str(path) not in Path("/proc/self/maps").read_text()
    first = next(batches)
    assert str(path) not in Path("/proc/self/maps").read_text()
    rest = list(batches)
    np.testing.assert_array_equal(np.concatenate([first.embeddings, *[b.embeddings for b in rest]]), _matrix(50, 4))


def test_npy_batches_of_a_fortran_order_file(tmp_path):
    x = _matrix(23, 5)
    path = tmp_path / "f.npy"
    np.save(path, np.asfortranarray(x))
    batches = list(iter_item_batches(path, 10))
    assert [len(b) for b in batches] == [10, 10, 3]
    assert all(b.embeddings.flags.c_contiguous for b in batches)
    np.testing.assert_array_equal(np.concatenate([b.embeddings for b in batches]), x)


@pytest.mark.parametrize("fmt", ["npy", "parquet"])
def test_streamed_errors_name_rows_of_the_file(tmp_path, fmt):
    x = _matrix(30, 4)
    x[13, 2] = np.nan
    path = tmp_path / f"items.{fmt}"
    np.save(path, x) if fmt == "npy" else _frame(x).write_parquet(path)
    batches = iter_item_batches(path, 5)
    for _ in range(2):  # rows 0..9 are clean
        next(batches)
    with pytest.raises(InputError, match=r"1 rows with NaN.*first bad row: 13"):
        next(batches)


def test_a_streamed_parquet_whose_later_rows_are_shorter_is_named_ragged_at_the_batch(tmp_path):
    path = tmp_path / "ragged.parquet"
    rows = [list(map(float, r)) for r in _matrix(12, 4)] + [list(map(float, r)) for r in _matrix(8, 3)]
    _write_rows(path, rows)
    batches = iter_item_batches(path, 4, id_col="item_id", expected_dim=4)
    for _ in range(3):  # rows 0..11 have 4 values
        next(batches)
    with pytest.raises(InputError, match=r"dimension 3, expected 4 \(in the rows from 12 on; the rows before have 4\)"):
        next(batches)


def test_streaming_argument_checks(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, _matrix(10, 4))
    for bad in (0, -3, 2.5, True):
        with pytest.raises(InputError, match="batch size"):
            iter_item_batches(path, bad)
    with pytest.raises(InputError, match="dimension 4, expected 8"):
        iter_item_batches(path, 4, expected_dim=8)  # raised at the call for .npy


# ------------------------------------------------------------------------------------------------- parts


def _part(folder: Path, name: str, x: np.ndarray, ids: list) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    _frame(x, ids).write_parquet(path, row_group_size=4)
    return path


@pytest.fixture
def export(tmp_path) -> tuple[Path, np.ndarray, list[str]]:
    """A warehouse export of 40 items: parts of 13, 0, 9 and 18 rows (Dask-style names, whose numbers sort as
    numbers; one part in a Hive partition folder), beside what such exports leave that is not data, and a semid
    model directory (whose registry is parquet too)."""
    x = _matrix(40, 6)
    ids = [f"item{i}" for i in range(40)]
    folder = tmp_path / "export"
    for name, rows in (("part.2.parquet", slice(0, 13)), ("part.9.parquet", slice(13, 13)),
                       ("part.10.parquet", slice(13, 22)), ("region=eu/part.0.parquet", slice(22, 40))):
        _part(folder, name, x[rows], ids[rows])
    (folder / "_SUCCESS").write_text("")
    (folder / ".part.2.parquet.crc").write_text("checksum")
    _part(folder, "_temporary/0/part.11.parquet", _matrix(3, 6, seed=9), ["t0", "t1", "t2"])  # a job's leftovers
    _part(folder, ".ids.tmp-0123abcd.parquet", _matrix(3, 6, seed=8), ["h0", "h1", "h2"])
    model = folder / "model"
    model.mkdir()
    (model / "meta.json").write_text(json.dumps({"format": "semid-model-v1"}))
    pl.DataFrame({"key": ["item0"], "id": [[1, 2, 3]]}).write_parquet(model / "registry.parquet")
    return folder, x, ids


def test_a_directory_or_pattern_of_parquet_parts_reads_as_one_table_in_natural_path_order(export):
    folder, x, ids = export
    listed = input_files(folder)
    assert [f.relative_to(folder).as_posix() for f in listed.files] == [
        "part.2.parquet", "part.9.parquet", "part.10.parquet", "region=eu/part.0.parquet"]
    assert str(listed) == f"{folder} (4 parquet files)" and listed.in_parts
    for source in (folder, str(folder / "**" / "*.parquet")):
        items = read_items(source)
        np.testing.assert_array_equal(items.embeddings, x)
        assert items.ids.tolist() == ids
        assert count_items(source) == 40
    # a wildcard stays within one name, and a pattern without ** looks in its own folder only
    assert input_files(folder / "part.[29].parquet").files == (folder / "part.2.parquet", folder / "part.9.parquet")
    assert len(input_files(folder / "*.parquet").files) == 3
    single = input_files(folder / "part.2.parquet")
    assert not single.in_parts and str(single) == str(folder / "part.2.parquet")


@pytest.mark.parametrize("batch_size", [1, 5, 13, 16, 40, 2**40])
def test_streamed_parts_make_full_batches_across_their_boundaries(export, batch_size):
    folder, x, ids = export
    batches = list(iter_item_batches(folder, batch_size))
    sizes = [len(b) for b in batches]
    expected = min(batch_size, 40)
    assert sizes == [expected] * (40 // expected) + ([40 % expected] if 40 % expected else [])
    np.testing.assert_array_equal(np.concatenate([b.embeddings for b in batches]), x)
    assert np.concatenate([b.ids for b in batches]).tolist() == ids


def test_rows_of_an_input_in_parts_are_counted_over_the_whole_table(export):
    folder, x, _ = export
    rows = np.array([39, 0, 12, 13, 22, 21, 5, 39])  # across every part, out of order, one twice
    np.testing.assert_array_equal(read_rows(folder, rows), x[rows])
    with pytest.raises(IndexError, match="rows 0..39"):
        read_rows(folder, np.array([3, 40]))


def test_parts_are_checked_one_by_one_and_named_in_errors(tmp_path, monkeypatch):
    x = _matrix(20, 4)
    folder = tmp_path / "export"
    _part(folder, "a.parquet", x[:10], [f"i{i}" for i in range(10)])
    bad = x[10:].copy()
    bad[3, 1] = np.nan
    _part(folder, "b.parquet", bad, [f"i{i}" for i in range(10, 20)])
    with pytest.raises(InputError, match=r"embeddings in .*b\.parquet contain non-finite values.*first bad row: 3\)"):
        read_items(folder)
    with pytest.raises(InputError, match=r"b\.parquet .*first bad row: 3\)"):
        list(iter_item_batches(folder, 8))  # the batch of rows 8..15 spans both parts: the row is b's own
    _part(folder, "b.parquet", x[10:], [f"i{i}" for i in range(9, 19)])  # i9 again
    with pytest.raises(InputError, match=r"column 'item_id' in .*export \(2 parquet files\).*'i9'.*the first is in "
                                         r".*a\.parquet row 9, .*b\.parquet row 0\)"):
        read_items(folder)
    single = _part(tmp_path, "single.parquet", x[:10], [f"i{i}" for i in range(9)] + ["i2"])
    monkeypatch.setattr(sources, "_READ_BATCH", 4)  # rows 2 and 9 in two slices of the read
    with pytest.raises(InputError, match=r"'i2'.*the first is in .*single\.parquet row 2, .*single\.parquet row 9\)"):
        read_items(single)
    _part(folder, "b.parquet", _matrix(10, 5), [f"i{i}" for i in range(10, 20)])
    with pytest.raises(InputError, match=r"embeddings in .*b\.parquet have dimension 5, expected 4 as in "
                                         r".*a\.parquet, read before it"):
        read_items(folder)
    with pytest.raises(InputError, match=r"b\.parquet have dimension 5, expected 4$"):  # the model's width
        list(iter_item_batches(folder, 8, expected_dim=4))
    with pytest.raises(InputError, match=r"a\.parquet have dimension 4, expected 5$"):
        list(iter_item_batches(folder, 8, expected_dim=5))
    pl.DataFrame({"item_id": ["z"], "vector": [[1.0, 2.0, 3.0, 4.0]]}).write_parquet(folder / "b.parquet")
    with pytest.raises(InputError, match=r"b\.parquet has no column 'embedding'"):
        count_items(folder)  # before any row is read
    (folder / "b.parquet").unlink()
    _part(folder, "a.parquet", x[:0], [])
    assert count_items(folder) == 0
    with pytest.raises(InputError, match=r"are empty: its files have no rows"):
        read_items(folder)
    with pytest.raises(InputError, match=r"are empty: the file has no rows"):
        iter_item_batches(folder / "a.parquet", 4)


def test_parts_are_ordered_by_the_numbers_in_their_names_whatever_the_names(tmp_path):
    names = ["part.10.parquet", "part.2.parquet", "a1\u00b2/x.parquet", "a01.parquet/x.parquet", "a1.parquet",
             "part-01.parquet", "part-1.parquet", "\u0663.parquet", "2.parquet"]  # a superscript 2; Arabic-Indic 3
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        _frame(_matrix(1, 2)).write_parquet(tmp_path / name)
    assert [f.relative_to(tmp_path).as_posix() for f in input_files(tmp_path).files] == [
        "2.parquet", "\u0663.parquet", "a1.parquet", "a01.parquet/x.parquet", "a1\u00b2/x.parquet",
        "part-01.parquet", "part-1.parquet", "part.2.parquet", "part.10.parquet"]


def test_the_readers_are_still_found_where_they_were():
    import semid.io
    import semid.sources

    assert semid.io.read_items is semid.sources.read_items
    assert semid.io.read_interaction_sequences is semid.sources.read_interaction_sequences
    with pytest.raises(AttributeError, match="no attribute 'read_everything'"):
        semid.io.read_everything  # noqa: B018


def test_inputs_that_name_no_parts_say_why(tmp_path):
    empty = tmp_path / "empty"
    (empty / "_tmp").mkdir(parents=True)
    _part(empty, "_tmp/a.parquet", _matrix(3, 2), ["a", "b", "c"])
    with pytest.raises(InputError, match="the directory .*empty holds no .parquet files \\(names that begin with '.' "
                                         "or '_', and semid model directories, are skipped\\)"):
        input_files(empty)
    np.save(empty / "x.npy", _matrix(3, 2))
    with pytest.raises(InputError, match=r"skipped; .npy files are read one at a time: name the file\)"):
        input_files(empty)
    with pytest.raises(InputError, match=r"input file not found: .*nothing-\*\.parquet, and as a glob pattern it "
                                         r"matches no \.parquet files"):
        input_files(tmp_path / "nothing-*.parquet")
    with pytest.raises(InputError, match=r"interactions file not found: .*log\[1\]\.csv, and as a glob"):
        input_files(tmp_path / "log[1].csv", suffixes=(".parquet", ".csv"), what="interactions")
    logs = tmp_path / "logs"
    logs.mkdir()
    pl.DataFrame({"user_id": ["u"], "item_id": ["a"]}).write_parquet(logs / "a.parquet")
    pl.DataFrame({"user_id": ["u"], "item_id": ["a"]}).write_csv(logs / "b.csv")
    with pytest.raises(InputError, match=r"has both .csv and .parquet files: name one kind, as in .*\*\.csv"):
        input_files(logs, suffixes=(".parquet", ".csv"))
    assert input_files(logs).files == (logs / "a.parquet",)  # items are parquet: the csv is not a part of them


@pytest.mark.skipif(not hasattr(os, "symlink") or sys.platform == "win32", reason="symbolic links")
def test_linked_folders_are_followed_once_and_an_alias_of_the_folder_is_the_folder(tmp_path):
    real = tmp_path / "real"
    _part(real, "sub/p1.parquet", _matrix(2, 3), ["a", "b"])
    export = tmp_path / "export"
    _part(export, "a.parquet", _matrix(2, 3, seed=1), ["c", "d"])
    (export / "linked").symlink_to(real / "sub", target_is_directory=True)
    (export / "loop").symlink_to(export, target_is_directory=True)  # a folder that holds itself: walked once
    expected = [export / "a.parquet", export / "linked" / "p1.parquet"]
    assert list(input_files(export).files) == expected
    assert list(input_files(str(export / "**" / "*.parquet")).files) == expected
    alias = tmp_path / "alias"
    alias.symlink_to(export, target_is_directory=True)
    assert input_files(export).would_read(alias / "ids.parquet")
    assert input_files(alias).would_read(export / "new" / "ids.parquet")
    assert input_files(str(alias / "*.parquet")).would_read(export / "ids.parquet")
    assert input_files(export).would_read(real / "sub" / "new.parquet")  # read through the link next time
    assert not input_files(export).would_read(real / "new.parquet")


@pytest.mark.skipif(not hasattr(os, "symlink") or sys.platform == "win32", reason="symbolic links")
def test_a_link_to_a_partition_never_hides_the_partition(tmp_path):
    """`latest -> 2024` beside 2024/: whichever the folder lists first, the part is read once, by its own path."""
    export = tmp_path / "x"
    _part(export, "2023/part-0.parquet", _matrix(2, 3), ["a", "b"])
    _part(export, "2024/part-0.parquet", _matrix(2, 3, seed=1), ["c", "d"])
    (export / "latest").symlink_to("2024", target_is_directory=True)
    expected = [export / "2023" / "part-0.parquet", export / "2024" / "part-0.parquet"]
    for given in (export, export / "20*" / "*.parquet", export / "**" / "20??" / "*.parquet", export / "*"):
        assert list(input_files(str(given)).files) == expected, given
    assert list(input_files(str(export / "latest" / "*.parquet")).files) == [export / "latest" / "part-0.parquet"]


def test_a_pattern_may_name_folders_and_names_are_never_read_as_patterns_by_polars(tmp_path):
    """`exports/date=2024-*` names partition folders, and Spark writes a table as a folder `items.parquet/`: their
    parts are read. A folder whose name holds [1] is read as that folder, not as a pattern matching data1/."""
    export = tmp_path / "exports"
    _part(export, "date=2024-01/part-0.parquet", _matrix(2, 3), ["a", "b"])
    _part(export, "date=2024-02/part-0.parquet", _matrix(1, 3, seed=1), ["c"])
    _part(export, "date=2023-12/part-0.parquet", _matrix(1, 3, seed=2), ["z"])
    _part(export, "items.parquet/part-00000.parquet", _matrix(1, 3, seed=3), ["s"])
    assert read_items(str(export / "date=2024-*")).ids.tolist() == ["a", "b", "c"]
    assert read_items(str(export / "*.parquet")).ids.tolist() == ["s"]
    assert input_files(str(export / "date=2024-*")).would_read(export / "date=2024-03" / "new.parquet")
    _part(tmp_path, "data[1]/a.parquet", _matrix(1, 3), ["bracketed"])
    _part(tmp_path, "data1/a.parquet", _matrix(1, 3), ["plain"])
    for given in (tmp_path / "data[1]", tmp_path / "data[1]" / "a.parquet"):
        assert read_items(given).ids.tolist() == ["bracketed"]
        assert count_items(given) == 1


def test_an_output_that_an_input_in_parts_would_read_is_recognised(export, tmp_path):
    folder, _, _ = export
    by_folder, by_pattern = input_files(folder), input_files(str(folder / "part.*.parquet"))
    assert by_folder.would_read(folder / "ids.parquet")  # would be a new part next time
    assert by_folder.would_read(folder / "region=us" / "ids.parquet")
    assert by_folder.would_read(folder / "part.10.parquet")  # is one now
    for harmless in (folder / "trie.json", folder / "_done" / "ids.parquet", folder / ".ids.parquet",
                     tmp_path / "ids.parquet", tmp_path / "export-2" / "ids.parquet"):
        assert not by_folder.would_read(harmless), harmless
    assert by_pattern.would_read(folder / "part.99.parquet")
    for harmless in (folder / "ids.parquet", folder / "sub" / "part.1.parquet", folder / "_part.1.parquet"):
        assert not by_pattern.would_read(harmless), harmless
    single = input_files(folder / "part.2.parquet")
    assert single.would_read(folder / "part.2.parquet") and not single.would_read(folder / "ids.parquet")


def test_an_id_column_keeps_an_integer_type_that_holds_every_part(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()

    def part(name: str, ids: pl.Series) -> None:
        pl.DataFrame({"item_id": ids, "embedding": [[0.0, 1.0]] * len(ids)}).write_parquet(folder / name)

    part("a.parquet", pl.Series([1, 2], dtype=pl.Int64))
    part("b.parquet", pl.Series([3], dtype=pl.Int32))
    pl.DataFrame({"item_id": [], "embedding": []}).write_parquet(folder / "c.parquet")  # no rows: typed Null
    assert parquet_column_type(folder, "item_id") == pl.Int64
    part("a.parquet", pl.Series([1, 2], dtype=pl.UInt16))
    part("b.parquet", pl.Series([3], dtype=pl.UInt32))
    assert parquet_column_type(folder, "item_id") == pl.UInt64
    part("a.parquet", pl.Series([2**63 + 5], dtype=pl.UInt64))
    part("b.parquet", pl.Series([-3], dtype=pl.Int64))
    assert parquet_column_type(folder, "item_id") == pl.String  # no integer type holds both
    part("b.parquet", pl.Series(["c"]))
    assert parquet_column_type(folder, "item_id") == pl.String
    assert read_items(folder).ids.tolist() == [str(2**63 + 5), "c"]


def test_an_interaction_log_in_parts_reads_as_one_log(tmp_path):
    """Parts may order their columns differently, carry other columns and other integer widths."""
    catalogue = ["10", "20", "30"]
    logs = tmp_path / "logs"
    logs.mkdir()
    first = pl.DataFrame({"user_id": ["u1", "u2"], "item_id": [10, 30], "timestamp": [2, 1]})
    second = pl.DataFrame({"timestamp": pl.Series([1, 3], dtype=pl.Int32), "item_id": pl.Series([20, 99], dtype=pl.Int32),
                           "user_id": ["u1", "u1"], "session": ["s", "s"]})
    for fmt in ("parquet", "csv"):
        for i, frame in enumerate((first, second)):
            frame.write_parquet(logs / f"part-{i}.parquet") if fmt == "parquet" else frame.write_csv(logs / f"part-{i}.csv")
        result = read_interaction_sequences(logs if fmt == "parquet" else logs / "*.csv", catalogue)
        assert [s.tolist() for s in result.sequences] == [[1, 0], [2]]
        assert (result.interactions, result.skipped) == (4, 1)
    second.drop("timestamp").write_parquet(logs / "part-1.parquet")
    with pytest.raises(InputError, match=r"the interactions .*part-1\.parquet have no time column 'timestamp'.*"
                                         r"part-0\.parquet, the first part, has one, so every part must"):
        read_interaction_sequences(logs / "*.parquet", catalogue)
    second.with_columns(user_id=pl.Series([None, "u1"], dtype=pl.String)).write_parquet(logs / "part-1.parquet")
    with pytest.raises(InputError, match=r"1 rows without a user \(column 'user_id', first at row 0 of .*part-1\.parquet\)"):
        read_interaction_sequences(logs / "*.parquet", catalogue)


# ------------------------------------------------------------------------------------------ atomic writes


class _Boom(RuntimeError):
    pass


def test_atomic_write_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out" / "ids.parquet"

    def failing(tmp: Path) -> None:
        assert tmp.parent == target.parent and tmp.suffix == ".parquet" and tmp != target
        tmp.write_bytes(b"partial")
        raise _Boom

    with pytest.raises(_Boom):
        atomic_write(target, failing)
    assert not target.exists() and _dir_entries(target.parent) == []


def test_atomic_write_failure_keeps_old_file(tmp_path):
    target = tmp_path / "report.json"
    write_json_atomic({"v": 1}, target)

    def failing(tmp: Path) -> None:
        tmp.write_text("{")
        raise _Boom

    with pytest.raises(_Boom):
        atomic_write(target, failing)
    assert json.loads(target.read_text()) == {"v": 1} and _dir_entries(tmp_path) == ["report.json"]


_HOLD_A_TEMP = """
import sys, time
from pathlib import Path
from semid.atomic import atomic_write, claimed_temp

target, kind = Path(sys.argv[1]), sys.argv[2]

def hold(tmp):
    print(tmp.name, flush=True)
    time.sleep(120)

if kind == "file":
    atomic_write(target, lambda tmp: (tmp.write_bytes(b"partial"), hold(tmp)))
else:
    with claimed_temp(target, directory=True) as staging:
        (staging / "model.pt").write_bytes(b"partial")
        hold(staging)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="no flock: a killed write's temp stays on Windows")
@pytest.mark.parametrize("kind", ["file", "directory"])
def test_the_temp_of_a_killed_write_is_removed_by_the_next_write_and_a_live_ones_is_not(tmp_path, kind):
    """kill -9 (OOM killer, a pre-empted instance) leaves a temp as large as the output: a checkpoint, a whole
    model's staging directory. The next write of the same output removes it, but never a live writer's."""
    target = tmp_path / ("ckpt.pt" if kind == "file" else "model")
    writer = subprocess.Popen([sys.executable, "-c", _HOLD_A_TEMP, str(target), kind], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        held = writer.stdout.readline().strip()
        assert held and (tmp_path / held).exists()
        unrelated = [".ckpt.tmp-0123456789ab.npy", ".other.tmp-0123456789ab.pt", ".ckpt.tmp-0123456789ab.pt.bak",
                     ".model.old-0123456789ab", "ckpt.tmp-0123456789ab.pt"]  # other outputs' temps, and no temps
        for name in unrelated:
            (tmp_path / name).write_bytes(b"keep")

        def next_write() -> None:
            if kind == "file":
                atomic_write(target, lambda tmp: tmp.write_bytes(b"whole"))
            else:
                with claimed_temp(target, directory=True) as staging:
                    os.replace(staging, target)  # as a model save ends
                    shutil.rmtree(target)

        next_write()
        assert (tmp_path / held).exists()  # its writer is alive: not removed
        writer.kill()
        writer.wait(timeout=60)
        assert (tmp_path / held).exists()
        next_write()
        assert not (tmp_path / held).exists()
        assert all((tmp_path / name).exists() for name in unrelated)  # other outputs' temps are not touched
        left = set(_dir_entries(tmp_path)) - set(unrelated)
        assert left == ({"ckpt.pt"} if kind == "file" else set())  # nothing of either write left
    finally:
        writer.kill()
        writer.wait(timeout=60)


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_writers_racing_for_one_output_never_remove_each_others_temps(tmp_path, kind):
    """Each write sweeps the temps beside its output while others are making theirs: none may take a live
    one (a temp made, not yet locked) for a killed writer's."""
    from concurrent.futures import ThreadPoolExecutor

    target = tmp_path / ("out.json" if kind == "file" else "model")

    def writes(worker: int) -> int:
        for i in range(150):
            if kind == "file":
                atomic_write(target, lambda tmp: tmp.write_text(f"{worker} {i}"))
            else:
                with claimed_temp(target, directory=True) as staging:
                    (staging / "weights").write_text(f"{worker} {i}")
                    shutil.rmtree(staging)  # as a save ends: its staging directory renamed away
        return worker

    with ThreadPoolExecutor(4) as pool:  # flock excludes other descriptors of this process as it does others'
        assert sorted(pool.map(writes, range(4))) == [0, 1, 2, 3]  # no write failed
    assert _dir_entries(tmp_path) == (["out.json"] if kind == "file" else [])


@pytest.mark.skipif(sys.platform == "win32", reason="no flock on Windows")
def test_a_file_system_without_locks_still_gets_its_outputs(tmp_path, monkeypatch):
    """Some mounts (FUSE, old NFS) refuse flock with ENOLCK: a write is then unclaimed, never refused."""
    import errno

    import semid.atomic

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(semid.atomic.fcntl, "flock", no_locks)
    target = tmp_path / "ids.json"
    write_json_atomic({"v": 2}, target)
    with claimed_temp(tmp_path / "model", directory=True) as staging:
        (staging / "x").write_text("")
        os.replace(staging, tmp_path / "model")
    assert json.loads(target.read_text()) == {"v": 2} and _dir_entries(tmp_path) == ["ids.json", "model"]


def test_an_atomic_write_that_the_system_refuses_names_the_file_meant(tmp_path):
    """A full disk or a read-only folder fails in the temp file; the error names the output, keeps its type."""
    target = tmp_path / "ids.parquet"

    def disk_full(tmp: Path) -> None:
        tmp.write_bytes(b"part")
        raise OSError(28, "No space left on device", str(tmp))

    with pytest.raises(OSError, match=r"cannot write .*ids\.parquet: No space left on device") as info:
        atomic_write(target, disk_full)
    assert info.value.errno == 28 and ".tmp-" not in str(info.value) and _dir_entries(tmp_path) == []
    (tmp_path / "a_file").write_text("")
    with pytest.raises(FileExistsError, match=r"cannot write .*a_file/x\.json"):  # a parent that is a file
        atomic_write(tmp_path / "a_file" / "x.json", lambda tmp: tmp.write_text("{}"))
    with pytest.raises(FileNotFoundError) as info:  # an error about a file the writer reads stays its own
        atomic_write(target, lambda tmp: (tmp_path / "missing.txt").read_text())
    assert info.value.filename == str(tmp_path / "missing.txt") and "cannot write" not in str(info.value)
    long = tmp_path / ("n" * 245 + ".json")  # a valid name whose temp's name is too long: the temp is not named
    with pytest.raises(OSError, match=r"cannot write .*nnn\.json: File name too long") as info:
        atomic_write(long, lambda tmp: tmp.write_text("{}"))
    assert ".tmp-" not in str(info.value)


def test_a_full_disk_reported_by_a_rust_writer_names_the_output(tmp_path):
    """polars reports the system's error in its own exception's text, without the file; only failures that
    writing alone meets (full disk, file too large, read-only) are taken for this output's."""
    class ComputeError(Exception):  # polars.exceptions.ComputeError, as a full disk raised it
        pass

    def full(tmp: Path) -> None:
        tmp.write_bytes(b"part")
        raise ComputeError("parquet: File out of specification: underlying IO error: File too large (os error 27)")

    with pytest.raises(OSError, match=r"cannot write .*ids\.parquet: File too large") as info:
        atomic_write(tmp_path / "ids.parquet", full)
    assert info.value.errno == 27 and _dir_entries(tmp_path) == []

    def reading(tmp: Path) -> None:  # a source the writer scans is missing: not about the output
        raise ComputeError("No such file or directory (os error 2): items.parquet")

    with pytest.raises(ComputeError):
        atomic_write(tmp_path / "ids.parquet", reading)


def test_atomic_write_follows_a_symlink_and_keeps_it(tmp_path):
    real = tmp_path / "data" / "report.json"
    write_json_atomic({"v": 1}, real)
    link = tmp_path / "report.json"
    link.symlink_to(real)
    write_json_atomic({"v": 2}, link)
    assert link.is_symlink() and json.loads(real.read_text()) == {"v": 2}
    assert _dir_entries(tmp_path) == ["data", "report.json"] and _dir_entries(real.parent) == ["report.json"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_atomic_write_into_a_pipe_writes_through_it_and_leaves_it_a_pipe(tmp_path):
    """/dev/null and /dev/stdout are not files to replace: renaming onto /dev/null made it a regular file (as
    root). A named pipe stands in for them here, read by a thread."""
    import stat
    import threading

    pipe = tmp_path / "out.json"
    os.mkfifo(pipe)
    received = []
    reader = threading.Thread(target=lambda: received.append(pipe.read_bytes()), daemon=True)
    reader.start()
    write_json_atomic({"v": 3}, pipe)
    reader.join(timeout=30)
    assert json.loads(received[0]) == {"v": 3}
    assert stat.S_ISFIFO(os.stat(pipe).st_mode) and _dir_entries(tmp_path) == ["out.json"]


@pytest.mark.skipif(not Path("/dev/stdout").exists(), reason="needs /dev/stdout")
def test_outputs_to_dev_stdout_on_a_pipe_reach_the_pipe():
    """`semid evaluate --json /dev/stdout | jq`: on a pipe /dev/stdout resolves to a name that does not exist
    (/proc/<pid>/fd/pipe:[n]); the output goes into the pipe, and two outputs may share it."""
    script = textwrap.dedent("""
        import argparse
        from semid.atomic import atomic_write, claimed_temp
        from semid.cli import check_output_paths
        check_output_paths(argparse.Namespace(command="evaluate", data="items.npy", model=None, sequences=None,
                                              interactions=None, json="/dev/stdout", plot="/dev/stdout"))
        atomic_write("/dev/stdout", lambda tmp: tmp.write_text("through the pipe"))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "through the pipe"


def test_write_json_atomic_handles_numpy_and_refuses_unknown(tmp_path):
    target = tmp_path / "a" / "b" / "r.json"
    write_json_atomic({"mse": np.float32(0.5), "usage": np.array([1.0, 0.25]), "n": np.int64(3)}, target)
    assert json.loads(target.read_text()) == {"mse": 0.5, "usage": [1.0, 0.25], "n": 3}
    with pytest.raises(TypeError):
        write_json_atomic({"x": object()}, tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()


def test_write_json_atomic_writes_strict_json(tmp_path):
    """NaN and inf (a metric of a degenerate set) become null: bare NaN is not JSON."""
    target = tmp_path / "r.json"
    write_json_atomic({"fvu": float("nan"), "cosine": np.float32("inf"), "usage": np.array([1.0, np.nan]),
                       "steps": [{"loss": -np.inf}]}, target)
    text = target.read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}")) == {
        "fvu": None, "cosine": None, "usage": [1.0, None], "steps": [{"loss": None}]}


def test_write_parquet_atomic_lazy(tmp_path):
    x = _matrix(20, 3)
    target = tmp_path / "lazy.parquet"
    write_parquet_atomic(_frame(x).lazy().filter(pl.col("item_id") != "item0"), target)
    np.testing.assert_array_equal(read_items(target).embeddings, x[1:])


def test_shard_writer_concatenates_in_order(tmp_path):
    x = _matrix(50, 4)
    frame = _frame(x)
    target = tmp_path / "ids.parquet"
    with ParquetShardWriter(target) as w:
        for start in range(0, 50, 12):
            w.write(frame.slice(start, 12))
    assert _dir_entries(tmp_path) == ["ids.parquet"]
    table = read_items(target)
    np.testing.assert_array_equal(table.embeddings, x)
    assert table.ids.tolist() == frame["item_id"].to_list()


def test_shard_writer_failure_leaves_nothing(tmp_path):
    target = tmp_path / "ids.parquet"
    with pytest.raises(_Boom):
        with ParquetShardWriter(target) as w:
            w.write(_frame(_matrix(5, 2)))
            raise _Boom
    assert _dir_entries(tmp_path) == []
    with pytest.raises(ValueError, match="no batches"):
        with ParquetShardWriter(target):
            pass
    assert _dir_entries(tmp_path) == []


# ---------------------------------------------------------------------------------- to_numpy_embeddings


def test_to_numpy_from_numpy_and_lists():
    x = _matrix(5, 3)
    ids, out = to_numpy_embeddings(x)
    assert ids is None
    np.testing.assert_array_equal(out, x)
    np.testing.assert_array_equal(to_numpy_embeddings(x.tolist())[1], x)
    with pytest.raises(InputError, match="ragged"):
        to_numpy_embeddings([[1.0, 2.0], [3.0]])
    with pytest.raises(InputError, match="unsupported embeddings type dict"):
        to_numpy_embeddings({"a": 1})
    for path in ("items.parquet", Path("items.parquet")):
        with pytest.raises(InputError, match=r"given as the path 'items.parquet': read the file first, items = "
                                             r"semid\.sources\.read_items\(path\)"):
            to_numpy_embeddings(path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_to_numpy_from_torch(dtype):
    t = torch.randn(6, 4, dtype=dtype, requires_grad=dtype.is_floating_point)
    ids, out = to_numpy_embeddings(t)
    assert ids is None and out.dtype == np.float32
    np.testing.assert_array_equal(out, t.detach().float().numpy())
    t2 = t.detach().clone()
    t2[2, 1] = float("nan")
    with pytest.raises(InputError, match="first bad row: 2"):
        to_numpy_embeddings(t2)


def test_to_numpy_from_polars_frame():
    x = _matrix(7, 3)
    ids, out = to_numpy_embeddings(_frame(x))
    np.testing.assert_array_equal(out, x)
    assert ids.tolist() == [f"item{i}" for i in range(7)]
    renamed = _frame(x).rename({"item_id": "sku", "embedding": "vec"})
    with pytest.raises(InputError, match=r"no column 'item_id'.*sku, vec"):
        to_numpy_embeddings(renamed)
    assert to_numpy_embeddings(renamed, id_col="sku", emb_col="vec")[0].tolist() == ids.tolist()


def test_to_numpy_from_pandas_frame():
    x = _matrix(4, 3)
    ids, out = to_numpy_embeddings(pd.DataFrame({"item_id": [5, 6, 7, 8], "embedding": list(x)}))
    np.testing.assert_array_equal(out, x)
    assert ids.tolist() == ["5", "6", "7", "8"]
    lists = pd.DataFrame({"item_id": list("abcd"), "embedding": x.tolist()})
    np.testing.assert_array_equal(to_numpy_embeddings(lists)[1], x)
    with pytest.raises(InputError, match=r"1 null embeddings \(first at row 1\)"):
        to_numpy_embeddings(pd.DataFrame({"item_id": ["a", "b"], "embedding": [[1.0], None]}))
    with pytest.raises(InputError, match="ragged"):
        to_numpy_embeddings(pd.DataFrame({"item_id": ["a", "b"], "embedding": [[1.0], [1.0, 2.0]]}))
    with pytest.raises(InputError, match="no column 'embedding'; its columns are: item_id, vec"):
        to_numpy_embeddings(pd.DataFrame({"item_id": ["a"], "vec": [[1.0]]}))
    with pytest.raises(InputError, match="must be unique"):
        to_numpy_embeddings(pd.DataFrame({"item_id": ["a", "a"], "embedding": [[1.0], [2.0]]}))
    with pytest.raises(InputError, match="one list of numbers per row; row 0 holds float"):
        to_numpy_embeddings(pd.DataFrame({"item_id": ["a", "b"], "embedding": [0.5, 0.7]}))


def test_pandas_nullable_ids_and_numbered_columns():
    """A left join leaves pandas' nullable Int64 ids with <NA>: named as the missing id it is, not as floats.
    Columns labelled by numbers are found by their text or their label."""
    x = _matrix(3, 2)
    for missing in (pd.array([1, None, 3], dtype="Int64"), pd.array(["a", None, "c"], dtype="string")):
        with pytest.raises(InputError, match=r"column 'item_id' .*1 missing \(null\) ids, the first at row 1"):
            to_numpy_embeddings(pd.DataFrame({"item_id": missing, "embedding": list(x)}))
        with pytest.raises(InputError, match=r"1 missing \(null\) ids, the first at row 1"):
            validate_ids(pd.Series(missing))
    full = pd.DataFrame({"item_id": pd.array([1, 2, 3], dtype="Int64"), "embedding": list(x)})
    assert to_numpy_embeddings(full)[0].tolist() == ["1", "2", "3"]
    numbered = pd.DataFrame({0: ["a", "b", "c"], 1: list(x)})
    for id_col, emb_col in (("0", "1"), (0, 1)):
        ids, out = to_numpy_embeddings(numbered, id_col=id_col, emb_col=emb_col)
        assert ids.tolist() == ["a", "b", "c"] and np.array_equal(out, x)


def test_works_without_pyarrow(tmp_path):
    """Block pyarrow in a fresh interpreter, then do a parquet round trip and a pandas conversion."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["pyarrow"] = None  # any `import pyarrow` now raises ImportError, even if installed
        import numpy as np, pandas as pd, polars as pl
        from semid.io import to_numpy_embeddings, write_parquet_atomic
        from semid.sources import read_items, iter_item_batches
        x = np.arange(12, dtype=np.float32).reshape(4, 3)
        df = pd.DataFrame({"item_id": list("abcd"), "embedding": list(x)})
        ids, out = to_numpy_embeddings(df)
        assert (out == x).all() and ids.tolist() == list("abcd")
        p = sys.argv[1]
        write_parquet_atomic(pl.DataFrame({"item_id": ids, "embedding": pl.Series(out).cast(pl.List(pl.Float32))}), p)
        t = read_items(p)
        assert (t.embeddings == x).all() and t.ids.tolist() == list("abcd")
        assert sum(len(b) for b in iter_item_batches(p, 3)) == 4
        assert sys.modules["pyarrow"] is None
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "p.parquet")], capture_output=True, text=True, env=env
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# --------------------------------------------------------------------------------------- bundled sample


def test_bundled_sample_reads_and_is_small():
    data = REPO / "data"
    table = read_items(data / "goodbooks.parquet")
    assert table.embeddings.shape == (10000, 384) and table.embeddings.dtype == np.float32
    assert len(set(table.ids.tolist())) == 10000
    norms = np.linalg.norm(table.embeddings, axis=1)  # raw mean-pooled MiniLM outputs, not unit length
    assert norms.min() > 1.0 and norms.max() < 10.0 and norms.std() > 0.1
    assert count_items(data / "goodbooks.parquet") == 10000
    assert "CC BY-SA 4.0" in (data / "README.md").read_text()
    assert "Attribution-ShareAlike 4.0" in (data / "LICENSE").read_text()
    assert sum(f.stat().st_size for f in data.rglob("*") if f.is_file()) < 20 * 2**20


def test_bundled_sample_matches_shared_data():
    if not (SHARED / "goodbooks.npy").exists():
        pytest.skip(f"shared data not found at {SHARED}")
    table = read_items(REPO / "data" / "goodbooks.parquet")
    np.testing.assert_array_equal(table.embeddings, read_items(SHARED / "goodbooks.npy").embeddings)
    shared_ids = pl.read_parquet(SHARED / "goodbooks.items.parquet")["item_id"].cast(pl.String).to_list()
    assert table.ids.tolist() == shared_ids


# ---- interaction logs -> users' sequences of catalogue rows ---------------------------------------------


def test_interactions_become_time_ordered_sequences_of_catalogue_rows(tmp_path):
    """Users' items in time order (ties in file order), as rows of the evaluated catalogue; items the catalogue
    does not hold are skipped and counted; integer item ids match a catalogue's string ids."""
    log = pl.DataFrame({
        "user_id": ["u2", "u1", "u1", "u2", "u1", "u2", "u1"],
        "item_id": [30, 10, 20, 99, 30, 10, 40],
        "timestamp": [5, 3, 1, 1, 2, 7, 2],
    })
    catalogue = ["10", "20", "30", "40"]  # rows 0..3
    log.write_parquet(tmp_path / "log.parquet")
    log.write_csv(tmp_path / "log.csv")
    for path in (tmp_path / "log.parquet", tmp_path / "log.csv"):
        result = read_interaction_sequences(path, catalogue)
        # users in sorted order; u1's items at time 2 (30, then 40) keep file order
        assert [s.tolist() for s in result.sequences] == [[1, 2, 3, 0], [2, 0]]
        assert (result.interactions, result.skipped) == (7, 1)
    log.drop("timestamp").write_parquet(tmp_path / "untimed.parquet")  # no time column: file order
    in_file_order = read_interaction_sequences(tmp_path / "untimed.parquet", catalogue)
    assert [s.tolist() for s in in_file_order.sequences] == [[0, 1, 2, 3], [2, 0]]
    log.rename({"timestamp": "clock"}).write_parquet(tmp_path / "clock.parquet")
    by_clock = read_interaction_sequences(tmp_path / "clock.parquet", catalogue, time_col="clock")
    assert [s.tolist() for s in by_clock.sequences] == [[1, 2, 3, 0], [2, 0]]


def test_interaction_logs_that_cannot_be_read_name_the_problem(tmp_path):
    with pytest.raises(InputError, match="interactions file not found"):
        read_interaction_sequences(tmp_path / "absent.parquet", ["a"])
    (tmp_path / "log.txt").write_text("u\ti\n")
    with pytest.raises(InputError, match="unsupported file type '.txt'.*expected .parquet or .csv"):
        read_interaction_sequences(tmp_path / "log.txt", ["a"])
    pl.DataFrame({"user": ["u"], "item_id": ["a"]}).write_parquet(tmp_path / "log.parquet")
    with pytest.raises(InputError, match=r"no user column 'user_id'; their columns are: user, item_id \(CLI"):
        read_interaction_sequences(tmp_path / "log.parquet", ["a"])
    pl.DataFrame({"user_id": ["u", None, None], "item_id": ["a", "a", "a"]}).write_parquet(tmp_path / "nulls.parquet")
    with pytest.raises(InputError, match=r"2 rows without a user \(column 'user_id', first at row 1\)"):
        read_interaction_sequences(tmp_path / "nulls.parquet", ["a"])
    with pytest.raises(InputError, match=r"no time column 'when'; their columns are: user_id, item_id \(CLI: --time"):
        read_interaction_sequences(tmp_path / "nulls.parquet", ["a"], time_col="when")  # named, so not file order
    untimed = pl.DataFrame({"user_id": ["u", "u"], "item_id": ["a", "a"], "timestamp": [1, None]})
    untimed.write_parquet(tmp_path / "untimed.parquet")
    with pytest.raises(InputError, match=r"1 rows without a time \(column 'timestamp', first at row 1\)"):
        read_interaction_sequences(tmp_path / "untimed.parquet", ["a"])
    # pandas writes integer ids with a missing value as floats: none of them matches, and that is named
    pl.DataFrame({"user_id": ["u", "u"], "item_id": [10.0, 20.0]}).write_parquet(tmp_path / "floats.parquet")
    with pytest.raises(InputError, match=r"none of the 2 interactions .* writes ids as '10.0', the catalogue as '10'"):
        read_interaction_sequences(tmp_path / "floats.parquet", ["10", "20"])
