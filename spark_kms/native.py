"""Spark's own Parquet writer and reader, and Delta Lake, encrypted with spark_kms keys.

Each function here first opens the table in the key service on the driver,
which checks the policy and the table's state. It then mints the job's KEKs or
unwraps the ones the table's files need (one HSM call per KEK), loads them into
the Spark session for the JVM bridge (:mod:`spark_kms.bridge`), and runs
Spark's own writer or reader. The files are the same as those of ``kms_parquet``: Parquet
Modular Encryption with the footer and every column encrypted, DEKs wrapped by
the job's KEKs in parquet-mr's local-wrap format, the KEKs wrapped by the
table's master key in the HSM. Either path reads the other's files.

Spark reads lazily, so :func:`read_parquet` and :func:`read_delta` leave the
table's KEKs loaded in the session until :func:`release_keys`, or until the
table is erased with :func:`spark_kms.erase_table`.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from spark_kms import bridge, delta_lake
from spark_kms.errors import (
    ConfigurationError,
    IntegrityError,
    InvalidOptionError,
    SparkKmsError,
    TableNotFoundError,
)
from spark_kms.jobkeys import JobKeys
from spark_kms.keyring import STAGING_DIR, CommitRecord, KeyringStore, TableMetadata
from spark_kms.keyservice import KeyService, WriteKeys
from spark_kms.options import TABLE_GROUP, append_column_keys, parse_column_keys
from spark_kms.parquet_crypto import is_encrypted_file
from spark_kms.spark import _service_of, typed_errors
from spark_kms.staging import STALE_AFTER_SECONDS, clean_stale_staging

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import StructType

__all__ = [
    "TableKeys",
    "read_delta",
    "read_parquet",
    "release_keys",
    "table_keys",
    "write_delta",
    "write_parquet",
]

log = logging.getLogger(__name__)

_MODES = ("append", "overwrite")


@dataclass(frozen=True)
class TableKeys:
    """Ids of the KEKs a :func:`table_keys` block loaded into the Spark session.

    :param write_kek_ids: key group to the id of the KEK minted for the
        block's writes; empty in a block opened without ``table``.
    """

    table: str
    location: str
    read_kek_ids: list[str]
    write_kek_ids: dict[str, str] = field(default_factory=dict)


# Checks ------------------------------------------------------------------------


def _require_bridge(spark: SparkSession) -> KeyService:
    service = _service_of(spark)
    if not bridge.is_enabled(spark):
        raise ConfigurationError(
            "the spark_kms JVM bridge is not enabled in this Spark session; launch the session "
            "with the properties of spark_kms.session_config(), then call spark_kms.configure(spark)"
        )
    return service


def _require_delta_log_store(spark: SparkSession) -> None:
    if not bridge.delta_log_store_enabled(spark):
        raise ConfigurationError(
            f"spark.delta.logStore.class is not {bridge.LOG_STORE_CLASS}, so Delta Lake would "
            "write the predicates of DELETE, UPDATE and MERGE into _delta_log in plaintext; "
            "launch the session with the properties of spark_kms.session_config()"
        )


def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        raise InvalidOptionError(f"invalid mode {mode!r}: use 'append' or 'overwrite'")


def _check_master_keys(meta: TableMetadata) -> None:
    if getattr(meta, "partition_by", None):
        raise InvalidOptionError(
            f"table '{meta.table}' has a master key per value of column '{meta.partition_by}', "
            "which only format('kms_parquet') writes and reads"
        )


def _parse_groups(column_keys: str | None) -> dict[str, list[str]]:
    groups = parse_column_keys(column_keys or "")
    if delta_lake.DELTA_LOG_GROUP in groups:
        raise InvalidOptionError(
            f"key group name '{delta_lake.DELTA_LOG_GROUP}' is reserved for Delta's checkpoints; "
            "choose another name in kms column keys"
        )
    return groups


def _check_partition_columns(
    groups: Mapping[str, Sequence[str]], partition_by: Sequence[str]
) -> None:
    # Partition values are folder names and _delta_log entries, in plaintext.
    under_keys = {column for columns in groups.values() for column in columns}
    clash = sorted(set(partition_by) & under_keys)
    if clash:
        raise InvalidOptionError(
            f"column(s) {', '.join(clash)} are under a column key, so they cannot be partition "
            "columns: partition values are stored in plaintext in folder names and _delta_log"
        )


def _reject_plaintext_delta(path: str) -> None:
    store = KeyringStore(path)
    if delta_lake.is_delta_location(store) and not store.exists():
        raise InvalidOptionError(
            f"{store.location} contains a Delta table that spark_kms did not create, so its files "
            "and the statistics in its _delta_log are plaintext; write to a new location"
        )


# Keys in the session -------------------------------------------------------------


def _table_kek_ids(spark: SparkSession, table: str) -> list[str]:
    # Key ids are "<table>.<group>.k<job id>"; table names contain no '.'.
    return [k for k in bridge.loaded_kek_ids(spark) if k.startswith(f"{table}.")]


def _unwrap_missing(
    spark: SparkSession,
    service: KeyService,
    meta: TableMetadata,
    store: KeyringStore,
    kek_ids: Iterable[str],
    job_id: str,
) -> JobKeys:
    """Unwrap the KEKs in ``kek_ids`` that are not loaded in ``spark`` yet."""
    missing = sorted(set(kek_ids) - set(bridge.loaded_kek_ids(spark)))
    if not missing:
        return JobKeys({})
    return service.unwrap_keks(meta, store, missing, job_id=job_id)


@contextmanager
def _block_keys(spark: SparkSession, table: str) -> Iterator[None]:
    """Unload on exit the KEKs loaded inside the block, unless the table was loaded before.

    A table loaded before (by a read) keeps the KEKs of the block's writes, so
    that its DataFrames can read the new files too.
    """
    before = set(bridge.loaded_kek_ids(spark))
    table_was_loaded = any(k.startswith(f"{table}.") for k in before)
    try:
        yield
    finally:
        if not table_was_loaded:
            bridge.unload_keys(spark, set(bridge.loaded_kek_ids(spark)) - before)


@contextmanager
def _writing(
    spark: SparkSession,
    service: KeyService,
    meta: TableMetadata,
    store: KeyringStore,
    *,
    schema: StructType,
    groups: Mapping[str, Sequence[str]],
    delta_log_kek_id: str | None,
    job_id: str,
) -> Iterator[WriteKeys]:
    """Mint the KEKs of one write job and configure Spark's Parquet writer with them."""
    # Resolve the columns first, so that a wrong name mints no KEK.
    paths = bridge.column_key_paths(spark, schema, groups)
    started = time.monotonic()
    write = service.mint_keks(meta, store, [TABLE_GROUP, *groups], job_id=job_id)
    log.info(
        "write job %s on table %s: %d KEK(s) minted in %.3f s",
        job_id,
        meta.table,
        len(write.kek_ids),
        time.monotonic() - started,
    )
    bridge.load_keys(spark, write.keys)
    with bridge.write_keys(
        spark,
        table=meta.table,
        table_id=meta.table_id,
        footer_kek_id=write.kek_ids[TABLE_GROUP],
        column_keys={write.kek_ids[group]: leaves for group, leaves in paths.items()},
        delta_log_kek_id=delta_log_kek_id,
    ):
        yield write


def _load_delta_log_kek(
    spark: SparkSession, service: KeyService, meta: TableMetadata, store: KeyringStore, job_id: str
) -> str:
    """Load every KEK of the table's Delta log, minting the first one; return the newest id."""
    kek_ids = delta_lake.delta_log_kek_ids(meta.table, store.list_kek_ids())
    if not kek_ids:
        minted = service.mint_keks(meta, store, [delta_lake.DELTA_LOG_GROUP], job_id=job_id)
        bridge.load_keys(spark, minted.keys)
        return minted.kek_ids[delta_lake.DELTA_LOG_GROUP]
    # Two writers that created the table at once may each have minted one; a
    # checkpoint may be under either, so both are loaded.
    bridge.load_keys(spark, _unwrap_missing(spark, service, meta, store, kek_ids, job_id))
    return max(kek_ids, key=lambda k: (store.get_kek_record(k).created_at, k))


def _delta_groups(table: str, stored: str | None, column_keys: str | None) -> dict[str, list[str]]:
    """Return the column-key layout of a write: the one given, which must match the stored one."""
    if column_keys is None:
        return _parse_groups(stored)
    groups = _parse_groups(column_keys)
    if stored is not None:
        expected = _parse_groups(stored)
        if {g: sorted(c) for g, c in groups.items()} != {g: sorted(c) for g, c in expected.items()}:
            raise InvalidOptionError(
                f"Delta table '{table}' keeps its columns under the column keys "
                f"{stored or '(none)'!r}, not {delta_lake.format_column_keys(groups)!r}; pass "
                "the same column keys, or none to use the table's"
            )
    return groups


def _table_files(store: KeyringStore) -> tuple[list[str], list[str]]:
    """Return the table's Parquet files, and those an overwrite replaced but did not delete."""
    replaced = {name for record in store.list_commit_records() for name in record.replaced}
    listed = store.list_data_files()
    return [n for n in listed if n not in replaced], [n for n in listed if n in replaced]


def _kek_ids_for_files(store: KeyringStore, files: list[str]) -> set[str]:
    """Return the KEKs that ``files`` need, by the table's commit records.

    A file that no commit record names (written by another path) may need any
    KEK of the table, so then all are returned.
    """
    by_file: dict[str, list[str]] = {}
    for record in store.list_commit_records():
        for name in record.files:
            by_file[name] = list(record.kek_ids)
    needed: set[str] = set()
    for name in files:
        if name not in by_file:
            return set(store.list_kek_ids())
        needed.update(by_file[name])
    return needed


# Public API --------------------------------------------------------------------


@contextmanager
def table_keys(
    spark: SparkSession,
    path: str,
    *,
    table: str | None = None,
    column_keys: str | None = None,
) -> Iterator[TableKeys]:
    """Encrypt Spark's own reads and writes of the table at ``path`` inside the block.

    Inside the block, Spark's Parquet reader and writer and Delta Lake read
    the table's files, and write new ones encrypted, for example::

        with spark_kms.table_keys(spark, path, table="flights"):
            DeltaTable.forPath(spark, path).delete("month = 1")
            spark.sql(f"OPTIMIZE delta.`{path}`")

    Every KEK of the table is unwrapped on entry, except those already loaded
    in the session. With ``table``, one KEK per key group is minted for the
    block's writes, and for a Delta table the files the block adds are
    recorded with those KEKs on exit. Errors that Spark reports from the JVM
    are raised as the spark_kms errors they carry.

    :param table: the table's name, to write; without it the block only reads.
    :param column_keys: ``group: column, column; group2: column``. For a Delta
        table the default is the layout stored with the table, and another
        layout is rejected; for a Parquet table the default is none (every
        column under the table's KEK).
    :raises TableNotFoundError: if ``path`` contains no spark_kms table and no
        ``table`` is given.
    :raises TableErasedError: if the table was erased.
    :raises AccessDeniedError: if the policy denies ``decrypt`` (or ``encrypt``
        with ``table``).
    :raises ConfigurationError: if the JVM bridge is not enabled, or another
        write block is active in the session.
    :raises InvalidOptionError: if a column key names a missing column.
    """
    service = _require_bridge(spark)
    job_id = uuid.uuid4().hex[:16]
    if table is None:
        meta, store = service.open_table_for_read(path)
    else:
        _reject_plaintext_delta(path)
        meta, store = service.open_table_for_write(table, path)
    _check_master_keys(meta)
    is_delta = delta_lake.is_delta_location(store)
    if is_delta and table is not None:
        _require_delta_log_store(spark)

    with _block_keys(spark, meta.table):
        bridge.load_keys(
            spark, _unwrap_missing(spark, service, meta, store, store.list_kek_ids(), job_id)
        )
        read_kek_ids = _table_kek_ids(spark, meta.table)
        if table is None:
            with typed_errors():
                yield TableKeys(meta.table, store.location, read_kek_ids)
            return

        log_kek_id: str | None = None
        before: set[str] = set()
        if is_delta:
            log_kek_id = _load_delta_log_kek(spark, service, meta, store, job_id)
            before = delta_lake.active_files(spark, store)
            properties = delta_lake.table_properties(spark, path)
            groups = _delta_groups(
                meta.table, properties.get(delta_lake.COLUMN_KEYS_PROPERTY), column_keys
            )
            delta_lake.check_column_mapping(meta.table, properties, bool(groups))
            schema = delta_lake.table_schema(spark, path)
        else:
            groups = _parse_groups(column_keys)
            schema = _stored_schema(meta, required=bool(groups))
        with _writing(
            spark,
            service,
            meta,
            store,
            schema=schema,
            groups=groups,
            delta_log_kek_id=log_kek_id,
            job_id=job_id,
        ) as write:
            try:
                with typed_errors():
                    yield TableKeys(meta.table, store.location, read_kek_ids, dict(write.kek_ids))
            finally:
                # Also after a failure: an operation of the block may have committed.
                if is_delta:
                    _record_delta_job(spark, store, job_id, before, write.keys.key_ids)


def _stored_schema(meta: TableMetadata, *, required: bool) -> StructType:
    from pyspark.sql.types import StructType

    if not meta.spark_schema:
        if required:
            raise InvalidOptionError(
                f"table '{meta.table}' has no stored schema, so its column keys cannot be "
                "resolved; write it first with spark_kms.write_parquet or format('kms_parquet')"
            )
        return StructType([])
    try:
        return StructType.fromJson(json.loads(meta.spark_schema))
    except (ValueError, KeyError, TypeError) as error:
        raise IntegrityError(f"table '{meta.table}' has a damaged schema in table.json") from error


def write_parquet(
    df: DataFrame,
    path: str,
    *,
    table: str,
    column_keys: str | None = None,
    mode: str = "append",
) -> None:
    """Write ``df`` with Spark's own Parquet writer into the spark_kms table at ``path``.

    The files are encrypted like those of ``format("kms_parquet")`` with the
    same options, and the table stays readable by both paths. As with
    kms_parquet, Spark writes them into the job's staging folder
    ``_spark_kms_staging/<job id>/``, and only the commit, under the table
    lock, moves them into the table. A write that fails before its commit
    record is written removes its staging folder and changes no file of the
    table.

    :param column_keys: ``group: column, column; group2: column``; every other
        column and the footer are under the table's KEK.
    :param mode: ``append`` or ``overwrite``. Overwrite moves the new files in,
        then deletes the files the table had at commit, so that the table's
        keyring survives, which Spark's own overwrite would delete. A reader
        in between reads both.
    :raises InvalidOptionError: for an invalid mode or column key, a schema
        that differs from the table's on append, or a Delta table at ``path``.
    :raises TableErasedError: if the table was erased.
    :raises ConfigurationError: if the JVM bridge is not enabled.
    """
    spark = df.sparkSession
    service = _require_bridge(spark)
    _check_mode(mode)
    groups = _parse_groups(column_keys)
    _reject_plaintext_delta(path)
    meta, store = service.open_table_for_write(table, path)
    _check_master_keys(meta)
    if delta_lake.is_delta_location(store):
        raise InvalidOptionError(
            f"{store.location} contains a Delta table; write it with spark_kms.write_delta"
        )
    _clean_stale_staging(store)
    if mode == "append" and meta.spark_schema and store.list_data_files():
        _check_append_schema(meta, df.schema)
    if mode == "append":
        groups = append_column_keys(
            meta.table,
            store.last_column_keys(),
            groups,
            option="column_keys",
            overwrite="mode='overwrite'",
        )

    job_id = uuid.uuid4().hex[:16]
    spark_staging = f"{_spark_location(path, store)}/{STAGING_DIR}/{job_id}"
    staging = f"{store.staging_root}/{job_id}"
    try:
        with _block_keys(spark, meta.table):
            with _writing(
                spark,
                service,
                meta,
                store,
                schema=df.schema,
                groups=groups,
                delta_log_kek_id=None,
                job_id=job_id,
            ) as write:
                with typed_errors():
                    df.write.mode("append").parquet(spark_staging)
                    files = _staged_files(store, staging)
                    _check_staged_encrypted(store, staging, files)
                    # Spark takes the row count from the footers, which needs the job's KEKs,
                    # so it is read while they are loaded.
                    paths = [f"{spark_staging}/{name}" for name in files]
                    rows = spark.read.parquet(*paths).count() if paths else 0
    except BaseException as error:
        _abort_parquet_job(service, meta, store, staging=staging, job_id=job_id, error=error)
        raise
    _commit_parquet(
        service,
        meta,
        store,
        job_id=job_id,
        mode=mode,
        staging=staging,
        files=files,
        kek_ids=write.keys.key_ids,
        rows=rows,
        groups=groups,
        schema_json=df.schema.json(),
    )


def _clean_stale_staging(store: KeyringStore) -> None:
    # Like kms_parquet's writer, this removes or rolls forward the staged files
    # of jobs whose driver died. A failure to clean them must not fail this write.
    try:
        clean_stale_staging(store)
    except (OSError, SparkKmsError) as error:
        log.warning("could not clean stale staging folders of %s: %s", store.location, error)


def _spark_location(path: str, store: KeyringStore) -> str:
    """Return the table location to give Spark: the folder that pyarrow resolved.

    Spark resolves a relative path against the JVM's working folder and pyarrow
    against this process's, which differ after ``os.chdir``. So Spark gets the
    absolute location of a local table, and other URIs as the caller gave them.
    """
    if isinstance(store.filesystem, pafs.LocalFileSystem):
        return f"file://{store.location}"
    return path.rstrip("/")


def _check_staged_encrypted(store: KeyringStore, staging: str, files: list[str]) -> None:
    # The bridge encrypts every file written inside a table, and a file it did
    # not (a staging folder it failed to recognize) must never be committed.
    for name in files:
        if not is_encrypted_file(store.filesystem, f"{staging}/{name}"):
            raise IntegrityError(
                f"staged file {name} is not in encrypted footer mode (magic PARE); "
                "the job is aborted and nothing was committed"
            )


def _staged_files(store: KeyringStore, staging: str) -> list[str]:
    """Return the Parquet files in the job's staging folder, relative to it.

    Spark's ``_SUCCESS`` marker and the hidden ``.crc`` checksum files that
    Hadoop's local filesystem writes are skipped. They stay in the staging
    folder and are deleted with it.
    """
    selector = pafs.FileSelector(staging, recursive=True, allow_not_found=True)
    files = []
    for info in store.filesystem.get_file_info(selector):
        relative = info.path[len(staging) + 1 :]
        if info.type != pafs.FileType.File or not relative.endswith(".parquet"):
            continue
        if any(part.startswith(("_", ".")) for part in relative.split("/")):
            continue
        files.append(relative)
    return sorted(files)


def _abort_parquet_job(
    service: KeyService,
    meta: TableMetadata,
    store: KeyringStore,
    *,
    staging: str,
    job_id: str,
    error: BaseException,
) -> None:
    """Remove the staging folder of a job that failed before its commit record was written."""
    # NOTE: a task that Spark is still killing when the job fails may recreate
    # the folder after this. Only the stale-staging cleanup removes it then.
    _remove_staging(store, staging, job_id)
    service.audit.append(
        "abort",
        table=meta.table,
        outcome=f"failed: {type(error).__name__}",
        job_id=job_id,
        writer="spark",
    )
    log.warning(
        "Spark's Parquet writer failed job %s on table %s (%s); its staged files were removed",
        job_id,
        meta.table,
        type(error).__name__,
    )


def _remove_staging(store: KeyringStore, staging: str, job_id: str) -> None:
    try:
        store.filesystem.delete_dir(staging)
    except FileNotFoundError:
        pass
    except OSError as error:
        # No reader looks into the staging folder, and the next write removes it once stale.
        log.warning("job %s: failed to remove staging folder %s (%s)", job_id, staging, error)


def _move_staged_files(store: KeyringStore, staging: str, files: list[str]) -> None:
    for name in files:
        if "/" in name:
            store.filesystem.create_dir(f"{store.location}/{os.path.dirname(name)}")
        store.filesystem.move(f"{staging}/{name}", f"{store.location}/{name}")


def _commit_parquet(
    service: KeyService,
    meta: TableMetadata,
    store: KeyringStore,
    *,
    job_id: str,
    mode: str,
    staging: str,
    files: list[str],
    kek_ids: list[str],
    rows: int,
    groups: Mapping[str, Sequence[str]],
    schema_json: str,
) -> None:
    """Record a job of Spark's Parquet writer and move its staged files into the table.

    As in kms_parquet's commit, the commit record is written first and names
    the job's files and KEKs, so that kms_parquet unwraps only the KEKs a read
    needs. If moving the files fails after that, the staging folder stays and
    :func:`spark_kms.staging.clean_stale_staging` rolls the job forward. On
    overwrite, the files the table had at commit are deleted after the new
    ones are in place.
    """
    with service.table_lock(meta.table):
        try:
            current, _ = service.check_writable(meta.table, store.location)
            previous = store.list_data_files() if mode == "overwrite" else []
            store.put_commit_record(
                CommitRecord(
                    job_id=job_id,
                    committed_at=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                    mode=mode,
                    files=files,
                    kek_ids=sorted(kek_ids),
                    rows=rows,
                    extra={"writer": "spark"},
                    column_keys={g: list(c) for g, c in groups.items()} or None,
                    replaced=previous,
                )
            )
        except BaseException as error:
            _abort_parquet_job(service, meta, store, staging=staging, job_id=job_id, error=error)
            raise
        try:
            _move_staged_files(store, staging, files)
        except OSError as error:
            log.error(
                "job %s on table %s is committed, but moving its files from %s failed (%s); "
                "the next write or 'spark-kms verify %s --repair' moves the rest into place once "
                "the folder is untouched for %d s",
                job_id,
                meta.table,
                staging,
                error,
                meta.table,
                STALE_AFTER_SECONDS,
            )
            raise
        for name in previous:
            try:
                store.filesystem.delete_file(f"{store.location}/{name}")
            except FileNotFoundError:
                pass
            except OSError as error:
                # The commit record lists the file as replaced, so reads skip it.
                log.warning(
                    "job %s on table %s: failed to delete replaced file %s (%s); delete it by hand",
                    job_id,
                    meta.table,
                    name,
                    error,
                )
        if current.spark_schema != schema_json:

            def set_schema(changed: TableMetadata) -> None:
                changed.spark_schema = schema_json

            service.update_metadata(store, meta.table_id, set_schema)
    # What is left is Spark's _SUCCESS marker and checksum files.
    _remove_staging(store, staging, job_id)
    service.audit.append(
        "commit",
        table=meta.table,
        outcome="ok",
        job_id=job_id,
        files=len(files),
        rows=rows,
        mode=mode,
        writer="spark",
    )
    log.info(
        "Spark's Parquet writer committed job %s to table %s (%s): %d file(s), %d row(s), "
        "%d old file(s) deleted",
        job_id,
        meta.table,
        mode,
        len(files),
        rows,
        len(previous),
    )


def _check_append_schema(meta: TableMetadata, schema: StructType) -> None:
    stored = _stored_schema(meta, required=True)
    if [(f.name, f.dataType) for f in stored.fields] != [
        (f.name, f.dataType) for f in schema.fields
    ]:
        raise InvalidOptionError(
            f"cannot append to table '{meta.table}': the DataFrame schema {schema.simpleString()} "
            f"differs from the table schema {stored.simpleString()}; use mode='overwrite' "
            "to replace the table"
        )


def read_parquet(spark: SparkSession, path: str) -> DataFrame:
    """Read the spark_kms table at ``path`` with Spark's own Parquet reader.

    The table's KEKs stay loaded in the session until :func:`release_keys`.

    :raises TableNotFoundError: if ``path`` contains no spark_kms table.
    :raises TableErasedError: if the table was erased.
    :raises InvalidOptionError: if ``path`` contains a Delta table, whose folder
        also contains the files Delta removed.
    :raises ConfigurationError: if the JVM bridge is not enabled.
    """
    service = _require_bridge(spark)
    meta, store = service.open_table_for_read(path)
    _check_master_keys(meta)
    if delta_lake.is_delta_location(store):
        raise InvalidOptionError(
            f"{store.location} contains a Delta table; read it with spark_kms.read_delta"
        )
    job_id = uuid.uuid4().hex[:16]
    files, stale = _table_files(store)
    keys = _unwrap_missing(spark, service, meta, store, _kek_ids_for_files(store, files), job_id)
    bridge.load_keys(spark, keys)
    log.info("read job %s on table %s: %d KEK(s) unwrapped", job_id, meta.table, len(keys))
    location = _spark_location(path, store)
    with typed_errors():
        if not stale:
            return spark.read.parquet(location)
        # An overwrite whose deletes failed left old files in the folder: they
        # are no longer part of the table, so only the others are read.
        log.warning(
            "read of table %s skips %d file(s) that an overwrite replaced but did not "
            "delete; delete them from %s: %s",
            meta.table,
            len(stale),
            store.location,
            ", ".join(stale),
        )
        if not files:
            return spark.createDataFrame([], _stored_schema(meta, required=True))
        return spark.read.option("basePath", location).parquet(*(f"{location}/{n}" for n in files))


def write_delta(
    df: DataFrame,
    path: str,
    *,
    table: str,
    column_keys: str | None = None,
    mode: str = "append",
    partition_by: Sequence[str] = (),
    options: Mapping[str, str] | None = None,
) -> None:
    """Write ``df`` to the encrypted Delta table at ``path``, creating it if new.

    A new table gets the properties of :data:`spark_kms.delta_lake.TABLE_PROPERTIES`,
    which keep column statistics out of ``_delta_log``, and stores its
    column-key layout.

    :param column_keys: ``group: column, column; group2: column``; by default
        the layout stored with an existing table. Every other column and the
        footer are under the table's KEK.
    :param mode: ``append`` or ``overwrite``.
    :param partition_by: partition columns, which must not be under a column
        key: partition values are stored in plaintext in folder names.
    :param options: further Delta writer options, such as ``replaceWhere``.
    :raises InvalidOptionError: for an invalid mode or column key, a layout
        that differs from the table's, or a location that contains a Delta table
        spark_kms did not create or a spark_kms Parquet table.
    :raises TableErasedError: if the table was erased.
    :raises ConfigurationError: if the JVM bridge or its Delta log store is not
        enabled.
    """
    spark = df.sparkSession
    service = _require_bridge(spark)
    _require_delta_log_store(spark)
    _check_mode(mode)
    _reject_plaintext_delta(path)
    meta, store = service.open_table_for_write(table, path)
    _check_master_keys(meta)
    if not delta_lake.is_delta_location(store) and store.list_data_files():
        raise InvalidOptionError(
            f"{store.location} contains spark_kms table '{meta.table}' in Parquet files; "
            "Delta would ignore them, so write the Delta table to another location"
        )

    from delta.tables import DeltaTable

    location = _spark_location(path, store)
    job_id = uuid.uuid4().hex[:16]
    with _block_keys(spark, meta.table):
        log_kek_id = _load_delta_log_kek(spark, service, meta, store, job_id)
        exists = DeltaTable.isDeltaTable(spark, location)
        before = delta_lake.active_files(spark, store) if exists else set()
        properties = delta_lake.table_properties(spark, location) if exists else {}
        groups = _delta_groups(
            meta.table,
            properties.get(delta_lake.COLUMN_KEYS_PROPERTY) if exists else None,
            column_keys,
        )
        _check_partition_columns(groups, partition_by)
        delta_lake.check_column_mapping(meta.table, properties, bool(groups))
        with _writing(
            spark,
            service,
            meta,
            store,
            schema=df.schema,
            groups=groups,
            delta_log_kek_id=log_kek_id,
            job_id=job_id,
        ) as write:
            with typed_errors():
                writer = df.write.format("delta").mode(mode).options(**dict(options or {}))
                if exists:
                    delta_lake.repair_properties(spark, location, meta.table, properties)
                else:
                    writer = writer.options(**delta_lake.TABLE_PROPERTIES)
                if partition_by:
                    writer = writer.partitionBy(*partition_by)
                writer.save(location)
                if delta_lake.COLUMN_KEYS_PROPERTY not in properties:
                    # NOTE: a crash before this commit leaves a new table without a
                    # stored layout, so its next write must name column_keys again.
                    delta_lake.set_column_keys(
                        spark, location, delta_lake.format_column_keys(groups)
                    )
            added = _record_delta_job(spark, store, job_id, before, write.keys.key_ids)
    log.info(
        "Delta write job %s on table %s (%s) committed: %d file(s)",
        job_id,
        meta.table,
        mode,
        added,
    )


def _record_delta_job(
    spark: SparkSession,
    store: KeyringStore,
    job_id: str,
    before: set[str],
    kek_ids: Sequence[str],
) -> int:
    """Record the files the job added to the Delta table; return how many.

    A failure is logged, not raised: without the record, reads of the table
    unwrap every KEK of the table instead of those its files need.
    """
    try:
        files = sorted(delta_lake.active_files(spark, store) - before)
        delta_lake.put_job_record(
            store,
            delta_lake.DeltaJobRecord(
                job_id=job_id,
                committed_at=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                kek_ids=sorted(kek_ids),
                files=files,
            ),
        )
    except Exception as error:
        log.warning(
            "could not record the files of job %s in %s (%s: %s); reads of the table "
            "will unwrap all its KEKs",
            job_id,
            store.keyring,
            type(error).__name__,
            error,
        )
        return 0
    return len(files)


def read_delta(
    spark: SparkSession, path: str, *, options: Mapping[str, str] | None = None
) -> DataFrame:
    """Read the encrypted Delta table at ``path``.

    The KEKs of the table's current files are unwrapped, once, and stay
    loaded in the session until :func:`release_keys`. With ``versionAsOf`` or
    ``timestampAsOf`` in ``options`` every KEK of the table is.

    :param options: Delta reader options, such as ``versionAsOf``.
    :raises TableNotFoundError: if ``path`` contains no spark_kms Delta table.
    :raises TableErasedError: if the table was erased.
    :raises ConfigurationError: if the JVM bridge is not enabled.
    """
    service = _require_bridge(spark)
    meta, store = service.open_table_for_read(path)
    _check_master_keys(meta)
    if not delta_lake.is_delta_location(store):
        raise TableNotFoundError(
            f"{store.location} contains spark_kms table '{meta.table}' but no Delta log; read it "
            "with spark_kms.read_parquet or format('kms_parquet')"
        )
    job_id = uuid.uuid4().hex[:16]
    kek_ids = store.list_kek_ids()
    log_kek_ids = delta_lake.delta_log_kek_ids(meta.table, kek_ids)
    keys = _unwrap_missing(spark, service, meta, store, log_kek_ids, job_id)
    bridge.load_keys(spark, keys)
    reader_options = dict(options or {})
    if {"versionAsOf", "timestampAsOf"} & {k for k in reader_options}:
        needed = set(kek_ids)
    else:
        with typed_errors():
            files = delta_lake.active_files(spark, store)
        needed = delta_lake.kek_ids_for_files(files, delta_lake.job_records(store), kek_ids)
    more = _unwrap_missing(spark, service, meta, store, needed, job_id)
    bridge.load_keys(spark, more)
    log.info(
        "read job %s on Delta table %s: %d of %d KEK(s) needed, %d unwrapped",
        job_id,
        meta.table,
        len(needed | set(log_kek_ids)),
        len(kek_ids),
        len(keys) + len(more),
    )
    with typed_errors():
        return (
            spark.read.format("delta").options(**reader_options).load(_spark_location(path, store))
        )


def release_keys(spark: SparkSession, path: str | None = None) -> int:
    """Unload the KEKs of the table at ``path`` (default: of every table) from ``spark``.

    DataFrames that read the table fail afterwards with ``KeyNotFoundError``
    until it is read again.

    :returns: the number of KEKs unloaded.
    :raises TableNotFoundError: if ``path`` contains no spark_kms table.
    """
    if path is None:
        return bridge.unload_keys(spark)
    meta = KeyringStore(path).read_metadata()
    if meta is None:
        raise TableNotFoundError(f"{path} contains no spark_kms table")
    return bridge.unload_keys(spark, _table_kek_ids(spark, meta.table))
