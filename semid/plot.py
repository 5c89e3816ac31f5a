"""A one-page picture of how a tokenizer uses its codebooks (the optional `plot` extra).

Why this module exists: the usage and entropy numbers in a report say *that* a level is unbalanced, not
*how*. A few dominant codes, a long tail of rare ones and a block of dead codes can give the same entropy.
The sorted usage curve of each level shows which case it is, and the distribution of group sizes of
full code tuples shows where the collisions are (many pairs, or one huge bucket).

The counting is done by semid.metrics, so the figures and the report agree on every number.
matplotlib is imported inside the function: it is an optional dependency. Drawing goes through an Agg
canvas on a bare Figure, not pyplot, so calling this from a notebook or a GUI program neither switches
the user's backend nor leaves figures open.
"""
from __future__ import annotations

import importlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from semid.atomic import atomic_write
from semid.metrics import _code_matrix, _level_sizes, _row_group_counts, codebook_metrics, collision_metrics

_MISSING_EXTRA = "semid plots need matplotlib, which the optional extra brings: pip install 'semid[plot]'"
_PANEL_COLUMNS = 3  # panels per row of the figure
_PANEL_SIZE = (5.0, 3.6)  # inches per panel (width, height)


def check_plotting() -> None:
    """Refuse a plot before any work where matplotlib is missing (or broken), not after an evaluation of minutes."""
    try:
        for module in ("matplotlib.figure", "matplotlib.backends.backend_agg"):
            importlib.import_module(module)
    except ImportError as e:
        raise ImportError(_MISSING_EXTRA) from e


def _new_figure(panels: int) -> tuple[Any, list[Any]]:
    """An Agg-backed Figure with a grid of `panels` axes (unused grid cells are hidden)."""
    check_plotting()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(panels, _PANEL_COLUMNS)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(_PANEL_SIZE[0] * cols, _PANEL_SIZE[1] * rows))
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def _draw_level(ax: Any, column: np.ndarray, k: int, level: int, usage: float, entropy: float) -> None:
    """Items per code, codes sorted from most to least used, against the uniform ideal N / K."""
    counts = np.sort(np.bincount(column, minlength=k))[::-1]  # (k,)
    used = int(np.count_nonzero(counts))
    ax.stairs(counts, np.arange(k + 1), fill=True, color="tab:blue", alpha=0.8)
    ax.axhline(column.size / k, color="tab:orange", linestyle="--", linewidth=1.2, label=f"uniform: {column.size / k:.3g}")
    if used < k:
        ax.axvline(used, color="tab:red", linewidth=1, label=f"{k - used} unused codes")
    ax.set_xlim(0, k)
    ax.set_title(
        f"level {level + 1}: {used}/{k} codes used ({usage:.1%})\n"
        f"entropy {entropy:.2f} of {math.log2(k):.2f} bits",
        fontsize=10,
    )
    ax.set_xlabel("code rank (most used first)")
    ax.set_ylabel("items per code")
    ax.legend(fontsize=8, loc="upper right")


def _draw_groups(ax: Any, group_sizes: np.ndarray, n: int, collisions: dict[str, float | int]) -> None:
    """How many distinct full tuples are shared by 1, 2, 3, ... items (log scale: singles dominate)."""
    sizes, tuples = np.unique(group_sizes, return_counts=True)  # (s,), (s,)
    ax.bar(sizes, tuples, width=0.8, color=np.where(sizes > 1, "tab:red", "tab:green"))
    ax.set_yscale("log")
    ax.set_ylim(0.5, tuples.max() * 4)  # headroom for the count labels
    if sizes.size <= 12:  # few bars: label them with their counts and tick every size
        ax.set_xticks(sizes)
        for s, t in zip(sizes, tuples):
            ax.annotate(str(t), (s, t), ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_title(
        f"full tuples: {group_sizes.size} distinct for {n} items\n"
        f"collision rate {collisions['collision_rate']:.2%}, colliding items {collisions['colliding_items']:.2%}, "
        f"max group {collisions['max_group']}",
        fontsize=10,
    )
    ax.set_xlabel("items sharing a tuple (group size)")
    ax.set_ylabel("number of tuples")


def plot_codebook_usage(codes: np.ndarray, codebook_sizes: Sequence[int] | int, path: str | os.PathLike) -> None:
    """Write a figure (PNG, or the format the path's suffix names: .pdf, .svg): per level the sorted
    code-usage curve, plus the tuple group-size distribution.

    codes: (N, L) integer codes before collision handling; codebook_sizes: K per level, or one K for all.
    Raises ValueError for malformed codes or codes outside [0, K), ImportError without matplotlib.
    """
    codes_np = _code_matrix(codes)  # (n, l)
    n, levels = codes_np.shape
    sizes = _level_sizes(codebook_sizes, levels)
    book = codebook_metrics(codes_np, sizes)  # also checks every code lies in [0, K)
    fig, axes = _new_figure(levels + 1)
    for level, k in enumerate(sizes):
        _draw_level(axes[level], codes_np[:, level], k, level, book["usage"][level], book["entropy_bits"][level])
    _draw_groups(axes[-1], _row_group_counts(codes_np), n, collision_metrics(codes_np))
    fig.suptitle(f"Codebook usage: {n} items, {levels} levels", fontsize=12)
    fig.tight_layout()
    image_format = Path(path).suffix.lstrip(".").lower() or "png"  # savefig refuses a format it cannot write
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=image_format, dpi=110))
