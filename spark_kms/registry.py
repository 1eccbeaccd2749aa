"""The table registry: table name to table id and location, and erasure tombstones.

One JSON file per table name in the registry folder (``spark.kms.registry``)
on the driver host. An entry whose state is ``erased`` is a tombstone: it is
never removed, so an erased table's key is never created again under its name.
An entry whose state is ``pending_deletion`` carries the time its deletion
becomes due.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass

from spark_kms.errors import IntegrityError
from spark_kms.jobkeys import check_name
from spark_kms.keyring import TABLE_STATES

__all__ = ["RegistryEntry", "TableRegistry"]


@dataclass
class RegistryEntry:
    """A registered table."""

    table: str
    table_id: str
    location: str
    state: str
    created_at: str
    erased_at: str | None = None
    deletion_scheduled_at: str | None = None
    deletion_due_at: str | None = None


class TableRegistry:
    """The registry folder at ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"TableRegistry(path={self.path!r})"

    def get(self, table: str) -> RegistryEntry | None:
        """Return the entry of ``table``, or ``None`` if it was never registered."""
        check_name("table", table)
        file = os.path.join(self.path, f"{table}.json")
        try:
            with open(file, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            return None
        except (ValueError, RecursionError):
            raise IntegrityError(f"registry entry {file} is not valid JSON") from None
        try:
            entry = RegistryEntry(**data)
        except TypeError:
            raise IntegrityError(f"registry entry {file} has missing or unknown fields") from None
        if not all(isinstance(v, str) for v in (entry.table, entry.table_id, entry.location)):
            raise IntegrityError(
                f"registry entry {file} has a table, id or location that is not text"
            )
        if entry.state not in TABLE_STATES:
            raise IntegrityError(f"registry entry {file} has an unknown state {entry.state!r}")
        optional_times = (entry.erased_at, entry.deletion_scheduled_at, entry.deletion_due_at)
        if not isinstance(entry.created_at, str) or not all(
            isinstance(t, str | None) for t in optional_times
        ):
            raise IntegrityError(f"registry entry {file} has a time that is not text")
        return entry

    def put(self, entry: RegistryEntry) -> None:
        """Write the entry of ``entry.table`` atomically."""
        os.makedirs(self.path, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=self.path, prefix=".", suffix=".tmp")
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(asdict(entry), handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, os.path.join(self.path, f"{entry.table}.json"))

    def entries(self) -> list[RegistryEntry]:
        """Return every entry, sorted by table name."""
        if not os.path.isdir(self.path):
            return []
        names = sorted(
            n[:-5] for n in os.listdir(self.path) if n.endswith(".json") and not n.startswith(".")
        )
        return [entry for entry in (self.get(n) for n in names) if entry is not None]
