"""Constrained decoding on tensors: which token may come next, for a whole batch of beams at once.

A generative retriever that decodes semantic IDs freely can emit an ID that names no item. Constrained beam
search masks, at every step, the logits of the tokens that would leave the catalogue. `semid.export.prefix_trie`
answers that as a Python dict, one beam at a time, which leaves the GPU waiting on the host at each step.
`PrefixIndex` answers it for a (beams, t) batch of prefixes with a few searches in sorted tensors, on the
device the logits are on, with no host synchronisation.

How it works: every prefix of length j + 1 in the catalogue gets a dense node number, the rank of
`parent_node * size_j + code_j` among the distinct such keys (one sorted int64 tensor per position). A prefix
is walked position by position with `searchsorted`; the codes that may follow node n at position t are those
c with `n * size_t + c` among that position's keys. Memory is one int64 per distinct prefix and position
(at most 8 bytes x items x tokens per ID), where a dense next-code bitmap per node would need items x size.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _tensor(values: np.ndarray | torch.Tensor, device: str | torch.device | None) -> torch.Tensor:
    if isinstance(values, np.ndarray) and not values.flags.writeable:  # the registry's IDs are read-only, which
        values = values.copy()  # torch would warn of
    return torch.as_tensor(values, device=device)


class PrefixIndex:
    """The catalogue's IDs, indexed for `next_codes` and `next_tokens` masks (see the module docstring).

    ids: (n, w) final IDs (numpy or torch), one per item. sizes: how many values each position takes (the
    codebook sizes, then the suffix bound; `SemanticIdTokenizer.prefix_index` passes them), which fixes the
    width of the masks and the token offsets of `semid.export.token_vocabulary`; by default each column's
    largest code + 1.
    """

    def __init__(self, ids: np.ndarray | torch.Tensor, sizes: Sequence[int] | None = None, *,
                 device: str | torch.device | None = None) -> None:
        ids = _tensor(ids, device)
        if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"PrefixIndex needs a non-empty (items x tokens) matrix of IDs, got shape "
                             f"{tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"PrefixIndex needs integer IDs, got {ids.dtype}")
        ids = ids.long()
        if bool((ids < 0).any()):
            row, column = (ids < 0).nonzero()[0].tolist()
            raise ValueError(f"IDs must be non-negative: row {row} has {int(ids[row, column])} at position {column}")
        largest = ids.max(dim=0).values.tolist()  # (w,)
        sizes = [value + 1 for value in largest] if sizes is None else [int(k) for k in sizes]
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
        # offsets[t]: where position t's tokens start in token_vocabulary(sizes) order
        self._offsets = torch.tensor(np.cumsum([0, *sizes[:-1]]), dtype=torch.long, device=self.device)  # (w,)
        self._keys: list[torch.Tensor] = []  # per position: sorted distinct parent_node * size + code
        node = torch.zeros(len(ids), dtype=torch.long, device=self.device)  # (n,) every item starts at the root
        for position, size in enumerate(sizes):
            keys, node = torch.unique(node * size + ids[:, position], sorted=True, return_inverse=True)
            self._keys.append(keys)

    @property
    def width(self) -> int:
        """Tokens per ID."""
        return len(self.sizes)

    @property
    def vocabulary_size(self) -> int:
        """Tokens in `token_vocabulary(sizes)`, the width of a `next_tokens` mask."""
        return sum(self.sizes)

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

    def _prefixes(self, prefixes: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
        prefixes = _tensor(prefixes, self.device)
        if prefixes.ndim != 2 or prefixes.dtype.is_floating_point or prefixes.dtype == torch.bool:
            raise ValueError(f"{what} must be a (beams x generated) integer matrix, got {prefixes.dtype} of shape "
                             f"{tuple(prefixes.shape)}")
        if prefixes.shape[1] >= self.width:
            raise ValueError(f"{what} of {prefixes.shape[1]} tokens are complete IDs (an ID has {self.width}): "
                             f"nothing comes next")
        return prefixes.long()

    def next_codes(self, prefixes: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(b, t) generated codes, t < width -> (b, sizes[t]) bool: True where code c of position t continues
        the prefix to an ID in the catalogue. A prefix that no ID starts with (a dead beam, padding such as -1)
        gets a row of False."""
        codes = self._prefixes(prefixes, "prefixes")
        position = codes.shape[1]
        size, keys = self.sizes[position], self._keys[position]
        node, found = self._walk(codes)
        # the children of node n are the keys in [n * size, (n + 1) * size): one contiguous run of the sorted keys
        first = torch.searchsorted(keys, node * size)  # (b,)
        count = torch.where(found, torch.searchsorted(keys, node * size + size) - first, 0)  # (b,)
        child = torch.arange(size, device=self.device)  # (size,) a node has at most `size` children
        at = (first[:, None] + child).clamp(max=len(keys) - 1)  # (b, size)
        # each child's code, or the spare column `size` past a node's last child: (b, size + 1) then cut
        column = torch.where(child < count[:, None], keys[at] - node[:, None] * size, size)
        mask = torch.zeros(len(codes), size + 1, dtype=torch.bool, device=self.device)
        return mask.scatter_(1, column, True)[:, :size]

    def next_tokens(self, prefixes: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The same over the flat vocabulary: (b, t) generated token numbers, each an index into
        `token_vocabulary(sizes)` (position t's code c is token offsets[t] + c) -> (b, vocabulary_size) bool,
        True only at the allowed tokens of position t. For a model whose added tokens start at id `first`:
        `allowed = index.next_tokens(generated - first)`, then mask `logits[:, first:first + V]` with it."""
        tokens = self._prefixes(prefixes, "token prefixes")
        position = tokens.shape[1]
        codes = tokens - self._offsets[:position]  # a token of another position falls outside the range: no match
        mask = torch.zeros(len(tokens), self.vocabulary_size, dtype=torch.bool, device=self.device)
        start = int(sum(self.sizes[:position]))
        mask[:, start : start + self.sizes[position]] = self.next_codes(codes)
        return mask

    def contains(self, ids: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(b, w) complete IDs -> (b,) bool: whether each names an item of the catalogue (as
        `SemanticIdTokenizer.items_for` does, on the device and without the item names)."""
        ids = _tensor(ids, self.device)
        if ids.ndim != 2 or ids.shape[1] != self.width or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"contains needs (b, {self.width}) integer IDs, got {ids.dtype} of shape "
                             f"{tuple(ids.shape)}")
        return self._walk(ids.long())[1]
