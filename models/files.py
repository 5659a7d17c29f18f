"""The project's one way of putting a file or a directory in place: never half-written, never absent.

- :func:`write_atomic` writes a file through a temporary name no other process or thread uses
  (``<path>.tmp.<pid>.<random>``), flushes and fsyncs it, renames it over ``path`` with
  ``os.replace`` and fsyncs the parent directory, so after a crash a reader sees the old file or
  the new one, never a part, and the rename itself survives a power loss.
- :func:`replace_dir` puts a freshly written directory in place of an old one without a moment
  where neither exists: the old one is renamed to ``<final>.bak``, the new one to ``<final>``,
  then the backup is deleted. :func:`recover_dir` (called by readers) renames a ``.bak`` left by
  a crash between the two renames back into place.

``metajudge.stages`` builds its JSON/JSONL/text writers on :func:`write_atomic` (models cannot
import metajudge: the layering is experiments -> metajudge -> models).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
import uuid
from typing import IO, Any, Callable


def fsync_dir(directory: str) -> None:
    """Makes the entries of ``directory`` (a rename, a new file) durable; a no-op where directories
    cannot be opened (Windows)."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: str) -> str:
    """A sibling of ``path`` that no other process or thread writes: ``<path>.tmp.<pid>.<hex>``."""
    return f"{path.rstrip(os.sep)}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"


def write_atomic(path: str, write: Callable[[IO[Any]], Any], *, binary: bool = False) -> None:
    """``write(f)`` into a temporary sibling of ``path``, fsync, ``os.replace`` onto ``path``, fsync
    of the directory. The temporary file is removed when ``write`` fails."""
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(parent)


def backup_name(final: str) -> str:
    return final.rstrip(os.sep) + ".bak"


def recover_dir(final: str) -> None:
    """If a crash in :func:`replace_dir` left only ``<final>.bak``, renames it back to ``final``."""
    final = final.rstrip(os.sep)
    bak = backup_name(final)
    if not os.path.exists(final) and os.path.isdir(bak):
        os.replace(bak, final)
        fsync_dir(os.path.dirname(final) or ".")


def replace_dir(new: str, final: str) -> None:
    """Moves the complete directory ``new`` to ``final`` (same filesystem); an existing ``final``
    is replaced, and at every moment ``final`` or ``<final>.bak`` holds a complete directory."""
    final = final.rstrip(os.sep)
    parent = os.path.dirname(final) or "."
    bak = backup_name(final)
    recover_dir(final)
    if os.path.exists(final):
        if os.path.exists(bak):
            shutil.rmtree(bak)
        os.replace(final, bak)
    os.replace(new, final)
    fsync_dir(parent)
    shutil.rmtree(bak, ignore_errors=True)


# ------------------------------------------------------------------------------------ the lock


class DirectoryLocked(Exception):
    """Another live process holds the lock of a run directory (the message names it)."""


class DirLock:
    """An exclusive lock on a run directory: ``fcntl.flock`` on ``<directory>/.lock``, whose text
    says who holds it (``pid host start-time``). The kernel drops the lock when its process ends,
    however it ends (SIGKILL included), so the lock of a dead process is never in the way; its file
    is then taken over (and a note printed). ``acquire`` raises :class:`DirectoryLocked` naming the
    holder when a live process holds it. Where ``fcntl`` is missing (Windows) it does nothing."""

    NAME = ".lock"

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, self.NAME)
        self._fd: int | None = None

    def acquire(self) -> "DirLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise DirectoryLocked(f"{self.directory} is in use by another run ({holder}); wait for it to end or "
                                  "choose another --out") from None
        previous = _read_holder(fd, raw=True)
        if previous:
            print(f"{self.directory}: taking over the lock left by a run that ended without releasing it "
                  f"({_describe(previous)})", file=sys.stderr)
        text = f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empties the lock file (a clean end) and drops the lock."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_holder(fd: int, raw: bool = False) -> str:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text if raw else _describe(text)


def _describe(text: str) -> str:
    parts = text.split()
    if len(parts) >= 3:
        return f"pid {parts[0]} on host {parts[1]}, started {parts[2]}"
    return "holder unknown: the lock file is empty or being written"
