"""Constrained-decoding masks: `semid.decoding.PrefixIndex` against the dict trie of `semid.export.prefix_trie`,
the form Hugging Face's `prefix_allowed_tokens_fn` and most TIGER code bases consult, one beam at a time.

Both build from the same IDs, then give the allowed next tokens of a batch of beams at every position of an ID
as a (beams, vocabulary) bool mask, the thing a decoder applies to its logits. The beams are prefixes of
catalogue IDs (live beams). Prints one JSON line per position and a summary with ratios; same process, same data.

    python scripts/bench_decoding.py --items 1000000 --beams 1024 [--device cuda] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from semid.atomic import atomic_write  # noqa: E402
from semid.decoding import PrefixIndex  # noqa: E402
from semid.device import resolve_device  # noqa: E402

try:
    from semid.export import prefix_trie  # noqa: E402
except ImportError:  # no polars (the device machine's image): the same dict, built in plain Python
    def prefix_trie(ids: np.ndarray) -> dict[tuple[int, ...], list[int]]:
        children: dict[tuple[int, ...], set[int]] = {}
        for row in ids.tolist():
            for depth, code in enumerate(row):
                children.setdefault(tuple(row[:depth]), set()).add(code)
        return {prefix: sorted(codes) for prefix, codes in children.items()}


def catalogue(items: int, sizes: list[int], seed: int) -> np.ndarray:
    """(n, w) distinct IDs shaped like semantic IDs: codes drawn unevenly (Zipf-like first codes), the last
    position a suffix that numbers the items sharing a tuple."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, sizes[0] + 1) ** 0.5
    codes = np.stack([rng.choice(sizes[0], items, p=weights / weights.sum()),
                      *(rng.integers(0, k, items) for k in sizes[1:-1])], axis=1)
    order = np.lexsort(codes.T[::-1])
    codes = codes[order]
    starts = np.r_[True, (codes[1:] != codes[:-1]).any(axis=1)]
    group_start = np.maximum.accumulate(np.where(starts, np.arange(items), 0))
    suffix = np.arange(items) - group_start
    keep = suffix < sizes[-1]
    return np.concatenate([codes, suffix[:, None]], axis=1)[keep]


def trie_masks(trie: dict, prefixes: np.ndarray, offset: int, vocabulary: int) -> np.ndarray:
    """What a per-beam decoder does: look each beam's prefix up in the dict and set its tokens."""
    mask = np.zeros((len(prefixes), vocabulary), dtype=bool)
    for row, prefix in enumerate(map(tuple, prefixes.tolist())):
        mask[row, [offset + c for c in trie.get(prefix, ())]] = True
    return mask


def timed(fn, repeats: int, sync) -> tuple[float, object]:
    result = fn()  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    sync()
    return (time.perf_counter() - start) / repeats, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--beams", type=int, default=1024)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 256, 256, 32], help="values per position")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = resolve_device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    ids = catalogue(args.items, args.sizes, args.seed)
    start = time.perf_counter()
    trie = prefix_trie(ids)
    trie_build = time.perf_counter() - start
    sync()
    start = time.perf_counter()
    index = PrefixIndex(ids, args.sizes, device=device)
    sync()
    index_build = time.perf_counter() - start

    beams = ids[np.random.default_rng(args.seed + 1).integers(0, len(ids), args.beams)]
    rows = []
    for t in range(len(args.sizes)):
        prefixes = beams[:, :t]
        on_device = torch.from_numpy(prefixes).to(device)
        index_s, mask = timed(lambda: index.next_codes(on_device), args.repeats, sync)
        trie_s, expected = timed(lambda: trie_masks(trie, prefixes, 0, args.sizes[t]), args.repeats, sync)
        assert np.array_equal(mask.cpu().numpy(), expected), f"masks differ at position {t}"
        rows.append({"position": t, "prefix_index_ms": 1e3 * index_s, "dict_trie_ms": 1e3 * trie_s,
                     "speedup": trie_s / index_s})
        print(json.dumps(rows[-1]))
    result = {
        "items": len(ids), "beams": args.beams, "sizes": args.sizes, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "build_s": {"prefix_index": index_build, "dict_trie": trie_build},
        "index_mib": sum(k.numel() * 8 for k in index._keys) / 2**20,
        "per_position": rows,
        "mask_ms_per_id": {"prefix_index": sum(r["prefix_index_ms"] for r in rows),
                           "dict_trie": sum(r["dict_trie_ms"] for r in rows)},
    }
    result["speedup_per_id"] = result["mask_ms_per_id"]["dict_trie"] / result["mask_ms_per_id"]["prefix_index"]
    print(json.dumps({k: v for k, v in result.items() if k != "per_position"}))
    if args.json:
        atomic_write(args.json, lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n"))


if __name__ == "__main__":
    main()
