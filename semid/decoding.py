"""Constrained decoding on tensors: which token may come next, for a whole batch of beams at once.

A generative retriever that decodes semantic IDs freely can emit an ID that names no item. Constrained beam
search masks, at every step, the logits of the tokens that would leave the catalogue. `semid.export.prefix_trie`
answers that as a Python dict, one beam at a time, which leaves the GPU waiting on the host at each step.
`PrefixIndex` answers it for a (beams, t) batch of prefixes with a few searches in sorted tensors, on the
device the logits are on, with no host synchronisation.

How it works: every prefix of length j + 1 in the catalogue gets a dense node number, the rank of
`parent_node * size_j + code_j` among the distinct such keys (one sorted int64 tensor per position). A prefix
is walked position by position with `searchsorted`; the children of node n at position t are the keys in
[n * size_t, (n + 1) * size_t), one run of the sorted keys, read up to the largest number of children any
node there has (a Python int known at build time, so shapes never depend on data). Memory is one int64 per
distinct prefix and position (at most 8 bytes x items x tokens per ID), where a dense next-code bitmap per
node would need items x size.
"""
from __future__ import annotations

import copy
import operator
from collections.abc import Sequence

import numpy as np
import torch

from semid.device import resolve_device

_INT64_MAX = torch.iinfo(torch.int64).max


def _device(device: str | torch.device | None) -> torch.device | None:
    """A device named as everywhere in semid (cpu, cuda, cuda:N, auto): one this machine lacks says so."""
    return None if device is None else resolve_device(str(device))


def _tensor(values: np.ndarray | torch.Tensor, device: str | torch.device | None) -> torch.Tensor:
    if isinstance(values, np.ndarray) and not values.flags.writeable:  # the registry's IDs are read-only, which
        values = values.copy()  # torch would warn of
    return torch.as_tensor(values, device=device)


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


class PrefixIndex:
    """The catalogue's IDs, indexed for `next_codes` and `next_tokens` masks (see the module docstring).

    ids: (n, w) final IDs (numpy or torch), one per item. sizes: how many values each position takes (the
    codebook sizes, then the suffix bound; `SemanticIdTokenizer.prefix_index` passes them), which fixes the
    width of the masks and the token numbers of `semid.export.token_vocabulary`; by default each column's
    largest code + 1. The index lives on `device` (by default the ids'), where the prefixes must be too.
    """

    def __init__(self, ids: np.ndarray | torch.Tensor, sizes: Sequence[int] | None = None, *,
                 device: str | torch.device | None = None) -> None:
        ids = _tensor(ids, _device(device))
        if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"PrefixIndex needs a non-empty (items x tokens) matrix of IDs, got shape "
                             f"{tuple(ids.shape)}")
        if not _is_integer(ids):
            raise ValueError(f"PrefixIndex needs integer IDs, got {ids.dtype}")
        ids = ids.long()
        if bool((ids < 0).any()):
            row, column = (ids < 0).nonzero()[0].tolist()
            raise ValueError(f"IDs must be non-negative: row {row} has {int(ids[row, column])} at position {column}")
        largest = ids.max(dim=0).values.tolist()  # (w,)
        try:
            sizes = [value + 1 for value in largest] if sizes is None else [operator.index(k) for k in sizes]
        except TypeError:
            raise ValueError(f"sizes must be whole numbers, got {list(sizes)}") from None
        if len(sizes) != ids.shape[1] or min(sizes) < 1:
            raise ValueError(f"sizes must give a positive size for each of the IDs' {ids.shape[1]} positions, "
                             f"got {sizes}")
        for position, (value, size) in enumerate(zip(largest, sizes)):
            if value >= size:
                row = int((ids[:, position] >= size).nonzero()[0])
                raise ValueError(f"row {row} has code {int(ids[row, position])} at position {position}, outside "
                                 f"its {size} values")
        self.sizes: tuple[int, ...] = tuple(sizes)
        self.device = ids.device
        # offsets[t]: the token number of position t's code 0 in token_vocabulary(sizes) order
        self.offsets: tuple[int, ...] = tuple(int(o) for o in np.cumsum([0, *sizes[:-1]]))
        self._offsets = torch.tensor(self.offsets, dtype=torch.long, device=self.device)  # (w,)
        self._keys: list[torch.Tensor] = []  # per position: sorted distinct parent_node * size + code
        self._fanout: list[int] = []  # per position: the most children a node has there
        node = torch.zeros(len(ids), dtype=torch.long, device=self.device)  # (n,) every item starts at the root
        parents = 1
        for position, size in enumerate(sizes):
            if parents * size > _INT64_MAX:  # node * size + code must stay an int64 key
                raise ValueError(f"position {position}: {parents} distinct prefixes x {size} values do not fit "
                                 f"64-bit keys; sizes this large are not codebook sizes")
            keys, node = torch.unique(node * size + ids[:, position], sorted=True, return_inverse=True)
            self._keys.append(keys)
            self._fanout.append(int(torch.unique_consecutive(keys // size, return_counts=True)[1].max()))
            parents = len(keys)
        self._root = self._children(torch.zeros(1, dtype=torch.long, device=self.device), 0)  # (1, sizes[0])

    def __repr__(self) -> str:
        return f"PrefixIndex({len(self._keys[-1]):,} IDs, sizes {self.sizes}, on {self.device})"

    @property
    def width(self) -> int:
        """Tokens per ID."""
        return len(self.sizes)

    @property
    def vocabulary_size(self) -> int:
        """Tokens in `token_vocabulary(sizes)`: the semantic tokens' part of a `next_tokens` mask."""
        return sum(self.sizes)

    def to(self, device: str | torch.device) -> PrefixIndex:
        """The same index on another device (the one the decoder's logits are on)."""
        device = _device(device)
        moved = copy.copy(self)
        moved._keys = [keys.to(device) for keys in self._keys]
        moved._offsets, moved._root = self._offsets.to(device), self._root.to(device)
        moved.device = moved._offsets.device  # "cuda" -> "cuda:0", as tensors report it
        return moved

    def _walk(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, t) codes -> (node, found), each (b,): the node each prefix ends at, and whether the catalogue
        holds that prefix (a code outside its position's range is not held: it would alias another node's child)."""
        node = torch.zeros(len(codes), dtype=torch.long, device=self.device)
        found = torch.ones(len(codes), dtype=torch.bool, device=self.device)
        for position in range(codes.shape[1]):
            size, keys = self.sizes[position], self._keys[position]
            code = codes[:, position]
            key = node * size + code.clamp(0, size - 1)
            at = torch.searchsorted(keys, key).clamp(max=len(keys) - 1)
            found &= (keys[at] == key) & (code >= 0) & (code < size)
            node = torch.where(found, at, 0)
        return node, found

    def _children(self, node: torch.Tensor, position: int, found: torch.Tensor | None = None) -> torch.Tensor:
        """(b,) nodes at `position` -> (b, sizes[position]) bool: their children's codes (none where not found)."""
        size, keys = self.sizes[position], self._keys[position]
        first = torch.searchsorted(keys, node * size)  # (b,) the run of node n's children starts here
        count = torch.searchsorted(keys, node * size + size) - first  # (b,)
        if found is not None:
            count = torch.where(found, count, 0)
        child = torch.arange(self._fanout[position], device=self.device)  # (f,)
        at = (first[:, None] + child).clamp(max=len(keys) - 1)  # (b, f)
        # each child's code, or the spare column `size` past a node's last child: (b, size + 1), then cut
        column = torch.where(child < count[:, None], keys[at] - node[:, None] * size, size)
        mask = torch.zeros(len(node), size + 1, dtype=torch.bool, device=self.device)
        return mask.scatter_(1, column, True)[:, :size]

    def _local(self, values: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
        """Host arrays are copied to the index's device; a tensor on another device is refused rather than
        copied, since that copy would wait on the device at every decoding step."""
        if isinstance(values, torch.Tensor) and values.device != self.device:
            raise ValueError(f"the index is on {self.device} and the {what} on {values.device}: build it there "
                             f"(device=...) or move it, index.to({str(values.device)!r})")
        return _tensor(values, self.device)

    def _prefixes(self, prefixes: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
        prefixes = self._local(prefixes, what)
        if prefixes.ndim != 2 or (prefixes.shape[1] and not _is_integer(prefixes)):
            raise ValueError(f"{what} must be a (beams x generated) integer matrix, got {prefixes.dtype} of shape "
                             f"{tuple(prefixes.shape)}")
        if prefixes.shape[1] >= self.width:
            raise ValueError(f"{what} of {prefixes.shape[1]} tokens: an ID has {self.width}, so nothing comes "
                             f"next. Pass only the tokens generated for this ID (not a prompt before them)")
        return prefixes.long()

    def next_codes(self, prefixes: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(b, t) generated codes, t < width -> (b, sizes[t]) bool: True where code c of position t continues
        the prefix to an ID in the catalogue. A prefix that no ID starts with (a dead beam, padding such as -1)
        gets a row of False: a decoder that masks from the first token on never meets one."""
        codes = self._prefixes(prefixes, "prefixes")
        if codes.shape[1] == 0:  # the root's children, the same for every beam
            return self._root.expand(len(codes), -1).clone()
        node, found = self._walk(codes)
        return self._children(node, codes.shape[1], found)

    def next_tokens(self, prefixes: np.ndarray | torch.Tensor, *, offset: int = 0,
                    vocab_size: int | None = None) -> torch.Tensor:
        """The same over a model's whole vocabulary: (b, t) generated token numbers -> (b, vocab_size) bool,
        True only at the allowed semantic tokens of position t, so every other token (text, EOS, padding) is
        masked too. Position t's code c is token number offset + offsets[t] + c: the order of
        `token_vocabulary(sizes)`, starting at `offset` (0 for a decoder whose vocabulary is those tokens; for an
        LLM, the id of the first token added from that list). vocab_size defaults to offset + vocabulary_size."""
        tokens = self._prefixes(prefixes, "token prefixes")
        position = tokens.shape[1]
        vocab_size = offset + self.vocabulary_size if vocab_size is None else vocab_size
        if offset < 0 or vocab_size < offset + self.vocabulary_size:
            raise ValueError(f"the semantic tokens (numbers {offset} to {offset + self.vocabulary_size - 1}) must "
                             f"lie inside the vocabulary of {vocab_size}")
        codes = self.codes(tokens, offset=offset)
        mask = torch.zeros(len(tokens), vocab_size, dtype=torch.bool, device=self.device)
        start = offset + self.offsets[position]
        mask[:, start : start + self.sizes[position]] = self.next_codes(codes)
        return mask

    def codes(self, tokens: np.ndarray | torch.Tensor, *, offset: int = 0) -> torch.Tensor:
        """(b, t) token numbers (t <= width, numbered from `offset` as in `next_tokens`) -> (b, t) codes, the
        rows `SemanticIdTokenizer.items_for` and `contains` read. A token of another position, or a text
        token, becomes a code outside its position's range, which names nothing."""
        tokens = self._local(tokens, "tokens")
        if tokens.ndim != 2 or tokens.shape[1] > self.width or (tokens.shape[1] and not _is_integer(tokens)):
            raise ValueError(f"tokens must be a (b, <= {self.width}) integer matrix, got {tokens.dtype} of shape "
                             f"{tuple(tokens.shape)}")
        return tokens.long() - (self._offsets[: tokens.shape[1]] + offset)

    def contains(self, ids: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(b, w) complete IDs -> (b,) bool: whether each names an item of the catalogue (as
        `SemanticIdTokenizer.items_for` does, on the device and without the item names)."""
        ids = self._local(ids, "IDs")
        if ids.ndim != 2 or ids.shape[1] != self.width or not _is_integer(ids):
            raise ValueError(f"contains needs (b, {self.width}) integer IDs, got {ids.dtype} of shape "
                             f"{tuple(ids.shape)}")
        return self._walk(ids.long())[1]


class SemanticIdLogitsProcessor:
    """Constrained generation with a Hugging Face model (`generate(..., logits_processor=[this])`) or any loop
    that calls `processor(input_ids, scores)` at each step: every token that would leave the catalogue gets
    -inf, and once an ID is complete only `eos_token_id` may follow (or nothing is masked, without one).

    input_ids are the whole sequences so far: the first `prompt_length` columns (a decoder-only model's
    (left-padded) prompt, or an encoder-decoder's decoder start token: 1) are not part of the ID. Semantic
    tokens are numbered from `offset` in `token_vocabulary` order (see `PrefixIndex.next_tokens`).
    """

    def __init__(self, index: PrefixIndex, *, prompt_length: int, offset: int = 0,
                 eos_token_id: int | None = None) -> None:
        self.index, self.prompt_length, self.offset, self.eos_token_id = index, prompt_length, offset, eos_token_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_length:]
        if generated.shape[1] < self.index.width:
            allowed = self.index.next_tokens(generated, offset=self.offset, vocab_size=scores.shape[1])
        elif self.eos_token_id is not None:
            allowed = torch.zeros_like(scores, dtype=torch.bool)
            allowed[:, self.eos_token_id] = True
        else:
            return scores
        return scores.masked_fill(~allowed, float("-inf"))
