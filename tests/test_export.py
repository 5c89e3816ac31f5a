"""Exports of final IDs: token strings, semantic ID strings, the prefix trie and its JSON file."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

import polars as pl

from semid.export import (
    id_table,
    parse_semantic_id_strings,
    parse_token_strings,
    prefix_trie,
    semantic_id_strings,
    token_strings,
    token_numbers,
    token_vocabulary,
    write_trie_json,
    write_vocabulary,
)


@pytest.fixture
def ids() -> np.ndarray:
    """Unique IDs with shared prefixes at every depth, in no particular order."""
    rng = np.random.default_rng(0)
    rows = np.stack([rng.integers(0, k, 300) for k in (4, 5, 300, 3)], 1)
    unique = np.unique(rows, axis=0)
    return unique[rng.permutation(len(unique))]


def test_token_strings_format():
    assert token_strings(np.array([[12, 201, 7, 0]])) == ["<a_12><b_201><c_7><d_0>"]
    assert token_strings(np.array([[3, 4]]), prefixes="xy") == ["<x_3><y_4>"]


def test_token_strings_parse_back(ids):
    strings = token_strings(ids)
    pattern = re.compile(r"<([a-z])_(\d+)>")
    for row, s in zip(ids, strings):
        tokens = pattern.findall(s)
        assert "".join(f"<{p}_{c}>" for p, c in tokens) == s
        assert [p for p, _ in tokens] == list("abcd")
        assert [int(c) for _, c in tokens] == row.tolist()


def test_semantic_id_strings(ids):
    assert semantic_id_strings(np.array([[12, 201, 7, 0]])) == ["12-201-7-0"]
    strings = semantic_id_strings(ids)
    assert [list(map(int, s.split("-"))) for s in strings] == ids.tolist()


def test_id_table_is_the_encode_output_with_the_item_ids_typed_as_given(ids):
    item_ids = pl.Series(np.arange(len(ids), dtype=np.int64) * 7)
    table = id_table(item_ids, ids)
    assert table.columns == ["item_id", "codes", "semantic_id", "tokens"]
    assert table["item_id"].dtype == pl.Int64 and table["item_id"].to_list() == item_ids.to_list()
    assert table["codes"].to_list() == ids.tolist()
    assert table["semantic_id"].to_list() == semantic_id_strings(ids)
    assert table["tokens"].to_list() == token_strings(ids)
    names = [f"book-{i}" for i in range(len(ids))]
    assert id_table(names, ids)["item_id"].to_list() == names
    assert id_table(np.arange(len(ids), dtype=np.uint32), ids)["item_id"].dtype == pl.UInt32
    empty = id_table(np.zeros(0, dtype=np.int64), ids[:0])
    assert empty.schema == {"item_id": pl.Int64, "codes": pl.List(pl.Int64), "semantic_id": pl.String,
                            "tokens": pl.String}
    with pytest.raises(ValueError, match=r"2 item ids for \d+ IDs"):
        id_table(["a", "b"], ids)


def test_parsers_invert_the_string_exports(ids):
    np.testing.assert_array_equal(parse_token_strings(token_strings(ids)), ids)
    np.testing.assert_array_equal(parse_semantic_id_strings(semantic_id_strings(ids)), ids)
    np.testing.assert_array_equal(parse_token_strings(token_strings(ids, prefixes="pqrs"), prefixes="pqrs"), ids)
    # as a detokeniser writes them: spaces between tokens, a Series
    spaced = pl.Series([s.replace("><", "> <") + "\n" for s in token_strings(ids)])
    np.testing.assert_array_equal(parse_token_strings(spaced), ids)
    assert parse_token_strings(spaced).flags.writeable  # torch.from_numpy takes it without a warning
    assert parse_token_strings([]).shape == (0, 0) and parse_semantic_id_strings([]).shape == (0, 0)


@pytest.mark.parametrize("bad, pattern", [
    (["<a_1><b_2>", "<a_1><c_2>"], r"row 1 \('<a_1><c_2>'\) is not of the form"),  # skips level b
    (["<b_1><c_2>"], "row 0"),  # does not start at the first level
    (["<a_1><a_2>"], "row 0"),  # repeats a level
    (["<a_1><b_2>x"], "row 0"),
    (["<a_-1>"], "row 0"),
    (["<a_1><b_2>", "<a_1>"], "row 1 .* has 1 codes but row 0 has 2"),
    (["<a_99999999999999999999>"], "too large"),
    (["<a_1>", None], "row 1 \\(None\\)"),
    (["<a_1 2><b_2>"], "row 0"),  # whitespace inside a token is not between tokens
    (["<a_\u0661\u0662>"], "row 0 .* not of the form"),  # Arabic-Indic digits: refused, not read as 12
    (["<a_1>", 7], "row 1 is int 7"),
    ("<a_1>", "not a single string"),
])
def test_parse_token_strings_names_the_first_row_it_cannot_read(bad, pattern):
    with pytest.raises(ValueError, match=pattern):
        parse_token_strings(bad)


def test_with_a_width_rows_that_do_not_parse_come_back_as_minus_one_rows():
    """A generative model's unconstrained output: each bad row of the strict tests above is a -1 row (no ID holds
    one), the good rows parse as they would alone, and the shape is the model's whatever the batch holds."""
    good = ["<a_1><b_2>", " <a_3> <b_4> "]
    bad = ["<a_1><c_2>", "<b_1><c_2>", "<a_1><a_2>", "<a_1><b_2>x", "<a_1>", "<a_1><b_2><c_3>",
           "<a_99999999999999999999><b_1>", None, "", "</s>"]
    parsed = parse_token_strings(good + bad, width=2)
    np.testing.assert_array_equal(parsed[:2], [[1, 2], [3, 4]])
    assert parsed.shape == (12, 2) and (parsed[2:] == -1).all() and parsed.flags.writeable
    assert parse_token_strings(["junk"], width=4).tolist() == [[-1] * 4]
    assert parse_token_strings([], width=4).shape == (0, 4)
    assert parse_semantic_id_strings(["1-2-3", "1-2", "x"], width=np.int64(3)).tolist() == [[1, 2, 3], [-1] * 3,
                                                                                          [-1] * 3]
    for width in (0, -1, 2.0, True, "2"):
        with pytest.raises(ValueError, match="width must be a positive int"):
            parse_token_strings(good, width=width)


def test_level_letters_must_keep_tokens_readable(ids):
    """A digit among the letters would read "<0_5>" as two codes; both directions refuse such prefixes."""
    for prefixes in ("01", "a_b", "<b", "a a", "aa", ""):
        with pytest.raises(ValueError, match="prefixes must"):
            token_strings(ids, prefixes=prefixes)
        with pytest.raises(ValueError, match="prefixes must"):
            parse_token_strings(["<a_1>"], prefixes=prefixes)
    for prefixes in ("a.b$", "^$[]", "αβγδ"):  # regex marks and other alphabets are letters like any other
        np.testing.assert_array_equal(parse_token_strings(token_strings(ids, prefixes=prefixes), prefixes=prefixes), ids)


@pytest.mark.parametrize("bad, pattern", [
    (["1-2", "1--2"], "row 1"), ([""], "row 0"), (["1-2", "3"], "has 1 codes"), (["1-x"], "row 0"),
    (["\u0661-\u0662"], "row 0 .* not of the form"), ("12-3", "not a single string"),
])
def test_parse_semantic_id_strings_names_the_first_row_it_cannot_read(bad, pattern):
    with pytest.raises(ValueError, match=pattern):
        parse_semantic_id_strings(bad)
    with pytest.raises(ValueError, match="must be strings"):
        parse_semantic_id_strings(pl.Series([1, 2]))


def test_bad_ids_are_rejected():
    with pytest.raises(ValueError, match="2 level prefixes"):
        token_strings(np.zeros((1, 3), int), prefixes="ab")
    with pytest.raises(ValueError, match="2-D"):
        semantic_id_strings(np.zeros(3, int))
    with pytest.raises(ValueError, match="negative"):
        prefix_trie(np.array([[0, -1]]))


def test_prefix_trie_lists_exactly_the_continuations_present(ids):
    trie = prefix_trie(ids)
    expected: dict[tuple, set[int]] = {}
    for row in ids.tolist():
        for depth in range(len(row)):
            expected.setdefault(tuple(row[:depth]), set()).add(row[depth])
    assert set(trie) == set(expected)
    for prefix, nxt in trie.items():
        assert nxt == sorted(expected[prefix])
    assert trie[()] == sorted(set(ids[:, 0].tolist()))


def test_trie_json_round_trip(ids, tmp_path):
    path = write_trie_json(ids, tmp_path / "out" / "trie.json")
    loaded = json.loads(path.read_text())
    assert loaded == prefix_trie(ids, string_keys=True)
    as_tuples = {tuple(int(c) for c in k.split("-")) if k else (): v for k, v in loaded.items()}
    assert as_tuples == prefix_trie(ids)
    assert [p.name for p in path.parent.iterdir()] == ["trie.json"]


def test_token_vocabulary_holds_every_token_the_ids_can_use(ids, tmp_path):
    """Every token of every ID of this shape is in the vocabulary, once, and nothing else is."""
    sizes = [int(k) for k in ids.max(axis=0) + 1]
    vocab = token_vocabulary(sizes)
    assert len(vocab) == len(set(vocab)) == sum(sizes)
    used = {token for s in token_strings(ids) for token in re.findall(r"<[a-z]_\d+>", s)}
    assert used <= set(vocab)
    assert set(vocab) == {f"<{'abcd'[j]}_{c}>" for j, k in enumerate(sizes) for c in range(k)}
    assert token_vocabulary([2, 1], prefixes="xy") == ["<x_0>", "<x_1>", "<y_0>"]
    path = write_vocabulary(vocab, tmp_path / "vocab.txt")
    assert path.read_text(encoding="utf-8").splitlines() == vocab
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.txt"]  # no temp file left


@pytest.mark.parametrize("sizes, prefixes, problem", [
    ([], "abc", "positive number"), ([4, 0], "abc", "positive number"),
    ([2, 2, 2], "ab", "only 2 level prefixes"), ([2], "a1", "distinct characters"),
])
def test_token_vocabulary_refuses_bad_shapes(sizes, prefixes, problem):
    with pytest.raises(ValueError, match=problem):
        token_vocabulary(sizes, prefixes=prefixes)


def test_token_numbers_are_each_tokens_place_in_the_vocabulary(ids):
    sizes = [int(k) + 1 for k in ids.max(axis=0)]
    vocabulary = token_vocabulary(sizes)
    place = {token: i for i, token in enumerate(vocabulary)}
    expected = [[place[t] for t in re.findall(r"<[^>]+>", row)] for row in token_strings(ids)]
    np.testing.assert_array_equal(token_numbers(ids, sizes), expected)
    np.testing.assert_array_equal(token_numbers(ids, sizes, offset=1000), np.array(expected) + 1000)
    with pytest.raises(ValueError, match=r"ids have 4 tokens but 3 sizes were given"):
        token_numbers(np.zeros((1, 4), int), [2, 2, 2])
    with pytest.raises(ValueError, match="row 1 has code 2 at position 0, outside its 2 values"):
        token_numbers(np.array([[0, 0], [2, 1]]), [2, 2])
