"""semid.plot: the PNG is written atomically with the designed layout, and each panel draws the right counts.

The panel tests read the drawn data back from the matplotlib artists and compare it with counts computed
here independently (np.bincount, collections.Counter over tuples), so a wrong sort, an off-by-one in the
unused-code marker or a miscounted group size fails.
"""
from __future__ import annotations

import struct
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from semid import plot  # noqa: E402
from semid.plot import plot_codebook_usage  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def _random_codes(n: int, sizes: list[int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, k, n) for k in sizes], axis=1)  # (n, l)


def test_writes_a_png_whose_grid_fits_the_levels(tmp_path: Path) -> None:
    # 2 levels + groups = 3 panels in one row; 3 levels + groups = 4 panels over two rows
    one_row, two_rows = tmp_path / "a.png", tmp_path / "b.png"
    plot_codebook_usage(_random_codes(500, [32, 32]), 32, one_row)
    plot_codebook_usage(_random_codes(500, [32, 16, 8]), [32, 16, 8], two_rows)
    (w1, h1), (w2, h2) = _png_size(one_row), _png_size(two_rows)
    assert w1 == w2  # three columns either way
    assert h2 == pytest.approx(2 * h1, rel=0.02)
    assert w1 / h1 == pytest.approx(3 * plot._PANEL_SIZE[0] / plot._PANEL_SIZE[1], rel=0.02)


def test_overwrites_atomically_and_leaves_no_temp_files(tmp_path: Path) -> None:
    out = tmp_path / "usage.png"
    out.write_bytes(b"old")
    plot_codebook_usage(_random_codes(200, [16, 16]), 16, out)
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in tmp_path.iterdir()] == ["usage.png"]


def test_level_panel_draws_sorted_usage_and_marks_unused_codes() -> None:
    k = 10
    column = np.array([3, 3, 3, 7, 7, 1, 3, 9])  # codes 0, 2, 4, 5, 6, 8 unused
    _, (ax,) = plot._new_figure(1)
    plot._draw_level(ax, column, k, 0, usage=0.4, entropy=1.0)
    values = ax.patches[0].get_data().values  # the stairs' heights
    np.testing.assert_array_equal(values, [4, 2, 1, 1, 0, 0, 0, 0, 0, 0])
    hlines = [line.get_ydata()[0] for line in ax.lines if line.get_ydata()[0] == line.get_ydata()[1]]
    vlines = [line.get_xdata()[0] for line in ax.lines if line.get_xdata()[0] == line.get_xdata()[1]]
    assert hlines == [pytest.approx(len(column) / k)]  # the uniform ideal N / K
    assert vlines == [4]  # first unused rank = number of used codes
    assert "4/10 codes used" in ax.get_title()


def test_group_panel_counts_tuples_per_group_size() -> None:
    codes = _random_codes(3000, [6, 6, 5], seed=1)  # 180 tuples for 3000 items: many large groups
    expected = Counter(Counter(map(tuple, codes.tolist())).values())  # group size -> number of tuples
    _, axes = plot._new_figure(4)
    plot._draw_groups(axes[0], plot._row_group_counts(codes), len(codes), plot.collision_metrics(codes))
    drawn = {round(b.get_x() + b.get_width() / 2): round(b.get_height()) for b in axes[0].patches}
    assert drawn == dict(expected)
    assert f"max group {max(expected)}" in axes[0].get_title()


def test_single_level_and_torch_codes(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    out = tmp_path / "one.png"
    plot_codebook_usage(torch.from_numpy(_random_codes(100, [8])), [8], out)
    assert _png_size(out)[0] > 0


@pytest.mark.parametrize(
    "codes, sizes, match",
    [
        (np.array([[0, 1], [2, 16]]), 16, r"level 2 must lie in \[0, 16\)"),
        (np.array([[0, -1]]), [4, 4], r"level 2 must lie in \[0, 4\)"),
        (np.array([[0, 1]]), [4, 4, 4], r"3 entries but codes have 2 levels"),
        (np.array([0, 1, 2]), 4, r"2-D"),
        (np.array([[0.5, 1.0]]), 4, r"integer codes"),
    ],
)
def test_bad_codes_raise_and_write_nothing(tmp_path: Path, codes: np.ndarray, sizes, match: str) -> None:
    out = tmp_path / "bad.png"
    with pytest.raises(ValueError, match=match):
        plot_codebook_usage(codes, sizes, out)
    assert not out.exists()


def test_missing_matplotlib_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'semid\[plot\]'"):
        plot_codebook_usage(_random_codes(10, [4]), 4, tmp_path / "x.png")


def test_the_suffix_picks_the_format(tmp_path: Path) -> None:
    codes = _random_codes(200, [8, 8])
    plot_codebook_usage(codes, 8, tmp_path / "u.pdf")
    plot_codebook_usage(codes, 8, tmp_path / "u.svg")
    plot_codebook_usage(codes, 8, tmp_path / "u")  # no suffix: PNG
    assert (tmp_path / "u.pdf").read_bytes()[:5] == b"%PDF-"
    assert b"<svg" in (tmp_path / "u.svg").read_bytes()[:400]
    assert _png_size(tmp_path / "u")[0] > 0
