"""Atomic file writes: a temp file beside the target, fsync, then a rename onto it.

Why a module of its own: checkpoints (semid.train) and configs (semid.config) are written where polars, which
semid.io needs, may be missing (a GPU worker's image); every writer in semid goes through this one function,
so an interrupted run never leaves a half-written file that looks valid.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable


_WRITE_ONLY_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EDQUOT}  # failures only a write meets


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], None]) -> None:
    """Run `write_fn(tmp)` on a temp path next to `path`, fsync it, then rename it onto `path`.

    The temp file is in the same directory (a rename across file systems is not atomic) and keeps the
    target's suffix, so writers that pick a format by suffix (np.save adds ".npy" otherwise) behave.
    If `write_fn` raises, the temp file is removed and `path` is untouched. A symlink is followed: the file
    it names is replaced, and the link stays. A device or pipe (/dev/null, /dev/stdout) is written into,
    once the whole output is ready: renaming onto it would replace the device node itself, which root may do.
    """
    if is_stream(path):
        _write_into_stream(Path(path), write_fn)
        return
    target = Path(os.path.realpath(path))
    tmp = target.with_name(f".{target.stem}.tmp-{uuid.uuid4().hex[:12]}{target.suffix}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except Exception as exc:
        _discard(tmp)
        # A failure to write the output (a full disk, a read-only folder) is named as this output's, not its temp
        # file's; an error about another file (one the writer reads) is left as it is. Writers in Rust (polars)
        # report the system's error in their text, "(os error 28)", often without a file name or an errno.
        number = exc.errno if isinstance(exc, OSError) and exc.errno is not None else _rust_errno(exc)
        ours = isinstance(exc, OSError) and (exc.filename is None or Path(exc.filename) in (tmp, *tmp.parents))
        if not ours and number not in _WRITE_ONLY_ERRNOS:
            raise
        kind = type(exc) if isinstance(exc, OSError) else OSError
        message = f"cannot write {path}: {os.strerror(number) if number is not None else exc}"
        raise (kind(number, message) if number is not None else kind(message)) from None
    except BaseException:
        _discard(tmp)
        raise
    _fsync_dir(target.parent)


def _rust_errno(exc: Exception) -> int | None:
    found = re.search(r"\(os error (\d+)\)", str(exc))
    return int(found.group(1)) if found else None


def is_stream(path: str | os.PathLike) -> bool:
    """Whether path names a device or a pipe, which an output is written into rather than replaced.

    Asked of the path as given: /dev/stdout on a pipe resolves to /proc/<pid>/fd/pipe:[n], a name that does
    not exist, while opening /dev/stdout itself reaches the pipe."""
    path = Path(path)
    return path.exists() and not path.is_file() and not path.is_dir()


def probe_writable(path: str | os.PathLike) -> None:
    """Make path's folder if need be, then create and remove a file beside path: raises the OSError that
    writing there later would meet, before the work whose output would then be lost (a training run)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    probe = path.parent / f".{path.name}.probe-{uuid.uuid4().hex[:12]}"
    probe.touch()
    probe.unlink()


def _discard(tmp: Path) -> None:
    """Remove a temp file that may never have been made (its folder may not even be one)."""
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def _write_into_stream(target: Path, write_fn: Callable[[Path], None]) -> None:
    """Write the output to a private temp file, then copy its bytes into `target` (opened, never replaced)."""
    with tempfile.TemporaryDirectory(prefix="semid-") as folder:
        tmp = Path(folder) / f"output{target.suffix}"
        write_fn(tmp)
        with open(tmp, "rb") as source, open(target, "wb") as sink:
            shutil.copyfileobj(source, sink)


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself; directories cannot be opened for fsync on some platforms (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
