"""The ``kms_parquet`` Spark Python Data Source.

Spark runs the planning methods (``schema``, ``reader``, ``writer``,
``commit``, ``abort``) in Python workers on the driver host and ``read`` and
``write`` in Python workers on executors. Only the planning methods use the
key service and so the HSM; executors get the job's KEKs inside the pickled
writer or partition.

Write: the driver mints one KEK per key group and persists the wrapped
records, tasks write encrypted files into ``_spark_kms_staging/<job id>/``,
and the driver commits all or nothing after checking that every staged file
begins and ends with ``PARE``. Read: the driver unwraps each KEK that the
table's files need once and groups the files into tasks (see
:mod:`spark_kms.splits`). Each task checks in the keyring that the table was
not erased since planning, then decrypts its files one after the other.

A table partitioned with ``kms.partition_by`` is written in Hive-style folders,
one master key per partition value (see :mod:`spark_kms.partitioning`). The
tasks derive the KEKs of the partitions they meet from a job seed, and the
commit wraps them under the partitions' master keys before any file becomes
visible. A read skips the files of erased partitions with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.fs as pafs
from pyspark.sql.datasource import (
    DataSource,
    DataSourceArrowWriter,
    DataSourceReader,
    InputPartition,
    WriterCommitMessage,
)
from pyspark.sql.types import StructType

from spark_kms.erasure import display_time
from spark_kms.errors import (
    CommitError,
    IntegrityError,
    InvalidOptionError,
    SparkKmsError,
    TableErasedError,
    TablePendingDeletionError,
    TableStateError,
)
from spark_kms.jobkeys import JobKeys
from spark_kms.keyring import (
    ERASED,
    PENDING_DELETION,
    CommitRecord,
    KeyringStore,
    TableMetadata,
    resolve_location,
)
from spark_kms.keyservice import KeyService
from spark_kms.options import (
    TABLE_GROUP,
    WriteOptions,
    append_column_keys,
    parse_write_options,
)
from spark_kms.parquet_crypto import (
    EncryptionPlan,
    check_readable,
    is_encrypted_file,
    leaf_paths,
    open_encrypted_dataset,
    resolve_column_paths,
    write_encrypted_file,
)
from spark_kms.partitioning import (
    HIVE_NULL,
    SEED_BYTES,
    PartitionedWrite,
    PartitionSeed,
    check_partition_type,
    parse_value,
    partition_kek_ids,
    partition_of,
    unescape_path_name,
)
from spark_kms.settings import KmsSettings
from spark_kms.splits import ReadSplitSettings, group_files
from spark_kms.staging import clean_stale_staging

__all__ = ["FORMAT_NAME", "KmsParquetDataSource", "data_source_class"]

log = logging.getLogger(__name__)

FORMAT_NAME = "kms_parquet"

_SERVICES: dict[tuple[tuple[str, str], ...], KeyService] = {}


def _service(properties: dict[str, str], context: dict[str, str] | None = None) -> KeyService:
    # One key service, and so one HSM login, per Python worker process and
    # Spark user. ``context`` contains the Spark user and application id.
    context = context or {}
    cache_key = tuple(sorted(properties.items())) + tuple(sorted(context.items()))
    service = _SERVICES.get(cache_key)
    if service is None:
        service = KeyService(
            KmsSettings.from_properties(properties),
            principal=context.get("principal"),
            application_id=context.get("application_id"),
        )
        _SERVICES[cache_key] = service
    return service


def data_source_class(
    settings: KmsSettings,
    *,
    principal: str | None = None,
    application_id: str | None = None,
    read_splits: ReadSplitSettings | None = None,
) -> type[KmsParquetDataSource]:
    """Return a ``kms_parquet`` data source class bound to ``settings``.

    Spark pickles the registered class by value, so the settings (paths and
    labels, never a PIN) reach the Python workers that plan reads and writes.
    Those workers do not see the Spark user, so ``principal`` (the Spark user,
    for the access policy and the audit log) and ``application_id`` travel
    with the class too, and so do the session's file scan settings
    (``read_splits``), which size the read tasks.
    """
    context = {"principal": principal, "application_id": application_id}
    return type(
        "KmsParquetDataSource",
        (KmsParquetDataSource,),
        {
            "_properties": settings.to_properties(),
            "_context": {k: v for k, v in context.items() if v},
            "_read_splits": (read_splits or ReadSplitSettings()).to_properties(),
        },
    )


class KmsParquetDataSource(DataSource):
    """Encrypted Parquet tables, keys from the HSM; see the module docstring.

    Register it with :func:`spark_kms.configure`, which binds the settings.
    """

    _properties: ClassVar[dict[str, str]] = {}
    _context: ClassVar[dict[str, str]] = {}
    _read_splits: ClassVar[dict[str, int]] = {}

    @classmethod
    def name(cls) -> str:
        return FORMAT_NAME

    def _location(self) -> str:
        location = self.options.get("path")
        if not location:
            raise InvalidOptionError(
                "kms_parquet needs a table location: pass it to save(path) or load(path)"
            )
        return str(location)

    def _key_service(self) -> KeyService:
        if not self._properties:
            raise SparkKmsError(
                "the kms_parquet data source is not bound to settings; register it with "
                "spark_kms.configure(spark)"
            )
        return _service(self._properties, self._context)

    def schema(self) -> StructType:
        service = self._key_service()
        meta, _store = service.open_table_for_read(self._location())
        if not meta.spark_schema:
            raise SparkKmsError(
                f"table '{meta.table}' has no stored schema yet because no write has "
                "committed; write to it first"
            )
        return _parse_stored_schema(meta.table, meta.spark_schema)

    def writer(self, schema: StructType, overwrite: bool) -> KmsParquetWriter:
        started = time.monotonic()
        options = parse_write_options(self.options)
        location = self._location()
        arrow_schema = _to_arrow_schema(schema)

        # Check the options against the schema before anything is created.
        grouped_columns = {
            group: resolve_column_paths(arrow_schema, columns)
            for group, columns in options.column_keys.items()
        }
        if options.partition_by:
            _check_partition_column(arrow_schema, options.partition_by, options.column_keys)

        _check_not_delta(location)
        service = self._key_service()
        meta, store = service.open_table_for_write(
            options.table,
            location,
            partition_by=options.partition_by,
            rotation_period_days=options.rotation_period_days,
        )
        _clean_stale_staging(store)
        if not overwrite and store.list_data_files():
            if meta.spark_schema:
                _check_append_schema(meta.table, meta.spark_schema, schema)
            options = _append_column_keys(meta.table, options, store)
            grouped_columns = {
                group: resolve_column_paths(arrow_schema, columns)
                for group, columns in options.column_keys.items()
            }

        job_id = uuid.uuid4().hex[:16]
        if meta.partition_by:
            return self._partitioned_writer(
                service, options, meta.partition_by, store, schema, overwrite, job_id
            )
        write_keys = service.mint_keks(meta, store, [TABLE_GROUP, *grouped_columns], job_id=job_id)
        footer_kek_id = write_keys.kek_ids[TABLE_GROUP]
        column_keys: dict[str, list[str]] = {}
        if grouped_columns:
            covered: set[str] = set()
            for group, by_column in grouped_columns.items():
                paths = [p for leaves in by_column.values() for p in leaves]
                column_keys[write_keys.kek_ids[group]] = paths
                covered.update(paths)
            rest = [p for p in leaf_paths(arrow_schema) if p not in covered]
            if rest:
                column_keys[footer_kek_id] = rest
        plan = EncryptionPlan(
            job_id=job_id,
            footer_kek_id=footer_kek_id,
            column_keys=column_keys,
            keys=write_keys.keys,
        )
        log.info(
            "write job %s on table %s: %d KEK(s) minted in %.3f s",
            job_id,
            meta.table,
            len(write_keys.kek_ids),
            time.monotonic() - started,
        )
        return KmsParquetWriter(
            table=meta.table,
            location=store.location,
            staging=f"{store.staging_root}/{job_id}",
            plan=plan,
            overwrite=overwrite,
            spark_schema=schema.json(),
            properties=dict(self._properties),
            column_keys=options.column_keys,
            context=dict(self._context),
        )

    def _partitioned_writer(
        self,
        service: KeyService,
        options: WriteOptions,
        column: str,
        store: KeyringStore,
        schema: StructType,
        overwrite: bool,
        job_id: str,
    ) -> KmsParquetWriter:
        # No KEK is minted here: the tasks derive each partition's KEKs from
        # the job seed, and the commit wraps them (see spark_kms.partitioning).
        arrow_schema = _to_arrow_schema(schema)
        _check_partition_column(arrow_schema, column, options.column_keys)
        file_schema = arrow_schema.remove(arrow_schema.get_field_index(column))
        grouped_paths = {
            group: [p for leaves in by_column.values() for p in leaves]
            for group, by_column in (
                (group, resolve_column_paths(file_schema, columns))
                for group, columns in options.column_keys.items()
            )
        }
        partitioned = PartitionedWrite(
            table=options.table,
            job_id=job_id,
            column=column,
            seed=PartitionSeed(os.urandom(SEED_BYTES)),
            table_group=TABLE_GROUP,
            groups=[TABLE_GROUP, *grouped_paths],
            grouped_paths=grouped_paths,
            leaves=leaf_paths(file_schema),
            erased=frozenset(service.erased_partitions(store.location)),
        )
        log.info("write job %s on table %s: partitioned by %s", job_id, options.table, column)
        return KmsParquetWriter(
            table=options.table,
            location=store.location,
            staging=f"{store.staging_root}/{job_id}",
            plan=None,
            overwrite=overwrite,
            spark_schema=schema.json(),
            properties=dict(self._properties),
            partitioned=partitioned,
            column_keys=options.column_keys,
            context=dict(self._context),
        )

    def reader(self, schema: StructType) -> KmsParquetReader:
        service = self._key_service()
        # The decrypt permission is checked when the reader plans its partitions.
        meta, store = service.open_table_for_read(self._location(), operation=None)
        if meta.spark_schema:
            _check_projection(meta.table, meta.spark_schema, schema)
        return KmsParquetReader(
            table=meta.table,
            location=store.location,
            schema=schema,
            properties=dict(self._properties),
            partition_by=meta.partition_by,
            context=dict(self._context),
            read_splits=ReadSplitSettings.from_properties(self._read_splits),
        )


def _check_partition_column(
    schema: pa.Schema, column: str, column_keys: dict[str, list[str]]
) -> None:
    if column not in schema.names:
        raise InvalidOptionError(
            f"kms.partition_by column '{column}' is not in the DataFrame; its columns are "
            + ", ".join(schema.names)
        )
    check_partition_type(column, schema.field(column).type)
    for group, columns in column_keys.items():
        if column in columns:
            raise InvalidOptionError(
                f"partition column '{column}' is listed under key group '{group}' in "
                "kms.column_keys, but its values are stored in folder names, not in the files; "
                "remove it from kms.column_keys"
            )
    if len(schema.names) == 1:
        raise InvalidOptionError(
            f"cannot partition by '{column}', the only column: the files would hold no column"
        )


def _clean_stale_staging(store: KeyringStore) -> None:
    # Staged files of a job whose driver died are removed by the next write;
    # a failure to clean them must not fail this write.
    try:
        clean_stale_staging(store)
    except (OSError, SparkKmsError) as error:
        log.warning("could not clean stale staging folders of %s: %s", store.location, error)


def _check_not_delta(location: str) -> None:
    filesystem, path = resolve_location(location)
    if filesystem.get_file_info(f"{path}/_delta_log").type == pafs.FileType.Directory:
        raise InvalidOptionError(
            f"{path} contains a Delta table; write it with spark_kms.write_delta, because a "
            "kms_parquet write would replace files that Delta's log still names"
        )


def _append_column_keys(table: str, options: WriteOptions, store: KeyringStore) -> WriteOptions:
    column_keys = append_column_keys(
        table,
        store.last_column_keys(),
        options.column_keys,
        option="kms.column_keys",
        overwrite="mode('overwrite')",
    )
    return replace(options, column_keys=column_keys)


def _to_arrow_schema(schema: StructType) -> pa.Schema:
    from pyspark.sql.pandas.types import to_arrow_schema

    return to_arrow_schema(schema, timezone="UTC")


def _parse_stored_schema(table: str, stored_json: str) -> StructType:
    # table.json is stored text that anyone with write access to the table may change.
    try:
        return StructType.fromJson(json.loads(stored_json))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise IntegrityError(
            f"the schema stored in the keyring of table '{table}' is not a valid Spark schema; "
            "restore _spark_kms/table.json from backup"
        ) from None


def _check_append_schema(table: str, stored_json: str, schema: StructType) -> None:
    stored = _parse_stored_schema(table, stored_json)
    if [(f.name, f.dataType) for f in stored.fields] != [
        (f.name, f.dataType) for f in schema.fields
    ]:
        raise InvalidOptionError(
            f"cannot append to table '{table}': the DataFrame schema {schema.simpleString()} "
            f"differs from the table schema {stored.simpleString()}; use mode('overwrite') "
            "to replace the table"
        )


def _check_projection(table: str, stored_json: str, schema: StructType) -> None:
    stored = {f.name: f.dataType for f in _parse_stored_schema(table, stored_json).fields}
    for requested in schema.fields:
        if stored.get(requested.name) != requested.dataType:
            raise InvalidOptionError(
                f"column '{requested.name}' of type {requested.dataType.simpleString()} is not in "
                f"table '{table}'; its columns are "
                + ", ".join(f"{n} {t.simpleString()}" for n, t in stored.items())
            )


@dataclass
class KmsCommitMessage(WriterCommitMessage):
    """Files one task staged, named relative to the job's staging folder."""

    files: list[str] = field(default_factory=list)
    rows: int = 0


class KmsParquetWriter(DataSourceArrowWriter):
    """Writer of one job; pickled to the tasks with the job's KEKs."""

    def __init__(
        self,
        *,
        table: str,
        location: str,
        staging: str,
        plan: EncryptionPlan | None,
        overwrite: bool,
        spark_schema: str,
        properties: dict[str, str],
        partitioned: PartitionedWrite | None = None,
        column_keys: dict[str, list[str]] | None = None,
        context: dict[str, str] | None = None,
    ) -> None:
        if (plan is None) == (partitioned is None):
            raise ValueError("a writer takes either an encryption plan or a partitioned write")
        self.table = table
        self.location = location
        self.staging = staging
        self.plan = plan
        self.partitioned = partitioned
        self.overwrite = overwrite
        self.spark_schema = spark_schema
        self.properties = properties
        self.column_keys = column_keys or {}
        self.context = context or {}

    def __repr__(self) -> str:
        return f"KmsParquetWriter(table={self.table!r}, job_id={self.job_id!r})"

    @property
    def job_id(self) -> str:
        """The write job's id."""
        if self.plan is not None:
            return self.plan.job_id
        assert self.partitioned is not None
        return self.partitioned.job_id

    def write(self, iterator: Iterator[pa.RecordBatch]) -> KmsCommitMessage:
        from pyspark import TaskContext

        context = TaskContext.get()
        partition = context.partitionId() if context is not None else 0
        filesystem, staging = resolve_location(self.staging)
        filesystem.create_dir(staging, recursive=True)
        if self.partitioned is not None:
            result = self.partitioned.write(iterator, staging, filesystem, partition)
            return KmsCommitMessage(files=result.files, rows=result.rows)
        assert self.plan is not None
        name = f"part-{partition:05d}-{self.plan.job_id}-{uuid.uuid4().hex[:12]}.parquet"
        path = f"{staging}/{name}"
        try:
            rows, written_schema = write_encrypted_file(
                iterator, path, plan=self.plan, filesystem=filesystem
            )
        except BaseException:
            _delete_quietly(filesystem, path)
            raise
        if written_schema is None:
            return KmsCommitMessage(files=[], rows=0)
        return KmsCommitMessage(files=[name], rows=rows)

    def commit(self, messages: list[WriterCommitMessage | None]) -> None:
        service = _service(self.properties, self.context)
        store = KeyringStore(self.location)
        filesystem = store.filesystem
        files = [f for m in messages if isinstance(m, KmsCommitMessage) for f in m.files]
        rows = sum(m.rows for m in messages if isinstance(m, KmsCommitMessage))

        # 1. Fail closed: every staged file must be in encrypted-footer mode.
        plaintext = [f for f in files if not is_encrypted_file(filesystem, f"{self.staging}/{f}")]
        if plaintext:
            self._remove_staging(filesystem)
            service.audit.append(
                "commit",
                table=self.table,
                outcome="failed: plaintext file",
                job_id=self.job_id,
            )
            raise CommitError(
                f"job {self.job_id} staged {len(plaintext)} file(s) that are not encrypted "
                f"({', '.join(plaintext[:5])}); nothing was committed to table '{self.table}'"
            )

        # 2. Under the table lock, so that no rotation, erasure or rekey
        #    interleaves. The table may have been erased or scheduled for
        #    deletion while the tasks ran. A partitioned job wraps its KEKs now.
        with service.table_lock(self.table):
            try:
                meta, _ = service.check_writable(self.table, self.location)
                kek_ids = self._persist_keks(service, meta, store, files)
            except SparkKmsError as error:
                self._remove_staging(filesystem)
                service.audit.append(
                    "commit",
                    table=self.table,
                    outcome=f"failed: {type(error).__name__}",
                    job_id=self.job_id,
                )
                raise

            # 3. Record the job, then move its files into place.
            previous = store.list_data_files() if self.overwrite else []
            replaced = [old for old in previous if old not in files]
            record = CommitRecord(
                job_id=self.job_id,
                committed_at=_utc_now(),
                mode="overwrite" if self.overwrite else "append",
                files=sorted(files),
                kek_ids=kek_ids,
                rows=rows,
                column_keys=self.column_keys,
                replaced=replaced,
            )
            store.put_commit_record(record)
            for name in files:
                if "/" in name:
                    filesystem.create_dir(f"{self.location}/{name.rsplit('/', 1)[0]}")
                filesystem.move(f"{self.staging}/{name}", f"{self.location}/{name}")
            for old in replaced:
                try:
                    _delete_quietly(filesystem, f"{self.location}/{old}")
                except OSError as error:
                    # The commit record lists the file as replaced, so reads skip it.
                    log.warning(
                        "job %s replaced %s of table %s but could not delete it: %s",
                        self.job_id,
                        old,
                        self.table,
                        error,
                    )

            def set_schema(current: TableMetadata) -> None:
                current.spark_schema = self.spark_schema

            service.update_metadata(store, meta.table_id, set_schema)
        self._remove_staging(filesystem)
        service.audit.append(
            "commit",
            table=self.table,
            outcome="ok",
            job_id=self.job_id,
            files=len(files),
            rows=rows,
            mode=record.mode,
        )
        log.info(
            "committed job %s to table %s: %d file(s), %d row(s)",
            self.job_id,
            self.table,
            len(files),
            rows,
        )

    def _persist_keks(
        self, service: KeyService, meta: TableMetadata, store: KeyringStore, files: list[str]
    ) -> list[str]:
        # Returns the KEK ids of the job. A partitioned job wraps the KEKs of
        # the partitions its files are in, each under its partition's master key.
        if self.partitioned is None:
            assert self.plan is not None
            return sorted(self.plan.keys.key_ids)
        folders = sorted({folder for name in files if (folder := partition_of(name))})
        keks = {folder: self.partitioned.keys_for(folder) for folder in folders}
        service.persist_partition_keks(meta, store, job_id=self.job_id, keks=keks)
        return sorted(kek_id for by_group in keks.values() for kek_id, _kek in by_group.values())

    def abort(self, messages: list[WriterCommitMessage | None]) -> None:
        store = KeyringStore(self.location)
        self._remove_staging(store.filesystem)
        _service(self.properties, self.context).audit.append(
            "abort", table=self.table, outcome="ok", job_id=self.job_id
        )
        log.warning(
            "aborted job %s on table %s; its staged files were removed",
            self.job_id,
            self.table,
        )

    def _remove_staging(self, filesystem: Any) -> None:
        try:
            filesystem.delete_dir(self.staging)
        except FileNotFoundError:
            pass


class KmsFile:
    """One file to read, with the KEKs it needs and, in a partitioned table,
    the folder text of its partition value (``None`` for null)."""

    def __init__(
        self, path: str, keys: JobKeys, partition_value: tuple[str | None] | None = None
    ) -> None:
        self.path = path
        self.keys = keys
        self.partition_value = partition_value

    def __repr__(self) -> str:
        return f"KmsFile(path={self.path!r}, keys={self.keys!r})"


class KmsFilePartition(InputPartition):
    """Files that one Spark task reads, one after the other."""

    def __init__(self, files: list[KmsFile]) -> None:
        super().__init__([file.path for file in files])
        self.files = files

    def __repr__(self) -> str:
        return f"KmsFilePartition(files={self.files!r})"


class KmsParquetReader(DataSourceReader):
    """Reader of one query; unwraps the KEKs in ``partitions`` on the driver.

    Reads the columns of ``schema``: a schema given with ``.schema(...)`` that
    names a subset of the table's columns reads only those columns.

    NOTE: no ``pushFilters``. PySpark 4.2.0 and 4.3.0 keep the read plan of the
    last filtered query on the DataFrame's relation and reuse it for a later
    query on the same DataFrame without filters, which would then return only
    the rows of the old filter. Spark evaluates every filter after the scan
    instead; the native Parquet reader through the JVM bridge does push filters.
    """

    def __init__(
        self,
        *,
        table: str,
        location: str,
        schema: StructType,
        properties: dict[str, str],
        partition_by: str | None = None,
        context: dict[str, str] | None = None,
        read_splits: ReadSplitSettings | None = None,
    ) -> None:
        self.table = table
        self.location = location
        self.schema = schema
        self.properties = properties
        self.partition_by = partition_by
        self.context = context or {}
        self.read_splits = read_splits or ReadSplitSettings()
        self.job_id = uuid.uuid4().hex[:16]

    def __repr__(self) -> str:
        return f"KmsParquetReader(table={self.table!r}, job_id={self.job_id!r})"

    def partitions(self) -> Sequence[InputPartition]:
        service = _service(self.properties, self.context)
        meta, store = service.open_table_for_read(self.location)
        records = store.list_commit_records()
        # A file that an overwrite replaced is no longer part of the table,
        # even when deleting it failed.
        replaced = {name for record in records for name in record.replaced}
        sizes = {
            name: size for name, size in store.data_file_sizes().items() if name not in replaced
        }
        files = self._skip_erased_partitions(service, sorted(sizes))
        if not files:
            return [KmsFilePartition([])]

        # Each file needs the KEKs of the job that wrote it. A file that no
        # commit record names (written by another path) may need any KEK of the table.
        by_file: dict[str, list[str]] = {}
        for record in records:
            for name in record.files:
                by_file[name] = self._partition_keks(name, record.kek_ids)
        unknown = [name for name in files if name not in by_file]
        if unknown:
            every = store.list_kek_ids()
            for name in unknown:
                by_file[name] = self._partition_keks(name, every)
        needed = {kek for name in files for kek in by_file[name]}
        keys = service.unwrap_keks(meta, store, needed, job_id=self.job_id)
        groups = group_files({name: sizes[name] for name in files}, self.read_splits)
        log.info(
            "read job %s on table %s: %d file(s) in %d task(s), %d KEK(s)",
            self.job_id,
            self.table,
            len(files),
            len(groups),
            len(keys),
        )
        # Each file keeps only the KEKs of its own job and partition, so a
        # file moved into another partition's folder fails instead of being
        # read with that folder's partition value.
        return [
            KmsFilePartition(
                [
                    KmsFile(
                        f"{store.location}/{name}",
                        keys.subset(by_file[name]),
                        self._partition_value(name),
                    )
                    for name in group
                ]
            )
            for group in groups
        ]

    def _skip_erased_partitions(self, service: KeyService, files: list[str]) -> list[str]:
        if not self.partition_by:
            return files
        erased = set(service.erased_partitions(self.location))
        skipped = sorted({folder for name in files if (folder := partition_of(name)) in erased})
        if skipped:
            # Python's last-resort handler prints this warning on the worker's
            # stderr, which Spark copies to the driver's console.
            log.warning(
                "read of table %s skips the erased partition(s) %s: their master keys are "
                "destroyed, so the result holds the other partitions only",
                self.table,
                ", ".join(skipped),
            )
        return [name for name in files if partition_of(name) not in erased]

    def _partition_keks(self, name: str, kek_ids: list[str]) -> list[str]:
        # The KEKs of an erased partition cannot be unwrapped, so each file
        # gets only those of its own partition.
        return partition_kek_ids(partition_of(name) if self.partition_by else None, kek_ids)

    def _partition_value(self, name: str) -> tuple[str | None] | None:
        if not self.partition_by:
            return None
        folder = partition_of(name)
        if folder is None or "=" not in folder:
            raise IntegrityError(
                f"file {name} of table '{self.table}' is not in a {self.partition_by}=<value> "
                "folder, but the table is partitioned; remove it or run 'spark-kms verify'"
            )
        text = unescape_path_name(folder.split("=", 1)[1])
        return (None if text == HIVE_NULL else text,)

    def read(self, partition: InputPartition) -> Iterator[pa.RecordBatch]:
        assert isinstance(partition, KmsFilePartition)
        if not partition.files:
            return
        erased = self._check_still_readable()
        # The paths are already resolved: resolving them again as URIs would
        # decode the %XX escapes of Hive-style partition folders.
        filesystem, _location = resolve_location(self.location)
        columns = [f.name for f in self.schema.fields if f.name != self.partition_by]
        nullable = {f.name: f.nullable for f in self.schema.fields}
        for file in partition.files:
            folder = partition_of(file.path[len(self.location) + 1 :])
            if folder in erased:
                log.warning(
                    "read job %s on table %s skips %s: its partition %s was erased",
                    self.job_id,
                    self.table,
                    file.path,
                    folder,
                )
                continue
            yield from self._read_file(file, filesystem, columns, nullable)

    def _check_still_readable(self) -> set[str]:
        """Raise if the table was erased or scheduled for deletion since planning.

        Spark keeps the planned partitions, with their KEKs, on a DataFrame and
        runs them again for its next action, so each task reads the table's
        state from its keyring first. Returns the folders of erased partitions,
        whose files the task skips as a new read would.

        NOTE: the KEKs stay in the DataFrame's plan, in memory, until the
        DataFrame is gone. Erasure cannot reach that copy; this check only
        stops spark_kms's own tasks from using it.
        """
        store = KeyringStore(self.location)
        meta = store.read_metadata()
        if meta is None or meta.state == ERASED:
            raise TableErasedError(self.table, "erased after this DataFrame was planned")
        if meta.state == PENDING_DELETION:
            raise TablePendingDeletionError(self.table, display_time(meta.deletion_due_at or ""))
        if not self.partition_by:
            return set()
        return {r.folder for r in store.list_partition_records() if r.state == ERASED}

    def _read_file(
        self, file: KmsFile, filesystem: Any, columns: list[str], nullable: dict[str, bool]
    ) -> Iterator[pa.RecordBatch]:
        # Opening the dataset already decrypts the footer, so it belongs inside
        # the try: every failure must name the file.
        try:
            # pyarrow reads a plaintext file even when given decryption
            # properties, so a file planted in the table must be refused here.
            if not is_encrypted_file(filesystem, file.path):
                raise IntegrityError(
                    "the file is not in encrypted footer mode (magic PARE), but a table "
                    "written by spark_kms holds only encrypted files; remove it or run "
                    "'spark-kms verify'"
                )
            dataset = open_encrypted_dataset(
                [file.path], keys=file.keys, filesystem=filesystem, job_id=self.job_id
            )
            partition_field = self._partition_field(file)
            for batch in dataset.to_batches(columns=columns, batch_size=65536):
                if partition_field is not None:
                    batch = self._with_partition_column(batch, *partition_field)
                yield _with_nullability(_timestamps_in_utc(batch), nullable)
        except FileNotFoundError:
            # Spark reruns the files it planned for a DataFrame's first action.
            raise TableStateError(
                f"file {file.path} of table '{self.table}' no longer exists: an overwrite "
                "or a rekey replaced it after this DataFrame was planned; read the table again"
            ) from None
        except (SparkKmsError, OSError, pa.ArrowException) as error:
            raise check_readable(error, file.path) from None

    def _partition_field(self, file: KmsFile) -> tuple[pa.Field, Any] | None:
        # The requested partition column and its value in this file's folder.
        requested = [f for f in self.schema.fields if f.name == self.partition_by]
        if file.partition_value is None or not requested:
            return None
        field = _to_arrow_schema(StructType(requested)).field(0)
        return field, parse_value(file.partition_value[0], field.type)

    def _with_partition_column(
        self, batch: pa.RecordBatch, field: pa.Field, value: Any
    ) -> pa.RecordBatch:
        # Hive-style files do not hold the partition column: it is rebuilt from
        # the folder name, in the position the requested schema gives it.
        column = pa.repeat(pa.scalar(value, field.type), batch.num_rows)
        arrays = []
        fields = []
        for requested in self.schema.fields:
            if requested.name == field.name:
                arrays.append(column)
                fields.append(field)
            else:
                arrays.append(batch.column(requested.name))
                fields.append(batch.schema.field(requested.name))
        return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))


def _timestamps_in_utc(batch: pa.RecordBatch) -> pa.RecordBatch:
    # A file keeps the session time zone of the job that wrote it, but Spark
    # expects the timestamps a read returns in UTC. The cast keeps the instants.
    # NOTE: a timestamp inside a struct, list or map keeps the writer's zone, so
    # Spark rejects it when that zone is not UTC.
    fields = list(batch.schema)
    zoned = [
        i
        for i, f in enumerate(fields)
        if pa.types.is_timestamp(f.type) and f.type.tz not in (None, "UTC")
    ]
    if not zoned:
        return batch
    columns = list(batch.columns)
    for i in zoned:
        fields[i] = fields[i].with_type(pa.timestamp(fields[i].type.unit, tz="UTC"))
        columns[i] = columns[i].cast(fields[i].type)
    return pa.RecordBatch.from_arrays(columns, schema=pa.schema(fields))


def _with_nullability(batch: pa.RecordBatch, nullable: dict[str, bool]) -> pa.RecordBatch:
    # Spark checks the nullability of returned batches against the requested
    # schema, which may differ from the written one (a schema given to the reader).
    schema = pa.schema([f.with_nullable(nullable.get(f.name, f.nullable)) for f in batch.schema])
    if schema.equals(batch.schema):
        return batch
    return pa.RecordBatch.from_arrays(batch.columns, schema=schema)


def _delete_quietly(filesystem: Any, path: str) -> None:
    try:
        filesystem.delete_file(path)
    except FileNotFoundError:
        pass


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
