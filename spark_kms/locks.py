"""Exclusive locks on the driver host, shared by threads and processes.

A lock is a file locked with ``flock``. Within one process the same lock file is
one :class:`FileLock` object, which a thread may take again while it holds it
(a commit that takes the table lock may call a key-service method that takes it
too). Across threads and processes the lock is exclusive.

``flock`` works between processes of one host only, so two drivers on
different hosts that share a registry folder on a network filesystem are not
serialized by it.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

__all__ = ["FileLock", "file_lock"]

_LOCKS: dict[str, FileLock] = {}
_LOCKS_GUARD = threading.Lock()


def file_lock(path: str) -> FileLock:
    """Return the process's one :class:`FileLock` for ``path``."""
    path = os.path.abspath(path)
    with _LOCKS_GUARD:
        lock = _LOCKS.get(path)
        if lock is None:
            lock = _LOCKS[path] = FileLock(path)
        return lock


class FileLock:
    """An exclusive lock on the file at ``path``, re-entrant for the thread holding it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._handle: IO[str] | None = None

    def __repr__(self) -> str:
        return f"FileLock(path={self.path!r})"

    @contextmanager
    def hold(self, *, blocking: bool = True) -> Iterator[bool]:
        """Hold the lock for the ``with`` block.

        :param blocking: wait for the lock; when false, yield ``False`` at once
            if another thread or process holds it.
        :returns: (as the ``with`` target) whether the lock is held.
        """
        if not self._thread_lock.acquire(blocking=blocking):
            yield False
            return
        try:
            if self._depth == 0 and not self._lock_file(blocking):
                yield False
                return
            self._depth += 1
            try:
                yield True
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._unlock_file()
        finally:
            self._thread_lock.release()

    def _lock_file(self, blocking: bool) -> bool:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        handle = open(self.path, "a")  # noqa: SIM115 (closed in _unlock_file)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self._handle = handle
        return True

    def _unlock_file(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
