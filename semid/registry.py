"""The stable ID registry: every final ID handed out, by item key, saved with the model.

semid promises that an item's ID never changes once given, even as new items are encoded later. The registry
is that promise's record: new items are resolved (`semid.collisions.resolve_collisions`) against every saved
ID, and the whole registry is saved as parquet with a digest of its content, so that a changed file is noticed.
Its keys are a polars string column (about 16 bytes plus the key's length per item, where Python str objects
in an index cost 80 to 100 with the hash table), looked up by binary search in a sorted copy made at the first
lookup after a registration.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from semid.atomic import atomic_write
from semid.collisions import (
    CollisionStrategy,
    IdLengthWarning,
    LastLevelDistances,
    LevelDistances,
    PrefixFullError,
    _strategy,
    _two_equal_rows,
    resolve_collisions,
)
from semid.config import MAX_SUFFIX
from semid.io import first_repeat

_DIGEST_KEY = "semid_registry_sha256"  # parquet metadata key of `IdRegistry.content_digest`


class IdRegistry:
    """Item key (str) -> final ID (tuple of ints); saved with the model so IDs never change.

    Every ID in a registry has the same length, fixed by the first assignment (or by `id_length`):
    L + 1 with "suffix", L with "none", and L with "remap": remap keeps length L (keep_length in
    `resolve_collisions`), on a registry of length L and on a new one, so that the length follows from
    the strategy and the model rather than from whether some prefix happened to be full at fit, and a
    later call can always extend the registry by the same rule. Only a first call for which no IDs of
    length L suffice (PrefixFullError) fixes length L + 1 and falls back to suffixes. On a registry of
    length L + 1 remap falls back to suffixes where a prefix is full, and a result shorter by one (remap
    without fallback, or none) is stored with suffix 0; for remap that cannot clash, as remap only hands
    out tuples no saved ID uses ("none" promises no uniqueness at all). Suffixed IDs on a registry of
    length L raise ValueError: create the registry with id_length=L + 1 to leave room for suffixes.
    """

    def __init__(self, id_length: int | None = None) -> None:
        if id_length is not None and id_length < 1:
            raise ValueError(f"id_length must be positive, got {id_length}")
        self.id_length = id_length
        self._keys = pl.Series("key", [], dtype=pl.String)
        self._ids = np.zeros((0, id_length or 0), dtype=np.int64)
        self._sorted: tuple[pl.Series, np.ndarray] | None = None  # see _sorted_index
        self._by_id: pl.DataFrame | None = None  # see _id_table

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def keys(self) -> pl.Series:
        """The registered item keys, in registration order."""
        return self._keys

    @property
    def ids(self) -> np.ndarray:
        """The registered IDs (n, id_length), in registration order, as a read-only view."""
        view = self._ids.view()
        view.flags.writeable = False
        return view

    @contextlib.contextmanager
    def provisional(self) -> Iterator[IdRegistry]:
        """Assignments made inside are undone on exit: the IDs new items would get, without registering them.

        Registering only ever replaces the key column and ID array by longer copies, so the ones held here
        are the registry as it was.
        """
        saved = self._keys, self._ids, self.id_length, self._sorted, self._by_id
        try:
            yield self
        finally:
            self._keys, self._ids, self.id_length, self._sorted, self._by_id = saved

    def lookup(self, keys: Sequence[str] | pl.Series) -> tuple[np.ndarray, np.ndarray]:
        """(known (n,) bool, ids (n, id_length) int64 with rows of -1 for unknown keys)."""
        return self._lookup(_key_series(keys))

    def _lookup(self, keys: pl.Series) -> tuple[np.ndarray, np.ndarray]:
        rows = self._rows(keys)
        known = rows >= 0
        ids = np.full((rows.size, self._ids.shape[1]), -1, dtype=np.int64)
        ids[known] = self._ids[rows[known]]
        return known, ids

    def keys_for(self, ids: np.ndarray) -> pl.Series:
        """The key each ID (n, id_length) was given to, in order: a String Series, null for an ID no item holds.

        The inverse of `lookup`, for what a generative model emits. One join over the registry, so a batch of
        generated IDs costs one pass, not a search per ID. Under collision strategy "none" an ID can belong
        to several items; the first registered of them is returned.
        """
        ids = np.asarray(ids)
        if ids.ndim and len(ids) == 0:  # no rows (an empty batch parses to (0, 0)); (n, 0) is n IDs of no tokens
            return pl.Series("key", [], dtype=pl.String)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be a 2-D integer matrix (items x tokens), got {ids.dtype} of shape {ids.shape}")
        if len(self) and ids.shape[1] != self.id_length:
            raise ValueError(f"ids have {ids.shape[1]} tokens but this registry's IDs have {self.id_length}")
        if len(self) == 0:
            return pl.Series("key", [None] * len(ids), dtype=pl.String)
        table = self._id_table()
        columns = table.columns[:-1]
        query = pl.DataFrame(dict(zip(columns, ids.astype(np.int64, copy=False).T))).with_row_index("row")
        return query.join(table, on=columns, how="left").sort("row")["key"]

    def _id_table(self) -> pl.DataFrame:
        """One row per distinct ID (columns c0.., key), the first registered item of each, kept until the next
        registration: a pipeline looking up generated IDs batch by batch builds it once."""
        if self._by_id is None:
            columns = [f"c{j}" for j in range(self._ids.shape[1])]
            table = pl.DataFrame({**dict(zip(columns, self._ids.T)), "key": self._keys})
            self._by_id = table.unique(subset=columns, keep="first", maintain_order=True)
        return self._by_id

    def _rows(self, keys: pl.Series) -> np.ndarray:
        """The registry row of each key, -1 where the key is unknown: (n,) int64, by binary search."""
        rows = np.full(len(keys), -1, dtype=np.int64)
        if len(self._keys) == 0 or len(keys) == 0:
            return rows
        ordered, order = self._sorted_index()
        pos = np.minimum(ordered.search_sorted(keys, side="left").to_numpy(), len(ordered) - 1)  # (n,)
        hit = (ordered.gather(pos) == keys).to_numpy()
        rows[hit] = order[pos[hit]]
        return rows

    def _sorted_index(self) -> tuple[pl.Series, np.ndarray]:
        """The keys in sorted order and their registry rows, kept until the next registration.

        A lookup is then a binary search per queried key: encoding a few items against millions of saved
        ones costs microseconds, not a pass over every saved key.
        """
        if self._sorted is None:
            order = self._keys.arg_sort().to_numpy()
            self._sorted = (self._keys.gather(order), order)
        return self._sorted

    def assign(
        self,
        keys: Sequence[str] | pl.Series,
        codes: np.ndarray,
        rank_key: np.ndarray,
        strategy: CollisionStrategy | str,
        *,
        codebook_sizes: Sequence[int],
        suffix_size: int = 256,
        last_level_distances: LastLevelDistances | None = None,
        overflow: str = "raise",
        level_distances: LevelDistances | None = None,
    ) -> np.ndarray:
        """Final IDs (n, id_length) for these items, registering the new ones.

        Known keys get their saved ID whatever their codes are now. The others are resolved with
        `resolve_collisions` against each other and against every saved ID, with keep_length for remap
        as the class docstring says. The distance callbacks receive row indices into this call's codes,
        and they and `overflow` mean what they do in `resolve_collisions`.
        """
        keys = _key_series(keys)
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[0] != len(keys):
            raise ValueError(f"codes must have one row per key ({len(keys)}), got shape {codes.shape}")
        repeated = first_repeat(keys)
        if repeated is not None:
            raise ValueError(f"item keys must be unique within one call; {repeated!r} repeats")
        levels = codes.shape[1]
        if self.id_length is not None and self.id_length not in (levels, levels + 1):
            raise ValueError(f"the registry holds IDs of length {self.id_length}, which does not fit {levels} levels")
        known, ids = self._lookup(keys)
        new = np.flatnonzero(~known)
        if new.size == 0:
            return ids
        rank_key = np.asarray(rank_key)
        if rank_key.shape != (len(keys),):
            raise ValueError(f"rank_key must have one value per key, shape ({len(keys)},), got {rank_key.shape}")

        def on_new_rows(distances: Callable[..., np.ndarray] | None) -> Callable[..., np.ndarray] | None:
            # rows index codes[new]; the caller indexes codes
            return None if distances is None else lambda rows, *leading: distances(new[rows], *leading)

        def resolve(keep_length: bool) -> np.ndarray:
            return resolve_collisions(
                codes[new],
                rank_key[new],
                strategy,
                codebook_sizes=codebook_sizes,
                suffix_size=suffix_size,
                last_level_distances=on_new_rows(last_level_distances),
                taken=self._ids if len(self) else None,
                overflow=overflow,
                keep_length=keep_length,
                level_distances=on_new_rows(level_distances),
            )

        remap = _strategy(strategy) is CollisionStrategy.REMAP
        try:
            fresh = resolve(keep_length=remap and self.id_length in (None, levels))
        except PrefixFullError as full:
            if self.id_length is not None:
                raise
            fresh = resolve(keep_length=False)  # no IDs of length L suffice: this first call fixes L + 1
            warnings.warn(IdLengthWarning(
                f"collision strategy 'remap' cannot keep IDs at {levels} codes here: all {full.capacity} IDs that "
                f"start with the codes {full.codes} are taken. This registry's IDs get a suffix instead, {levels + 1} "
                "tokens each from now on; larger codebooks (quantizer.codebook_size) keep the length"
            ), stacklevel=4)
        width = self.id_length if self.id_length is not None else fresh.shape[1]
        if fresh.shape[1] > width:
            raise ValueError(
                f"collision strategy {_strategy(strategy).value!r} needs IDs of length {fresh.shape[1]} here, but the "
                f"IDs this registry handed out have length {width}: keep the strategy they were given with (a new "
                f"model's registry made as IdRegistry(id_length={fresh.shape[1]}) would leave room for suffixes)"
            )
        if fresh.shape[1] < width:
            fresh = np.column_stack([fresh, np.zeros(len(fresh), dtype=np.int64)])
        if self.id_length is None:  # the first assignment fixes the length
            self.id_length = width
            self._ids = np.zeros((0, width), dtype=np.int64)
            ids = np.full((len(keys), width), -1, dtype=np.int64)
        ids[new] = fresh
        self._append(keys if new.size == len(keys) else keys.gather(new), fresh)
        return ids

    def _append(self, keys: pl.Series, ids: np.ndarray) -> None:
        """Register new keys. The key column grows by one chunk, without copying the keys held before."""
        self._keys = pl.concat([self._keys, keys.rename("key")], rechunk=False)
        self._ids = np.concatenate([self._ids, ids])
        self._sorted = self._by_id = None

    def to_frame(self) -> pl.DataFrame:
        """The registry as a polars frame: key (str), id (list[int64])."""
        return pl.DataFrame({"key": self._keys, "id": pl.Series("id", self._ids).cast(pl.List(pl.Int64))})

    def save(self, path: str | os.PathLike) -> Path:
        """Write the registry as parquet (columns key, id), atomically, with the digest of its content in the
        file's metadata (`content_digest`), which `load` checks."""
        frame, digest = self.to_frame(), self.content_digest()
        atomic_write(path, lambda tmp: frame.write_parquet(tmp, metadata={_DIGEST_KEY: digest}))
        return Path(path)

    def content_digest(self) -> str:
        """SHA-256 of the keys and IDs in registration order.

        Why: parquet readers do not check page checksums, and a flipped bit inside the value range changes an
        item's ID or key silently (most single-bit flips of a registry did, in an audit); `check_ids` sees only
        what no model could have given. Computed from the values, not the file's bytes, so it does not depend
        on how a polars version encodes or compresses them. 4M items: about 0.3 s.
        """
        digest = hashlib.sha256(f"{self.id_length}:{len(self)}:".encode())
        if len(self):
            digest.update(self._keys.str.len_bytes().to_numpy().astype("<u4").tobytes())
            digest.update(self._keys.str.join("").item().encode())
            digest.update(np.ascontiguousarray(self._ids, dtype="<i8").tobytes())
        return digest.hexdigest()

    def check_ids(self, codebook_sizes: Sequence[int], unique: bool) -> None:
        """Raise ValueError where an ID is not one this model can have handed out: a code outside its level's
        codebook, a suffix outside [0, MAX_SUFFIX) or more than one suffix, or (`unique`: any strategy but
        "none") one ID held by two items. A damaged or edited registry would otherwise give items IDs that no
        decoder knows, or two items one ID. Suffixes are bounded by the largest suffix_size a config may set,
        not the model's own: a user may lower it after IDs above it were handed out (`token_vocabulary`).
        """
        if not len(self):
            return
        ids, levels = self._ids, len(codebook_sizes)
        if not levels <= ids.shape[1] <= levels + 1:
            raise ValueError(f"its IDs have {ids.shape[1]} tokens, but the model's have {levels} codes and at most "
                             "one suffix")
        limits = np.array([*codebook_sizes, MAX_SUFFIX][: ids.shape[1]], dtype=np.int64)
        bad = (ids < 0) | (ids >= limits)
        if bad.any():
            row, col = (int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"the ID of item {self._keys[row]!r} holds {ids[row, col]} at position {col + 1}, "
                             f"outside [0, {limits[col]})")
        if unique and (rows := _two_equal_rows(ids, limits)) is not None:
            raise ValueError(f"items {self._keys[rows[0]]!r} and {self._keys[rows[1]]!r} hold one ID, "
                             f"{ids[rows[0]].tolist()}")

    @classmethod
    def load(cls, path: str | os.PathLike) -> IdRegistry:
        """Read a registry written by `save`. An empty file gives a registry without a fixed length."""
        frame = pl.read_parquet(path, glob=False)
        if {"key", "id"} - set(frame.columns):
            raise ValueError(f"{path} is not an ID registry: it needs columns 'key' and 'id', has {frame.columns}")
        if not isinstance(frame.schema["id"], pl.List):
            raise ValueError(f"{path}: column 'id' must hold lists of integers, found {frame.schema['id']}")
        lengths = frame["id"].list.len().unique()
        if len(lengths) > 1:
            raise ValueError(f"{path} holds IDs of different lengths {sorted(lengths.to_list())}")
        registry = cls(int(lengths[0]) if len(lengths) else None)
        if len(frame):
            keys = _key_series(frame["key"])
            repeated = first_repeat(keys)
            if repeated is not None:
                raise ValueError(f"{path} lists the key {repeated!r} more than once")
            registry._keys = keys.rename("key")
            registry._ids = frame["id"].list.to_array(registry.id_length).to_numpy().astype(np.int64)
        saved = pl.read_parquet_metadata(path).get(_DIGEST_KEY)  # none in registries of an earlier semid
        if saved is not None and saved != registry.content_digest():
            raise ValueError(f"{path}: its content does not match the digest it was saved with")
        return registry


def _key_series(keys: Sequence[str] | pl.Series) -> pl.Series:
    """Item keys as a polars string Series, checked to be strings (no nulls).

    A numpy str array converts without a Python object per key; other sequences are converted strictly,
    so that a number among the keys is an error rather than a key that looks like it.
    """
    if isinstance(keys, pl.Series):
        series = keys
    else:
        values = keys if isinstance(keys, np.ndarray) else np.asarray(keys, dtype=object)
        if values.ndim != 1:
            raise ValueError(f"item keys must be a flat sequence of strings, got shape {values.shape}")
        if values.dtype.kind not in "OU":
            raise ValueError(f"item keys must be strings, got {values.dtype} values")
        try:
            series = pl.Series("key", values, dtype=pl.String, strict=True)
        except (TypeError, pl.exceptions.PolarsError) as e:
            raise ValueError(f"item keys must be strings: {e}") from None
    if series.dtype != pl.String:
        raise ValueError(f"item keys must be strings, got {series.dtype} values")
    if series.null_count():
        raise ValueError(f"item keys must be strings, got {series.null_count()} missing values")
    return series
