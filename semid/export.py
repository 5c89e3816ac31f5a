"""Turning final semantic IDs into what downstream models consume.

A generative recommender reads IDs either as token strings (one vocabulary entry per level and
code, so that code 7 at level 1 and code 7 at level 2 are different tokens) or as plain strings that
name an item. Constrained decoding additionally needs the prefix trie: at every step, which tokens
can follow what has been generated so far without leaving the catalogue. What the model generates comes
back through the parsers, as ID rows that `SemanticIdTokenizer.items_for` turns into items.

All builders work column-wise (polars string concatenation, one sort for the trie) rather than per
item, so catalogues of millions of IDs stay cheap.
"""
from __future__ import annotations

import json
import numbers
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from semid.atomic import atomic_write

LEVEL_PREFIXES = "abcdefghijklmnopqrstuvwxyz"


def _as_id_matrix(ids: np.ndarray) -> np.ndarray:
    """Validate final IDs: a 2-D integer matrix (n, w) with non-negative entries."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"ids must be a 2-D matrix (items x tokens), got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
    if ids.size and ids.min() < 0:
        raise ValueError("ids must be non-negative; found a negative code")
    return ids.astype(np.int64, copy=False)


def _concat_columns(ids: np.ndarray, pieces: Callable[[int, pl.Expr], list[pl.Expr]], separator: str) -> list[str]:
    """Build one string per row from per-column expressions, in a single polars pass."""
    frame = pl.DataFrame({f"c{j}": ids[:, j] for j in range(ids.shape[1])})
    if ids.shape[1] == 0:
        return [""] * ids.shape[0]
    exprs = [e for j in range(ids.shape[1]) for e in pieces(j, pl.col(f"c{j}").cast(pl.Utf8))]
    return frame.select(pl.concat_str(exprs, separator=separator).alias("s"))["s"].to_list()


def _check_prefixes(prefixes: str) -> None:
    """Level letters must keep a token readable: distinct characters, none of them a digit, whitespace or
    one of the token's own marks "<", "_" and ">"."""
    if not isinstance(prefixes, str) or not prefixes:
        raise ValueError(f"prefixes must be a non-empty string of level letters, got {prefixes!r}")
    bad = [c for c in prefixes if c.isdigit() or c.isspace() or c in "<_>"]
    if bad or len(set(prefixes)) != len(prefixes):
        raise ValueError(f"prefixes must be distinct characters other than digits, whitespace, '<', '_' and '>'; "
                         f"got {prefixes!r}")


def token_strings(ids: np.ndarray, prefixes: str = LEVEL_PREFIXES) -> list[str]:
    """One string of level-tagged tokens per item, e.g. [12, 201, 7, 0] -> "<a_12><b_201><c_7><d_0>".

    Position j uses the letter prefixes[j], so the same code at different levels is a different token.
    """
    _check_prefixes(prefixes)
    ids = _as_id_matrix(ids)
    if ids.shape[1] > len(prefixes):
        raise ValueError(f"ids have {ids.shape[1]} tokens but only {len(prefixes)} level prefixes were given")
    return _concat_columns(ids, lambda j, col: [pl.lit(f"<{prefixes[j]}_"), col, pl.lit(">")], separator="")


def token_vocabulary(sizes: Sequence[int], prefixes: str = LEVEL_PREFIXES) -> list[str]:
    """Every token an ID can hold, position by position: "<a_0>" .. "<a_{K-1}>", then "<b_0>" ...

    sizes[j] is how many values position j takes (a level's codebook size, or the suffix bound). An LLM
    recommender adds these to its text tokenizer, one embedding row each, before it learns to emit IDs.
    The list holds every code rather than the codes in use, so that it stays the same as items arrive.
    """
    _check_prefixes(prefixes)
    sizes = [int(k) for k in sizes]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"sizes must give a positive number of values per token position, got {sizes}")
    if len(sizes) > len(prefixes):
        raise ValueError(f"{len(sizes)} token positions but only {len(prefixes)} level prefixes were given")
    return [f"<{letter}_{code}>" for letter, k in zip(prefixes, sizes) for code in range(k)]


def token_numbers(ids: np.ndarray, sizes: Sequence[int], *, offset: int = 0) -> np.ndarray:
    """(n, w) IDs -> (n, w) int64 token numbers: each token's index in `token_vocabulary(sizes)`, plus `offset`
    (the id of the first added token, for an LLM). What a seq2seq retriever with its own vocabulary trains on;
    `semid.decoding.PrefixIndex.codes` is the way back."""
    ids = _as_id_matrix(ids)
    sizes = [int(k) for k in sizes]
    if ids.shape[1] != len(sizes):
        raise ValueError(f"ids have {ids.shape[1]} tokens but {len(sizes)} sizes were given")
    over = ids >= np.asarray(sizes)
    if over.any():
        row, position = map(int, np.argwhere(over)[0])
        raise ValueError(f"row {row} has code {ids[row, position]} at position {position}, outside its "
                         f"{sizes[position]} values")
    return ids + np.cumsum([offset, *sizes[:-1]])


def semantic_id_strings(ids: np.ndarray) -> list[str]:
    """One dash-joined string per item, e.g. [12, 201, 7, 0] -> "12-201-7-0" (the `semantic_id` column)."""
    return _concat_columns(_as_id_matrix(ids), lambda j, col: [col], separator="-")


def id_table(item_ids: Sequence[object] | pl.Series, ids: np.ndarray) -> pl.DataFrame:
    """`item_id, codes, semantic_id, tokens`: the table `semid encode` writes, for items encoded in Python.

    `item_ids` keep their type (a polars Series, or any sequence polars can type), so the table joins back
    onto the catalogue it came from.
    """
    ids = _as_id_matrix(ids)
    if not isinstance(item_ids, pl.Series):  # a numpy array keeps its dtype; any other sequence is typed by polars
        item_ids = pl.Series(item_ids if isinstance(item_ids, np.ndarray) else list(item_ids))
    if len(item_ids) != len(ids):
        raise ValueError(f"{len(item_ids)} item ids for {len(ids)} IDs: give one item id per ID row")
    return pl.DataFrame({
        "item_id": item_ids.alias("item_id"),
        "codes": pl.Series(ids).cast(pl.List(pl.Int64)),
        "semantic_id": pl.Series(semantic_id_strings(ids), dtype=pl.String),
        "tokens": pl.Series(token_strings(ids), dtype=pl.String),
    })


def _string_series(strings: Sequence[str] | pl.Series, what: str) -> pl.Series:
    if isinstance(strings, (str, bytes)):
        raise ValueError(f"{what} must be a sequence of strings, one per ID, not a single string: wrap it in a list")
    if not isinstance(strings, pl.Series):
        values = list(strings)
        row = next((i for i, v in enumerate(values) if v is not None and not isinstance(v, str)), None)
        if row is not None:
            raise ValueError(f"{what} must be strings; row {row} is {type(values[row]).__name__} {values[row]!r}")
        return pl.Series(what, values, dtype=pl.String)
    if strings.dtype != pl.String:
        raise ValueError(f"{what} must be strings, got {strings.dtype}")
    return strings


def _parsed(series: pl.Series, codes: pl.Series, what: str, example: str, width: int | None) -> np.ndarray:
    """The (n, w) int64 rows of `codes` (a list of digit strings per row, null where a row is malformed).

    Without `width` every row must parse, all to one length, and the first that does not is named. With it
    (the model's `id_length`) a row that is malformed, of another length, or holds a code too large for int64
    comes back as a row of -1, which no ID holds: `items_for` names no item for it and `decode` refuses it.
    """
    strict = width is None
    if not strict and (isinstance(width, bool) or not isinstance(width, numbers.Integral) or width < 1):
        raise ValueError(f"width must be a positive int (the tokens of an ID, tok.id_length), got {width!r}")
    if len(series) == 0:  # an empty batch: (0, 0), or (0, width)
        return np.zeros((0, width or 0), dtype=np.int64)
    lengths = codes.list.len().fill_null(-1).to_numpy()  # -1: malformed
    if strict:
        malformed = lengths < 0
        if malformed.any():
            row = int(np.argmax(malformed))
            raise ValueError(f"{what}: row {row} ({series[row]!r}) is not of the form {example}"
                             f"{f' ({int(malformed.sum())} such rows)' if malformed.sum() > 1 else ''}")
        width = int(lengths[0])
        if (lengths != width).any():
            row = int(np.argmax(lengths != width))
            raise ValueError(f"{what}: row {row} ({series[row]!r}) has {lengths[row]} codes but row 0 has {width}; "
                             "every ID has the same length")
    kept = np.flatnonzero(lengths == width)
    flat = codes.gather(kept).explode().cast(pl.Int64, strict=False)  # a code too large for int64 becomes null
    too_large = flat.is_null().to_numpy().reshape(len(kept), width).any(axis=1)
    if strict and too_large.any():
        row = int(kept[np.argmax(too_large)])
        raise ValueError(f"{what}: row {row} ({series[row]!r}) holds a code too large for a 64-bit integer")
    out = np.full((len(series), width), -1, dtype=np.int64)  # writable, unlike some polars views
    out[kept[~too_large]] = flat.fill_null(-1).to_numpy().reshape(len(kept), width)[~too_large]
    return out


def parse_token_strings(strings: Sequence[str] | pl.Series, prefixes: str = LEVEL_PREFIXES, *,
                        width: int | None = None) -> np.ndarray:
    """(n, w) int64 IDs from token strings, the inverse of `token_strings`: "<a_12><b_201><c_7><d_0>" -> [12, 201,
    7, 0].

    For what a generative model emits: whitespace between tokens (as detokenisers insert) is allowed, but
    the tokens must carry the level letters in order from the first, so a sequence that skips or repeats
    a level is refused rather than read as another item's ID. Every string must hold the same number of
    tokens; ValueError names the first row that does not parse. A generative model's unconstrained output
    has such rows: pass `width=tok.id_length` to get them back as rows of -1 instead, which `tok.items_for`
    maps to null.
    """
    _check_prefixes(prefixes)
    series = _string_series(strings, "token strings")
    stripped = series.str.replace_all(r">\s+<", "><").str.strip_chars()  # whitespace between tokens only
    letters = "".join(re.escape(p) for p in prefixes)
    well_formed = stripped.str.contains(f"^(?:<[{letters}]_[0-9]+>)+$")  # ASCII digits: int() of others differs
    letters_used = stripped.str.replace_all(r"_[0-9]+>", "").str.replace_all("<", "")  # "abcd" for a good row
    in_order = pl.select(pl.lit(prefixes).str.starts_with(letters_used)).to_series()  # prefixes[0], [1], ...
    codes = stripped.str.extract_all(r"_[0-9]+").list.eval(pl.element().str.slice(1))  # the digits after "_"
    codes = pl.select(pl.when(well_formed & in_order).then(codes)).to_series()
    example = f"<{prefixes[0]}_12>" + (f"<{prefixes[1]}_201>..." if len(prefixes) > 1 else "")
    return _parsed(series, codes, "token strings", example, width)


def parse_semantic_id_strings(strings: Sequence[str] | pl.Series, *, width: int | None = None) -> np.ndarray:
    """(n, w) int64 IDs from dash-joined strings, the inverse of `semantic_id_strings`: "12-201-7-0" -> [12, 201,
    7, 0]. Every string must hold the same number of codes; ValueError names the first row that does not parse
    (with `width`, such rows come back as rows of -1, as in `parse_token_strings`)."""
    series = _string_series(strings, "semantic ID strings")
    stripped = series.str.strip_chars()
    codes = pl.select(pl.when(stripped.str.contains(r"^[0-9]+(?:-[0-9]+)*$")).then(stripped.str.split("-"))).to_series()
    return _parsed(series, codes, "semantic ID strings", "12-201-7-0", width)


def prefix_trie(ids: np.ndarray, *, string_keys: bool = False) -> dict:
    """Valid next tokens after every prefix of the given IDs, for constrained decoding.

    Format: a dict mapping each prefix that occurs (lengths 0 .. w-1, w = tokens per ID) to the
    sorted list of distinct codes (ints) that follow it in at least one ID. Complete IDs are not keys;
    a decoder stops after w tokens. Keys are tuples of ints, the root being (); with
    `string_keys=True` they are dash-joined strings ("" for the root, "12-201" for (12, 201)), which is
    the JSON-serialisable variant written by `write_trie_json`.

    Built from one lexicographic sort of the IDs; each depth's nodes are the rows where the sorted
    prefix changes, so the Python work is per trie node, never per item.
    """
    ids = _as_id_matrix(ids)
    n, width = ids.shape
    if n == 0 or width == 0:
        return {}
    srt = ids[np.lexsort(ids.T[::-1])]  # (n, w), rows in lexicographic order
    # new_node[i, d]: sorted row i starts a new prefix of length d + 1 (differs from row i-1 in a column <= d)
    new_node = np.ones((n, width), dtype=bool)
    new_node[1:] = np.logical_or.accumulate(srt[1:] != srt[:-1], axis=1)
    trie: dict = {}
    for depth in range(width):
        starts = np.flatnonzero(new_node[:, depth])  # one row per distinct prefix of length depth + 1
        if depth == 0:
            parent_start = np.zeros(1, dtype=np.int64)
        else:
            parent_start = np.flatnonzero(new_node[starts, depth - 1])  # children of one parent are contiguous
        parents = srt[starts[parent_start], :depth]  # (p, depth)
        keys = semantic_id_strings(parents) if string_keys else map(tuple, parents.tolist())
        kids = srt[starts, depth].tolist()
        bounds = [*parent_start.tolist(), len(kids)]
        trie.update(zip(keys, (kids[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:]))))
    return trie


def write_trie_json(ids: np.ndarray, path: str | os.PathLike) -> Path:
    """Write `prefix_trie(ids, string_keys=True)` as compact JSON (tries get large), atomically."""
    text = json.dumps(prefix_trie(ids, string_keys=True), separators=(",", ":"))
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return Path(path)


def write_vocabulary(tokens: Sequence[str], path: str | os.PathLike) -> Path:
    """Write tokens (see `token_vocabulary`) one per line, the form text tokenizers' add-tokens scripts read,
    atomically."""
    text = "".join(f"{token}\n" for token in tokens)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return Path(path)
