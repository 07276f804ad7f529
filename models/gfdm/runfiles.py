"""The files of a run, written so that nothing is lost or silently wrong: one process per output, whole files only.

* :func:`run_lock` — an exclusive lock on an output (a run folder, or one result file) for a whole command.
  A second gfdm process gets :class:`RunLockedError` naming the holder's pid. The lock is an ``flock`` on a
  ``.gfdm.lock`` file that records the pid: the kernel drops it when its process dies, so the lock file a
  killed run leaves behind is taken over by the next run (and said so), never honoured forever.
* :func:`atomic_write` — every artefact (checkpoints, samples, JSON, PNG) is written to a temporary file in the
  target folder, flushed to disk and renamed over the target, so a crash or a full disk leaves the old file or
  the new one, never half of one; the temporary is removed on failure, and :func:`sweep_temporaries` removes
  those a killed process could not (at the next start, under the lock).
* :func:`disk_error` — an ``OSError`` of a full disk (or quota) as one line naming the file.
"""
from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

__all__ = ["RunLockedError", "run_lock", "check_unlocked", "atomic_write", "write_text", "write_npz",
           "sweep_temporaries", "disk_error", "DISK_FULL"]

LOCK_NAME = ".gfdm.lock"
#: errno values of "the disk cannot take this file": full, over quota, file too large
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class RunLockedError(RuntimeError):
    """Another process holds the output this command wants to write."""


def _lock_path(target: Path, folder: bool) -> Path:
    return target / LOCK_NAME if folder else target.with_name(f".{target.name}.lock")


@contextmanager
def run_lock(target, what: str, folder: bool = True, log=None):
    """Hold an exclusive lock on ``target`` (a folder, created if needed; or a file if not ``folder``) while the
    block runs. ``what`` names the command for the holder's record. Only torchrun's rank 0 locks (the other
    ranks write nothing). Raises :class:`RunLockedError` naming the holder if another process has it."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    target = Path(target)
    lock = _lock_path(target, folder)
    created = not lock.parent.exists()         # removed again if the command leaves it empty (e.g. it failed)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunLockedError(_in_use(target, holder, lock)) from None
        try:           # the file may have been unlinked by its previous holder between our open and our lock
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    stale = _holder(fd)
    if stale and log is not None:
        log(f"note: took over the lock of {stale}, which is no longer running ({lock})")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, gfdm {what}\n".encode())
    except OSError as e:                     # a full disk already: say which file
        os.close(fd)
        lock.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(lock)) from None
    try:
        yield
    finally:
        try:
            os.unlink(lock)          # while still holding it: a waiting process then sees another inode and retries
        finally:
            os.close(fd)
        if created and not any(lock.parent.iterdir()):
            lock.parent.rmdir()


def check_unlocked(target, folder: bool = True) -> None:
    """Raise :class:`RunLockedError` if another process holds :func:`run_lock` on ``target`` now; creates nothing
    (for the checks a command makes before any work; it takes the lock itself when it starts writing)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    lock = _lock_path(Path(target), folder)
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:                         # no lock file (or no folder): nobody holds it
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunLockedError(_in_use(target, _holder(fd), lock)) from None
    finally:
        os.close(fd)                        # closing drops the probe's lock


def _in_use(target, holder: str, lock: Path) -> str:
    return (f"{target} is in use by another gfdm process ({holder or 'pid unknown'}; lock file {lock}); wait for it "
            f"to finish or choose another output")


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 200).decode(errors="replace").strip()


def atomic_write(path, write: Callable, mode: str = "wb") -> Path:
    """Write ``path`` whole or not at all: ``write(f)`` fills a temporary file in the same folder, which is
    flushed, fsynced and renamed over ``path``. On any failure the temporary is removed; an ``OSError`` is
    raised again with ``path`` as its file name (torch and numpy writers drop it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())       # mkstemp's 0600 → the mode any new file of the user gets
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        cause = _os_error(e)
        if cause is not None and (cause is not e or e.filename is None):
            raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from None
        raise
    return path


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind ``e``: itself, or the one a writer turned into another exception (torch's zip writer
    reports a full disk as a RuntimeError about the file position, raised while handling the OSError)."""
    current: BaseException | None = e
    for _ in range(5):
        if current is None:
            return None
        if isinstance(current, OSError) and current.errno is not None:
            return current
        current = current.__cause__ or current.__context__
    return None


def write_npz(path, compressed: bool = False, **arrays) -> Path:
    """:func:`atomic_write` of a numpy ``.npz`` archive. The archive is built in memory first: numpy's zip writer,
    interrupted by a full disk, leaves a half-closed archive whose clean-up raises again at interpreter exit."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def write_text(path, text: str) -> Path:
    """:func:`atomic_write` of a text file (UTF-8)."""
    return atomic_write(path, lambda f: f.write(text.encode()))


def sweep_temporaries(folder, names: Iterable[str]) -> list[Path]:
    """Remove the temporaries :func:`atomic_write` left for the artefacts ``names`` (file names or glob patterns)
    in ``folder`` — files of a killed process; call it while holding the folder's :func:`run_lock`."""
    folder = Path(folder)
    removed = []
    for name in names:
        for tmp in folder.glob(f".{name}.*.tmp"):
            if tmp.is_file():
                tmp.unlink()
                removed.append(tmp)
    return removed


def disk_error(e: OSError) -> str | None:
    """One line for an ``OSError`` of a full disk (None for any other error)."""
    if e.errno not in DISK_FULL:
        return None
    return (f"{e.strerror or os.strerror(e.errno)} while writing {e.filename or 'an output file'}; nothing "
            f"half-written was kept (free space, then rerun; a training run continues with --resume)")


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask
