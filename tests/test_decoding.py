"""PrefixIndex: constrained decoding masks on tensors, checked against a plain-Python trie.

The module imports no polars (the device machine's image has none), so that the CUDA cases run there too.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch

from semid.decoding import PrefixIndex, SemanticIdLogitsProcessor

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="needs a CUDA device"))]


def prefix_trie(ids: np.ndarray) -> dict[tuple[int, ...], list[int]]:
    """Reference: every prefix of the IDs -> the sorted codes that follow it in at least one ID."""
    children = defaultdict(set)
    for row in ids.tolist():
        for depth, code in enumerate(row):
            children[tuple(row[:depth])].add(code)
    return {prefix: sorted(codes) for prefix, codes in children.items()}


def _catalogue(seed: int, n: int, sizes: list[int]) -> np.ndarray:
    """(n, w) distinct IDs, crowded into few prefixes, as semantic IDs are (many items under few first codes)."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.integers(0, max(1, k // (4 - min(j, 3))), n) for j, k in enumerate(sizes)], axis=1)
    return np.unique(ids, axis=0)[rng.permutation(len(np.unique(ids, axis=0)))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed, n, sizes", [(0, 500, [8, 8, 8, 4]), (1, 3000, [16, 16, 16]), (2, 40, [3, 5]),
                                            (3, 1, [7, 2, 9])])
def test_next_codes_are_the_tries_children_and_nothing_else(seed, n, sizes, device):
    ids = _catalogue(seed, n, sizes)
    index = PrefixIndex(ids, sizes, device=device)
    trie = prefix_trie(ids)
    rng = np.random.default_rng(seed + 100)
    for t in range(len(sizes)):
        held = [p for p in trie if len(p) == t]  # every prefix there is
        held = np.array(held, dtype=np.int64).reshape(len(held), t)
        absent = rng.integers(0, sizes[:t] or 1, size=(200, t)) if t else np.zeros((0, 0), np.int64)
        absent = absent[[tuple(p) not in trie for p in absent.tolist()]]
        prefixes = np.concatenate([held, absent])
        mask = index.next_codes(torch.from_numpy(prefixes).to(device))
        assert mask.shape == (len(prefixes), sizes[t]) and mask.device.type == device
        expected = np.zeros((len(prefixes), sizes[t]), dtype=bool)
        for row, prefix in enumerate(held.tolist()):
            expected[row, trie[tuple(prefix)]] = True
        np.testing.assert_array_equal(mask.cpu().numpy(), expected)


def test_a_code_outside_its_range_never_reads_as_another_prefixs_child():
    """Keys are parent * size + code, so code 5 under prefix (0,) would be key 5 = prefix (1,)'s code 1 were
    codes not checked against their range; negative codes (padding) likewise."""
    index = PrefixIndex(np.array([[0, 1], [1, 1]]), [2, 4])
    assert index.contains(np.array([[0, 5], [1, 1], [0, -3], [-1, 1], [2, 1]])).tolist() == [False, True, False,
                                                                                             False, False]
    assert index.next_codes(np.array([[2], [-1], [1]])).tolist() == [[False] * 4, [False] * 4,
                                                                     [False, True, False, False]]


@pytest.mark.parametrize("device", DEVICES)
def test_next_tokens_place_each_positions_codes_at_its_vocabulary_offset(device):
    pytest.importorskip("polars")  # semid.export's strings are made by polars
    from semid.export import token_strings, token_vocabulary

    sizes = [8, 8, 8, 4]
    ids = _catalogue(5, 400, sizes)
    index = PrefixIndex(torch.from_numpy(ids).to(device), sizes)
    vocabulary = token_vocabulary(sizes)
    assert index.vocabulary_size == len(vocabulary) and index.device.type == device
    number = {token: i for i, token in enumerate(vocabulary)}
    tokens = np.array([[number[t] for t in row.replace("><", "> <").split()] for row in token_strings(ids)])
    offsets = np.cumsum([0, *sizes[:-1]])
    np.testing.assert_array_equal(tokens, ids + offsets)  # token_vocabulary's order, by its own strings
    for t in range(len(sizes)):
        mask = index.next_tokens(tokens[:, :t])
        codes = index.next_codes(ids[:, :t])
        assert not mask[:, : offsets[t]].any() and not mask[:, offsets[t] + sizes[t]:].any()
        assert torch.equal(mask[:, offsets[t] : offsets[t] + sizes[t]], codes)
        assert mask[torch.arange(len(ids)), torch.from_numpy(tokens[:, t])].all()  # each item's own next token
    wrong_position = tokens[:, :2].copy()
    wrong_position[:, 1] = tokens[:, 0]  # position 0's token where position 1's belongs
    assert not index.next_tokens(wrong_position).any()


def test_contains_is_membership_of_the_catalogue():
    sizes = [6, 6, 6]
    ids = _catalogue(7, 150, sizes)
    index = PrefixIndex(ids, sizes)
    rng = np.random.default_rng(8)
    queries = np.concatenate([ids, rng.integers(0, 6, size=(300, 3))])
    known = set(map(tuple, ids.tolist()))
    assert index.contains(queries).tolist() == [tuple(q) in known for q in queries.tolist()]


@pytest.mark.parametrize("device", DEVICES)
def test_constrained_greedy_decoding_of_random_logits_always_lands_on_an_item(device):
    """What a generative retriever does with it: at every step, mask the logits, take the best; however
    wrong the model, each beam ends on an ID of the catalogue."""
    sizes = [16, 16, 16, 3]
    ids = _catalogue(9, 2000, sizes)
    index = PrefixIndex(ids, sizes, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    generated = torch.zeros(512, 0, dtype=torch.long, device=device)
    for _ in range(index.width):
        logits = torch.randn(512, index.vocabulary_size, generator=generator, device=device)
        logits = logits.masked_fill(~index.next_tokens(generated), float("-inf"))
        generated = torch.cat([generated, logits.argmax(dim=1, keepdim=True)], dim=1)
    codes = index.codes(generated)
    assert torch.equal(codes, generated - torch.tensor(np.cumsum([0, *sizes[:-1]]), device=device))
    assert index.contains(codes).all()
    assert set(map(tuple, codes.tolist())) <= set(map(tuple, ids.tolist()))
    assert len(set(map(tuple, codes.tolist()))) > 100  # the masks steer; they do not collapse every beam to one ID


def test_default_sizes_are_each_columns_largest_code_plus_one():
    index = PrefixIndex(np.array([[0, 4], [2, 1], [2, 1]]))  # a repeated ID is one ID
    assert index.sizes == (3, 5) and index.width == 2
    assert repr(index) == "PrefixIndex(2 IDs, sizes (3, 5), on cpu)"
    assert index.next_codes(np.zeros((3, 0), dtype=np.int64)).tolist() == [[True, False, True]] * 3
    assert index.next_codes(np.zeros((0, 1), dtype=np.int64)).shape == (0, 5)


@pytest.mark.parametrize("ids, sizes, message", [
    (np.zeros((0, 3), np.int64), None, r"non-empty .* got shape \(0, 3\)"),
    (np.zeros(4, np.int64), None, r"got shape \(4,\)"),
    (np.zeros((2, 3)), None, "integer IDs, got torch.float64"),
    (np.array([[0, 1], [0, -2]]), None, "non-negative: row 1 has -2 at position 1"),
    (np.array([[0, 1], [0, 4]]), [2, 4], "row 1 has code 4 at position 1, outside its 4 values"),
    (np.array([[0, 1]]), [2], r"each of the IDs' 2 positions, got \[2\]"),
    (np.array([[0, 1]]), [2, 0], r"positive size .* got \[2, 0\]"),
    (np.array([[0, 1]]), [2.5, 3], r"sizes must be whole numbers, got \[2.5, 3\]"),
    (np.array([[0, 0], [1, 0], [2, 0], [3, 0], [4, 9]]), [5, 2**62], "position 1: 5 distinct prefixes x "
                                                                       f"{2**62} values do not fit 64-bit keys"),
])
def test_bad_ids_are_named(ids, sizes, message):
    with pytest.raises(ValueError, match=message):
        PrefixIndex(ids, sizes)


def test_bad_prefixes_are_named():
    index = PrefixIndex(np.array([[0, 1, 2]]), [2, 2, 3])
    with pytest.raises(ValueError, match="prefixes of 3 tokens: an ID has 3, so nothing comes next. Pass only the "
                                         "tokens generated for this ID"):
        index.next_codes(np.array([[0, 1, 2]]))
    with pytest.raises(ValueError, match="the index is on cpu and the prefixes on meta: build it there"):
        index.next_codes(torch.zeros(2, 1, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match=r"semantic tokens \(numbers 5 to 11\) must lie inside the vocabulary of 10"):
        index.next_tokens(np.zeros((1, 0), np.int64), offset=5, vocab_size=10)
    with pytest.raises(ValueError, match=r"token prefixes must be a \(beams x generated\) integer matrix"):
        index.next_tokens(np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"tokens must be a \(b, <= 3\) integer matrix, got torch.int64 of shape "
                                         r"\(1, 4\)"):
        index.codes(np.array([[0, 1, 2, 3]]))
    with pytest.raises(ValueError, match=r"contains needs \(b, 3\) integer IDs, got torch.int64 of shape \(1, 2\)"):
        index.contains(np.array([[0, 1]]))


def test_codebooks_far_wider_than_any_nodes_children_give_the_tries_masks():
    """Masks are read up to the largest number of children a node has, not the codebook size: with 8,192 codes a
    level and a few hundred items, each node has a handful of children."""
    sizes = [8192, 8192, 8]
    rng = np.random.default_rng(11)
    ids = np.unique(np.stack([rng.integers(0, 40, 600), rng.integers(0, 8192, 600), rng.integers(0, 8, 600)], 1),
                    axis=0)
    index = PrefixIndex(ids, sizes)
    trie = prefix_trie(ids)
    assert index._fanout == [len(trie[()]), max(len(v) for k, v in trie.items() if len(k) == 1),
                             max(len(v) for k, v in trie.items() if len(k) == 2)]
    for t in range(3):
        prefixes = np.unique(ids[:, :t], axis=0)
        mask = index.next_codes(prefixes).numpy()
        for row, prefix in enumerate(map(tuple, prefixes.tolist())):
            assert np.flatnonzero(mask[row]).tolist() == trie[prefix]


def test_next_tokens_over_a_language_models_vocabulary_masks_every_other_token():
    """An LLM whose added semantic tokens start at id 100 in a vocabulary of 130: text tokens, EOS and the
    tokens of other positions are all masked."""
    sizes = [4, 4, 2]
    ids = _catalogue(12, 30, sizes)
    index = PrefixIndex(ids, sizes)
    tokens = ids + np.array(index.offsets) + 100
    for t in range(3):
        mask = index.next_tokens(tokens[:, :t], offset=100, vocab_size=130)
        assert mask.shape == (len(ids), 130)
        allowed = index.next_codes(ids[:, :t])
        start = 100 + index.offsets[t]
        assert torch.equal(mask[:, start : start + sizes[t]], allowed)
        assert mask.sum() == allowed.sum()  # nothing outside position t's semantic tokens
    assert not index.next_tokens(tokens[:, :1] - 100, offset=100, vocab_size=130).any()  # text tokens: no match


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_a_device_the_machine_lacks_is_named():
    with pytest.raises(RuntimeError, match="device is 'cuda' but no CUDA device is available"):
        PrefixIndex(np.array([[0, 1]]), device="cuda")
    with pytest.raises(RuntimeError, match="device is 'cuda:1' but no CUDA device is available"):
        PrefixIndex(np.array([[0, 1]])).to("cuda:1")
    with pytest.raises(ValueError, match="device 'gpu' is not one of auto, cpu, cuda"):
        PrefixIndex(np.array([[0, 1]]), device="gpu")


@pytest.mark.parametrize("device", DEVICES)
def test_to_moves_the_index_and_keeps_its_answers(device):
    ids = _catalogue(13, 200, [8, 8, 3])
    index = PrefixIndex(ids, [8, 8, 3])
    moved = index.to(device)
    assert moved.device.type == device and moved.sizes == index.sizes and index.device.type == "cpu"
    for t in range(3):
        on_device = torch.from_numpy(ids[:, :t]).to(moved.device)
        assert torch.equal(moved.next_codes(on_device).cpu(), index.next_codes(ids[:, :t]))
    if device != "cpu":  # a prefix left on the host would be copied at every step: refused by name
        with pytest.raises(ValueError, match=f"the index is on {moved.device} and the prefixes on cpu"):
            moved.next_codes(torch.from_numpy(ids[:, :1]))
    assert index.next_codes(torch.empty(3, 0)).shape == (3, 8)  # an empty float prefix is an empty prefix


@pytest.mark.parametrize("device", DEVICES)
def test_the_logits_processor_constrains_generation_then_allows_only_eos(device):
    """What `generate` calls at each step: the whole sequence so far (a 5-token prompt first), and the scores."""
    sizes = [6, 6, 2]
    ids = _catalogue(14, 50, sizes)
    index = PrefixIndex(ids, sizes, device=device)
    processor = SemanticIdLogitsProcessor(index, prompt_length=5, offset=20, eos_token_id=2)
    generator = torch.Generator(device=device).manual_seed(1)
    sequences = torch.randint(0, 20, (64, 5), generator=generator, device=device)  # prompts of text tokens
    for _ in range(index.width + 1):
        scores = processor(sequences, torch.randn(64, 40, generator=generator, device=device))
        assert torch.isfinite(scores).any(1).all()  # every beam has somewhere to go
        sequences = torch.cat([sequences, scores.argmax(1, keepdim=True)], 1)
    codes = index.codes(sequences[:, 5:8], offset=20)
    assert index.contains(codes).all() and (sequences[:, 8] == 2).all()
    free = SemanticIdLogitsProcessor(index, prompt_length=5, offset=20)  # no EOS: past the ID nothing is masked
    scores = torch.randn(4, 40, device=device)
    assert torch.equal(free(sequences[:4, :8], scores), scores)


def test_a_hugging_face_model_generates_only_catalogue_ids():
    """The processor inside `generate` of a small random GPT-2 (no download): greedy and beam search."""
    transformers = pytest.importorskip("transformers")
    sizes = [8, 8, 4]
    ids = _catalogue(15, 120, sizes)
    index = PrefixIndex(ids, sizes)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50 + index.vocabulary_size, n_layer=1, n_head=2, n_embd=32,
                                     n_positions=32, eos_token_id=1, pad_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    prompt = torch.randint(2, 50, (3, 6))
    processor = SemanticIdLogitsProcessor(index, prompt_length=6, offset=50, eos_token_id=1)
    for beams in (1, 4):
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=index.width + 1,
                             num_beams=beams, num_return_sequences=beams, do_sample=False,
                             logits_processor=transformers.LogitsProcessorList([processor]))
        codes = index.codes(out[:, 6:9], offset=50)
        assert index.contains(codes).all() and (out[:, 9] == 1).all()
