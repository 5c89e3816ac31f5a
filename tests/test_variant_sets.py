"""Tests of scripts/make_variant_sets.py: the derived sets the default is checked on must be what they claim."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import make_variant_sets as mv  # noqa: E402


def test_interaction_factors_reproduce_the_item_co_occurrence_matrix(tmp_path: Path) -> None:
    """At A's rank, U S (U S)^T is A A^T, the items' shared-user counts; repeats of an item count once.

    u3 consumed what u1 did, so the 5 x 4 matrix A has rank 3, which 3 factors hold exactly.
    """
    lines = ["u0\t0 1 1 2", "u1\t1 3", "u2\t0 3 4", "u3\t3 1"]
    (tmp_path / "seq.txt").write_text("\n".join(lines) + "\n")
    factors = mv.interaction_factors(tmp_path / "seq.txt", n_items=5, dim=3)
    assert factors.shape == (5, 3)
    a = np.zeros((5, 4))
    for user, line in enumerate(lines):
        for row in line.split("\t")[1].split():
            a[int(row), user] = 1.0
    assert np.linalg.matrix_rank(a) == 3
    np.testing.assert_allclose(factors @ factors.T, a @ a.T, atol=1e-6)


def test_text_lsa_places_texts_that_share_words_closer() -> None:
    texts = ["red lipstick matte", "red lipstick gloss", "matte red lipstick", "hair shampoo dry",
             "dry hair shampoo", "shampoo for dry hair", "nail polish red", "nail polish clear"]
    vectors = mv.text_lsa(texts, dim=3)
    assert vectors.shape == (8, 3)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = unit @ unit.T
    assert similarity[0, 2] > similarity[0, 3]  # two lipsticks are closer than a lipstick and a shampoo
    assert similarity[3, 4] > similarity[3, 1]


def test_subsets_are_seeded_distinct_rows_in_order() -> None:
    x = {"a": np.arange(40, dtype=np.float32).reshape(20, 2), "b": np.ones((5, 3), np.float32)}
    first, again = mv.subsets(x, {"a": 7, "b": 5}), mv.subsets(x, {"a": 7, "b": 5})
    assert set(first) == {"a-7", "b-5"}
    np.testing.assert_array_equal(first["a-7"], again["a-7"])
    rows = first["a-7"][:, 0] / 2
    assert len(set(rows)) == 7 and np.all(np.diff(rows) > 0)  # distinct rows of a, in their original order
    assert not np.array_equal(first["a-7"], mv.subsets(x, {"a": 7}, seed=1)["a-7"])
