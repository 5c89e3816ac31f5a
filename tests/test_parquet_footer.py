"""semid.parquet_footer: rows per row group, read from the footer, against what polars wrote."""
from __future__ import annotations

import os

import numpy as np
import polars as pl
import pytest

from semid import sources
from semid.parquet_footer import row_group_rows


def _frame(n: int) -> pl.DataFrame:
    """Every kind of column a footer's schema and statistics describe: integers, floats, text, booleans, lists,
    structs and an all-null column (statistics of each are skipped on the way to the row counts)."""
    return pl.DataFrame({
        "item_id": [f"i{i}" for i in range(n)],
        "n": list(range(n)),
        "x": np.linspace(0, 1, n),
        "flag": [i % 3 == 0 for i in range(n)],
        "embedding": pl.Series([[float(i), 1.0] for i in range(n)], dtype=pl.List(pl.Float32)),
        "meta": [{"a": i, "b": "t"} for i in range(n)],
        "none": pl.Series([None] * n, dtype=pl.Int64),
    })


@pytest.mark.parametrize("group", [1, 7, 100, 1000, 5000])
def test_row_groups_are_read_as_polars_wrote_them(tmp_path, group):
    path = tmp_path / "t.parquet"
    _frame(1000).write_parquet(path, row_group_size=group)
    rows = row_group_rows(path)
    expected = [min(group, 1000 - start) for start in range(0, 1000, group)]
    assert rows == expected


def test_files_whose_footer_cannot_be_read_give_none(tmp_path):
    empty = tmp_path / "empty.parquet"
    pl.DataFrame({"a": []}).write_parquet(empty)
    assert row_group_rows(empty) == []
    good = tmp_path / "good.parquet"
    _frame(50).write_parquet(good)
    data = good.read_bytes()
    for name, content in (("junk", b"PAR1" + os.urandom(200) + (100).to_bytes(4, "little") + b"PAR1"),
                          ("truncated", data[: len(data) // 2]), ("tiny", b"PAR1"), ("text", b"not parquet at all\n"),
                          ("long footer", data[:-8] + (10**9).to_bytes(4, "little") + b"PAR1")):
        bad = tmp_path / f"{name}.parquet"
        bad.write_bytes(content)
        assert row_group_rows(bad) is None, name
    assert row_group_rows(tmp_path / "absent.parquet") is None


@pytest.mark.parametrize("group, batch, reads", [(100, 10, 1), (10, 25, 5), (10, 100, 1), (30, 20, 4), (7, 7, 15)])
def test_a_stream_decodes_each_row_group_once(tmp_path, monkeypatch, group, batch, reads):
    """Row groups larger than a batch are read whole and cut in memory; smaller ones are joined up to a batch.
    Either way every group is read once, and the batches are the same."""
    path = tmp_path / "items.parquet"
    frame = _frame(100)
    frame.write_parquet(path, row_group_size=group)
    collected = []
    real_collect = sources._collect
    monkeypatch.setattr(sources, "_collect", lambda lf, p: collected.append(p) or real_collect(lf, p))
    batches = list(sources.iter_item_batches(path, batch))
    assert len(collected) == reads
    assert [len(b) for b in batches] == [batch] * (100 // batch) + ([100 % batch] if 100 % batch else [])
    np.testing.assert_array_equal(np.concatenate([b.embeddings for b in batches]),
                                  np.array(frame["embedding"].to_list(), dtype=np.float32))
    assert np.concatenate([b.ids for b in batches]).tolist() == frame["item_id"].to_list()
