"""SemanticIdTokenizer (issue #4): unique final IDs, stable IDs for old items, save/load, streaming, decode.

A tiny model (3 levels x 16 codes) is trained once per collision strategy and identity kind on the
first 1200 items of ml-100k (A); the others (B) play the part of items added later. The few rows of
ml-100k that repeat an earlier row bit for bit are dropped, so that every row is a distinct item also
for content keys. 16^3 tuples for 1200 clustered items give raw collisions, which the collision
handling must remove.
"""
from __future__ import annotations

import io
import re
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F

from semid.distance import pairwise_distance
from semid.collisions import SuffixOverflowError, SuffixOverflowWarning
from semid.config import ConfigError
from semid.export import id_table, parse_token_strings, token_strings, token_vocabulary
from semid.io import InputError
from semid.metrics import collision_metrics
from semid.rqvae import RQVAE, _centred_as, _linear
from semid.tokenizer import ModelDirError, SemanticIdTokenizer

N_A = 1200
DESIGN_KEYS = {"mse", "fvu", "cosine", "collision_rate", "colliding_items", "max_group", "usage", "entropy_bits",
               "prefix_agreement", "unique_after", "id_length"}


def _frame(x: np.ndarray, ids: np.ndarray) -> pl.DataFrame:
    return pl.DataFrame({"item_id": ids, "embedding": pl.Series(x.tolist(), dtype=pl.List(pl.Float32))})


def _rows(ids: np.ndarray) -> set[tuple[int, ...]]:
    return set(map(tuple, ids.tolist()))


@pytest.fixture(scope="module")
def data(real_data) -> dict[str, np.ndarray]:
    x = real_data("ml-100k")
    x = x[np.sort(np.unique(x, axis=0, return_index=True)[1])]  # (n, D) distinct rows, in file order
    ids = np.array([f"movie-{i}" for i in range(len(x))])
    return {"x": x, "ids": ids, "a": x[:N_A], "b": x[N_A:], "ids_a": ids[:N_A], "ids_b": ids[N_A:]}


@pytest.fixture(scope="module")
def model_dir(data, tiny_config, tmp_path_factory) -> Callable[[str, bool], Path]:
    """`model_dir(strategy, with_ids)` -> a saved model fitted on A (cached); load it for a fresh tokenizer."""
    cache: dict[tuple[str, bool], Path] = {}

    def get(strategy: str, with_ids: bool) -> Path:
        if (strategy, with_ids) not in cache:
            tok = SemanticIdTokenizer(tiny_config({"collisions.strategy": strategy}))
            tok.fit(_frame(data["a"], data["ids_a"]) if with_ids else data["a"])
            cache[strategy, with_ids] = tok.save(tmp_path_factory.mktemp(f"{strategy}-{with_ids}") / "model")
        return cache[strategy, with_ids]

    return get


def _encode(tok: SemanticIdTokenizer, x: np.ndarray, ids: np.ndarray, with_ids: bool) -> np.ndarray:
    return tok.encode(_frame(x, ids)) if with_ids else tok.encode(x)


# ---- collision handling -------------------------------------------------------------------------


def _rank_keys(tok: SemanticIdTokenizer, x: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Each item's squared latent distance to its codeword sum: the documented within-group ranking."""
    with torch.no_grad():
        z = tok.model.latent(torch.from_numpy(x))
        return (z - tok.model.quantizer.decode(torch.from_numpy(codes))).pow(2).sum(-1).numpy()


def test_suffix_makes_ids_unique_and_ranks_by_distance(data, model_dir):
    tok = SemanticIdTokenizer.load(model_dir("suffix", True))
    x, levels = data["a"], 3
    raw = tok.encode_raw(x)
    assert collision_metrics(raw)["collision_rate"] > 0  # precondition: there is something to resolve
    final = _encode(tok, x, data["ids_a"], True)
    assert final.shape == (N_A, levels + 1)
    assert np.unique(final, axis=0).shape[0] == N_A
    np.testing.assert_array_equal(final[:, :levels], raw)  # the suffix is appended, codes are kept
    rank = _rank_keys(tok, x, raw)
    _, group = np.unique(raw, axis=0, return_inverse=True)
    for g in np.unique(group):
        members = np.flatnonzero(group == g)
        suffixes = final[members, levels]
        np.testing.assert_array_equal(np.sort(suffixes), np.arange(len(members)))  # 0..g-1; alone -> 0
        # Closer to the codeword -> smaller suffix (ties by item order).
        order = np.lexsort((members, rank[members]))
        np.testing.assert_array_equal(suffixes[order], np.arange(len(members)))
    report = tok.evaluate(_frame(x, data["ids_a"]))
    assert report["unique_after"] == 1.0
    assert report["id_length"] == levels + 1


def test_remap_makes_ids_unique_within_the_same_prefix(data, model_dir):
    tok = SemanticIdTokenizer.load(model_dir("remap", True))
    x, levels = data["a"], 3
    raw = tok.encode_raw(x)
    assert collision_metrics(raw)["collision_rate"] > 0
    final = _encode(tok, x, data["ids_a"], True)
    assert final.shape == (N_A, levels) and np.unique(final, axis=0).shape[0] == N_A  # length L, always
    # Only the last level moves, except for the items a full prefix (over 16) has no code for: they move to
    # another level-2 code under the same first code.
    np.testing.assert_array_equal(final[:, 0], raw[:, 0])
    _, in_prefix, per_prefix = np.unique(raw[:, :2], axis=0, return_inverse=True, return_counts=True)
    overflow = np.maximum(per_prefix - 16, 0)
    left = final[:, 1] != raw[:, 1]
    assert overflow.sum() > 0 and left.sum() == overflow.sum()  # the premise, and no other item leaves
    assert (per_prefix[in_prefix[left]] > 16).all()
    # An item alone in its tuple keeps it.
    _, group, counts = np.unique(raw, axis=0, return_inverse=True, return_counts=True)
    alone = counts[group] == 1
    np.testing.assert_array_equal(final[alone], raw[alone])
    moved = (final != raw).any(axis=1)
    assert 0 < moved.sum() <= N_A - len(counts)
    assert tok.evaluate(_frame(x, data["ids_a"]))["unique_after"] == 1.0


def test_none_strategy_leaves_collisions(data, model_dir):
    tok = SemanticIdTokenizer.load(model_dir("none", True))
    final = _encode(tok, data["a"], data["ids_a"], True)
    np.testing.assert_array_equal(final, tok.encode_raw(data["a"]))
    assert tok.evaluate(_frame(data["a"], data["ids_a"]))["unique_after"] < 1.0


# ---- stable IDs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["suffix", "remap"])
@pytest.mark.parametrize("with_ids", [True, False], ids=["ids", "content"])
def test_new_items_leave_old_ids_unchanged(data, model_dir, tmp_path, strategy, with_ids):
    path = model_dir(strategy, with_ids)
    tok = SemanticIdTokenizer.load(path)
    ids_a = _encode(tok, data["a"], data["ids_a"], with_ids)
    assert np.unique(ids_a, axis=0).shape[0] == N_A
    raw_a, raw_b = tok.encode_raw(data["a"]), tok.encode_raw(data["b"])
    assert _rows(raw_a) & _rows(raw_b)  # precondition: some new items fall on tuples old items hold

    ids_b = _encode(tok, data["b"], data["ids_b"], with_ids)
    assert np.unique(ids_b, axis=0).shape[0] == len(data["b"])
    assert not _rows(ids_a) & _rows(ids_b)
    np.testing.assert_array_equal(_encode(tok, data["a"], data["ids_a"], with_ids), ids_a)
    both = _encode(tok, data["x"], data["ids"], with_ids)  # a catalogue with old and new items mixed
    np.testing.assert_array_equal(both, np.concatenate([ids_a, ids_b]))

    # The same, with save/load between the steps: a fresh copy of the model gives B the same IDs, and the
    # saved registry remembers them.
    other = SemanticIdTokenizer.load(path)
    np.testing.assert_array_equal(_encode(other, data["b"], data["ids_b"], with_ids), ids_b)
    tok.save(tmp_path / "after-b")
    again = SemanticIdTokenizer.load(tmp_path / "after-b")
    np.testing.assert_array_equal(_encode(again, data["x"], data["ids"], with_ids), both)


def test_known_ids_keep_their_id_when_embeddings_change(data, model_dir):
    tok = SemanticIdTokenizer.load(model_dir("suffix", True))
    ids_a = _encode(tok, data["a"], data["ids_a"], True)
    shuffled = np.random.default_rng(0).permutation(N_A)
    moved = data["a"][shuffled]  # every id now carries another item's embedding
    assert (tok.encode_raw(moved) != tok.encode_raw(data["a"])).any()
    np.testing.assert_array_equal(_encode(tok, moved, data["ids_a"], True), ids_a)


def test_content_keys_tell_repeated_rows_apart(data, model_dir):
    tok = SemanticIdTokenizer.load(model_dir("suffix", False))
    x = np.concatenate([data["b"][:5], data["b"][:5]])  # five new items, each twice
    ids = tok.encode(x)
    assert np.unique(ids, axis=0).shape[0] == 10
    np.testing.assert_array_equal(tok.encode(x), ids)
    np.testing.assert_array_equal(tok.encode(x[:5]), ids[:5])  # first occurrences keep their IDs


def test_content_keys_give_a_known_row_its_saved_id(data, model_dir):
    """Without ids, a row is its content: a bit-identical copy of a fitted row is that item again."""
    tok = SemanticIdTokenizer.load(model_dir("suffix", False))
    ids_a = tok.encode(data["a"])
    picked = [7, 3, 500]
    copies = np.concatenate([data["b"][:2], data["a"][picked]])
    np.testing.assert_array_equal(tok.encode(copies)[2:], ids_a[picked])


# ---- persistence and streaming ------------------------------------------------------------------


def test_save_load_round_trip_gives_identical_codes(data, model_dir, tmp_path):
    tok = SemanticIdTokenizer.load(model_dir("suffix", True))
    tok.save(tmp_path / "copy")
    copy = SemanticIdTokenizer.load(tmp_path / "copy")
    for name, value in tok.model.state_dict().items():
        assert torch.equal(value, copy.model.state_dict()[name]), name
    np.testing.assert_array_equal(copy.encode_raw(data["x"]), tok.encode_raw(data["x"]))
    np.testing.assert_array_equal(copy.encode(_frame(data["a"], data["ids_a"])),
                                  tok.encode(_frame(data["a"], data["ids_a"])))
    assert copy.config == tok.config
    assert copy.meta == tok.meta
    assert copy.history == tok.history


def test_items_for_names_the_item_of_each_generated_id(data, model_dir, tmp_path):
    """The pipeline's way back: a generated token string -> ID row -> item id; unknown IDs give null."""
    tok = SemanticIdTokenizer.load(model_dir("suffix", True))
    ids = tok.encode(_frame(data["a"], data["ids_a"]))
    generated = token_strings(ids[::-1]) + ["<a_0><b_0><c_0><d_9999>"]
    items = tok.items_for(parse_token_strings(generated))
    assert items.name == "item_id" and items.to_list() == data["ids_a"][::-1].tolist() + [None]
    unconstrained = generated + ["<a_0><b_0>", "<a_1><b_2><c_3><d_0></s>"]  # a model's malformed output
    items = tok.items_for(parse_token_strings(unconstrained, width=tok.id_length))
    assert items.to_list() == data["ids_a"][::-1].tolist() + [None, None, None]
    with pytest.raises(InputError, match="out of range"):
        tok.decode(parse_token_strings(["junk"], width=tok.id_length))
    tok.encode(_frame(data["b"], data["ids_b"]))  # registered by this call, found after a save and load
    tok.save(tmp_path / "grown")
    again = SemanticIdTokenizer.load(tmp_path / "grown")
    assert again.items_for(again.encode(_frame(data["b"], data["ids_b"]))).to_list() == data["ids_b"].tolist()
    with pytest.raises(ValueError, match="tokens but this registry's IDs have 4"):
        again.items_for(ids[:, :3])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_decode_and_items_for_take_a_generative_models_tensors(data, model_dir, device):
    """A seq2seq model's beams are torch tensors, on its GPU: both ways back take them as they are."""
    tok = SemanticIdTokenizer.load(model_dir("suffix", True))
    ids = tok.encode(_frame(data["a"], data["ids_a"]))
    beams = torch.from_numpy(ids).to(device)
    assert tok.items_for(beams).to_list() == data["ids_a"].tolist()
    np.testing.assert_array_equal(tok.decode(beams), tok.decode(ids))


@pytest.mark.parametrize("strategy", ["suffix", "remap"])
def test_prefix_index_constrains_a_generative_model_to_the_registered_items(data, model_dir, strategy):
    """Constrained greedy decoding over token_vocabulary() numbers: however random the logits, every beam
    ends on an item of the registry, and items encoded later join the index when it is built again."""
    tok = SemanticIdTokenizer.load(model_dir(strategy, True))
    ids = tok.encode(_frame(data["a"], data["ids_a"]))
    index = tok.prefix_index()
    number = {token: i for i, token in enumerate(tok.token_vocabulary())}
    tokens = [[number[t] for t in row.replace("><", "> <").split()] for row in token_strings(ids)]
    np.testing.assert_array_equal(tok.token_numbers(ids), tokens)  # the training targets of a retriever
    assert torch.equal(index.codes(tok.token_numbers(ids, offset=7), offset=7), torch.from_numpy(ids))
    assert index.width == tok.id_length and index.vocabulary_size == len(number)
    allowed = index.next_tokens(np.array(tokens)[:, :-1])
    assert allowed[np.arange(len(ids)), np.array(tokens)[:, -1]].all()  # each item's own last token
    generator = torch.Generator().manual_seed(0)
    generated = torch.zeros(256, 0, dtype=torch.long)
    for _ in range(index.width):
        logits = torch.randn(256, index.vocabulary_size, generator=generator).masked_fill(
            ~index.next_tokens(generated), float("-inf"))
        generated = torch.cat([generated, logits.argmax(dim=1, keepdim=True)], dim=1)
    vocabulary = tok.token_vocabulary()
    beams = parse_token_strings(["".join(vocabulary[i] for i in row) for row in generated.tolist()])
    assert tok.items_for(beams).null_count() == 0
    new_ids = tok.encode(_frame(data["b"], data["ids_b"]))
    assert not index.contains(new_ids).all() and tok.prefix_index().contains(new_ids).all()
    on_sale = tok.prefix_index(torch.from_numpy(new_ids[:50]))  # decoding restricted to some items
    table = id_table(data["ids_b"], new_ids)  # what `semid encode` writes: its codes column is a list column
    assert tok.items_for(table["codes"]).to_list() == data["ids_b"].tolist()
    assert torch.equal(tok.prefix_index(table["codes"][:50]).contains(new_ids), on_sale.contains(new_ids))
    for ragged in ([[1, 2, 3], [1, 2]], [[1, 2, None]], [[1, 2, 3], None]):
        with pytest.raises(InputError, match="the ID column 'codes' must hold one ID of the same length in every "
                                             "row, with no missing codes"):
            tok.items_for(pl.Series("codes", ragged))
    as_floats = table["codes"].cast(pl.List(pl.Float64))  # whole numbers through a float column: integers again
    assert tok.items_for(as_floats).to_list() == data["ids_b"].tolist()
    with pytest.raises(ValueError, match="2-D integer matrix"):  # a code of 7.4 is no code: refused, not cut to 7
        tok.items_for(as_floats.list.eval(pl.element() + 0.4))
    assert on_sale.sizes == index.sizes and on_sale.contains(new_ids).tolist() == [True] * 50 + [False] * (
        len(new_ids) - 50)
    grid = np.stack(np.meshgrid(*[np.arange(k) for k in index.sizes[:3]], indexing="ij"), -1).reshape(-1, 3)
    grid = np.pad(grid, ((0, 0), (0, tok.id_length - 3)))  # every 3-code tuple, suffix 0 where IDs have one
    nobodys = grid[~tok.prefix_index().contains(grid).numpy()][:1]  # 16^3 tuples, fewer items: some are free
    with pytest.raises(ValueError, match=rf"1 of the IDs hold no item of this model's registry \(the first is "
                                         rf"row 3: \[{', '.join(map(str, nobodys[0]))}\]\)"):
        tok.prefix_index(np.concatenate([new_ids[:3], nobodys]))
    with pytest.raises(ValueError, match="ids selects no IDs"):
        tok.prefix_index(new_ids[:0])
    with pytest.raises(TypeError, match=r"takes the device by keyword: prefix_index\(device='cpu'\)"):
        tok.prefix_index("cpu")
    with pytest.raises(ValueError, match="registry holds no IDs yet: encode the catalogue first"):
        tok.registry = type(tok.registry)()
        tok.prefix_index()


@pytest.mark.parametrize("trained_on", ["cuda", "cuda:3"])
def test_a_model_trained_on_a_gpu_loads_where_there_is_none(data, model_dir, tmp_path, monkeypatch, trained_on):
    """Its config says train.device = "cuda" (or "cuda:3"); without a device named, load puts it on the CPU
    instead of failing, and gives the IDs it had."""
    tok = SemanticIdTokenizer.load(model_dir("suffix", True))
    expected = tok.encode(_frame(data["a"], data["ids_a"]))
    tok.config = tok.config.with_overrides({"train.device": trained_on})  # as `semid train --device` saves it
    tok.save(tmp_path / "gpu-model")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loaded = SemanticIdTokenizer.load(tmp_path / "gpu-model")
    assert loaded._device().type == "cpu" and loaded.config.train.device == "auto"
    np.testing.assert_array_equal(loaded.encode(_frame(data["a"], data["ids_a"])), expected)
    with pytest.raises(RuntimeError, match="no CUDA device is available"):  # asked for by name: still an error
        SemanticIdTokenizer.load(tmp_path / "gpu-model", device="cuda")


@pytest.mark.parametrize("with_ids", [True, False], ids=["parquet", "npy"])
def test_encode_file_is_independent_of_batch_size(data, model_dir, tmp_path, with_ids):
    path = model_dir("suffix", with_ids)
    if with_ids:
        source = tmp_path / "items.parquet"
        _frame(data["x"], data["ids"]).write_parquet(source, row_group_size=300)
    else:
        source = tmp_path / "items.npy"
        np.save(source, data["x"])
    frames = []
    for batch_size in (100, 1000, 100000):
        tok = SemanticIdTokenizer.load(path)  # fresh registry each time: B is new in every run
        out = tmp_path / f"ids-{batch_size}.parquet"
        summary = tok.encode_file(source, out, batch_size=batch_size, progress=False)
        assert summary["n_items"] == len(data["x"])
        assert summary["new_items"] == len(data["b"])
        frames.append(pl.read_parquet(out))
    for frame in frames[1:]:
        assert frame.equals(frames[0])
    frame = frames[0]
    assert frame.columns == ["item_id", "codes", "semantic_id", "tokens"]
    codes = np.array(frame["codes"].to_list())
    expected = _encode(SemanticIdTokenizer.load(path), data["x"], data["ids"], with_ids)
    np.testing.assert_array_equal(codes, expected)  # the streamed path agrees with the in-memory one
    assert frame["semantic_id"].to_list() == ["-".join(map(str, row)) for row in codes.tolist()]
    expected_ids = data["ids"].tolist() if with_ids else list(range(len(data["x"])))
    assert [str(v) for v in frame["item_id"].to_list()] == [str(v) for v in expected_ids]


# ---- the encode path ----------------------------------------------------------------------------


def _reference_codes(model: RQVAE, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes written plainly: standardise, encoder, then each level's argmin of pairwise_distance.

    Also returns each row's smallest gap between its best and second-best distance over the levels, so
    that a test can tell a real disagreement from a near-tie that fp32 rounding may settle either way.
    """
    quantizer = model.quantizer
    centres = dict(zip(quantizer.prefix_keys.tolist(), quantizer.prefix_centres))  # prefix key -> centre
    with torch.no_grad():
        z = model.encoder(model.normalize(torch.from_numpy(x)))
        codes, gaps = [], []
        for i, level in enumerate(quantizer.levels):
            if i == len(quantizer.levels) - 1 and centres:  # the last level codes z minus the prefix's centre
                keys = torch.zeros(len(z), dtype=torch.long)
                for size, prefix_codes in zip(quantizer.codebook_sizes, codes):
                    keys = keys * size + prefix_codes
                z = z - torch.stack([centres.get(k, torch.zeros(z.shape[1])) for k in keys.tolist()])
            d = pairwise_distance(z, level.codebook, level.distance)
            two = d.topk(2, dim=-1, largest=False).values
            codes.append(d.argmin(-1))
            gaps.append(two[:, 1] - two[:, 0])
            z = z - level.codebook[codes[-1]]
        return torch.stack(codes, -1).numpy(), torch.stack(gaps, -1).min(-1).values.numpy()


@pytest.mark.parametrize("overrides", [
    {},
    {"quantizer.distance": "cosine", "model.activation": "silu", "model.layer_norm": True, "model.latent_norm": 0.5},
    {"model.type": "rqkmeans", "quantizer.distance": "cosine"},
], ids=["l2-relu", "cosine-silu-layernorm-latentnorm", "rqkmeans"])
def test_encode_gives_the_greedy_nearest_codewords_in_any_block_size(data, tiny_config, overrides, monkeypatch):
    """The folded standardiser, the oneDNN layers, the blocks and the tie-break change no code."""
    config = tiny_config({**overrides, "train.steps": 20, "train.eval_every": 20, "collisions.strategy": "none"})
    tok = SemanticIdTokenizer(config).fit(data["a"])
    assert tok.model.quantizer.has_centres
    x = data["x"]
    expected, gap = _reference_codes(tok.model, x)
    clear = gap > 1e-4
    assert clear.mean() > 0.99
    for rows in (4096, 7):  # 7: many blocks, and a last block shorter than the others
        monkeypatch.setattr("semid.rqvae._CPU_ENCODE_BLOCK_ROWS", rows)
        monkeypatch.setattr("semid.tokenizer._CPU_BLOCK_ROWS", rows)
        codes = tok.encode_raw(x)
        assert codes.dtype == np.int64 and codes.shape == expected.shape
        np.testing.assert_array_equal(codes[clear], expected[clear])
        np.testing.assert_array_equal(tok.model.encode(torch.from_numpy(x)).numpy(), codes)
        np.testing.assert_array_equal(tok._raw(x)[0], codes)  # the path of encode() and encode_file()


@pytest.mark.parametrize("norms", [{}, {"model.layer_norm": True}, {"model.latent_norm": 0.5}],
                         ids=["plain", "layernorm", "latentnorm"])
def test_latent_folds_the_standardiser_without_changing_values_or_gradients(data, tiny_config, norms):
    config = tiny_config({**norms, "model.activation": "relu"})
    model = RQVAE(data["x"].shape[1], config.model, config.quantizer)
    x = torch.from_numpy(data["x"][:300])
    model.fit_standardizer(x)
    with torch.no_grad():
        torch.testing.assert_close(model.latent(x), model.encoder(model.normalize(x)), rtol=1e-4, atol=1e-5)
    first = model.encoder[0].weight
    grads = []
    for latent in (model.latent(x), model.encoder(model.normalize(x))):
        grads.append(torch.autograd.grad(latent.pow(2).sum(), first)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast standardises first, as training does
        assert model.latent(x).dtype == torch.bfloat16


def test_latent_norm_fixes_each_rows_rms_and_leaves_no_radial_gradient(data, tiny_config):
    """RMSNorm's Jacobian at h is (I - u u^T) / rms(h) with u = h / |h|: a loss can move a latent's direction
    through it but never its length, which is what keeps the latent scale from drifting."""
    config = tiny_config({"model.latent_norm": 0.5})
    model = RQVAE(data["x"].shape[1], config.model, config.quantizer)
    x = torch.from_numpy(data["x"][:300])
    model.fit_standardizer(x)
    before_norm = model.encoder[:-1](model.normalize(x)).detach().requires_grad_(True)
    latent = model.encoder[-1](before_norm)
    with torch.no_grad():
        torch.testing.assert_close(model.latent(x), latent)
        torch.testing.assert_close(model.latent(x * 3.0 - 1.0).pow(2).mean(-1).sqrt(), torch.full((300,), 0.5))
    assert before_norm.pow(2).mean(-1).std() > 0.01  # the rows had different scales before the norm
    target = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(F.mse_loss(latent, target), before_norm)
    radial = (grad * before_norm).sum(-1) / (grad.norm(dim=-1) * before_norm.norm(dim=-1))
    assert radial.abs().max() < 1e-4
    assert set(model.state_dict()) == set(RQVAE(data["x"].shape[1], tiny_config({}).model, config.quantizer).state_dict())


@pytest.mark.parametrize("relu", [False, True])
def test_inference_linear_matches_f_linear_and_steps_aside_for_gradients(monkeypatch, relu):
    """Every kernel `_linear` may take (oneDNN for fp32 on a CPU, torch._addmm_activation with its ReLU inside
    the product, F.linear) gives F.linear's values, and a gradient where one is needed."""
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(24, 10, generator=g), torch.randn(24, generator=g)
    h = torch.randn(33, 20, generator=g)[:, ::2]  # a strided view, as a caller may pass

    def expected(h, weight, bias):
        out = F.linear(h, weight, bias)
        return F.relu(out) if relu else out

    with torch.no_grad():
        torch.testing.assert_close(_linear(h, weight, bias, relu), expected(h, weight, bias), rtol=1e-5, atol=1e-5)
        low = [t.bfloat16() for t in (h, weight, bias)]  # the autocast path
        assert _linear(*low, relu).dtype == torch.bfloat16
        torch.testing.assert_close(_linear(*low, relu), expected(*low), rtol=1e-2, atol=1e-2)
        monkeypatch.setattr("semid.rqvae._RELU_IN_PRODUCT", {"cpu"})  # the CUDA path's arithmetic, on the CPU
        fused_calls = []
        addmm_activation = torch._addmm_activation
        monkeypatch.setattr(torch, "_addmm_activation", lambda *a: fused_calls.append(1) or addmm_activation(*a))
        torch.testing.assert_close(_linear(*low, relu), expected(*low), rtol=1e-2, atol=1e-2)
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
        torch.testing.assert_close(_linear(h, weight, bias, relu), expected(h, weight, bias), rtol=0, atol=0)
        assert len(fused_calls) == (2 if relu else 0)
        monkeypatch.undo()
    weight.requires_grad_(True)
    out = _linear(h, weight, bias, relu)
    out.sum().backward()
    active = (out > 0).float() if relu else torch.ones_like(out)
    torch.testing.assert_close(weight.grad, active.T @ h)


def test_centred_as_rounds_once_with_or_without_a_gradient():
    g = torch.Generator().manual_seed(0)
    x, mean = 1000.0 + torch.randn(50, 8, generator=g), 1000.0 + torch.randn(8, generator=g)
    expected = (x - mean).bfloat16()  # the offset taken off in fp32, then one rounding
    assert torch.equal(_centred_as(x, mean, torch.bfloat16), expected)
    assert not torch.equal(x.bfloat16().float() - mean, expected.float())  # rounding the raw values first loses it
    x.requires_grad_(True)
    centred = _centred_as(x, mean, torch.bfloat16)
    assert torch.equal(centred.detach(), expected)
    centred.float().sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("activation, norms", [("relu", {}), ("silu", {}), ("relu", {"model.layer_norm": True}),
                                               ("relu", {"model.latent_norm": 0.5})],
                         ids=["relu", "silu", "relu-layernorm", "relu-latentnorm"])
def test_latent_under_autocast_matches_the_training_modules_and_keeps_gradients(data, tiny_config, activation, norms):
    """The rearranged low-precision pass (offset off in fp32, scale folded, ReLU inside the product) computes
    what the encoder modules compute under autocast, to bf16's precision, and stays differentiable."""
    config = tiny_config({**norms, "model.activation": activation})
    model = RQVAE(data["x"].shape[1], config.model, config.quantizer)
    x = torch.from_numpy(data["x"][:300]) * 40.0 + 7.0  # an offset and a scale for the standardiser to remove
    model.fit_standardizer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            fast, modules = model.latent(x), model.encoder(model.normalize(x))
        assert fast.dtype == modules.dtype
        error = (fast.float() - modules.float()).norm() / modules.float().norm()
        assert error < 0.02, error
        first = model.encoder[0].weight
        probe = torch.randn(modules.shape, generator=torch.Generator().manual_seed(1))  # not invariant to the norm
        grads = [torch.autograd.grad((latent.float() * probe).sum(), first)[0]
                 for latent in (model.latent(x), model.encoder(model.normalize(x)))]
    assert F.cosine_similarity(grads[0].flatten(), grads[1].flatten(), dim=0) > 0.99  # bf16 rounds them apart


def test_encode_file_writes_in_slices_and_refuses_ids_repeated_across_batches(data, model_dir, tmp_path, monkeypatch):
    tok = SemanticIdTokenizer.load(model_dir("suffix", True))
    expected = tok.encode(_frame(data["x"], data["ids"]))
    monkeypatch.setattr("semid.tokenizer._OUTPUT_SLICE_ROWS", 333)  # several slices, the last one short
    source = tmp_path / "items.parquet"
    _frame(data["x"], data["ids"]).write_parquet(source)
    tok.encode_file(source, tmp_path / "ids.parquet", batch_size=500, progress=False)
    frame = pl.read_parquet(tmp_path / "ids.parquet")
    np.testing.assert_array_equal(np.array(frame["codes"].to_list()), expected)
    assert frame["item_id"].to_list() == data["ids"].tolist()
    ids = data["ids"].copy()
    ids[700] = ids[3]  # the same id in the first and the second batch
    _frame(data["x"], ids).write_parquet(source)
    with pytest.raises(InputError, match=rf"column 'item_id' in .*items\.parquet must be unique: 1 ids .* '{ids[3]}' \(2x\)"):
        tok.encode_file(source, tmp_path / "dup.parquet", batch_size=500, progress=False)
    assert not (tmp_path / "dup.parquet").exists()


def test_encode_file_refuses_an_output_it_cannot_write_before_encoding(data, model_dir, tmp_path, monkeypatch):
    """The output is tried first, and named: not its hidden temp, after the whole encode and a registry save."""
    tok = SemanticIdTokenizer.load(model_dir("suffix", True))
    source = tmp_path / "items.parquet"
    _frame(data["x"][:50], data["ids"][:50]).write_parquet(source)
    monkeypatch.setattr(SemanticIdTokenizer, "_raw", lambda *a: pytest.fail("encoded before trying the output"))
    long = tmp_path / ("n" * 245 + ".parquet")  # a valid name; its temp's is too long
    with pytest.raises(OSError, match=r"cannot write .*n\.parquet: File name too long \(its temp file's name is 18 "):
        tok.encode_file(source, long, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["items.parquet"]


# ---- decode and evaluate ------------------------------------------------------------------------


def test_decode_reconstructs_in_input_units(data, model_dir):
    tok = SemanticIdTokenizer.load(model_dir("suffix", True))
    x = data["a"]
    raw = tok.encode_raw(x)
    x_hat = tok.decode(raw)
    assert x_hat.dtype == np.float32 and x_hat.shape == x.shape
    final = tok.encode(_frame(x, data["ids_a"]))
    np.testing.assert_array_equal(tok.decode(final), x_hat)  # the suffix column is ignored
    np.testing.assert_array_equal(tok.reconstruct(x), x_hat)
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    report = tok.evaluate(_frame(x, data["ids_a"]))
    assert report["fvu"] == pytest.approx(float(fvu), rel=1e-4)
    assert fvu < 0.95  # the decoder really reconstructs, far better than the mean


@pytest.mark.parametrize("bad, pattern", [
    (np.zeros(3, dtype=np.int64), "shape"),
    (np.zeros((4, 2), dtype=np.int64), "shape"),
    (np.array([[0, 0, 16]]), "level 3 out of range"),
    (np.array([[0, -1, 0]]), "level 2 out of range"),
    (np.array([[1.7, 2.2, 3.9, 0.0]]), "integer codes, got float64"),
    (np.array([[np.nan, 0, 0]]), "integer codes"),
    (np.array([["a", "b", "c"]]), "integer codes, got <U1"),
])
def test_decode_validates_its_input(data, model_dir, bad, pattern):
    tok = SemanticIdTokenizer.load(model_dir("suffix", True))
    with pytest.raises(InputError, match=pattern):
        tok.decode(bad)


def test_decode_takes_whole_floats_and_empty_input(data, model_dir):
    tok = SemanticIdTokenizer.load(model_dir("suffix", True))
    raw = tok.encode_raw(data["a"][:5])
    np.testing.assert_array_equal(tok.decode(raw.astype(np.float64)), tok.decode(raw))  # e.g. read from a CSV
    for none in (np.zeros((0, 4), dtype=np.int64), parse_token_strings([])):  # the parse of an empty batch: (0, 0)
        empty = tok.decode(none)
        assert empty.shape == (0, data["a"].shape[1]) and empty.dtype == np.float32


def test_items_for_takes_what_decode_takes(data, model_dir):
    """Whole numbers that came through a float column name their items, as decode reads them."""
    tok = SemanticIdTokenizer.load(model_dir("suffix", True))
    ids = tok.encode(_frame(data["a"][:5], data["ids_a"][:5]))
    assert tok.items_for(ids.astype(np.float64)).to_list() == tok.items_for(ids).to_list() == list(data["ids_a"][:5])
    with pytest.raises(ValueError, match="2-D integer matrix"):
        tok.items_for(ids + 0.5)


def test_fit_refuses_a_catalogue_of_one_repeated_row(data, tiny_config):
    with pytest.raises(InputError, match="all 50 embeddings are the same vector"):
        SemanticIdTokenizer(tiny_config()).fit(np.repeat(data["a"][:1], 50, axis=0))
    with pytest.raises(InputError, match="at least two items to tell apart, got 1"):
        SemanticIdTokenizer(tiny_config()).fit(data["a"][:1])


def test_encode_file_keeps_integer_ids_and_refuses_a_bad_output_path(data, model_dir, tmp_path):
    tok = SemanticIdTokenizer.load(model_dir("suffix", True))
    source = tmp_path / "int_ids.parquet"
    pl.DataFrame({"item_id": np.arange(100, 160, dtype=np.int64),
                  "embedding": pl.Series(data["b"][:60].tolist(), dtype=pl.List(pl.Float32))}).write_parquet(source)
    out = tmp_path / "ids.parquet"
    tok.encode_file(source, out, progress=False)
    written = pl.read_parquet(out)
    assert written.schema["item_id"] == pl.Int64  # joins back to the source table
    assert written["item_id"].to_list() == list(range(100, 160))
    with pytest.raises(InputError, match="is the input file"):
        tok.encode_file(source, source, progress=False)
    with pytest.raises(InputError, match="must be a .parquet file"):
        tok.encode_file(source, tmp_path / "ids.csv", progress=False)
    assert pl.read_parquet(source).height == 60 and not (tmp_path / "ids.csv").exists()


def test_evaluate_reports_every_design_metric(data, model_dir):
    tok = SemanticIdTokenizer.load(model_dir("suffix", True))
    report = tok.evaluate(_frame(data["a"], data["ids_a"]))
    assert DESIGN_KEYS <= report.keys()
    raw = tok.encode_raw(data["a"])
    assert report["collision_rate"] == pytest.approx(1 - np.unique(raw, axis=0).shape[0] / N_A)
    assert len(report["usage"]) == len(report["entropy_bits"]) == len(report["prefix_agreement"]) == 3
    assert all(0 <= e <= np.log2(16) + 1e-9 for e in report["entropy_bits"])
    agreement = report["prefix_agreement"]
    assert all(a >= b for a, b in zip(agreement, agreement[1:]))  # sharing d+1 codes implies sharing d


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, where progress bars are drawn."""

    def isatty(self) -> bool:
        return True


def test_encode_file_draws_a_bar_on_a_terminal_only(data, model_dir, tmp_path, capsys, monkeypatch):
    tok = SemanticIdTokenizer.load(model_dir("suffix", False))
    np.save(tmp_path / "a.npy", data["a"])
    tok.encode_file(tmp_path / "a.npy", tmp_path / "log.parquet")  # stderr is a capture here: a log
    assert "encode" not in capsys.readouterr().err
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    tok.encode_file(tmp_path / "a.npy", tmp_path / "terminal.parquet")
    assert "encode: 100%" in terminal.getvalue()


def test_evaluate_shows_the_neighbour_search_bar_on_a_terminal_when_training_shows_one(data, model_dir, capsys,
                                                                                      monkeypatch):
    """By default a bar where training would show one: train.progress, on a terminal (a log gets no redraws)."""
    tok = SemanticIdTokenizer.load(model_dir("suffix", False))
    assert tok.config.train.progress is False  # the tiny config
    quiet = tok.evaluate(data["a"])
    assert "neighbours" not in capsys.readouterr().err
    tok.config = tok.config.with_overrides({"train.progress": True})
    tok.evaluate(data["a"])  # stderr is a capture here, not a terminal
    assert "neighbours" not in capsys.readouterr().err
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    shown = tok.evaluate(data["a"])
    assert f"{N_A}/{N_A}" in terminal.getvalue()
    assert shown["prefix_agreement"] == quiet["prefix_agreement"]
    before = terminal.getvalue()
    tok.evaluate(data["a"], progress=False)
    assert terminal.getvalue() == before


# ---- a suffix vocabulary too small for the tuples ------------------------------------------------


@pytest.mark.filterwarnings("ignore::semid.collisions.SuffixOverflowWarning")  # later calls overflow too
def test_fit_remaps_what_the_suffix_cannot_number_and_keeps_every_id_unique(data, tiny_config, tmp_path):
    tok = SemanticIdTokenizer(tiny_config({"collisions.suffix_size": 2, "quantizer.codebook_size": [16, 16, 64]}))
    with pytest.warns(SuffixOverflowWarning, match=r"\d+ items share the code tuple .*suffix_size=2.*'remap'"):
        tok.fit(_frame(data["a"], data["ids_a"]))
    assert int(np.unique(tok.encode_raw(data["a"]), axis=0, return_counts=True)[1].max()) > 2  # it did overflow
    ids = tok.encode(_frame(data["a"], data["ids_a"]))
    assert ids.shape == (N_A, 4) and len(_rows(ids)) == N_A and ids[:, -1].max() < 2
    both = np.concatenate([ids, tok.encode(_frame(data["b"], data["ids_b"]))])  # new items, the same rule
    assert len(_rows(both)) == len(data["x"])
    again = SemanticIdTokenizer.load(tok.save(tmp_path / "model"))
    np.testing.assert_array_equal(again.encode(_frame(data["a"], data["ids_a"])), ids)


def test_fit_keeps_the_trained_model_when_no_code_is_free(data, tiny_config):
    """2 x 4 x 2 codes and suffix_size 75 for 1200 items: exactly as many IDs as items, so unless the items fill
    the 8 prefixes evenly one of them is full, and remapping cannot help either."""
    tok = SemanticIdTokenizer(tiny_config({"collisions.suffix_size": 75, "quantizer.codebook_size": [2, 4, 2]}))
    with pytest.raises(SuffixOverflowError, match=r"the prefix \(\d, \d\) is full.*The trained model is kept"):
        with pytest.warns(SuffixOverflowWarning):  # the remap of the overflow came first, and ran out of codes
            tok.fit(data["a"])
    assert tok.model is not None and len(tok.registry) == 0
    tok.config = tok.config.with_overrides({"collisions.suffix_size": 4096})
    ids = tok.encode(data["a"])  # no training again
    assert len(_rows(ids)) == N_A


def test_fit_numbers_hundreds_of_identical_items_within_the_suffix_bound(data, tiny_config):
    """400 of 1200 items share one embedding (as items without metadata do): 400 > suffix_size = 64 items
    on one tuple and more than the prefix's 16 codes can take, so the rest spill into its other codes."""
    x = data["a"].copy()
    x[:400] = x[0]
    tok = SemanticIdTokenizer(tiny_config({"collisions.suffix_size": 64}))
    with pytest.warns(SuffixOverflowWarning):
        ids = tok.fit(x).encode(x)
    assert len(_rows(ids)) == N_A and ids[:, -1].max() < 64
    assert len(_rows(ids[:400, :2])) == 1  # the identical items keep one prefix
    assert len(_rows(ids[:400, :3])) > 400 // 64  # ... and fill several of its codes
    np.testing.assert_array_equal(tok.encode(x), ids)  # and keep those IDs


class _Trained(Exception):
    """Raised in place of training: the checks before it passed."""


@pytest.mark.parametrize("strategy, room", [("suffix", 4 * 3), ("remap", 16 * 4)])
def test_fit_refuses_more_identical_items_than_their_prefix_holds_before_training(data, tiny_config, monkeypatch,
                                                                                  strategy, room):
    """Codebooks (4, 16, 4) and suffix_size 3: the suffix strategy numbers 4 x 3 items of one prefix, and remap,
    which may move them to the 16 x 4 tuples under their level-1 code, more. One identical item beyond that
    is refused before any training; exactly that many reach it."""
    def stop(*args: object, **kwargs: object) -> None:
        raise _Trained

    monkeypatch.setattr("semid.tokenizer.Trainer.fit", stop)
    tok = SemanticIdTokenizer(tiny_config({"collisions.strategy": strategy, "quantizer.codebook_size": [4, 16, 4],
                                           "collisions.suffix_size": 3}))
    x = data["a"][:700].copy()  # within the 4 x 16 x 4 x 3 = 768 IDs of the whole config
    x[:room] = x[0]
    with pytest.raises(_Trained):
        tok.fit(x)
    x[room] = x[0]
    with pytest.raises(InputError, match=f"{room + 1} items share one embedding exactly, more than the {room} IDs"):
        tok.fit(x)


@pytest.mark.parametrize("strategy", ["suffix", "remap"])
def test_fit_refuses_a_catalogue_larger_than_every_id_the_config_can_give(data, tiny_config, monkeypatch, strategy):
    """Two levels of 4 codes and suffix_size 3 give 48 IDs: 48 items reach training, 49 are refused before it
    (before, the run trained and then failed to register them)."""
    def stop(*args: object, **kwargs: object) -> None:
        raise _Trained

    monkeypatch.setattr("semid.tokenizer.Trainer.fit", stop)
    tok = SemanticIdTokenizer(tiny_config({"collisions.strategy": strategy, "quantizer.levels": 2,
                                           "quantizer.codebook_size": 4, "collisions.suffix_size": 3}))
    with pytest.raises(_Trained):
        tok.fit(data["a"][:48])
    with pytest.raises(InputError, match=r"49 items need distinct IDs, but codebook sizes \[4, 4\] with "
                                         r"collisions.suffix_size = 3 give at most 48"):
        tok.fit(data["a"][:49])
    none = SemanticIdTokenizer(tok.config.with_overrides({"collisions.strategy": "none"}))
    with pytest.raises(_Trained):  # IDs may repeat: nothing to run out of
        none.fit(data["a"][:49])


@pytest.mark.parametrize("strategy", ["suffix", "remap", "none"])
def test_token_vocabulary_covers_every_token_of_the_ids(data, tiny_config, strategy):
    """The vocabulary lists each level's codes and, where IDs carry one, the suffix values up to
    collisions.suffix_size; every token of every encoded ID is in it."""
    tok = SemanticIdTokenizer(tiny_config({"collisions.strategy": strategy, "collisions.suffix_size": 16}))
    ids = tok.fit(data["a"]).encode(data["a"])
    vocab = tok.token_vocabulary()
    sizes = [*tok.model.codebook_sizes, *([16] if ids.shape[1] > len(tok.model.codebook_sizes) else [])]
    assert len(vocab) == len(set(vocab)) == sum(sizes)
    assert ids.shape[1] == 3 + (strategy == "suffix")
    used = {token for s in token_strings(ids) for token in re.findall(r"<[a-z]_\d+>", s)}
    assert used <= set(vocab) and f"<{'abcd'[ids.shape[1] - 1]}_0>" in vocab
    if strategy == "suffix":  # a suffix saved under a larger bound still gets its token
        assert ids[:, -1].max() >= 2
        tok.config = tok.config.with_overrides({"collisions.suffix_size": 2})
        assert len(tok.token_vocabulary()) == sum(sizes[:-1]) + max(2, int(ids[:, -1].max()) + 1)


def test_token_vocabulary_of_remap_that_fell_back_to_suffixes_has_the_suffix_position(data, tiny_config):
    """1,200 items cannot keep length 3 in 4 x 4 x 4 tuples, so remap's first call fixes IDs of length 4;
    the vocabulary follows the registry, not the strategy's usual length."""
    tok = SemanticIdTokenizer(tiny_config({"collisions.strategy": "remap", "quantizer.codebook_size": 4,
                                           "collisions.suffix_size": 128}))
    ids = tok.fit(data["a"]).encode(data["a"])
    assert ids.shape[1] == 4 and tok.token_vocabulary() == token_vocabulary([4, 4, 4, 128])


def test_remap_gives_hundreds_of_near_copies_on_a_full_prefix_ids_of_length_l(data, tiny_config, tmp_path):
    """Remap fitted where no prefix was full saves IDs of length L. Encoding 300 noisy copies of one item
    (more than the 16 codes of its prefix) then moves the overflow to nearby prefixes, still at length L,
    rather than failing the whole encode for want of a suffix. Through encode_file, as `semid encode` does."""
    fit_x = data["a"][:300]
    tok = SemanticIdTokenizer(tiny_config({"collisions.strategy": "remap", "quantizer.codebook_size": [16, 32, 16]}))
    fit_ids = tok.fit(fit_x).encode(fit_x)
    # Precondition: nothing left its prefix at fit, so a length L registry was what the old rule fixed too.
    assert tok.registry.id_length == 3
    np.testing.assert_array_equal(fit_ids[:, :2], tok.encode_raw(fit_x)[:, :2])
    copies = data["b"][0] + 1e-3 * data["b"].std() * np.random.default_rng(0).standard_normal((300, data["b"].shape[1]))
    source = tmp_path / "copies.npy"
    np.save(source, copies.astype(np.float32))
    raw = tok.encode_raw(np.load(source))
    assert np.unique(raw[:, :2], axis=0, return_counts=True)[1].max() > 16  # their prefix overflows
    path = tok.save(tmp_path / "model")

    def encode_copies(name: str) -> np.ndarray:
        fresh = SemanticIdTokenizer.load(path)
        fresh.encode_file(source, tmp_path / f"{name}.parquet", progress=False)
        np.testing.assert_array_equal(fresh.encode(fit_x), fit_ids)  # the saved IDs stay as they were
        return np.array(pl.read_parquet(tmp_path / f"{name}.parquet")["codes"].to_list())

    ids = encode_copies("first")
    assert ids.shape == (300, 3) and len(_rows(ids)) == 300 and not _rows(ids) & _rows(fit_ids)
    assert (ids[:, 0] == raw[:, 0]).all() and (ids[:, 1] != raw[:, 1]).any()  # moved at level 2, kept level 1
    np.testing.assert_array_equal(encode_copies("second"), ids)  # deterministic


# ---- errors ---------------------------------------------------------------------------------------


def test_bad_inputs_are_refused(data, model_dir):
    tok = SemanticIdTokenizer.load(model_dir("suffix", True))
    with pytest.raises(InputError, match="dimension"):
        tok.encode(data["a"][:, :100])
    nan = data["a"][:10].copy()
    nan[3, 7] = np.nan
    with pytest.raises(InputError, match="NaN"):
        tok.encode(nan)
    with pytest.raises(InputError, match="unique"):
        tok.encode(_frame(data["a"][:3], np.array(["x", "y", "x"])))
    with pytest.raises(RuntimeError, match="not fitted"):
        SemanticIdTokenizer().encode(data["a"])


def test_load_refuses_incomplete_or_foreign_directories(model_dir, tmp_path):
    import shutil

    with pytest.raises(ModelDirError, match="not found"):
        SemanticIdTokenizer.load(tmp_path / "nothing")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hello")
    with pytest.raises(ModelDirError, match="not a semid model directory"):
        SemanticIdTokenizer.load(foreign)
    broken = tmp_path / "broken"
    shutil.copytree(model_dir("suffix", True), broken)
    weights = (broken / "model.pt").read_bytes()
    (broken / "model.pt").write_bytes(weights[: len(weights) // 3])
    with pytest.raises(ModelDirError, match="model.pt"):
        SemanticIdTokenizer.load(broken)
    (broken / "meta.json").unlink()
    with pytest.raises(ModelDirError, match="meta.json"):
        SemanticIdTokenizer.load(broken)


def test_balanced_last_level_spreads_codes_and_keeps_ids_unique(data, model_dir):
    """Sinkhorn at the last level evens out code use there; collision handling still makes IDs unique."""
    plain = SemanticIdTokenizer.load(model_dir("suffix", False))
    balanced = SemanticIdTokenizer.load(model_dir("suffix", False))
    balanced.config = balanced.config.with_overrides({"collisions.balanced_last_level": True})
    x = data["b"]
    ids_plain, ids_balanced = plain.encode(x), balanced.encode(x)
    k_last = plain.model.codebook_sizes[-1]
    assert np.bincount(ids_balanced[:, 2], minlength=k_last).max() < np.bincount(ids_plain[:, 2], minlength=k_last).max()
    assert (ids_balanced[:, :2] == ids_plain[:, :2]).all()  # only the last level is rebalanced
    assert len(_rows(ids_balanced)) == len(x)
    # Calls of fewer items than codes keep each item's nearest code: balanced alone, an item took code 0
    fresh = SemanticIdTokenizer.load(model_dir("suffix", False))
    fresh.config = balanced.config
    lone = np.concatenate([fresh.encode(x[i : i + 1]) for i in range(40, 60)])
    np.testing.assert_array_equal(lone[:, :3], fresh.encode_raw(x[40:60]))


def test_ids_longer_than_a_64_bit_prefix_key_train_without_prefix_centres(data, tiny_config, tmp_path):
    """Nine levels of 256 codes have 2^64 prefixes: prefix centres, which key each prefix by an int64, are refused
    by name before training; without them such IDs train, stay unique and round-trip."""
    with pytest.raises(ConfigError, match=r"quantizer.prefix_centres .* set quantizer.prefix_centres = false"):
        tiny_config({"quantizer.levels": 9, "quantizer.codebook_size": 256})
    config = tiny_config({"model.type": "rqkmeans", "quantizer.levels": 9, "quantizer.codebook_size": 256,
                          "quantizer.prefix_centres": False, "quantizer.refine_passes": 1})
    tok = SemanticIdTokenizer(config).fit(data["a"])
    ids = tok.encode(data["a"])
    assert ids.shape == (len(data["a"]), 10) and len(_rows(ids)) == len(ids)
    loaded = SemanticIdTokenizer.load(tok.save(tmp_path / "long"))
    np.testing.assert_array_equal(loaded.encode(data["a"]), ids)


def test_a_model_records_the_steps_its_catalogue_trained_for_and_keeps_the_recipe(data, tiny_config, tmp_path):
    """train.min_epochs resolves the steps per catalogue. The model's metadata says how many ran; the config
    stays the recipe, so a second fit of the same tokenizer (or of a loaded one) on a smaller catalogue trains
    the steps a fresh tokenizer would, and gives the same model."""
    config = tiny_config({"train.steps": 10, "train.min_epochs": 3, "train.eval_every": 0})
    tok = SemanticIdTokenizer(config)
    tok.fit(data["a"])
    expected = -(-3 * len(data["a"]) // 256)  # ceil: 3 passes in 256-row batches
    assert expected > 10 and tok.meta["train_steps"] == expected
    assert tok.config.train.steps == 10
    loaded = SemanticIdTokenizer.load(tok.save(tmp_path / "model"))
    assert loaded.meta["train_steps"] == expected and loaded.config.train.steps == 10
    small = data["a"][:300]
    loaded.fit(small)
    fresh = SemanticIdTokenizer(config).fit(small)
    assert loaded.meta["train_steps"] == fresh.meta["train_steps"] == 10
    np.testing.assert_array_equal(loaded.encode_raw(small), fresh.encode_raw(small))


def test_fit_warns_when_a_few_items_hold_most_of_the_variance(data, tiny_config):
    """Popularity-scaled rows, as collaborative factors have, get a HeavyTailWarning when batches are drawn
    uniformly; real text embeddings none, and neither does training with train.norm_sampling."""
    import warnings

    from semid.tokenizer import HeavyTailWarning

    config = tiny_config({"train.steps": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error", HeavyTailWarning)
        SemanticIdTokenizer(config).fit(data["a"])
    heavy = data["a"].copy()
    heavy[:12] *= 30.0
    with pytest.warns(HeavyTailWarning, match=r"the top 1% of items hold \d+% of the embeddings' variance"):
        SemanticIdTokenizer(config).fit(heavy)
    with warnings.catch_warnings():  # batches drawn by norm are the remedy the warning names
        warnings.simplefilter("error", HeavyTailWarning)
        SemanticIdTokenizer(config.with_overrides({"train.norm_sampling": 0.5})).fit(heavy)
        tiny = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)  # one of 5 holds 29%: not a tail
        SemanticIdTokenizer(config.with_overrides({"quantizer.codebook_size": 2, "quantizer.kmeans_init": False,
                                                   "quantizer.prefix_centres": False})).fit(tiny)
    rqkmeans = config.with_overrides({"model.type": "rqkmeans", "train.norm_sampling": 0.5})
    with pytest.warns(HeavyTailWarning, match=r"residual k-means .*Use model.type = \"rqvae\""):
        SemanticIdTokenizer(rqkmeans).fit(heavy)  # which draws no batches: norm_sampling does nothing there


def test_fit_warns_of_rows_on_another_scale_than_the_rest(data, tiny_config):
    """A few rows a million times as long as the others (never normalised as the rest were) pull every other
    item onto a few codes; collaborative factors (up to about 100x) and text embeddings get no warning."""
    import warnings

    from semid.tokenizer import OutlierRowsWarning

    config = tiny_config({"train.steps": 2})
    heavy = data["a"].copy()
    heavy[:12] *= 100.0  # as far as Beauty's item factors reach
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutlierRowsWarning)
        SemanticIdTokenizer(config).fit(data["a"])
        SemanticIdTokenizer(config).fit(heavy)
    broken = data["a"].copy()
    broken[[7, 40]] *= 1e6
    with pytest.warns(OutlierRowsWarning, match=r"2 rows are over 1,000x as long as the median row .*first: row 7"):
        SemanticIdTokenizer(config).fit(broken)


def test_rows_without_ids_on_a_model_that_knows_its_items_by_id_are_warned(data, model_dir):
    from semid.tokenizer import UnnamedItemsWarning

    named = SemanticIdTokenizer.load(model_dir("suffix", True))
    with pytest.warns(UnnamedItemsWarning, match="pass the ids"):
        named.encode(data["a"][:10])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UnnamedItemsWarning)
        named.encode(data["a"][:10])  # those rows are registered now, by content: no warning
        named.encode(_frame(data["a"][:10], data["ids_a"][:10]))
        SemanticIdTokenizer.load(model_dir("suffix", False)).encode(data["a"][:10])  # a model of unnamed rows


def test_rows_with_ids_on_a_model_that_knows_its_items_by_embedding_are_warned(data, model_dir, tmp_path):
    """The other way round: a model fitted on a bare matrix would give its known items new IDs under ids."""
    from semid.tokenizer import UnnamedItemsWarning

    unnamed = SemanticIdTokenizer.load(model_dir("suffix", False))
    saved = unnamed.encode(data["a"][:10])
    with pytest.warns(UnnamedItemsWarning, match="encode them without ids"):
        renamed = unnamed.encode(_frame(data["a"][:10], data["ids_a"][:10]))
    assert not (renamed == saved).all(axis=1).any()  # what the warning is about: known items, new IDs
    frame = _frame(data["a"][:10], data["ids_a"][:10])
    frame.write_parquet(tmp_path / "named.parquet")
    with pytest.warns(UnnamedItemsWarning, match="encode them without ids"):  # encode_file warns alike
        SemanticIdTokenizer.load(model_dir("suffix", False)).encode_file(
            tmp_path / "named.parquet", tmp_path / "ids.parquet", progress=False)


def test_evaluate_scores_new_items_without_registering_them(data, model_dir):
    tok = SemanticIdTokenizer.load(model_dir("suffix", True))
    before = len(tok.registry)
    new = _frame(data["b"][:200], data["ids_b"][:200])
    report = tok.evaluate(new)
    assert len(tok.registry) == before and not tok.registry.lookup(data["ids_b"][:1])[0].any()
    ids = tok.encode(new)  # what encode then gives them is what evaluate scored
    assert report["unique_after"] == len(_rows(ids)) / 200 == 1.0
    assert len(tok.registry) == before + 200

