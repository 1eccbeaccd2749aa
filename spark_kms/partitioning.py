"""Tables partitioned by a column, with one master key per partition value.

With the writer option ``kms.partition_by`` a table is laid out in Hive-style
folders, ``<table>/<column>=<value>/part-....parquet``, and each partition value
gets its own master key in the HSM. Erasing that key erases the partition
alone. The partition column is stored in the folder name, not in the files, so
its values are visible in plaintext, as in any Hive-style table.

Keys. A task meets partition values that the driver cannot know when it plans
the job, and tasks never reach the HSM. So the driver gives the job one random
256-bit seed, and every task derives the KEK of a (partition, key group) pair
from it with HKDF-SHA256 (RFC 5869), using the KEK id as ``info``. Every task
of the job derives the same KEK for the same partition. At commit the driver
derives the KEKs of the partitions the tasks wrote, wraps each once under its
partition's master key and persists the records before any file becomes
visible. The seed is never stored, so once a partition's master key is
destroyed, its KEKs cannot be recovered from the keyring.

This module runs on executors and never imports the HSM access.
"""

from __future__ import annotations

import datetime as _datetime
import hashlib
import json
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from spark_kms.errors import InvalidOptionError, PartitionErasedError
from spark_kms.jobkeys import JobKeys
from spark_kms.parquet_crypto import EncryptionPlan, open_encrypted_writer

__all__ = [
    "HIVE_NULL",
    "PartitionSeed",
    "PartitionedWrite",
    "PartitionedTaskResult",
    "check_partition_type",
    "derive_partition_keys",
    "format_value",
    "parse_partition_spec",
    "parse_value",
    "partition_folder",
    "partition_id",
    "partition_kek_id",
    "partition_kek_ids",
    "partition_of",
    "partition_plan",
    "partition_type",
    "split_by_partition",
    "unescape_path_name",
]

# The folder name Hive and Spark use for a null partition value.
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
SEED_BYTES = 32
KEK_BYTES = 32
MAX_FOLDER_BYTES = 255

# Characters Spark escapes as %XX in partition folder names
# (org.apache.spark.sql.catalyst.catalog.ExternalCatalogUtils.charToEscape),
# plus NUL, which no filesystem accepts in a name.
_ESCAPED = {chr(c) for c in range(0x00, 0x20)} | set("\"#%'*/:=?\\\x7f{[]^")
_ESCAPE_PATTERN = re.compile(r"%([0-9A-Fa-f]{2})")

# Arrow type of each Spark type a partition column may have, by its name in the
# JSON form of a Spark schema (``StructType.json()``).
_SPARK_TYPES = {
    "string": pa.string(),
    "byte": pa.int8(),
    "short": pa.int16(),
    "integer": pa.int32(),
    "long": pa.int64(),
    "boolean": pa.bool_(),
    "date": pa.date32(),
}


class PartitionSeed:
    """The random seed of one partitioned write job; ``repr`` never shows it."""

    __slots__ = ("_seed",)

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_BYTES:
            raise ValueError(f"a partition seed has {SEED_BYTES} bytes, not {len(seed)}")
        self._seed = seed

    def __repr__(self) -> str:
        return "PartitionSeed(<redacted>)"

    __str__ = __repr__

    def __getstate__(self) -> bytes:
        return self._seed

    def __setstate__(self, state: bytes) -> None:
        self._seed = state

    def derive(self, kek_id: str) -> bytes:
        """Derive the KEK with id ``kek_id`` (HKDF-SHA256, no salt, the id as info)."""
        hkdf = HKDF(
            algorithm=hashes.SHA256(),
            length=KEK_BYTES,
            salt=None,
            info=b"spark_kms partition KEK " + kek_id.encode("ascii"),
        )
        return hkdf.derive(self._seed)


def check_partition_type(column: str, data_type: pa.DataType) -> None:
    """Raise unless ``data_type`` can name a partition folder.

    :raises InvalidOptionError: for types other than string, integer, boolean and date.
    """
    if not (
        pa.types.is_string(data_type)
        or pa.types.is_large_string(data_type)
        or pa.types.is_integer(data_type)
        or pa.types.is_boolean(data_type)
        or pa.types.is_date32(data_type)
    ):
        raise InvalidOptionError(
            f"cannot partition by column '{column}' of type {data_type}: kms.partition_by "
            "takes a string, integer, boolean or date column"
        )


def partition_type(spark_schema: str | None, column: str) -> pa.DataType:
    """Return the Arrow type of ``column`` in a Spark schema in JSON form.

    A table with no schema yet, or a column of another type, gives string: its
    folder text is then used as it is.
    """
    if not spark_schema:
        return pa.string()
    try:
        fields = json.loads(spark_schema).get("fields", [])
    except (ValueError, AttributeError, RecursionError):
        return pa.string()
    for item in fields:
        if isinstance(item, dict) and item.get("name") == column:
            return _SPARK_TYPES.get(str(item.get("type")), pa.string())
    return pa.string()


def format_value(column: str, value: Any) -> str | None:
    """Return the folder text of a partition value, or ``None`` for null.

    :raises InvalidOptionError: for an empty string, which a Hive-style folder
        cannot tell apart from null.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, _datetime.date):
        return value.isoformat()
    text = str(value)
    if text == "":
        raise InvalidOptionError(
            f"partition column '{column}' has an empty string value, which a Hive-style "
            "folder cannot tell apart from null; replace it with null or another value"
        )
    return text


def parse_value(text: str | None, data_type: pa.DataType) -> Any:
    """Return the value of the folder text ``text`` as a Python value of ``data_type``.

    :raises InvalidOptionError: if the text is not a value of that type.
    """
    if text is None or text == HIVE_NULL:
        return None
    try:
        if pa.types.is_integer(data_type):
            return int(text)
        if pa.types.is_boolean(data_type):
            if text.lower() not in ("true", "false"):
                raise ValueError(text)
            return text.lower() == "true"
        if pa.types.is_date32(data_type):
            return _datetime.date.fromisoformat(text)
    except ValueError:
        raise InvalidOptionError(
            f"partition value {text!r} is not a valid {data_type} value"
        ) from None
    return text


def escape_path_name(text: str) -> str:
    """Escape ``text`` for a folder name the way Spark does (``%XX`` per special character)."""
    return "".join(f"%{ord(c):02X}" if c in _ESCAPED else c for c in text)


def unescape_path_name(text: str) -> str:
    """Undo :func:`escape_path_name`."""
    return _ESCAPE_PATTERN.sub(lambda m: chr(int(m.group(1), 16)), text)


def partition_folder(column: str, text: str | None) -> str:
    """Return the Hive-style folder name ``column=value`` of a partition.

    :raises InvalidOptionError: if the name exceeds 255 bytes, the usual
        filesystem limit for one path component.
    """
    value = HIVE_NULL if text is None else escape_path_name(text)
    folder = f"{escape_path_name(column)}={value}"
    if len(folder.encode("utf-8")) > MAX_FOLDER_BYTES:
        prefix = (text or "")[:40]
        raise InvalidOptionError(
            f"partition value {prefix!r}... of column '{column}' makes a folder name longer "
            f"than {MAX_FOLDER_BYTES} bytes; partition by a column with shorter values"
        )
    return folder


def partition_of(relative_path: str) -> str | None:
    """Return the partition folder of a data file path relative to the table, if any."""
    first, slash, _rest = relative_path.partition("/")
    return first if slash and "=" in first else None


def partition_id(folder: str) -> str:
    """Return the id of a partition: the first 20 hex digits of SHA-256 of its folder name.

    The id goes into HSM labels and KEK ids, which allow only ``[A-Za-z0-9._-]``.
    """
    return hashlib.sha256(folder.encode("utf-8")).hexdigest()[:20]


def partition_kek_id(table: str, group: str, folder: str, job_id: str) -> str:
    """Return the id of the KEK of key group ``group`` in one partition, for one job."""
    return f"{table}.{group}.p{partition_id(folder)}.k{job_id}"


def partition_kek_ids(folder: str | None, kek_ids: Iterable[str]) -> list[str]:
    """Return the KEK ids among ``kek_ids`` that belong to the partition ``folder``.

    A partitioned job's commit record lists the KEKs of all its partitions, but
    a file needs only those of its own. ``None`` (no partition) keeps every id.
    """
    if folder is None:
        return list(kek_ids)
    marker = f".p{partition_id(folder)}.k"
    return [kek_id for kek_id in kek_ids if marker in kek_id]


def parse_partition_spec(spec: str) -> tuple[str, str]:
    """Split ``column=value`` (as given to ``spark-kms erase --partition``).

    :raises InvalidOptionError: if ``=`` is missing or the column is empty.
    """
    column, equals, value = spec.partition("=")
    if not equals or not column.strip():
        raise InvalidOptionError(
            f"invalid partition {spec!r}: give it as column=value, for example customer_id=42"
        )
    return column.strip(), value


def derive_partition_keys(
    seed: PartitionSeed, table: str, job_id: str, folder: str, groups: Iterable[str]
) -> dict[str, tuple[str, bytes]]:
    """Derive the KEK of each key group in one partition: group to (KEK id, KEK)."""
    keys = {}
    for group in groups:
        kek_id = partition_kek_id(table, group, folder, job_id)
        keys[group] = (kek_id, seed.derive(kek_id))
    return keys


def partition_plan(
    *,
    job_id: str,
    table_group: str,
    keys: Mapping[str, tuple[str, bytes]],
    grouped_paths: Mapping[str, Sequence[str]],
    leaves: Sequence[str],
) -> EncryptionPlan:
    """Return the encryption plan of one partition's files.

    :param keys: group to (KEK id, KEK), including ``table_group``.
    :param grouped_paths: column key group to the Parquet leaf paths it covers.
    :param leaves: every leaf path of the files, so that the columns outside
        every group are encrypted with the footer KEK.
    """
    footer_kek_id = keys[table_group][0]
    column_keys: dict[str, list[str]] = {}
    if grouped_paths:
        covered: set[str] = set()
        for group, paths in grouped_paths.items():
            column_keys[keys[group][0]] = list(paths)
            covered.update(paths)
        rest = [p for p in leaves if p not in covered]
        if rest:
            column_keys[footer_kek_id] = rest
    return EncryptionPlan(
        job_id=job_id,
        footer_kek_id=footer_kek_id,
        column_keys=column_keys,
        keys=JobKeys({kek_id: kek for kek_id, kek in keys.values()}),
    )


def split_by_partition(
    batch: pa.RecordBatch, column: str
) -> Iterator[tuple[str | None, pa.RecordBatch]]:
    """Yield (folder text of the value, rows without the partition column) per value in ``batch``.

    Rows are sorted by the partition column first, so the cost is one sort per
    batch, whatever the number of distinct values.
    """
    index = batch.schema.get_field_index(column)
    order = pc.array_sort_indices(batch.column(index), null_placement="at_end")
    ordered = batch.take(order)
    values = ordered.column(index).to_pylist()
    rest = ordered.select([i for i in range(ordered.num_columns) if i != index])
    start = 0
    for position in range(1, len(values) + 1):
        if position == len(values) or values[position] != values[start]:
            yield format_value(column, values[start]), rest.slice(start, position - start)
            start = position


@dataclass
class PartitionedTaskResult:
    """Files one task of a partitioned job staged (paths relative to the staging folder), and rows."""

    files: list[str] = field(default_factory=list)
    rows: int = 0


@dataclass
class PartitionedWrite:
    """The part of a partitioned write job that its tasks and its commit share.

    :param groups: every key group of the job, ``table_group`` included.
    :param grouped_paths: column key group to the Parquet leaf paths it covers.
    :param leaves: every leaf path of the files (the partition column is not in them).
    :param erased: folders of erased partitions, which the tasks reject early.
    """

    table: str
    job_id: str
    column: str
    seed: PartitionSeed
    table_group: str
    groups: list[str]
    grouped_paths: dict[str, list[str]]
    leaves: list[str]
    erased: frozenset[str] = frozenset()

    def __repr__(self) -> str:
        return (
            f"PartitionedWrite(table={self.table!r}, job_id={self.job_id!r}, "
            f"column={self.column!r})"
        )

    def keys_for(self, folder: str) -> dict[str, tuple[str, bytes]]:
        """Derive the KEKs of one partition: group to (KEK id, KEK)."""
        return derive_partition_keys(self.seed, self.table, self.job_id, folder, self.groups)

    def write(
        self, batches: Iterable[pa.RecordBatch], staging: str, filesystem: Any, task: int
    ) -> PartitionedTaskResult:
        """Write the task's rows into one encrypted file per partition value under ``staging``.

        :raises PartitionErasedError: for a row of an erased partition; the
            files this task opened are deleted.
        """
        name = f"part-{task:05d}-{self.job_id}-{uuid.uuid4().hex[:12]}.parquet"
        writers: dict[str, Any] = {}
        rows = 0
        try:
            for batch in batches:
                for text, part in split_by_partition(batch, self.column):
                    folder = partition_folder(self.column, text)
                    if folder in self.erased:
                        raise PartitionErasedError(
                            self.table, folder, "write this data to another partition value"
                        )
                    writer = writers.get(folder)
                    if writer is None:
                        filesystem.create_dir(f"{staging}/{folder}", recursive=True)
                        writer = self._open(folder, part.schema, staging, name, filesystem)
                        writers[folder] = writer
                    writer.write_batch(part)
                    rows += part.num_rows
            for writer in writers.values():
                writer.close()
        except BaseException:
            _close_quietly(writers)
            for folder in writers:
                _delete_quietly(filesystem, f"{staging}/{folder}/{name}")
            raise
        return PartitionedTaskResult(files=sorted(f"{folder}/{name}" for folder in writers), rows=rows)

    def _open(
        self, folder: str, schema: pa.Schema, staging: str, name: str, filesystem: Any
    ) -> Any:
        plan = partition_plan(
            job_id=self.job_id,
            table_group=self.table_group,
            keys=self.keys_for(folder),
            grouped_paths=self.grouped_paths,
            leaves=self.leaves,
        )
        return open_encrypted_writer(f"{staging}/{folder}/{name}", schema, plan, filesystem)


def _close_quietly(writers: Mapping[str, Any]) -> None:
    # Closes what it can before the files are deleted; the first error is re-raised by the caller.
    for writer in writers.values():
        try:
            writer.close()
        except (OSError, pa.ArrowException):
            pass


def _delete_quietly(filesystem: Any, path: str) -> None:
    try:
        filesystem.delete_file(path)
    except FileNotFoundError:
        pass
