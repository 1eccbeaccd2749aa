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
table's files need once, and tasks decrypt one file each.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, ClassVar

import pyarrow as pa
from pyspark.sql.datasource import (
    DataSource,
    DataSourceArrowWriter,
    DataSourceReader,
    InputPartition,
    WriterCommitMessage,
)
from pyspark.sql.types import StructType

from spark_kms.errors import CommitError, IntegrityError, InvalidOptionError, SparkKmsError
from spark_kms.jobkeys import JobKeys
from spark_kms.keyring import CommitRecord, KeyringStore, resolve_location
from spark_kms.keyservice import KeyService
from spark_kms.options import TABLE_GROUP, parse_write_options
from spark_kms.parquet_crypto import (
    EncryptionPlan,
    check_readable,
    is_encrypted_file,
    leaf_paths,
    open_encrypted_dataset,
    resolve_column_paths,
    write_encrypted_file,
)
from spark_kms.settings import KmsSettings

__all__ = ["FORMAT_NAME", "KmsParquetDataSource", "data_source_class"]

log = logging.getLogger(__name__)

FORMAT_NAME = "kms_parquet"

_SERVICES: dict[tuple[tuple[str, str], ...], KeyService] = {}


def _service(properties: dict[str, str]) -> KeyService:
    # One key service, and so one HSM login, per Python worker process.
    cache_key = tuple(sorted(properties.items()))
    service = _SERVICES.get(cache_key)
    if service is None:
        service = KeyService(KmsSettings.from_properties(properties))
        _SERVICES[cache_key] = service
    return service


def data_source_class(settings: KmsSettings) -> type[KmsParquetDataSource]:
    """Return a ``kms_parquet`` data source class bound to ``settings``.

    Spark pickles the registered class by value, so the settings (paths and
    labels, never a PIN) reach the Python workers that plan reads and writes.
    """
    return type(
        "KmsParquetDataSource",
        (KmsParquetDataSource,),
        {"_properties": settings.to_properties()},
    )


class KmsParquetDataSource(DataSource):
    """Encrypted Parquet tables, keys from the HSM; see the module docstring.

    Register it with :func:`spark_kms.configure`, which binds the settings.
    """

    _properties: ClassVar[dict[str, str]] = {}

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
        return _service(self._properties)

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

        service = self._key_service()
        meta, store = service.open_table_for_write(options.table, location)
        if not overwrite and meta.spark_schema and store.list_data_files():
            _check_append_schema(meta.table, meta.spark_schema, schema)

        job_id = uuid.uuid4().hex[:16]
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
        )

    def reader(self, schema: StructType) -> KmsParquetReader:
        service = self._key_service()
        meta, store = service.open_table_for_read(self._location())
        if meta.spark_schema:
            _check_projection(meta.table, meta.spark_schema, schema)
        return KmsParquetReader(
            table=meta.table,
            location=store.location,
            schema=schema,
            properties=dict(self._properties),
        )


def _to_arrow_schema(schema: StructType) -> pa.Schema:
    from pyspark.sql.pandas.types import to_arrow_schema

    return to_arrow_schema(schema)


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
    """What one task staged: file names relative to the job's staging folder."""

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
        plan: EncryptionPlan,
        overwrite: bool,
        spark_schema: str,
        properties: dict[str, str],
    ) -> None:
        self.table = table
        self.location = location
        self.staging = staging
        self.plan = plan
        self.overwrite = overwrite
        self.spark_schema = spark_schema
        self.properties = properties

    def __repr__(self) -> str:
        return f"KmsParquetWriter(table={self.table!r}, job_id={self.plan.job_id!r})"

    def write(self, iterator: Iterator[pa.RecordBatch]) -> KmsCommitMessage:
        from pyspark import TaskContext

        context = TaskContext.get()
        partition = context.partitionId() if context is not None else 0
        name = f"part-{partition:05d}-{self.plan.job_id}-{uuid.uuid4().hex[:12]}.parquet"
        filesystem, staging = resolve_location(self.staging)
        filesystem.create_dir(staging, recursive=True)
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
        service = _service(self.properties)
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
                job_id=self.plan.job_id,
            )
            raise CommitError(
                f"job {self.plan.job_id} staged {len(plaintext)} file(s) that are not encrypted "
                f"({', '.join(plaintext[:5])}); nothing was committed to table '{self.table}'"
            )

        # 2. The table may have been erased while the tasks ran.
        meta, _ = service.open_table_for_write(self.table, self.location)

        # 3. Record the job, then move its files into place.
        previous = store.list_data_files() if self.overwrite else []
        record = CommitRecord(
            job_id=self.plan.job_id,
            committed_at=_utc_now(),
            mode="overwrite" if self.overwrite else "append",
            files=sorted(files),
            kek_ids=sorted(self.plan.keys.key_ids),
            rows=rows,
        )
        store.put_commit_record(record)
        for name in files:
            filesystem.move(f"{self.staging}/{name}", f"{self.location}/{name}")
        for old in previous:
            if old not in files:
                _delete_quietly(filesystem, f"{self.location}/{old}")
        meta.spark_schema = self.spark_schema
        store.write_metadata(meta)
        self._remove_staging(filesystem)
        service.audit.append(
            "commit",
            table=self.table,
            outcome="ok",
            job_id=self.plan.job_id,
            files=len(files),
            rows=rows,
            mode=record.mode,
        )
        log.info(
            "committed job %s to table %s: %d file(s), %d row(s)",
            self.plan.job_id,
            self.table,
            len(files),
            rows,
        )

    def abort(self, messages: list[WriterCommitMessage | None]) -> None:
        store = KeyringStore(self.location)
        self._remove_staging(store.filesystem)
        _service(self.properties).audit.append(
            "abort", table=self.table, outcome="ok", job_id=self.plan.job_id
        )
        log.warning(
            "aborted job %s on table %s; its staged files were removed",
            self.plan.job_id,
            self.table,
        )

    def _remove_staging(self, filesystem: Any) -> None:
        try:
            filesystem.delete_dir(self.staging)
        except FileNotFoundError:
            pass


class KmsFilePartition(InputPartition):
    """One file to read, with the KEKs it needs."""

    def __init__(self, path: str, keys: JobKeys) -> None:
        super().__init__(path)
        self.path = path
        self.keys = keys

    def __repr__(self) -> str:
        return f"KmsFilePartition(path={self.path!r}, keys={self.keys!r})"


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
        self, *, table: str, location: str, schema: StructType, properties: dict[str, str]
    ) -> None:
        self.table = table
        self.location = location
        self.schema = schema
        self.properties = properties
        self.job_id = uuid.uuid4().hex[:16]

    def __repr__(self) -> str:
        return f"KmsParquetReader(table={self.table!r}, job_id={self.job_id!r})"

    def partitions(self) -> Sequence[InputPartition]:
        service = _service(self.properties)
        meta, store = service.open_table_for_read(self.location)
        files = store.list_data_files()
        if not files:
            return [KmsFilePartition("", JobKeys({}))]

        # Each file needs the KEKs of the job that wrote it; a file no commit
        # record names (written by another path) may need any KEK of the table.
        by_file: dict[str, list[str]] = {}
        for record in store.list_commit_records():
            for name in record.files:
                by_file[name] = record.kek_ids
        needed = {kek for name in files for kek in by_file.get(name, [])}
        unknown = [name for name in files if name not in by_file]
        if unknown:
            needed.update(store.list_kek_ids())
        keys = service.unwrap_keks(meta, store, needed, job_id=self.job_id)
        log.info(
            "read job %s on table %s: %d file(s), %d KEK(s)",
            self.job_id,
            self.table,
            len(files),
            len(keys),
        )
        partitions: list[InputPartition] = []
        for name in files:
            wanted = by_file.get(name)
            partitions.append(
                KmsFilePartition(
                    f"{store.location}/{name}", keys if wanted is None else keys.subset(wanted)
                )
            )
        return partitions

    def read(self, partition: InputPartition) -> Iterator[pa.RecordBatch]:
        assert isinstance(partition, KmsFilePartition)
        if not partition.path:
            return
        filesystem, path = resolve_location(partition.path)
        columns = [f.name for f in self.schema.fields]
        # Opening the dataset already decrypts the footer, so it belongs inside
        # the try: every failure must name the file.
        try:
            # pyarrow reads a plaintext file even when given decryption
            # properties, so a file planted in the table must be refused here.
            if not is_encrypted_file(filesystem, path):
                raise IntegrityError(
                    "the file is not in encrypted footer mode (magic PARE), but a table "
                    "written by spark_kms holds only encrypted files; remove it or run "
                    "'spark-kms verify'"
                )
            dataset = open_encrypted_dataset(
                [path], keys=partition.keys, filesystem=filesystem, job_id=self.job_id
            )
            nullable = {f.name: f.nullable for f in self.schema.fields}
            for batch in dataset.to_batches(columns=columns, batch_size=65536):
                yield _with_nullability(batch, nullable)
        except (SparkKmsError, OSError, pa.ArrowException) as error:
            raise check_readable(error, partition.path) from None


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
