"""Append-only audit log of key operations, one JSON object per line.

Each record carries ``prev``, the SHA-256 of the previous line, so that a
removed or edited line breaks the chain and :func:`verify_chain` finds it.
Records hold ids, labels, versions and outcomes, never key bytes.
Appends from several processes on one host are serialized with ``flock``.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

__all__ = ["AuditLog", "current_principal", "verify_chain"]

GENESIS = "0" * 64


def current_principal() -> str:
    """Return who is asking: the Spark user if Spark set one, else the OS user."""
    return os.environ.get("SPARK_USER") or getpass.getuser()


class AuditLog:
    """The audit log at ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"AuditLog(path={self.path!r})"

    def append(self, operation: str, *, table: str, outcome: str, **details: Any) -> None:
        """Append one record for ``operation`` on ``table``."""
        record: dict[str, Any] = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "principal": current_principal(),
            "operation": operation,
            "table": table,
            "outcome": outcome,
        }
        record.update({k: v for k, v in details.items() if v is not None})
        folder = os.path.dirname(self.path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        with open(self.path, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                record["prev"] = _last_line_hash(handle)
                handle.seek(0, os.SEEK_END)
                handle.write(json.dumps(record, sort_keys=True).encode("utf-8") + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def records(self) -> Iterator[dict[str, Any]]:
        """Yield every record, oldest first; a line that is not JSON is skipped."""
        if not os.path.exists(self.path):
            return
        # Bytes, not text: a line that is not UTF-8 is skipped like any other bad line.
        with open(self.path, "rb") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError):
                    continue
                if isinstance(record, dict):
                    yield record

    def count(self) -> int:
        """Return the number of records."""
        return sum(1 for _ in self.records())


def verify_chain(path: str) -> list[str]:
    """Check the hash chain of the audit log at ``path``.

    :returns: one message per broken link (empty when the log is intact).
    """
    problems: list[str] = []
    if not os.path.exists(path):
        return problems
    previous = GENESIS
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                record = json.loads(line)
                stated = record.get("prev") if isinstance(record, dict) else None
            except (ValueError, RecursionError):
                problems.append(f"line {number}: not valid JSON")
                stated = None
            if stated != previous:
                problems.append(
                    f"line {number}: hash chain broken (a line before it was removed or edited)"
                )
            previous = hashlib.sha256(line.rstrip(b"\n")).hexdigest()
    return problems


def _last_line_hash(handle: Any) -> str:
    handle.seek(0, os.SEEK_END)
    size = handle.tell()
    if size == 0:
        return GENESIS
    # Read backwards until the start of the last line.
    block = 4096
    position = size
    tail = b""
    while position > 0:
        step = min(block, position)
        position -= step
        handle.seek(position)
        tail = handle.read(step) + tail
        if tail.rstrip(b"\n").count(b"\n") >= 1:
            break
    last = tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    return hashlib.sha256(last).hexdigest()
