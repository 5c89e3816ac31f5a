"""Helpers shared by the benchmark scripts: where the data lives, how it is loaded, how time is measured
and how results are written.

Every benchmark reads the same files and times the same way, so that numbers from different scripts and
different runs can be set side by side.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from semid.atomic import atomic_write

DATA_SETS: tuple[str, ...] = ("beauty", "goodbooks", "ml-1m", "ml-100k", "scientific")
# semid's residual k-means is compared like for like with FAISS's residual quantizers, which have no
# prefix-centre table: in the raw 384-d space the table holds part of each item's residual and flatters
# training-set fvu (bench/COLLISIONS.md).
RQKMEANS_LIKE_FAISS: dict[str, Any] = {"quantizer.prefix_centres": False}


def default_data_dir() -> Path:
    """The shared data folder: `../shared/data` next to the repository checkout."""
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def set_file(name: str, data_dir: Path) -> Path:
    """The .npy of a shared set's name, or the .npy path itself: an item set of one's own benchmarks like the
    shared ones, with its `<stem>_sequences.txt` beside it."""
    path = Path(name)
    return path if path.suffix == ".npy" else data_dir / f"{name}.npy"


def load_embeddings(name: str, data_dir: Path) -> np.ndarray:
    """The float32 (n, d) embedding matrix of a set name or a .npy path, checked for shape and finiteness."""
    path = set_file(name, data_dir)
    if not path.is_file():
        raise FileNotFoundError(
            f"data set {name!r} not found: expected {path} (pass --data-dir to point at the folder that "
            f"holds {path.name}, or a path to the .npy)"
        )
    x = np.load(path)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{path} must hold a non-empty 2-D matrix (items, dim), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{path} contains NaN or infinite values")
    return np.ascontiguousarray(x, dtype=np.float32)


def sequences_path(name: str, data_dir: Path) -> Path | None:
    """The user-sequence file of a set (name or .npy path), or None where the set has none."""
    npy = set_file(name, data_dir)
    path = npy.with_name(f"{npy.stem}_sequences.txt")
    return path if path.is_file() else None


def best_of(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
    """Fastest wall time of `repeats` calls, after `warmup` untimed calls.

    The minimum, not the mean, because interference from other processes only ever adds time; the
    warm-up call absorbs one-off costs (allocator growth, kernel compilation, thread-pool start-up).
    """
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def to_jsonable(value: Any) -> Any:
    """Numpy scalars and arrays, tuples and paths turned into plain JSON values."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def write_text_atomic(path: Path, text: str) -> None:
    """Text written as semid writes its outputs (`semid.atomic`): a reader, or a crash mid-write, never sees
    half a file."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: Path, obj: Any) -> None:
    """JSON (numpy values converted) written atomically."""
    write_text_atomic(path, json.dumps(to_jsonable(obj), indent=2) + "\n")
