"""The table keyring: metadata and wrapped KEK records in ``<table>/_spark_kms/``.

Layout::

    <table>/_spark_kms/table.json              table metadata, replaced atomically
    <table>/_spark_kms/keks/<kek id>.json      one record per KEK
    <table>/_spark_kms/commits/<job id>.json   the files each committed job added
    <table>/_spark_kms/partitions/<id>.json    one record per partition value with its own master key
    <table>/_spark_kms/rekey.json              the file swaps of a rekey that is committing
    <table>/_spark_kms_staging/<job id>/       files of a job not yet committed

Files are written to a temporary name and then renamed, so a reader sees the
old or the new version and never half a file. A write never replaces a KEK
record: writing one whose id exists fails. Only master-key rotation replaces a
record (the same KEK, wrapped by the new master key version), and only a rekey
deletes one, after no committed file depends on it. The store uses
``pyarrow.fs``, so the table may live on a local disk, HDFS or S3.

NOTE: the rename is atomic on local disks and HDFS; on S3 ``pyarrow.fs``
moves by copy and delete, so a reader can briefly miss a file being replaced.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.fs as pafs

from spark_kms.errors import IntegrityError, KeyNotFoundError, SparkKmsError

__all__ = [
    "ACTIVE",
    "ERASED",
    "PENDING_DELETION",
    "TABLE_STATES",
    "CommitRecord",
    "KekRecord",
    "KeyringStore",
    "PartitionRecord",
    "TableMetadata",
    "resolve_location",
]

log = logging.getLogger(__name__)

KEYRING_DIR = "_spark_kms"
STAGING_DIR = "_spark_kms_staging"
FORMAT_VERSION = 1
DEFAULT_ROTATION_PERIOD_DAYS = 365

# Table and partition states. A table scheduled for deletion is neither read
# nor written until the deletion runs or is cancelled.
ACTIVE = "active"
PENDING_DELETION = "pending_deletion"
ERASED = "erased"
TABLE_STATES = (ACTIVE, PENDING_DELETION, ERASED)


def resolve_location(path: str) -> tuple[pafs.FileSystem, str]:
    """Return the filesystem and the normalized path for a table location.

    A path without a scheme is a local path and is made absolute, and so is
    Hadoop's ``file:/path`` spelling.
    """
    if path.startswith("file:") and not path.startswith("file://"):
        path = path[len("file:") :]
    if "://" not in path:
        path = os.path.abspath(path)
    try:
        filesystem, resolved = pafs.FileSystem.from_uri(path if "://" in path else f"file://{path}")
    except (ValueError, OSError) as error:
        raise SparkKmsError(f"cannot open table location {path}: {error}") from error
    return filesystem, resolved.rstrip("/")


@dataclass
class TableMetadata:
    """Contents of ``table.json``: what a table is and which master key protects it.

    ``master_key_since`` is when the current master key version became current
    (``None`` for tables written before it was recorded: the creation time
    counts). ``rotation_started_at`` is set while a rotation is unfinished, and
    ``rotation_pending`` lists the master keys it has still to give a new
    version (``table`` for the table's own, else partition ids).
    ``rotation_period_days`` of 0 turns automatic rotation off.
    ``partition_by`` names the column whose values each get their own master key.
    """

    table: str
    table_id: str
    state: str
    master_key_label: str
    master_key_version: int
    created_at: str
    spark_schema: str | None = None
    erased_at: str | None = None
    format_version: int = FORMAT_VERSION
    master_key_since: str | None = None
    rotation_period_days: int = DEFAULT_ROTATION_PERIOD_DAYS
    rotation_started_at: str | None = None
    rotation_pending: list[str] | None = None
    deletion_scheduled_at: str | None = None
    deletion_due_at: str | None = None
    partition_by: str | None = None

    @classmethod
    def from_json(cls, text: str, source: str) -> TableMetadata:
        """Parse ``table.json``.

        :raises IntegrityError: naming ``source`` if the text is not valid metadata.
        """
        data = _parse_object(text, source)
        try:
            meta = cls(
                table=_field(data, "table", str, source),
                table_id=_field(data, "table_id", str, source),
                state=_field(data, "state", str, source),
                master_key_label=_field(data, "master_key_label", str, source),
                master_key_version=_field(data, "master_key_version", int, source),
                created_at=_field(data, "created_at", str, source),
                spark_schema=data.get("spark_schema"),
                erased_at=data.get("erased_at"),
                format_version=_field(data, "format_version", int, source),
                master_key_since=_optional(data, "master_key_since", str, source),
                rotation_period_days=_optional(
                    data, "rotation_period_days", int, source, DEFAULT_ROTATION_PERIOD_DAYS
                ),
                rotation_started_at=_optional(data, "rotation_started_at", str, source),
                rotation_pending=_optional(data, "rotation_pending", list, source),
                deletion_scheduled_at=_optional(data, "deletion_scheduled_at", str, source),
                deletion_due_at=_optional(data, "deletion_due_at", str, source),
                partition_by=_optional(data, "partition_by", str, source),
            )
        except TypeError as error:
            raise IntegrityError(f"{source} is not valid table metadata: {error}") from None
        if meta.state not in TABLE_STATES:
            raise IntegrityError(f"{source} has an unknown table state {meta.state!r}")
        if meta.rotation_pending is not None and not all(
            isinstance(scope, str) for scope in meta.rotation_pending
        ):
            raise IntegrityError(f"{source} has a rotation_pending entry that is not a string")
        if meta.spark_schema is not None and not isinstance(meta.spark_schema, str):
            raise IntegrityError(f"{source} has a spark_schema that is not a string")
        if meta.erased_at is not None and not isinstance(meta.erased_at, str):
            raise IntegrityError(f"{source} has an erased_at that is not a string")
        return meta


@dataclass
class KekRecord:
    """One KEK, wrapped by a master key version, as stored in ``keks/<kek id>.json``."""

    kek_id: str
    table: str
    table_id: str
    group: str
    job_id: str
    created_at: str
    master_key_label: str
    master_key_version: int
    wrapped_kek: str
    format_version: int = FORMAT_VERSION
    partition_id: str | None = None

    @classmethod
    def from_json(cls, text: str, source: str) -> KekRecord:
        """Parse a KEK record.

        :raises IntegrityError: naming ``source`` if the text is not a valid record.
        """
        data = _parse_object(text, source)
        return cls(
            kek_id=_field(data, "kek_id", str, source),
            table=_field(data, "table", str, source),
            table_id=_field(data, "table_id", str, source),
            group=_field(data, "group", str, source),
            job_id=_field(data, "job_id", str, source),
            created_at=_field(data, "created_at", str, source),
            master_key_label=_field(data, "master_key_label", str, source),
            master_key_version=_field(data, "master_key_version", int, source),
            wrapped_kek=_field(data, "wrapped_kek", str, source),
            format_version=_field(data, "format_version", int, source),
            partition_id=_optional(data, "partition_id", str, source),
        )

    def __repr__(self) -> str:
        return (
            f"KekRecord(kek_id={self.kek_id!r}, table={self.table!r}, "
            f"partition_id={self.partition_id!r}, "
            f"master_key_label={self.master_key_label!r}, "
            f"master_key_version={self.master_key_version})"
        )


@dataclass
class CommitRecord:
    """The files one committed write job added, and the KEKs they depend on.

    ``column_keys`` maps each column key group of the job to its columns; it is
    ``None`` in records written before it was stored. ``replaced`` lists the
    files an overwrite replaced: they are no longer part of the table, even if
    deleting one of them failed.
    """

    job_id: str
    committed_at: str
    mode: str
    files: list[str]
    kek_ids: list[str]
    rows: int = 0
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    column_keys: dict[str, list[str]] | None = None
    replaced: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, text: str, source: str) -> CommitRecord:
        """Parse a commit record.

        :raises IntegrityError: naming ``source`` if the text is not a valid record.
        """
        data = _parse_object(text, source)
        files = _field(data, "files", list, source)
        kek_ids = _field(data, "kek_ids", list, source)
        if not all(isinstance(x, str) for x in files + kek_ids):
            raise IntegrityError(f"{source} lists a file or KEK id that is not a string")
        return cls(
            job_id=_field(data, "job_id", str, source),
            committed_at=_field(data, "committed_at", str, source),
            mode=_field(data, "mode", str, source),
            files=files,
            kek_ids=kek_ids,
            rows=_field(data, "rows", int, source),
            format_version=_field(data, "format_version", int, source),
            column_keys=_column_keys(data, source),
            replaced=_replaced_files(data, source),
        )


@dataclass
class PartitionRecord:
    """One partition value of a table partitioned with its own master keys.

    ``folder`` is the Hive-style folder of the partition (``column=value``,
    escaped). The partition's master key label and version change on rotation;
    ``state`` becomes ``erased`` when the partition is crypto-erased.
    """

    partition_id: str
    table_id: str
    column: str
    folder: str
    state: str
    master_key_label: str
    master_key_version: int
    master_key_since: str
    created_at: str
    erased_at: str | None = None
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_json(cls, text: str, source: str) -> PartitionRecord:
        """Parse a partition record.

        :raises IntegrityError: naming ``source`` if the text is not a valid record.
        """
        data = _parse_object(text, source)
        record = cls(
            partition_id=_field(data, "partition_id", str, source),
            table_id=_field(data, "table_id", str, source),
            column=_field(data, "column", str, source),
            folder=_field(data, "folder", str, source),
            state=_field(data, "state", str, source),
            master_key_label=_field(data, "master_key_label", str, source),
            master_key_version=_field(data, "master_key_version", int, source),
            master_key_since=_field(data, "master_key_since", str, source),
            created_at=_field(data, "created_at", str, source),
            erased_at=_optional(data, "erased_at", str, source),
            format_version=_field(data, "format_version", int, source),
        )
        if record.state not in (ACTIVE, ERASED):
            raise IntegrityError(f"{source} has an unknown partition state {record.state!r}")
        return record


class KeyringStore:
    """Reads and writes the keyring of the table at ``location``."""

    def __init__(self, location: str) -> None:
        self.filesystem, self.location = resolve_location(location)
        self.keyring = f"{self.location}/{KEYRING_DIR}"

    def __repr__(self) -> str:
        return f"KeyringStore(location={self.location!r})"

    @property
    def staging_root(self) -> str:
        """Folder under which each job stages its files before commit."""
        return f"{self.location}/{STAGING_DIR}"

    def exists(self) -> bool:
        """Tell whether the location contains a spark_kms table."""
        return self._is_file(f"{self.keyring}/table.json")

    def read_metadata(self) -> TableMetadata | None:
        """Return the table metadata, or ``None`` if there is no table here."""
        path = f"{self.keyring}/table.json"
        text = self._read_text(path)
        return None if text is None else TableMetadata.from_json(text, path)

    def write_metadata(self, meta: TableMetadata) -> None:
        """Replace ``table.json`` atomically."""
        self._write_atomically(f"{self.keyring}/table.json", _dump(asdict(meta)))

    def put_kek_record(self, record: KekRecord) -> None:
        """Persist a new KEK record.

        :raises IntegrityError: if a record with this KEK id already exists.
        """
        path = self._kek_path(record.kek_id)
        if self._is_file(path):
            raise IntegrityError(
                f"KEK record {record.kek_id} already exists; KEK records are never replaced"
            )
        self._write_atomically(path, _dump(asdict(record)))
        log.info("persisted KEK record %s of table %s", record.kek_id, record.table)

    def replace_kek_record(self, record: KekRecord) -> None:
        """Replace an existing KEK record atomically (used by rotation only)."""
        self._write_atomically(self._kek_path(record.kek_id), _dump(asdict(record)))

    def delete_kek_record(self, kek_id: str) -> None:
        """Delete a KEK record (used by rekey only, once no committed file needs it)."""
        _delete_if_present(self.filesystem, self._kek_path(kek_id))
        log.info("deleted KEK record %s in %s", kek_id, self.keyring)

    def get_kek_record(self, kek_id: str) -> KekRecord:
        """Return the KEK record with this id.

        :raises KeyNotFoundError: if no such record exists.
        """
        path = self._kek_path(kek_id)
        text = self._read_text(path)
        if text is None:
            raise KeyNotFoundError(f"no KEK record {kek_id} in {self.keyring}/keks")
        record = KekRecord.from_json(text, path)
        if record.kek_id != kek_id:
            raise IntegrityError(
                f"{path} contains the record of KEK {record.kek_id!r}, not {kek_id!r}"
            )
        return record

    def list_kek_ids(self) -> list[str]:
        """Return the ids of every KEK record, sorted."""
        names = self._list_names(f"{self.keyring}/keks")
        return sorted(n[: -len(".json")] for n in names if n.endswith(".json"))

    def put_commit_record(self, record: CommitRecord) -> None:
        """Persist the record of a committed job."""
        self._write_atomically(
            f"{self.keyring}/commits/{record.job_id}.json", _dump(asdict(record))
        )

    def delete_commit_record(self, job_id: str) -> None:
        """Delete the record of a committed job whose files are all gone."""
        _delete_if_present(self.filesystem, f"{self.keyring}/commits/{job_id}.json")

    def put_partition_record(self, record: PartitionRecord) -> None:
        """Write a partition record, replacing the previous version atomically."""
        self._write_atomically(self._partition_path(record.partition_id), _dump(asdict(record)))

    def get_partition_record(self, partition_id: str) -> PartitionRecord | None:
        """Return the record of a partition, or ``None`` if the partition was never written."""
        path = self._partition_path(partition_id)
        text = self._read_text(path)
        return None if text is None else PartitionRecord.from_json(text, path)

    def list_partition_records(self) -> list[PartitionRecord]:
        """Return every partition record, sorted by folder."""
        folder = f"{self.keyring}/partitions"
        records = []
        for name in self._list_names(folder):
            if name.endswith(".json") and not name.startswith("."):
                record = self.get_partition_record(name[: -len(".json")])
                if record is not None:
                    records.append(record)
        return sorted(records, key=lambda r: r.folder)

    def read_rekey_journal(self) -> dict[str, Any] | None:
        """Return the journal of a rekey that was committing, or ``None``."""
        path = f"{self.keyring}/rekey.json"
        text = self._read_text(path)
        return None if text is None else _parse_object(text, path)

    def write_rekey_journal(self, journal: dict[str, Any]) -> None:
        """Write the journal of a committing rekey atomically."""
        self._write_atomically(f"{self.keyring}/rekey.json", _dump(journal))

    def delete_rekey_journal(self) -> None:
        """Delete the journal once its rekey has committed."""
        _delete_if_present(self.filesystem, f"{self.keyring}/rekey.json")

    def list_commit_records(self) -> list[CommitRecord]:
        """Return every commit record, oldest first."""
        folder = f"{self.keyring}/commits"
        records = []
        for name in self._list_names(folder):
            if not name.endswith(".json"):
                continue
            path = f"{folder}/{name}"
            text = self._read_text(path)
            if text is not None:
                records.append(CommitRecord.from_json(text, path))
        return sorted(records, key=lambda r: (r.committed_at, r.job_id))

    def last_column_keys(self) -> dict[str, list[str]] | None:
        """Return the column-key layout of the table's last write that recorded one."""
        records = reversed(self.list_commit_records())
        return next((r.column_keys for r in records if r.column_keys is not None), None)

    def list_data_files(self) -> list[str]:
        """Return the table's Parquet files (relative paths), skipping ``_`` and ``.`` folders."""
        return sorted(self.data_file_sizes())

    def data_file_sizes(self) -> dict[str, int]:
        """Return the size in bytes of each Parquet file of the table, by relative path."""
        selector = pafs.FileSelector(self.location, recursive=True, allow_not_found=True)
        found = {}
        for info in self.filesystem.get_file_info(selector):
            if info.type != pafs.FileType.File:
                continue
            relative = info.path[len(self.location) + 1 :]
            if any(part.startswith(("_", ".")) for part in relative.split("/")):
                continue
            if relative.endswith(".parquet"):
                found[relative] = int(info.size or 0)
        return found

    def _kek_path(self, kek_id: str) -> str:
        return f"{self.keyring}/keks/{kek_id}.json"

    def _partition_path(self, partition_id: str) -> str:
        return f"{self.keyring}/partitions/{partition_id}.json"

    def _is_file(self, path: str) -> bool:
        return bool(self.filesystem.get_file_info(path).type == pafs.FileType.File)

    def _list_names(self, folder: str) -> list[str]:
        selector = pafs.FileSelector(folder, allow_not_found=True)
        return sorted(info.base_name for info in self.filesystem.get_file_info(selector))

    def _read_text(self, path: str) -> str | None:
        try:
            with self.filesystem.open_input_stream(path) as stream:
                data: bytes = stream.read()
        except FileNotFoundError:
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise IntegrityError(f"{path} is not UTF-8 text") from None

    def _write_atomically(self, path: str, text: str) -> None:
        folder = path.rsplit("/", 1)[0]
        self.filesystem.create_dir(folder, recursive=True)
        temporary = f"{folder}/.{uuid.uuid4().hex}.tmp"
        with self.filesystem.open_output_stream(temporary) as stream:
            stream.write(text.encode("utf-8"))
        self.filesystem.move(temporary, path)


def _dump(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _replaced_files(data: dict[str, Any], source: str) -> list[str]:
    replaced = data.get("replaced", [])
    if not isinstance(replaced, list) or not all(isinstance(x, str) for x in replaced):
        raise IntegrityError(f"{source} has a 'replaced' field that is not a list of file names")
    return replaced


def _parse_object(text: str, source: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise IntegrityError(f"{source} is not valid JSON") from None
    if not isinstance(data, dict):
        raise IntegrityError(f"{source} does not hold a JSON object")
    return data


def _delete_if_present(filesystem: pafs.FileSystem, path: str) -> None:
    try:
        filesystem.delete_file(path)
    except FileNotFoundError:
        pass


def _optional(data: dict[str, Any], name: str, kind: type, source: str, default: Any = None) -> Any:
    # A field added after the first format version: absent in older files.
    if data.get(name) is None:
        return default
    return _field(data, name, kind, source)


def _column_keys(data: dict[str, Any], source: str) -> dict[str, list[str]] | None:
    value = data.get("column_keys")
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(group, str)
        and isinstance(columns, list)
        and all(isinstance(column, str) for column in columns)
        for group, columns in value.items()
    ):
        raise IntegrityError(f"{source} has a column_keys field that is not groups of column names")
    return value


def _field(data: dict[str, Any], name: str, kind: type, source: str) -> Any:
    value = data.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise IntegrityError(
            f"{source} has a missing or invalid field {name!r} (expected {kind.__name__})"
        )
    return value
