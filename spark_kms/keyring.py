"""The table keyring: metadata and wrapped KEK records in ``<table>/_spark_kms/``.

Layout::

    <table>/_spark_kms/table.json              table metadata, replaced atomically
    <table>/_spark_kms/keks/<kek id>.json      one immutable record per KEK
    <table>/_spark_kms/commits/<job id>.json   the files each committed job added
    <table>/_spark_kms_staging/<job id>/       files of a job not yet committed

Files are written to a temporary name and then renamed, so a reader sees the
old or the new version and never half a file. A KEK record is never replaced:
writing one whose id exists fails. The store uses ``pyarrow.fs``, so the table
may live on a local disk, HDFS or S3.
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
    "CommitRecord",
    "KekRecord",
    "KeyringStore",
    "TableMetadata",
    "resolve_location",
]

log = logging.getLogger(__name__)

KEYRING_DIR = "_spark_kms"
STAGING_DIR = "_spark_kms_staging"
FORMAT_VERSION = 1


def resolve_location(path: str) -> tuple[pafs.FileSystem, str]:
    """Return the filesystem and the normalized path for a table location.

    A path without a scheme is a local path and is made absolute.
    """
    if "://" not in path:
        path = os.path.abspath(path)
    try:
        filesystem, resolved = pafs.FileSystem.from_uri(path if "://" in path else f"file://{path}")
    except (ValueError, OSError) as error:
        raise SparkKmsError(f"cannot open table location {path}: {error}") from error
    return filesystem, resolved.rstrip("/")


@dataclass
class TableMetadata:
    """Contents of ``table.json``: what a table is and which master key protects it."""

    table: str
    table_id: str
    state: str
    master_key_label: str
    master_key_version: int
    created_at: str
    spark_schema: str | None = None
    erased_at: str | None = None
    format_version: int = FORMAT_VERSION

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
            )
        except TypeError as error:
            raise IntegrityError(f"{source} is not valid table metadata: {error}") from None
        if meta.state not in ("active", "erased"):
            raise IntegrityError(f"{source} has an unknown table state {meta.state!r}")
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
        )

    def __repr__(self) -> str:
        return (
            f"KekRecord(kek_id={self.kek_id!r}, table={self.table!r}, "
            f"master_key_label={self.master_key_label!r}, "
            f"master_key_version={self.master_key_version})"
        )


@dataclass
class CommitRecord:
    """The files one committed write job added, and the KEKs they depend on."""

    job_id: str
    committed_at: str
    mode: str
    files: list[str]
    kek_ids: list[str]
    rows: int = 0
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

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
        )


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
        """Tell whether the location holds a spark_kms table."""
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
                f"{path} holds the record of KEK {record.kek_id!r}, not {kek_id!r}"
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

    def list_data_files(self) -> list[str]:
        """Return the table's Parquet files (relative paths), skipping ``_`` and ``.`` folders."""
        selector = pafs.FileSelector(self.location, recursive=True, allow_not_found=True)
        found = []
        for info in self.filesystem.get_file_info(selector):
            if info.type != pafs.FileType.File:
                continue
            relative = info.path[len(self.location) + 1 :]
            if any(part.startswith(("_", ".")) for part in relative.split("/")):
                continue
            if relative.endswith(".parquet"):
                found.append(relative)
        return sorted(found)

    def _kek_path(self, kek_id: str) -> str:
        return f"{self.keyring}/keks/{kek_id}.json"

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


def _parse_object(text: str, source: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise IntegrityError(f"{source} is not valid JSON") from None
    if not isinstance(data, dict):
        raise IntegrityError(f"{source} does not hold a JSON object")
    return data


def _field(data: dict[str, Any], name: str, kind: type, source: str) -> Any:
    value = data.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise IntegrityError(
            f"{source} has a missing or invalid field {name!r} (expected {kind.__name__})"
        )
    return value
