"""Exports of final IDs: token strings, semantic ID strings, the prefix trie and its JSON file."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from semid.export import prefix_trie, semantic_id_strings, token_strings, write_trie_json


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

