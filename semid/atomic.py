"""Atomic file writes: a temp file beside the target, fsync, then a rename onto it.

Why a module of its own: checkpoints (semid.train) and configs (semid.config) are written where polars, which
semid.io needs, may be missing (a GPU worker's image); every writer in semid goes through this one function,
so an interrupted run never leaves a half-written file that looks valid, and a killed one leaves no temp file
for longer than until the next write of the same output.
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
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so temps are not claimed and a killed write's stay behind
    fcntl = None

_TEMP_HEX = 12  # hex digits of a temp's random part

_WRITE_ONLY_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EDQUOT}  # failures only a write meets


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], None]) -> None:
    """Run `write_fn(tmp)` on a temp path next to `path` (`claimed_temp`), fsync it, then rename it onto `path`.

    If `write_fn` raises, the temp file is removed and `path` is untouched; if the process is killed, the next
    write of `path` removes it. A symlink is followed: the file it names is replaced, and the link stays. A
    device or pipe (/dev/null, /dev/stdout) is written into, once the whole output is ready: renaming onto it
    would replace the device node itself, which root may do.
    """
    if is_stream(path):
        _write_into_stream(Path(path), write_fn)
        return
    target = Path(os.path.realpath(path))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with claimed_temp(target) as tmp:
            write_fn(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
    except Exception as exc:
        error = output_error(exc, path)
        if error is None:
            raise
        raise error from None
    _fsync_dir(target.parent)


def output_error(exc: Exception, path: str | os.PathLike) -> Exception | None:
    """The error to report for a failed write of the output `path`, or None when `exc` is about another file.

    A failure to write the output (a full disk, a read-only folder) is named as this output's, not its temp
    file's; an error about another file (one the writer reads) is left as it is. Writers in Rust (polars)
    report the system's error in their text, "(os error 28)", often without a file name or an errno.
    """
    target = Path(os.path.realpath(path))
    number = exc.errno if isinstance(exc, OSError) and exc.errno is not None else _rust_errno(exc)
    named = None if not isinstance(exc, OSError) or exc.filename is None else Path(exc.filename)
    ours = isinstance(exc, OSError) and (named is None or named in (target, *target.parents)
                                         or _is_temp_of(named, target))
    if not ours and number not in _WRITE_ONLY_ERRNOS:
        return None
    kind = type(exc) if isinstance(exc, OSError) else OSError
    reason = os.strerror(number) if number is not None else str(exc)
    if number == errno.ENAMETOOLONG:
        reason += f" (its temp file's name is {len(temp_beside(target).name) - len(target.name)} characters longer)"
    message = f"cannot write {path}: {reason}"
    return kind(number, message) if number is not None else kind(message)


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
    probe = temp_beside(path)  # named as a temp: `output_error` takes its failures for the output's
    probe.touch()
    probe.unlink(missing_ok=True)  # a sweep may have taken it, unlocked, already


def temp_beside(target: Path) -> Path:
    """A fresh temp name beside target: hidden, in the same folder (a rename across file systems is not atomic),
    with the target's suffix kept (writers that pick a format by suffix, as np.save adds ".npy" otherwise)."""
    return target.with_name(f".{target.stem}.tmp-{uuid.uuid4().hex[:_TEMP_HEX]}{target.suffix}")


@contextlib.contextmanager
def claimed_temp(target: Path, directory: bool = False) -> Iterator[Path]:
    """A new temp file (or directory) beside target, removed on an exception, and locked while the block runs.

    Why the lock: a process killed by kill -9, the OOM killer or a pre-empted spot instance cannot remove its
    temp, and those are as large as the output (a checkpoint, a catalogue's IDs, a whole model). A temp whose
    lock is free belongs to nobody (flock is released however a process ends), so the temps a killed write left
    beside target are removed here first, while a live writer's, locked, are left alone.
    """
    _remove_abandoned(target)
    path, handle = _make_claimed(target, directory)
    try:
        yield path
    except BaseException:
        _remove(path)
        raise
    finally:
        if handle is not None:
            os.close(handle)


def _make_claimed(target: Path, directory: bool) -> tuple[Path, int | None]:
    """Make a temp beside target and take its lock (None where there are no locks).

    A file is made through the descriptor that locks it. A directory exists a moment before it is locked,
    and a sweep by another process may take and remove it then: the lock counts only where the name still
    holds our directory, and another name is tried otherwise.
    """
    for _ in range(100):
        path = temp_beside(target)
        try:
            if directory:
                path.mkdir()
                handle = os.open(path, os.O_RDONLY) if fcntl is not None else None
            else:
                handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileNotFoundError:  # a sweep removed the directory already
            continue
        if fcntl is None:
            if handle is not None:
                os.close(handle)
            return path, None
        keep = False
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            keep = names_open_file(path, handle)
        except BlockingIOError:  # a sweep holds it, and removes it
            pass
        except OSError:  # no flock here (some FUSE mounts; directories on NFS): the temp is written unclaimed
            return path, None
        finally:
            if not keep:
                os.close(handle)
        if keep:
            return path, handle
    raise OSError(f"cannot claim a temp file beside {target}: another process keeps removing them")


def _remove_abandoned(target: Path) -> None:
    """Remove the temps beside target whose lock is free: their writer ended without removing them."""
    if fcntl is None:
        return
    pattern = re.compile(re.escape(f".{target.stem}.tmp-") + f"[0-9a-f]{{{_TEMP_HEX}}}" + re.escape(target.suffix))
    try:
        entries = [(entry.name, entry.is_dir()) for entry in os.scandir(target.parent) if pattern.fullmatch(entry.name)]
    except OSError:  # no folder yet: nothing to remove, and the write itself says what is wrong
        return
    for name, is_dir in entries:
        path = target.parent / name
        try:  # NFS locks a file only through a descriptor that may write it
            handle = os.open(path, os.O_RDONLY if is_dir else os.O_RDWR)
        except OSError:  # gone meanwhile, or not ours to touch
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if names_open_file(path, handle):
                _remove(path)
        except OSError:  # locked by its live writer, or not ours to remove
            pass
        finally:
            os.close(handle)


def _is_temp_of(path: Path, target: Path) -> bool:
    """Whether path is a temp that `temp_beside(target)` could have named."""
    return path.parent == target.parent and path.name.startswith(f".{target.stem}.tmp-")


def names_open_file(path: Path, handle: int) -> bool:
    """Whether `path` still names the file that the descriptor `handle` has open (a rename onto it, or its
    removal, since it was opened means that it does not)."""
    try:
        named, held = os.stat(path), os.fstat(handle)
    except FileNotFoundError:
        return False
    return (named.st_ino, named.st_dev) == (held.st_ino, held.st_dev)


def _remove(path: Path) -> None:
    """Remove a temp file or directory that may be gone already."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


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
