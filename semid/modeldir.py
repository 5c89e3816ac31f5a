"""The model directory on disk: what makes one, and how it is replaced and shared safely.

A model directory holds the ID registry, the one record of which ID each item was given. Losing or
forking it breaks the promise that IDs never change, so this module refuses to replace anything that
is not a model, makes replacing a model an explicit choice, and serialises the processes that add
items to a registry (two overlapping `semid encode` runs would otherwise each save their own copy, and
the later one would silently drop the earlier one's items while both had handed out the same IDs).
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Iterator

from semid.atomic import claimed_temp, names_open_file, probe_writable

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the stale-registry check in the tokenizer still holds
    fcntl = None

MODEL_FORMAT = "semid-model-v1"
FILES = ("config.toml", "model.pt", "meta.json", "registry.parquet")
REGISTRY_LOCK = ".registry.lock"
# flock serialises processes; within one, each directory has a re-entrant thread lock, taken first, so that two
# threads (two tokenizers of one model) take turns too, and a thread that holds the lock can take it again.
_held: dict[Path, list[IO[str] | None]] = {}  # per directory, the flock handle taken at each nesting level
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


def enclosing_model(path: Path) -> Path | None:
    """The semid model directory that path lies inside, if any: whose `train --overwrite` would delete it."""
    return next((folder for folder in Path(path).absolute().parents if is_model_dir(folder)), None)


def check_save_target(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """The absolute target of a save, once it is known to be safe to write there; raises ModelDirError.

    Called before training as well as by `save`, so that a target that cannot be written costs no
    training time. Only an absent path, an empty directory, or (with overwrite) a semid model may be
    replaced: a model's registry is the record of every ID handed out.
    """
    target = Path(path).absolute()
    if Path.cwd().is_relative_to(target):
        raise ModelDirError(f"{path} is the current directory or one above it; name a new directory to save into")
    if (inside := enclosing_model(target)) is not None:  # its `train --overwrite` would delete this model too
        raise ModelDirError(f"{path} is inside the semid model directory {inside}; save next to it, not in it")
    free = not target.exists() or (target.is_dir() and not any(target.iterdir()))  # an empty directory is free
    if free and (left := interrupted_replaces(target)):
        raise ModelDirError(f"a replace of the model at {path} was interrupted, and its previous model, with the "
                            f"registry of every ID it handed out, is in {left[0]}: rename that back to {path} "
                            "(then overwrite it if you mean to), or delete it, before saving a new model there")
    if not free:
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


def staging_dir(target: Path) -> contextlib.AbstractContextManager[Path]:
    """An empty directory beside target to build the new model in (mode from the umask, as any mkdir), removed
    if the block raises; one that a killed save left is removed by the next save to target (`claimed_temp`)."""
    return claimed_temp(target, directory=True)


def replace_dir(staging: Path, target: Path, overwrite: bool = True) -> None:
    """Move a complete staging directory onto target: readers see the old model or the new one, never a mix.

    Without `overwrite`, a model that another save put at target since `check_save_target` (two saves to one
    new path) is refused, not replaced: the rename of a directory onto one that is not empty fails.

    Two renames: the old model aside, the new one in. An exception or Ctrl-C between them puts the old one
    back; a process killed there leaves it as `.<name>.old-*`, which `present_or_raise` and
    `check_save_target` point to, so that it is restored rather than shadowed by a new registry.
    """
    if not overwrite or not target.exists():
        try:
            os.replace(staging, target)  # replaces at most an empty directory
        except OSError:
            if not target.is_dir() or not any(target.iterdir()):
                raise
            raise ModelDirError(f"{target} was written by another save meanwhile; refusing to replace it (a model "
                                "is replaced only with overwrite=True)") from None
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
    left = [p for p in target.parent.glob(f".{glob.escape(target.name)}.old-*") if is_model_dir(p)]
    return sorted(left, key=lambda p: p.stat().st_mtime, reverse=True)


def present_or_raise(path: str | os.PathLike) -> Path:
    """`path` as a Path when it is a directory; else ModelDirError "model directory not found", which says where
    the previous model is when a replace of it was interrupted. A replace still under way (between its two
    renames, microseconds) is waited for a moment rather than reported as interrupted."""
    root = Path(path)
    if root.is_dir():
        return root
    left = interrupted_replaces(root)
    for _ in range(20 if left else 0):
        time.sleep(0.01)
        if root.is_dir():
            return root
    if not left:
        found = " (it is a file: a model is the directory semid train --out wrote)" if root.exists() else ""
        raise ModelDirError(f"model directory not found: {path}{found}")
    raise ModelDirError(f"model directory not found: {path}; a replace of it was interrupted, and its previous "
                        f"model is in {left[0]}: rename that back to {path}")


@contextlib.contextmanager
def registry_lock(model_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the model directory's registry lock: one process, and one thread, at a time reads, extends and
    saves the registry.

    Advisory (flock), released when the process exits however it exits. Re-entrant within a thread, so
    `save_registry` can take it inside a caller that already holds it; another thread of the process waits,
    as another process does (so a lock holder must not wait for a thread that takes the lock). A no-op where
    flock is missing, and in a directory this process cannot write (a model baked into a read-only image):
    encoding items it already knows needs no lock there, and saving new ones fails on its own with the reason.
    """
    root = present_or_raise(model_dir).resolve()  # one key per directory however spelled: re-entrance sees it
    with _thread_locks_guard:
        thread_lock = _thread_locks.setdefault(root, threading.RLock())
    with thread_lock:  # from here on only this thread changes _held[root]
        held = _held.setdefault(root, [])
        outer = next((h for h in reversed(held) if h is not None), None)
        # Re-entrance keeps the outer flock, unless a save replaced the directory under it meanwhile: that flock
        # is on the old lock file, which no longer guards the registry, so the new one is locked too.
        relock = fcntl is not None and (not held or (outer is not None and not names_open_file(root / REGISTRY_LOCK, outer.fileno())))
        handle = _locked_file(root / REGISTRY_LOCK) if relock else None
        held.append(handle)
        try:
            with handle or contextlib.nullcontext():
                yield
        finally:
            held.pop()
            if not held:
                del _held[root]


def _can_write(folder: Path) -> bool:
    return os.access(folder, os.W_OK)


def _locked_file(path: Path) -> IO[str] | None:
    """An open handle on `path` holding its flock (released when the handle closes); None where the file can
    neither be opened nor made (a read-only model directory).

    Read-only: flock needs no write access, so a lock file another user made (mode 0644 in a shared,
    group-writable model directory) locks as well as one's own.

    Why the loop: `save(..., overwrite=True)` replaces the whole directory, lock file included. A process that
    was waiting on the old file would get a lock that no longer guards anything, beside one that locked the
    new file; so after the wait the lock is kept only if `path` still names the file it locked.
    """
    for _ in range(100):
        try:
            handle = os.fdopen(os.open(path, os.O_RDONLY | os.O_CREAT, 0o666), "r")
        except FileNotFoundError:  # between the two renames of a replace: the new directory is a moment away
            time.sleep(0.01)
            continue
        except OSError as exc:
            if not _can_write(path.parent):  # a read-only model: nothing can be registered there anyway
                return None
            raise ModelDirError(f"cannot open the registry lock {path}: {exc.strerror or exc}; without it two "
                                "encodes could hand out the same IDs") from None
        fcntl.flock(handle, fcntl.LOCK_EX)
        if names_open_file(path, handle.fileno()):
            return handle
        handle.close()
    raise ModelDirError(f"cannot lock {path}: its model directory keeps being replaced or was removed")


def file_stamp(path: Path) -> list[int] | None:
    """Identity of a file's current version (inode, size, mtime): an atomic replace always changes it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return [st.st_ino, st.st_size, st.st_mtime_ns]
