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
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Iterator

from semid.atomic import probe_writable

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the stale-registry check in the tokenizer still holds
    fcntl = None

MODEL_FORMAT = "semid-model-v1"
FILES = ("config.toml", "model.pt", "meta.json", "registry.parquet")
REGISTRY_LOCK = ".registry.lock"
# flock serialises processes; within one, each directory has a re-entrant thread lock, taken first, so that two
# threads (two tokenizers of one model) take turns too, and a thread that holds the lock can take it again.
_held: dict[Path, int] = {}  # model directories this process holds the flock of, with the nesting depth
_thread_locks: dict[Path, threading.RLock] = {}
_thread_locks_guard = threading.Lock()


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
    if not target.exists() and (left := interrupted_replaces(target)):
        raise ModelDirError(f"a replace of the model at {path} was interrupted, and its previous model, with the "
                            f"registry of every ID it handed out, is in {left[0]}: rename that back to {path} "
                            "(then overwrite it if you mean to), or delete it, before saving a new model there")
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
        probe_writable(target)
    except OSError as exc:
        raise ModelDirError(f"cannot write a model directory at {path}: {exc.strerror or exc}") from None
    return target


def staging_dir(target: Path) -> Path:
    """An empty directory beside target to build the new model in (mode from the umask, as any mkdir)."""
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    return staging


def replace_dir(staging: Path, target: Path) -> None:
    """Move a complete staging directory onto target: readers see the old model or the new one, never a mix.

    Two renames: the old model aside, the new one in. An exception or Ctrl-C between them puts the old one
    back; a process killed there leaves it as `.<name>.old-*`, which `missing_model_message` and
    `check_save_target` point to, so that it is restored rather than shadowed by a new registry.
    """
    if not target.exists():
        os.replace(staging, target)
        return
    retired = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
    try:
        os.replace(target, retired)
        os.replace(staging, target)
    except BaseException:
        if retired.exists() and not target.exists():
            os.replace(retired, target)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def interrupted_replaces(target: Path) -> list[Path]:
    """Old models that a killed `replace_dir` left beside target (`.<name>.old-*`), newest first."""
    target = Path(target).absolute()
    if not target.parent.is_dir():
        return []
    left = [p for p in target.parent.glob(f".{target.name}.old-*") if is_model_dir(p)]
    return sorted(left, key=lambda p: p.stat().st_mtime, reverse=True)


def missing_model_message(path: str | os.PathLike) -> str:
    """"model directory not found", and where its previous model is when a replace of it was interrupted."""
    left = interrupted_replaces(Path(path))
    if not left:
        return f"model directory not found: {path}"
    return (f"model directory not found: {path}; a replace of it was interrupted, and its previous model is in "
            f"{left[0]}: rename that back to {path}")


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
        raise ModelDirError(missing_model_message(model_dir))
    with _thread_locks_guard:
        thread_lock = _thread_locks.setdefault(root, threading.RLock())
    with thread_lock:  # from here on only this thread changes _held[root]
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
        except OSError as exc:
            if not os.access(path.parent, os.W_OK):  # a read-only model: nothing can be registered there anyway
                return None
            raise ModelDirError(f"cannot open the registry lock {path}: {exc.strerror or exc}; without it two "
                                "encodes could hand out the same IDs") from None
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
