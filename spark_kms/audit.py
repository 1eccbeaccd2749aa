"""Append-only audit log of key operations and policy decisions, one JSON object per line.

Every record has ``time``, ``principal``, ``operation``, ``table`` and
``outcome``, and where they apply ``partition``, ``key_label``,
``key_version``, ``kek_ids``, ``job_id``, ``trigger`` and
``application_id`` (the Spark application). Records hold ids, labels,
versions and outcomes, never key bytes.

Each record carries ``prev``, the SHA-256 of the previous line, so that a
removed or edited line breaks the chain and :func:`verify_chain` finds it.
The chain alone cannot show that lines were cut from the end, so every append
also writes ``<log>.head`` with the number of lines, the hash of the last
one and the log's size. Appends from several processes on one host are serialized with ``flock``.
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

__all__ = ["AuditLog", "current_principal", "parse_time", "verify_chain"]

GENESIS = "0" * 64
HEAD_SUFFIX = ".head"


def current_principal() -> str:
    """Return who is asking: the Spark user if Spark set one, else the OS user."""
    return os.environ.get("SPARK_USER") or getpass.getuser()


class AuditLog:
    """The audit log at ``path``.

    :param principal: who the records name; by default :func:`current_principal`
        at the time of each append.
    :param application_id: Spark application id written into every record, if any.
    """

    def __init__(
        self, path: str, *, principal: str | None = None, application_id: str | None = None
    ) -> None:
        self.path = path
        self.principal = principal
        self.application_id = application_id

    def __repr__(self) -> str:
        return f"AuditLog(path={self.path!r})"

    def append(self, operation: str, *, table: str, outcome: str, **details: Any) -> None:
        """Append one record for ``operation`` on ``table``; details that are ``None`` are left out."""
        record: dict[str, Any] = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "principal": self.principal or current_principal(),
            "operation": operation,
            "table": table,
            "outcome": outcome,
            "application_id": self.application_id,
        }
        record.update(details)
        record = {k: v for k, v in record.items() if v is not None}
        folder = os.path.dirname(self.path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        with open(self.path, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                record["prev"] = _last_line_hash(handle)
                line = json.dumps(record, sort_keys=True).encode("utf-8")
                size = handle.seek(0, os.SEEK_END)
                handle.write(line + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
                self._advance_head(handle, line, size)
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

    def select(
        self,
        *,
        table: str | None = None,
        operation: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Yield the records that match every given filter, oldest first.

        ``since`` is inclusive and ``until`` exclusive; a record whose time
        cannot be parsed never matches a time filter.
        """
        for record in self.records():
            if table is not None and record.get("table") != table:
                continue
            if operation is not None and record.get("operation") != operation:
                continue
            if since is not None or until is not None:
                try:
                    at = parse_time(str(record.get("time", "")))
                except ValueError:
                    continue
                if since is not None and at < since:
                    continue
                if until is not None and at >= until:
                    continue
            yield record

    def _advance_head(self, handle: Any, line: bytes, size: int) -> None:
        # Called with the log locked, after ``line`` was appended at offset ``size``.
        # Lines past the head's size were appended by a process that stopped before
        # its head update, so they are counted. A shrunk log keeps the old count.
        head = _read_head(self.path)
        head_size = _read_head_size(self.path)
        if head is None:
            handle.seek(0)
            lines = sum(1 for _ in handle)
        elif head_size is not None and 0 <= head_size < size:
            handle.seek(head_size)
            lines = head[0] + handle.read(size - head_size).count(b"\n") + 1
        else:
            lines = head[0] + 1
        temporary = f"{self.path}{HEAD_SUFFIX}.tmp"
        with open(temporary, "w", encoding="utf-8") as out:
            record = {
                "lines": lines,
                "last": hashlib.sha256(line).hexdigest(),
                "size": size + len(line) + 1,
            }
            json.dump(record, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self.path + HEAD_SUFFIX)


def parse_time(text: str) -> datetime:
    """Parse an ISO 8601 date or time; a value without a zone is taken as UTC.

    :raises ValueError: if ``text`` is not an ISO 8601 date or time.
    """
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed


def _read_head(path: str) -> tuple[int, str] | None:
    try:
        with open(path + HEAD_SUFFIX, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return None
    except (ValueError, RecursionError, UnicodeDecodeError):
        return (-1, "")
    if not isinstance(data, dict):
        return (-1, "")
    lines, last = data.get("lines"), data.get("last")
    if not isinstance(lines, int) or isinstance(lines, bool) or not isinstance(last, str):
        return (-1, "")
    return lines, last


def _read_head_size(path: str) -> int | None:
    # The log's size in bytes after the append that the head records. Heads
    # written before the size was stored have none.
    try:
        with open(path + HEAD_SUFFIX, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError, RecursionError, UnicodeDecodeError):
        return None
    size = data.get("size") if isinstance(data, dict) else None
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def verify_chain(path: str) -> list[str]:
    """Check the hash chain of the audit log at ``path``, and its end against ``<path>.head``.

    :returns: one message per problem (empty when the log is intact).
    """
    problems: list[str] = []
    head = _read_head(path)
    if not os.path.exists(path):
        if head is not None:
            problems.append(f"{path} is missing but {path}{HEAD_SUFFIX} says it had lines")
        return problems
    previous = GENESIS
    line_hashes: dict[int, str] = {}
    number = 0
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
            if head is not None and number == head[0]:
                line_hashes[number] = previous
    problems.extend(_check_head(path, head, number, line_hashes))
    return problems


def _check_head(
    path: str, head: tuple[int, str] | None, lines: int, line_hashes: dict[int, str]
) -> list[str]:
    # A log longer than its head is fine: the process may have stopped between
    # appending a line and updating the head.
    if head is None:
        return []
    expected, last = head
    if expected < 0:
        return [f"{path}{HEAD_SUFFIX} is not valid; it was edited"]
    if lines < expected:
        return [
            f"the log has {lines} line(s) but {expected} were appended: "
            "lines were removed from its end"
        ]
    if line_hashes.get(expected) != last:
        return [f"line {expected}: does not match the hash of the last append (it was edited)"]
    return []


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
