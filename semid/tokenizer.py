"""`SemanticIdTokenizer`: the object a recommendation pipeline holds.

fit -> encode -> decode / evaluate -> save / load, in the scikit-learn manner. It owns the trained model
and the ID registry, which is what makes IDs stable: an item that has an ID keeps it forever, and a new
item is resolved against every ID handed out before.

Items are identified by their ids when the input has them (a DataFrame's id column, or `ids=`). A bare
matrix has none, so each row is identified by a digest of its embedding bytes plus its occurrence
number among identical rows of that call: encoding the same matrix twice gives the same IDs, and a row
seen in `fit` keeps its ID when it comes back inside a larger matrix.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from semid import installed_version
from semid.atomic import output_error, probe_writable
from semid.collisions import SuffixOverflowError
from semid.config import ConfigError, SemidConfig
from semid.decoding import PrefixIndex
from semid.device import device_available, resolve_device
from semid.export import id_table, token_numbers, token_vocabulary, write_trie_json
from semid.kmeans import sinkhorn_assign
from semid.io import (
    InputError,
    ParquetShardWriter,
    check_trainable_scale,
    to_numpy_embeddings,
    validate_ids,
    write_json_atomic,
)
from semid.metrics import (
    OUTLIER_NORM_RATIO,
    duplicate_group_sizes,
    evaluate_codes,
    is_heavy_tailed,
    outlier_rows,
    squared_from_mean,
    top_share,
)
from semid.modeldir import (
    FILES,
    MODEL_FORMAT,
    ModelDirError,
    check_save_target,
    file_stamp,
    is_model_dir,
    present_or_raise,
    registry_lock,
    replace_dir,
    staging_dir,
)
from semid.registry import IdRegistry
from semid.rqvae import RQVAE
from semid.sources import (
    InputFiles,
    check_unique_ids_of,
    count_items,
    input_files,
    iter_item_batches,
    parquet_column_type,
    read_rows,
)
from semid.train import Trainer, load_tensors, save_tensors, weights_problem

# Rows per encode block: on a CPU a block is a view of the input, sized as in semid.rqvae to bound the
# activations; on a GPU each block is one host-to-device copy.
_CPU_BLOCK_ROWS = 16384
_DEVICE_BLOCK_ROWS = 65536
# Rows per slice of an output table: bounds the memory of its per-item strings.
_OUTPUT_SLICE_ROWS = 1 << 18

def row_digests(x: np.ndarray) -> list[str]:
    """A short digest of each row's bytes: the identity of an item that comes without an id."""
    return [hashlib.blake2b(row.tobytes(), digest_size=12).hexdigest() for row in np.ascontiguousarray(x)]


_CONTENT_KEY = r"^[0-9a-f]{24}#\d+$"  # what content_keys makes


def content_keys(digests: Sequence[str] | pl.Series) -> pl.Series:
    """Item keys from row digests; the k-th repeat of identical rows gets '#k', so keys are unique."""
    frame = pl.DataFrame({"d": digests}, schema={"d": pl.String})
    keys = pl.col("d") + "#" + pl.int_range(pl.len()).over("d").cast(pl.String)
    return frame.select(keys.alias("key"))["key"]


def write_id_table(item_ids: pl.Series, ids: np.ndarray, out: str | os.PathLike) -> None:
    """Write `item_id, codes, semantic_id, tokens` parquet atomically, _OUTPUT_SLICE_ROWS rows at a time.

    The semantic_id and token strings are made per slice, so a catalogue of millions of items never holds
    them (as Python strings, then as columns) for all items at once.
    """
    with ParquetShardWriter(out) as writer:
        for start in range(0, len(ids), _OUTPUT_SLICE_ROWS):
            part = ids[start : start + _OUTPUT_SLICE_ROWS]
            writer.write(id_table(item_ids.slice(start, len(part)), part))


# Files of a model directory that never change after saving (the registry grows), by their digest's key in meta.json.
_DIGESTED = {"config.toml": "config_sha256", "model.pt": "weights_sha256"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_digest(root: Path, meta: dict[str, Any], name: str) -> None:
    """Refuse a file of a model directory that is not the one saved with it. Models saved before the digest
    existed have none, and load as before."""
    digest_key = _DIGESTED[name]
    if digest_key in meta and meta[digest_key] != _sha256(root / name):
        raise ModelDirError(f"{root}/{name} is not the file this model was saved with: it does not match the digest "
                            "meta.json records for it (one of the two was replaced, edited or truncated)")


def _host_ids(ids: Any) -> np.ndarray:
    """IDs or codes as a numpy array, from anything array-like: a generative model's output tensor may be on a
    GPU, the `codes` column of `semid encode`'s output is a polars list column, and whole numbers that came
    through a float column (pandas, JSON) become integers again."""
    if isinstance(ids, pl.Series) and isinstance(ids.dtype, (pl.List, pl.Array)):
        codes = ids.explode() if isinstance(ids.dtype, pl.List) else ids.arr.explode()  # (n * w,), its own dtype
        ragged = isinstance(ids.dtype, pl.List) and ids.list.len().n_unique() > 1
        if ids.null_count() or codes.null_count() or ragged:
            raise InputError(f"the ID column {ids.name!r} must hold one ID of the same length in every row, "
                             f"with no missing codes")
        ids = codes.to_numpy().reshape(len(ids), -1) if len(ids) else np.zeros((0, 0), dtype=np.int64)
    ids = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    if ids.dtype.kind == "f" and np.isfinite(ids).all() and (ids == np.round(ids)).all():
        ids = ids.astype(np.int64)
    return ids


class UnnamedItemsWarning(UserWarning):
    """Rows keyed otherwise than the registry knows its items: without ids where it knows them by id, or with
    ids where it knows them by embedding (see `_item_keys`). Known items then get new IDs."""


class HeavyTailWarning(UserWarning):
    """A few items hold most of the catalogue's variance, and training samples uniformly (see `fit`)."""


class OutlierRowsWarning(UserWarning):
    """A few rows lie orders of magnitude farther out than the rest, as rows not normalised like the others do
    (see `fit`): they decide the training, and every other item's codes with it."""


class SemanticIdTokenizer:
    """Learns semantic IDs for item embeddings and hands out unique, stable IDs."""

    def __init__(self, config: SemidConfig | None = None) -> None:
        """`config` defaults to semid's recipe, `configs/default.toml` (`SemidConfig.default()`)."""
        self.config = config or SemidConfig.default()
        self.model: RQVAE | None = None
        self.registry = IdRegistry()
        self.history: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {}
        # The model directory whose registry this one was read from or written to, and that file's stamp
        # then: `save_registry` refuses to overwrite a registry that changed since.
        self._registry_source: tuple[Path, list[int] | None] | None = None

    @classmethod
    def from_config(cls, config: str | os.PathLike | SemidConfig, overrides: dict[str, Any] | None = None):
        base = config if isinstance(config, SemidConfig) else SemidConfig.load(config)
        return cls(base.with_overrides(overrides))

    # ---- fitting ------------------------------------------------------------------------------
    def fit(
        self,
        x: Any,
        ids: Sequence[str] | None = None,
        *,
        id_col: str | None = "item_id",
        emb_col: str = "embedding",
        checkpoint: str | os.PathLike | None = None,
        resume: bool = False,
    ) -> "SemanticIdTokenizer":
        """Train on the items and give each of them its final ID.

        Fitting starts a new model and a new registry: a fitted or loaded tokenizer forgets the IDs it held
        (their directory keeps them), and `save` writes the new model to a directory of its own.

        `checkpoint` names a resumable training checkpoint (written every `train.checkpoint_every` steps);
        with resume=True training continues from it. A code tuple with more items than
        collisions.suffix_size can number does not lose the training: its extra items are remapped, with a
        SuffixOverflowWarning (see `_resolve`). A catalogue whose variance sits in a few items (heavy-tailed
        norms) gets a HeavyTailWarning before training unless the autoencoder draws its batches by norm
        (train.norm_sampling), without which such items are coded badly.
        """
        keys, emb = self._items(x, ids, id_col, emb_col, for_registry=False)  # a new registry: no warning
        if len(emb) < 2:
            raise InputError(f"fit needs at least two items to tell apart, got {len(emb)}")
        check_trainable_scale(emb)
        if not np.ptp(emb, axis=0).any():
            raise InputError(f"all {len(emb)} embeddings are the same vector: nothing tells the items apart")
        self._check_room_for_ids(emb)
        norms = squared_from_mean(emb, centred=False)  # (n,) squared
        if len(far := outlier_rows(norms)):
            ratio = float(np.sqrt(norms[far].max() / np.median(norms)))
            warnings.warn(OutlierRowsWarning(
                f"{len(far)} rows are over {OUTLIER_NORM_RATIO:,.0f}x as long as the median row (up to {ratio:,.0f}x; "
                f"first: row {int(far[0])}), beyond even collaborative factors' spread (about 100x): rows on another "
                "scale than the rest (not normalised like them?) decide the training, and the other items crowd a "
                "few codes; fix or drop them"
            ), stacklevel=2)
        autoencoder = self.config.model.type == "rqvae"
        drawn_by_norm = autoencoder and self.config.train.norm_sampling > 0
        if not drawn_by_norm and is_heavy_tailed(share := top_share(squared_from_mean(emb)), len(emb)):
            why = ("training draws batches uniformly: few of those items reach each batch, and semid reconstructs "
                   "them badly (fvu 0.29 on Beauty's item factors against FAISS RQ's 0.05). Train the autoencoder "
                   "with train.norm_sampling = 0.5 (configs/default.toml)" if autoencoder else
                   "residual k-means gives them codes by direction with many small items, and reconstructs them "
                   "badly (fvu 0.33 on Beauty's item factors against FAISS RQ's 0.05). Use model.type = \"rqvae\" "
                   "with train.norm_sampling = 0.5 (configs/default.toml)")
            warnings.warn(HeavyTailWarning(
                f"the top 1% of items hold {share:.0%} of the embeddings' variance (heavy-tailed norms, as in "
                f"collaborative-filtering factors), and {why}, which draws such items more often and reached 0.03 "
                "there (bench/VARIANTS.md); or unit-normalise the rows if direction alone should group items"
            ), stacklevel=2)
        trainer = Trainer(self.config, torch.tensor(emb), checkpoint_path=checkpoint)
        self.model = trainer.fit(resume=resume)
        # self.config stays the recipe as given: train.steps is a floor that min_epochs raises per catalogue, so a
        # later fit of this tokenizer on another catalogue resolves its own steps, as a fresh tokenizer would.
        self.history = trainer.state.history
        self.meta = {
            "input_dim": int(emb.shape[1]),
            "n_train_items": int(emb.shape[0]),
            "train_steps": trainer.config.train.steps,
            "train_fingerprint": trainer.data_fingerprint,
            "best_step": trainer.state.best_step,
            # where and how it trained: the same seed gives the same model only on the same kind of device
            "train_device": trainer.device.type,
            "train_precision": "bf16 autocast" if trainer.use_amp else "fp32",
            "dead_code_resets": trainer.state.dead_code_resets,
            "final": trainer.state.final,
        }
        self.registry = IdRegistry()
        self._registry_source = None  # a new model: no saved directory's registry is this one
        try:
            self._assign(keys, emb)
        except SuffixOverflowError as e:
            raise SuffixOverflowError(
                f"{e}. The trained model is kept: set "
                "tok.config = tok.config.with_overrides({'collisions.suffix_size': ...}) and call tok.encode(...), "
                "or tok.save(...) it as it is",
                size=e.size, codes=e.codes, suffix_size=e.suffix_size,
            ) from e
        return self

    # ---- encoding -----------------------------------------------------------------------------
    def _check_room_for_ids(self, emb: np.ndarray) -> None:
        """Fail before training where the catalogue, or identical embeddings in it, are certain to exhaust
        the IDs the config can give.

        Every ID is a code tuple, with a suffix below collisions.suffix_size at most, so no catalogue larger
        than the product of the codebook sizes times suffix_size fits. Identical rows get one code tuple. A
        prefix numbers at most K_last x collisions.suffix_size items (its tuples' suffixes); remap can instead
        keep length L by moving items to the K_(L-1) x K_last tuples under their first L - 2 codes, and takes
        whichever of the two holds more. Catalogues meet this through placeholder items, thousands of empty
        descriptions with one embedding; found after training, it would cost the run.
        """
        c, sizes = self.config.collisions, self.config.quantizer.sizes()
        if c.strategy == "none":
            return
        capacity = math.prod(sizes) * c.suffix_size
        if len(emb) > capacity:
            raise InputError(f"{len(emb):,} items need distinct IDs, but codebook sizes {sizes} with "
                             f"collisions.suffix_size = {c.suffix_size} give at most {capacity:,}: use more "
                             "levels (quantizer.levels), larger codebooks or a larger suffix_size")
        rooms = {"last-level codes x collisions.suffix_size": (sizes[-1], c.suffix_size)}
        if c.strategy == "remap" and len(sizes) > 1:
            rooms["codes of the last two levels"] = (sizes[-2], sizes[-1])
        how, (a, b) = max(rooms.items(), key=lambda item: item[1][0] * item[1][1])
        largest = int(duplicate_group_sizes(emb).max())
        if largest > a * b:
            raise InputError(
                f"{largest} items share one embedding exactly, more than the {a * b} IDs that collision strategy "
                f"{c.strategy!r} can give one tuple's items ({how} = {a} x {b}): drop the duplicates "
                "(placeholder items?) or raise collisions.suffix_size"
            )

    def encode(self, x: Any, ids: Sequence[str] | None = None, *, id_col: str | None = "item_id",
               emb_col: str = "embedding") -> np.ndarray:
        """Final IDs (n, L + s): saved IDs for known items, fresh collision-free IDs for new ones."""
        keys, emb = self._items(x, ids, id_col, emb_col)
        return self._assign(keys, emb)

    def encode_file(self, path: str | os.PathLike | InputFiles, out: str | os.PathLike, *, batch_size: int = 65536,
                    id_col: str | None = "item_id", emb_col: str = "embedding", progress: bool | None = None,
                    trie: str | os.PathLike | None = None,
                    save_registry_to: str | os.PathLike | None = None) -> dict[str, Any]:
        """Stream a .npy or parquet catalogue in batches and write `item_id, codes, semantic_id, tokens` parquet.

        `path` is one file, or a directory or glob pattern of parquet parts (`exports/items/`,
        `'exports/part-*.parquet'`), read as one table in natural path order (`semid.sources.input_files`).

        `tokens` is the LLM token string (`<a_12><b_201><c_7><d_0>`); `trie` also writes the prefix trie of the
        IDs as JSON, for constrained decoding. `item_id` keeps the input's id type (integers stay integers).
        `progress` shows a bar, by default only where stderr is a terminal (a log gets no redraws).

        `save_registry_to` (a model directory) saves the registry there when items are new, before any output
        is written: an output whose IDs were never recorded would let a later encode hand them out again.

        Embeddings are held one batch at a time; only the codes, rank keys and ids of all items stay in
        memory for the global collision pass, ids as one polars string column. The output is written in
        slices and appears atomically. Items of a .npy file, or of a parquet read with id_col=None, are
        identified by content and reported by row number.
        """
        model = self._fitted()
        if Path(out).suffix.lower() != ".parquet":
            raise InputError(f"the output {out} must be a .parquet file")
        source = input_files(path)  # listed once: every pass below reads the same parts
        if source.would_read(out):  # as the CLI compares paths: a symlink is its target
            what = f"would be read as a part of the input {source}" if source.in_parts else "is the input file"
            raise InputError(f"the output {out} {what}; write the IDs to another path")
        try:  # now, not after the encode and the registry save
            probe_writable(out)
        except OSError as exc:
            raise (output_error(exc, out) or exc) from None
        id_col = None if source.is_npy else id_col  # None: rows without ids, known by content
        n = count_items(source, id_col=id_col, emb_col=emb_col)
        batches = iter_item_batches(source, batch_size, id_col=id_col, emb_col=emb_col,
                                    expected_dim=self.meta.get("input_dim"))
        key_parts, code_parts, rank_parts = [], [], []
        shown = sys.stderr.isatty() if progress is None else progress
        for table in tqdm(batches, total=-(-n // batch_size), disable=not shown, desc="encode", unit="batch"):
            c, r = self._raw(table.embeddings)
            code_parts.append(c)
            rank_parts.append(r)
            # Strings go into polars columns a batch at a time: no Python object per item outlives its batch.
            parts = table.ids if table.ids is not None else row_digests(table.embeddings)
            key_parts.append(pl.Series("key", parts, dtype=pl.String))
        keys, codes, ranks = pl.concat(key_parts, rechunk=False), np.concatenate(code_parts), np.concatenate(rank_parts)
        del key_parts, code_parts, rank_parts
        if id_col is None:
            item_ids, keys = pl.int_range(n, eager=True).alias("item_id"), self._item_keys(named=None, digests=keys)
        else:
            check_unique_ids_of(source, keys, f"column '{id_col}' in {source}")  # each batch was checked alone;
            # this catches repeats across batches
            item_ids = keys.alias("item_id").cast(parquet_column_type(source, id_col))
            keys = self._item_keys(named=keys, digests=None)
        known_before = len(self.registry)
        final = self._resolve(keys, codes, ranks, lambda rows: read_rows(source, rows, emb_col=emb_col))
        if save_registry_to is not None and len(self.registry) > known_before:
            self.save_registry(save_registry_to)
        write_id_table(item_ids, final, out)
        if trie is not None:
            write_trie_json(final, trie)
        return {"n_items": n, "new_items": len(self.registry) - known_before, "id_length": int(final.shape[1]),
                "levels": len(model.codebook_sizes)}

    @property
    def id_length(self) -> int:
        """Tokens per final ID: the registry's (remap keeps length L unless its first call had to fall back to
        suffixes); before any ID is registered it follows from the strategy."""
        levels = len(self._fitted().codebook_sizes)
        return self.registry.id_length or levels + (self.config.collisions.strategy == "suffix")

    def _token_sizes(self) -> list[int]:
        """Values each ID position takes: each level's codebook size, then, where IDs carry a suffix
        (`id_length`), collisions.suffix_size (or the largest saved suffix + 1, if higher)."""
        sizes = list(self._fitted().codebook_sizes)
        if self.id_length == len(sizes):
            return sizes
        largest = int(self.registry.ids[:, -1].max(initial=-1)) if len(self.registry) else -1
        return [*sizes, max(self.config.collisions.suffix_size, largest + 1)]

    def token_vocabulary(self) -> list[str]:
        """Every token this model's IDs can use, in `token_strings` form (see `_token_sizes`): it does not grow
        as items arrive, so a generative model's vocabulary stays fixed."""
        return token_vocabulary(self._token_sizes())

    def token_numbers(self, ids: np.ndarray | torch.Tensor | pl.Series, *, offset: int = 0) -> np.ndarray:
        """Final IDs -> their token numbers in `token_vocabulary()` (plus `offset`, an LLM's first added token):
        a generative retriever's training targets, as `prefix_index().codes` reads them back."""
        return token_numbers(_host_ids(ids), self._token_sizes(), offset=offset)

    def prefix_index(self, ids: np.ndarray | torch.Tensor | None = None, *,
                     device: str | torch.device | None = None) -> PrefixIndex:
        """IDs indexed for constrained beam search on `device`: `next_codes` / `next_tokens` masks for a batch
        of generated prefixes (`semid.decoding`), with token numbers as in `token_vocabulary()`.

        By default every ID in the registry (each item encoded so far: build it again after encoding new
        items). `ids` restricts decoding to some of them, such as the `codes` of the items on sale today; an
        ID that no item holds is refused, as decoding to it would name nothing."""
        self._fitted()
        if isinstance(ids, (str, torch.device)):
            raise TypeError(f"prefix_index takes the device by keyword: prefix_index(device={str(ids)!r})")
        if ids is None:
            if not len(self.registry):
                raise ValueError("the registry holds no IDs yet: encode the catalogue first")
            return PrefixIndex(self.registry.ids, self._token_sizes(), device=device)
        host = _host_ids(ids)
        if host.ndim == 2 and len(host) == 0:
            raise ValueError("ids selects no IDs: give the IDs of at least one item to decode to")
        unknown = self.registry.keys_for(host).is_null()
        if unknown.any():
            row = int(unknown.arg_true()[0])
            raise ValueError(f"{int(unknown.sum())} of the IDs hold no item of this model's registry (the first "
                             f"is row {row}: {host[row].tolist()}); encode their items first")
        return PrefixIndex(host, self._token_sizes(), device=device)

    def items_for(self, ids: np.ndarray | torch.Tensor) -> pl.Series:
        """The item each final ID names: its item id (as a string), or null for an ID no item was given.

        For generated IDs: parse a model's output with `semid.export.parse_token_strings` (or
        `parse_semantic_id_strings`), then look the rows up here; a null is an ID outside the catalogue.
        Items encoded without ids come back as their content keys.
        """
        self._fitted()
        return self.registry.keys_for(_host_ids(ids)).rename("item_id")

    @torch.no_grad()
    def encode_raw(self, x: Any) -> np.ndarray:
        """Codes (n, L) before collision handling: each item's own nearest codes."""
        model, emb = self._fitted(), self._matrix(x)
        return torch.cat([model.encode(rows).cpu() for rows in self._row_blocks(emb)]).numpy()

    def decode(self, ids: np.ndarray | torch.Tensor) -> np.ndarray:
        """(n, >= L) IDs or codes -> (n, D) float32 reconstructions (a suffix column is ignored)."""
        model = self._fitted()
        ids = _host_ids(ids)
        levels = len(model.codebook_sizes)
        if ids.ndim and len(ids) == 0:  # no IDs (parse_token_strings of an empty batch is (0, 0)): nothing to decode
            return np.zeros((0, self.meta["input_dim"]), dtype=np.float32)
        if ids.ndim != 2 or ids.shape[1] < levels:
            raise InputError(f"decode needs IDs of shape (n, >= {levels}), got {ids.shape}")
        if ids.dtype.kind not in "iu":
            raise InputError(f"decode needs integer codes, got {ids.dtype} values")
        codes = torch.as_tensor(ids[:, :levels], dtype=torch.long, device=self._device())
        for level, size in enumerate(model.codebook_sizes):
            bad = (codes[:, level] < 0) | (codes[:, level] >= size)
            if bool(bad.any()):
                raise InputError(f"code at level {level + 1} out of range [0, {size}) in row {int(bad.nonzero()[0])}")
        return torch.cat(
            [model.decode(codes[i : i + 65536]) for i in range(0, len(codes), 65536)]
        ).cpu().numpy().astype(np.float32)

    def reconstruct(self, x: Any) -> np.ndarray:
        return self.decode(self.encode_raw(x))

    # ---- evaluation ---------------------------------------------------------------------------
    def evaluate(self, x: Any, ids: Sequence[str] | None = None, *, sequences: Sequence[np.ndarray] | None = None,
                 id_col: str | None = "item_id", emb_col: str = "embedding",
                 progress: bool | None = None) -> dict[str, Any]:
        """Every metric of the README's Metrics section on these items. Final IDs come from the registry;
        new items get the IDs `encode` would give them, but are not registered: measuring a model leaves it as it was.

        The neighbour search behind prefix_agreement runs on the model's device: for 500k items it is 19 TFLOP
        in fp32, minutes on a laptop CPU and seconds on a GPU. `progress` shows a bar for it, by default when
        training would show one (train.progress, and stderr a terminal).
        """
        if progress is None:
            progress = self.config.train.progress and sys.stderr.isatty()
        keys, emb = self._items(x, ids, id_col, emb_col)
        raw = self._raw(emb)
        codes = raw[0]
        with self.registry.provisional():
            final = self._assign(keys, emb, raw)
        report = evaluate_codes(emb, self.decode(codes), codes, self._fitted().codebook_sizes,
                                final_ids=final, sequences=sequences, device=self._device(), progress=progress)
        report["collision_strategy"] = self.config.collisions.strategy
        return report

    # ---- persistence --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write a self-describing model directory atomically: it appears complete or not at all.

        An existing model is replaced only with overwrite=True, and anything else that exists (a file, a
        directory with other contents) never is: the registry inside a model is the record of every ID it
        handed out, and `check_save_target` says why a target is refused. Saved back over the directory it
        was loaded from, it is refused, as `save_registry` is, when that registry changed since.
        """
        model = self._fitted()
        target = check_save_target(path, overwrite)
        try:  # what load would refuse is never written
            self._check_registry_ids()
        except ValueError as exc:
            raise ModelDirError(f"this tokenizer's registry cannot be saved: {exc} (was collisions.strategy changed "
                                "from \"none\" after its IDs were given?)") from None
        # Saving over the directory this registry came from writes that registry back: like save_registry, it
        # must not drop IDs another process registered there meanwhile.
        # Paths compare resolved: a symlink or a `..` spelling of the same directory is the same registry.
        resaving = (self._registry_source is not None and self._registry_source[0] == target.resolve()
                    and target.is_dir())
        # Any model replaced waits for the encodes registering items in it, and an encode waiting to start then
        # loads the new model: none can write the old registry into the new directory after the replace.
        with registry_lock(target) if is_model_dir(target) else contextlib.nullcontext():
            if resaving:
                self._check_registry_unchanged(target)
            with staging_dir(target) as staging:
                self.config.save(staging / "config.toml")
                save_tensors({k: v.cpu() for k, v in model.state_dict().items()}, staging / "model.pt", "model weights")
                self.registry.save(staging / "registry.parquet")
                write_json_atomic(
                    {"format": MODEL_FORMAT, "semid_version": installed_version(),
                     "codebook_sizes": model.codebook_sizes, "history": self.history, **self.meta,
                     **{digest_key: _sha256(staging / name) for name, digest_key in _DIGESTED.items()}},
                    staging / "meta.json",
                )
                replace_dir(staging, target, overwrite)
            self._registry_source = (target.resolve(), file_stamp(target / "registry.parquet"))  # under the lock
        return target

    def _check_registry_ids(self) -> None:
        """`IdRegistry.check_ids` for this model: the one check that `save` and `load` share."""
        self.registry.check_ids(self._fitted().codebook_sizes, unique=self.config.collisions.strategy != "none")

    def _check_registry_unchanged(self, root: Path) -> None:
        """Refuse to write this tokenizer's registry over the one in `root` if that changed since it was read."""
        if file_stamp(root / "registry.parquet") != self._registry_source[1]:
            raise ModelDirError(
                f"the registry in {root} changed since this tokenizer loaded it (another encode?); nothing was "
                "written: load the model again and encode these items anew"
            )

    def save_registry(self, path: str | os.PathLike) -> None:
        """Update only the registry of a saved model directory (after encoding new items), atomically.

        Refused unless this tokenizer was loaded from that directory or last saved there, and fitted on
        nothing since (a fit starts a new registry, which belongs with the new weights, not the saved ones);
        and refused when the registry there changed since: another process has registered items meanwhile,
        and writing this copy would drop them while both had handed out IDs. Under `registry_lock` (as
        `semid encode` holds it) that cannot happen.
        """
        root = Path(path).resolve()
        file = root / "registry.parquet"
        with registry_lock(root):
            if self._registry_source is None or self._registry_source[0] != root:
                raise ModelDirError(
                    f"{path} holds another model than this tokenizer (it was not loaded from there, or was fitted "
                    "since): its registry belongs with its own weights; save(path, overwrite=True) replaces the model"
                )
            self._check_registry_unchanged(root)
            self.registry.save(file)
            self._registry_source = (root, file_stamp(file))

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | None = None) -> "SemanticIdTokenizer":
        """Read a directory written by `save`; anything truncated, edited or foreign is a ModelDirError.

        The model goes to `device` ("auto", "cpu", "cuda", "cuda:N"), else where it trained, or to "auto" when
        it trained on a GPU that this machine lacks (the CPU, or the current GPU for cuda:3 on a 2-GPU machine).
        """
        root = present_or_raise(path)
        missing = [name for name in FILES if not (root / name).is_file()]
        if missing:
            raise ModelDirError(f"{root} is not a semid model directory: missing {', '.join(missing)}")
        try:
            meta = json.loads((root / "meta.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelDirError(f"{root}/meta.json is corrupt: {exc}") from None
        if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
            raise ModelDirError(f"{root} is not a semid model directory (meta.json has no '{MODEL_FORMAT}' format)")
        if not isinstance(meta.get("input_dim"), int):
            raise ModelDirError(f"{root}/meta.json is incomplete: it has no input_dim")
        _check_digest(root, meta, "config.toml")  # another config would build another architecture or encoder
        try:
            config = SemidConfig.load(root / "config.toml", record=True)
        except ConfigError as exc:
            raise ModelDirError(f"{root}/config.toml cannot be used: {exc}") from None
        if device is None and not device_available(config.train.device):
            device = "auto"  # trained on a GPU this machine lacks: a model is portable, as its IDs are
        if device is not None:
            config = config.with_overrides({"train.device": device})
        tok = cls(config)
        model = RQVAE(meta["input_dim"], config.model, config.quantizer)
        try:
            state = load_tensors(root / "model.pt", checksums=_DIGESTED["model.pt"] not in meta)  # digest below
            model.load_state_dict(state)
        except Exception as exc:
            raise ModelDirError(f"{root}/model.pt is truncated, corrupt or from another model: "
                                f"{weights_problem(exc)}") from None
        _check_digest(root, meta, "model.pt")  # another model's weights of this shape load, but give other codes
        # The stamp before the read: a registry written in between then reads as changed, never as this one.
        stamp = file_stamp(root / "registry.parquet")
        try:
            tok.registry = IdRegistry.load(root / "registry.parquet")
        except Exception as exc:
            raise ModelDirError(f"{root}/registry.parquet is unreadable: {exc}") from None
        tok.model = model.to(resolve_device(config.train.device)).eval()
        try:
            tok._check_registry_ids()
        except ValueError as exc:
            raise ModelDirError(f"{root}/registry.parquet is damaged or edited: {exc}") from None
        tok._registry_source = (root.resolve(), stamp)
        tok.history = meta.pop("history", [])
        tok.meta = {k: v for k, v in meta.items()
                    if k not in ("format", "semid_version", "codebook_sizes", *_DIGESTED.values())}
        return tok

    # ---- internals ----------------------------------------------------------------------------
    def _fitted(self) -> RQVAE:
        if self.model is None:
            raise RuntimeError("this SemanticIdTokenizer is not fitted yet: call fit() or load()")
        return self.model

    def _device(self) -> torch.device:
        return next(self._fitted().buffers()).device

    def _embeddings(self, x: Any, id_col: str | None, emb_col: str) -> tuple[np.ndarray | None, np.ndarray]:
        ids, emb = to_numpy_embeddings(x, id_col=id_col, emb_col=emb_col)
        expected = self.meta.get("input_dim") if self.model is not None else None
        if expected is not None and emb.shape[1] != expected:
            raise InputError(f"embeddings have dimension {emb.shape[1]}, but the model was trained on {expected}")
        return ids, emb

    def _matrix(self, x: Any) -> np.ndarray:
        return self._embeddings(x, None, "embedding")[1]

    def _items(self, x: Any, ids: Sequence[str] | None, id_col: str | None, emb_col: str,
               for_registry: bool = True) -> tuple[pl.Series, np.ndarray]:
        """(keys, embeddings); `for_registry` is False where the keys will start a new registry (`fit`)."""
        frame_ids, emb = self._embeddings(x, id_col, emb_col)
        if ids is not None:
            frame_ids = validate_ids(ids)
            if len(frame_ids) != len(emb):
                raise InputError(f"got {len(frame_ids)} ids for {len(emb)} embeddings")
        digests = row_digests(emb) if frame_ids is None else None
        return self._item_keys(named=frame_ids, digests=digests, against_registry=for_registry), emb

    def _item_keys(self, *, named: Sequence[str] | pl.Series | None, digests: Sequence[str] | pl.Series | None,
                   against_registry: bool = True) -> pl.Series:
        """The registry keys of rows: their ids (`named`), else keys made from their embedding `digests`.

        A registry knows its items one way: by id where it was fitted on ids, by content where on a bare
        matrix. Rows keyed the other way are all new items, known ones included, which deserves a warning
        (`against_registry`: the keys are for the current registry, not a new one). The kind is read from the
        first and last 100 keys (registration order, so a later change shows in the tail).
        """
        keys = self.registry.keys if against_registry else pl.Series("key", [], dtype=pl.String)
        by_content = pl.concat([keys.head(100), keys.tail(100)]).str.contains(_CONTENT_KEY)
        if named is not None and len(by_content) and by_content.all():
            warnings.warn(UnnamedItemsWarning(
                "this model's registry knows its items by their embeddings (it was fitted on rows without ids), "
                "and these rows come with ids: each id is a new item, so an item it knows gets a new ID here; "
                "encode them without ids (a bare matrix) to give known items their saved IDs, or fit with ids"
            ), stacklevel=3)
        if named is not None:
            return pl.Series("key", named)
        if len(by_content) and not by_content.any():
            warnings.warn(UnnamedItemsWarning(
                "this model's registry knows its items by id, and these rows come without ids: each is keyed by its "
                "embedding instead, so an item it knows gets a new ID here; pass the ids (ids=, or a parquet with "
                "an id column) to give known items their saved IDs"
            ), stacklevel=3)
        return content_keys(digests)

    def _row_blocks(self, emb: np.ndarray) -> Iterator[torch.Tensor]:
        """Row blocks of a float32 matrix as tensors on the model's device.

        On a CPU each block is a view of `emb` (no copy); on a GPU a block is one host-to-device copy, large
        enough to keep the device busy.
        """
        device = self._device()
        rows = _CPU_BLOCK_ROWS if device.type == "cpu" else _DEVICE_BLOCK_ROWS
        emb = np.require(emb, requirements="W")  # torch wants writable memory; copies only read-only input
        for start in range(0, len(emb), rows):
            yield torch.from_numpy(emb[start : start + rows]).to(device)

    @torch.no_grad()
    def _raw(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(codes (n, L), rank key (n,)): the rank key is the latent's distance to its codeword sum."""
        model = self._fitted()
        codes, ranks = [], []
        for x in self._row_blocks(emb):
            z = model.latent(x).float()
            c = model.quantizer.encode(z)
            ranks.append((z - model.quantizer.decode(c)).pow(2).sum(-1).cpu())
            codes.append(c.cpu())
        return torch.cat(codes).numpy(), torch.cat(ranks).numpy()

    def _assign(self, keys: pl.Series, emb: np.ndarray, raw: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        codes, rank = raw if raw is not None else self._raw(emb)
        return self._resolve(keys, codes, rank, lambda rows: emb[rows])

    def _resolve(self, keys: pl.Series, codes: np.ndarray, rank: np.ndarray,
                 fetch_rows: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Final IDs from the registry; `fetch_rows` returns embeddings of given rows, needed only by remap.

        Items beyond the suffix bound of a crowded tuple are remapped with a SuffixOverflowWarning rather
        than failing the call: a failure here would come after training, or after encoding a catalogue.
        """
        model = self._fitted()
        device = self._device()

        def latent(rows: np.ndarray) -> torch.Tensor:
            return model.latent(torch.from_numpy(np.ascontiguousarray(fetch_rows(rows), dtype=np.float32)).to(device))

        @torch.no_grad()
        def last_level_distances(rows: np.ndarray) -> np.ndarray:
            return model.quantizer.last_level_distances(latent(rows)).cpu().numpy()

        @torch.no_grad()
        def level_distances(rows: np.ndarray, leading: np.ndarray) -> np.ndarray:
            """Remap moves an item whose prefix is full to another prefix: distances under the given codes."""
            return model.quantizer.level_distances(latent(rows), torch.from_numpy(leading).to(device)).cpu().numpy()

        # Fewer items than last-level codes have nothing to share out: balanced over a handful of items, codes far
        # from all of them draw the mass (a lone item always took code 0), so such calls keep the nearest codes.
        if self.config.collisions.balanced_last_level and len(codes) >= model.codebook_sizes[-1]:
            codes = codes.copy()
            cost = torch.from_numpy(last_level_distances(np.arange(len(codes)))).to(device)
            codes[:, -1] = sinkhorn_assign(cost).cpu().numpy()

        return self.registry.assign(
            keys, codes, rank, self.config.collisions.strategy,
            codebook_sizes=model.codebook_sizes, suffix_size=self.config.collisions.suffix_size,
            last_level_distances=last_level_distances, overflow="remap", level_distances=level_distances,
        )
