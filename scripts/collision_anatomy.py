"""Where collisions come from: which items collide, in which prefix groups, and why.

    python scripts/collision_anatomy.py --data beauty --tokenizer runs/beauty      # a saved tokenizer
    python scripts/collision_anatomy.py --data beauty --config configs/demo.toml   # fit one first

Prints, for the raw codes (before collision handling):

* how similar colliding items are: how many have a nearest neighbour (cosine, input space) above 0.99,
  0.98 and 0.95. If most collisions were near-duplicates, only an encoder that separates near-identical
  inputs could remove them; if not, the quantizer's geometry is to blame;
* the loss of distinct tuples by the size of the (L-1)-prefix group the items share;
* per level l >= 2, the mean cosine between the residuals (the input level l quantizes) of two items in
  the same (l-1)-prefix group. Near 0 means the level sees directions spread around the group's centre
  and splits the group like chance; clearly above 0 means the group's residuals share a direction (the
  group's centre is not the sum of its codewords: codebooks below level 1 are shared by every prefix),
  so items of a group pick the same code far more often than chance.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from bench_common import default_data_dir, load_embeddings  # noqa: E402


def nearest_neighbour_cosine(x: np.ndarray, block: int = 4096) -> np.ndarray:
    """(n,) cosine similarity of each row to its most similar other row."""
    unit = torch.nn.functional.normalize(torch.from_numpy(x).float(), dim=-1)
    best = torch.empty(len(unit))
    for start in range(0, len(unit), block):
        sims = unit[start : start + block] @ unit.T  # (b, n)
        sims[torch.arange(sims.shape[0]), torch.arange(start, start + sims.shape[0])] = -2.0
        best[start : start + block] = sims.max(dim=1).values
    return best.numpy()


def group_ids(codes: np.ndarray) -> np.ndarray:
    """Dense index of each row's code tuple (equal tuples, equal index)."""
    return np.unique(codes, axis=0, return_inverse=True)[1].reshape(-1)


def loss_by_group_size(codes: np.ndarray, cap: int = 10) -> dict[str, dict[str, int]]:
    """Distinct tuples lost inside each (L-1)-prefix group, summed by group size (sizes >= cap pooled)."""
    prefix = group_ids(codes[:, :-1])
    full = group_ids(codes)
    table: dict[str, dict[str, int]] = {}
    for g in np.unique(prefix):
        rows = np.flatnonzero(prefix == g)
        if len(rows) < 2:
            continue
        key = str(len(rows)) if len(rows) < cap else f">={cap}"
        entry = table.setdefault(key, {"groups": 0, "items": 0, "lost": 0})
        entry["groups"] += 1
        entry["items"] += len(rows)
        entry["lost"] += len(rows) - len(np.unique(full[rows]))
    return dict(sorted(table.items(), key=lambda kv: (kv[0].startswith(">"), int(kv[0].lstrip(">=")))))


def within_group_residual_cosine(residuals: list[torch.Tensor], codes: np.ndarray) -> list[float]:
    """Per level l >= 2: mean cosine between residuals of two items sharing the first l-1 codes."""
    means = []
    for level in range(1, codes.shape[1]):
        unit = torch.nn.functional.normalize(residuals[level].float(), dim=-1)
        groups = group_ids(codes[:, :level])
        total, pairs = 0.0, 0
        for g in np.unique(groups):
            rows = torch.from_numpy(np.flatnonzero(groups == g))
            if len(rows) < 2:
                continue
            summed = unit[rows].sum(0)
            total += float(summed @ summed) - len(rows)  # sum over ordered pairs i != j of cos
            pairs += len(rows) * (len(rows) - 1)
        means.append(total / max(pairs, 1))
    return means


def level_residuals(model, x: np.ndarray) -> tuple[np.ndarray, list[torch.Tensor]]:
    """Raw codes and, per level, the residual that level quantized (the quantizer's own greedy walk)."""
    with torch.no_grad():
        latent = model.latent(torch.from_numpy(x).to(next(model.parameters()).device))
        steps = list(model.quantizer._walk(latent))
    return torch.stack([codes for _, _, codes in steps], dim=-1).cpu().numpy(), [r.cpu() for _, r, _ in steps]


def anatomy(model, x: np.ndarray) -> dict:
    codes, residuals = level_residuals(model, x)
    collided = np.bincount(group_ids(codes))[group_ids(codes)] > 1
    nn_cos = nearest_neighbour_cosine(x)
    return {
        "items": len(x),
        "collision_rate": 1 - len(np.unique(group_ids(codes))) / len(x),
        "colliding_items": int(collided.sum()),
        "colliding_with_neighbour_above": {str(t): int((collided & (nn_cos > t)).sum()) for t in (0.99, 0.98, 0.95)},
        "loss_by_prefix_group_size": loss_by_group_size(codes),
        "within_group_residual_cosine": within_group_residual_cosine(residuals, codes),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="set name in --data-dir, e.g. beauty")
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer", type=Path, help="a directory written by SemanticIdTokenizer.save / semid train")
    source.add_argument("--config", type=Path, help="fit this config on the data first")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (with --config)")
    args = p.parse_args(argv)

    from semid.cli import _parse_overrides
    from semid.tokenizer import SemanticIdTokenizer

    x = load_embeddings(args.data, args.data_dir)
    if args.tokenizer:
        tokenizer = SemanticIdTokenizer.load(args.tokenizer)
    else:
        overrides = {"train.progress": False, **_parse_overrides(args.set)}
        tokenizer = SemanticIdTokenizer.from_config(args.config, overrides=overrides).fit(x)
    print(json.dumps(anatomy(tokenizer.model, x), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
