"""The model directory on disk: what makes one, and how it is replaced and shared safely.

A model directory holds the ID registry, the one record of which ID each item was given. Losing or
forking it breaks the promise that IDs never change, so this module refuses to replace anything that
is not a model, makes replacing a model an explicit choice, and serialises the processes that add
items to a registry (two overlapping `semid encode` runs would otherwise each save their own copy, and
the later one would silently drop the earlier one's items while both had handed out the same IDs).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import IO, Iterator

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the stale-registry check in the tokenizer still holds
    fcntl = None

MODEL_FORMAT = "semid-model-v1"
FILES = ("config.toml", "model.pt", "meta.json", "registry.parquet")
REGISTRY_LOCK = ".registry.lock"
_held: dict[Path, int] = {}  # model directories this process holds the lock of, with the nesting depth


class ModelDirError(ValueError):
    """A directory that is not a complete, readable semid model, or that may not be written."""


def is_model_dir(path: Path) -> bool:
    """Whether path holds a semid model (its meta.json names the format), complete or not."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == MODEL_FORMAT


def check_save_target(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """The absolute target of a save, once it is known to be safe to write there; raises ModelDirError.

    Called before training as well as by `save`, so that a target that cannot be written costs no
    training time. Only an absent path, an empty directory, or (with overwrite) a semid model may be
    replaced: a model's registry is the record of every ID handed out.
    """
    target = Path(path).absolute()
    if Path.cwd().is_relative_to(target):
        raise ModelDirError(f"{path} is the current directory or one above it; name a new directory to save into")
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):  # an empty directory is free
        if is_model_dir(target):
            if not overwrite:
                raise ModelDirError(
                    f"{path} already holds a semid model, whose registry records the IDs it handed out; replace "
                    "it with overwrite=True (semid train --overwrite), or save to a new directory"
                )
        else:
            kind = "directory" if target.is_dir() else "file"
            raise ModelDirError(f"{path} is an existing {kind} that is not a semid model; refusing to replace it")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        probe = target.parent / f".{target.name}.probe-{uuid.uuid4().hex[:12]}"
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise ModelDirError(f"cannot write a model directory at {path}: {exc.strerror or exc}") from None
    return target


def staging_dir(target: Path) -> Path:
    """An empty directory beside target to build the new model in (mode from the umask, as any mkdir)."""
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    return staging


def replace_dir(staging: Path, target: Path) -> None:
    """Move a complete staging directory onto target: readers see the old model or the new one, never a mix."""
    if not target.exists():
        os.replace(staging, target)
        return
    retired = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
    os.replace(target, retired)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(retired, target)
        raise
    shutil.rmtree(retired, ignore_errors=True)


@contextlib.contextmanager
def registry_lock(model_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the model directory's registry lock: one process at a time reads, extends and saves the registry.

    Advisory (flock), released when the process exits however it exits; re-entrant within a process, so
    `save_registry` can take it inside a caller that already holds it. A no-op where flock is missing, and
    in a directory this process cannot write (a model baked into a read-only image): encoding items it
    already knows needs no lock there, and saving new ones fails on its own with the reason.
    """
    root = Path(model_dir).resolve()  # one key per directory however it is spelled: re-entrance must see it
    if not root.is_dir():
        raise ModelDirError(f"model directory not found: {model_dir}")
    handle = _locked_file(root / REGISTRY_LOCK) if fcntl is not None and root not in _held else None
    with handle or contextlib.nullcontext():
        _held[root] = _held.get(root, 0) + 1
        try:
            yield
        finally:
            _held[root] -= 1
            if not _held[root]:
                del _held[root]


def _locked_file(path: Path) -> IO[str] | None:
    """An open handle on `path` holding its flock (released when the handle closes); None where the file cannot
    be opened (a read-only directory).

    Why the loop: `save(..., overwrite=True)` replaces the whole directory, lock file included. A process that
    was waiting on the old file would get a lock that no longer guards anything, beside one that locked the
    new file; so after the wait the lock is kept only if `path` still names the file it locked.
    """
    for _ in range(100):
        try:
            handle = open(path, "a")
        except FileNotFoundError:  # between the two renames of a replace: the new directory is a moment away
            time.sleep(0.01)
            continue
        except OSError:
            return None
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                return handle
        except FileNotFoundError:
            pass
        handle.close()
    raise ModelDirError(f"cannot lock {path}: its model directory keeps being replaced or was removed")


def file_stamp(path: Path) -> list[int] | None:
    """Identity of a file's current version (inode, size, mtime): an atomic replace always changes it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return [st.st_ino, st.st_size, st.st_mtime_ns]
