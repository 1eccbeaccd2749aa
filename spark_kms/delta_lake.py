"""Delta Lake tables under spark_kms: their table properties, column keys and log KEK.

Delta keeps per-file statistics (minimum, maximum, null count) of the first 32
columns in ``_delta_log``, in plaintext. Every spark_kms Delta table is created
with :data:`TABLE_PROPERTIES`, which turn them off, so ``_delta_log`` keeps only
row counts. They are options of the table's first write, because Delta creates
no table in a folder that already contains the keyring. The bridge's log store
also redacts the predicates Delta records for DELETE, UPDATE and MERGE. The
table's column-key layout is stored as the table property
``spark_kms.column_keys``, so later writes and DELETE, UPDATE, MERGE and
OPTIMIZE encrypt the same columns under the same key groups.

Delta's checkpoints (Parquet files in ``_delta_log``) are encrypted too, under a
KEK of the key group ``delta_log`` that lives as long as the table, so a write
needs to unwrap that one KEK to read the log, not every KEK of the table.

Each write job records the files it added, with its KEK ids, in
``_spark_kms/delta_jobs/<job id>.json``, so that a read unwraps only the KEKs
of the files in the table's current version (:func:`kek_ids_for_files`).
"""

from __future__ import annotations

import json
import logging
import urllib.parse
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from spark_kms.errors import IntegrityError, InvalidOptionError
from spark_kms.keyring import KeyringStore

if TYPE_CHECKING:
    from pyspark.sql import SparkSession
    from pyspark.sql.types import StructType

__all__ = [
    "COLUMN_KEYS_PROPERTY",
    "DELTA_LOG_GROUP",
    "TABLE_PROPERTIES",
    "delta_log_kek_ids",
    "format_column_keys",
    "is_delta_location",
]

log = logging.getLogger(__name__)

DELTA_LOG_DIR = "_delta_log"
JOBS_DIR = "delta_jobs"
DELTA_LOG_GROUP = "delta_log"
COLUMN_KEYS_PROPERTY = "spark_kms.column_keys"

TABLE_PROPERTIES = {
    # No minimum, maximum or null count of any column in the add actions of
    # _delta_log, only the row count: every column of the files is encrypted.
    "delta.dataSkippingNumIndexedCols": "0",
    # Checkpoints carry no copy of the statistics either.
    "delta.checkpoint.writeStatsAsJson": "false",
    "delta.checkpoint.writeStatsAsStruct": "false",
    # DELETE, UPDATE and MERGE rewrite the affected files (all encrypted)
    # instead of adding deletion vector files beside them.
    "delta.enableDeletionVectors": "false",
}
# Names the columns to collect statistics of, overriding the count above.
_STATS_COLUMNS_PROPERTY = "delta.dataSkippingStatsColumns"
_COLUMN_MAPPING_PROPERTY = "delta.columnMapping.mode"


def is_delta_location(store: KeyringStore) -> bool:
    """Tell whether the table folder of ``store`` contains a ``_delta_log`` folder."""
    info = store.filesystem.get_file_info(f"{store.location}/{DELTA_LOG_DIR}")
    return bool(info.type == pafs.FileType.Directory)


def format_column_keys(groups: Mapping[str, Sequence[str]]) -> str:
    """Return ``groups`` in the ``kms.column_keys`` syntax, groups sorted: ``pii: a, b; ops: c``."""
    return "; ".join(f"{group}: {', '.join(groups[group])}" for group in sorted(groups))


def delta_log_kek_ids(table: str, kek_ids: Iterable[str]) -> list[str]:
    """Return the ids among ``kek_ids`` of the KEKs that encrypt the Delta log of ``table``."""
    # Key ids are "<table>.<group>.k<job id>"; table names contain no '.'.
    prefix = f"{table}.{DELTA_LOG_GROUP}."
    return sorted(k for k in kek_ids if k.startswith(prefix))


def _quoted_path(location: str) -> str:
    return "delta.`" + location.replace("`", "``") + "`"


def _literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def table_properties(spark: SparkSession, location: str) -> dict[str, str]:
    """Return the table properties of the Delta table at ``location``."""
    from delta.tables import DeltaTable

    detail = DeltaTable.forPath(spark, location).detail().first()
    properties = detail["properties"] if detail is not None else None
    return dict(properties or {})


def table_schema(spark: SparkSession, location: str) -> StructType:
    """Return the schema of the Delta table at ``location``."""
    from delta.tables import DeltaTable

    return DeltaTable.forPath(spark, location).toDF().schema


def repair_properties(
    spark: SparkSession, location: str, table: str, properties: Mapping[str, str]
) -> list[str]:
    """Set :data:`TABLE_PROPERTIES` on the Delta table at ``location`` where they differ.

    :returns: the names of the properties that were changed.
    """
    wrong = {k: v for k, v in TABLE_PROPERTIES.items() if properties.get(k) != v}
    changed = sorted(wrong)
    if wrong:
        pairs = ", ".join(f"{_literal(k)} = {_literal(v)}" for k, v in sorted(wrong.items()))
        spark.sql(f"ALTER TABLE {_quoted_path(location)} SET TBLPROPERTIES ({pairs})")
    if _STATS_COLUMNS_PROPERTY in properties:
        spark.sql(
            f"ALTER TABLE {_quoted_path(location)} UNSET TBLPROPERTIES IF EXISTS "
            f"({_literal(_STATS_COLUMNS_PROPERTY)})"
        )
        changed.append(_STATS_COLUMNS_PROPERTY)
    if changed:
        log.warning(
            "Delta table %s had table properties that let _delta_log keep column statistics; "
            "reset %s. Files committed before may have statistics in _delta_log",
            table,
            ", ".join(changed),
        )
    return changed


def check_column_mapping(table: str, properties: Mapping[str, str], has_column_keys: bool) -> None:
    """Reject column keys on a table whose Parquet column names are not its column names.

    :raises InvalidOptionError: if the table uses Delta column mapping.
    """
    mode = properties.get(_COLUMN_MAPPING_PROPERTY, "none")
    if has_column_keys and mode != "none":
        raise InvalidOptionError(
            f"Delta table '{table}' uses column mapping mode '{mode}', whose physical Parquet "
            "column names differ from the column names, so column keys cannot name them; "
            "write without column keys or use a table without column mapping"
        )


def set_column_keys(spark: SparkSession, location: str, column_keys: str) -> None:
    """Store the column-key layout as the table property ``spark_kms.column_keys``."""
    spark.sql(
        f"ALTER TABLE {_quoted_path(location)} SET TBLPROPERTIES "
        f"({_literal(COLUMN_KEYS_PROPERTY)} = {_literal(column_keys)})"
    )


# Which KEKs the files of a version need ------------------------------------------


@dataclass(frozen=True)
class DeltaJobRecord:
    """The data files one write job added to a Delta table, and the KEKs of that job."""

    job_id: str
    committed_at: str
    kek_ids: list[str]
    files: list[str]


def active_files(spark: SparkSession, store: KeyringStore) -> set[str]:
    """Return the data files of the table's current version, relative to its folder."""
    from delta.tables import DeltaTable

    files = set()
    prefix = store.location.rstrip("/") + "/"
    for uri in DeltaTable.forPath(spark, store.location).toDF().inputFiles():
        parsed = urllib.parse.urlparse(uri)
        path = urllib.parse.unquote(parsed.path)
        if parsed.scheme not in ("", "file"):
            path = parsed.netloc + path
        files.add(path[len(prefix) :] if path.startswith(prefix) else path)
    return files


def put_job_record(store: KeyringStore, record: DeltaJobRecord) -> None:
    """Write ``record`` to ``_spark_kms/delta_jobs/`` (temporary file, then rename)."""
    folder = f"{store.keyring}/{JOBS_DIR}"
    store.filesystem.create_dir(folder, recursive=True)
    temporary = f"{folder}/.{uuid.uuid4().hex}.tmp"
    with store.filesystem.open_output_stream(temporary) as stream:
        stream.write((json.dumps(asdict(record), indent=2, sort_keys=True) + "\n").encode())
    store.filesystem.move(temporary, f"{folder}/{record.job_id}.json")


def job_records(store: KeyringStore) -> list[DeltaJobRecord]:
    """Return every job record of the table.

    :raises IntegrityError: naming the file if a record is not valid.
    """
    folder = f"{store.keyring}/{JOBS_DIR}"
    selector = pafs.FileSelector(folder, allow_not_found=True)
    records = []
    for info in store.filesystem.get_file_info(selector):
        if not info.base_name.endswith(".json") or info.base_name.startswith("."):
            continue
        with store.filesystem.open_input_stream(info.path) as stream:
            text = stream.read().decode("utf-8", errors="replace")
        try:
            records.append(DeltaJobRecord(**json.loads(text)))
        except (ValueError, TypeError):
            raise IntegrityError(f"{info.path} is not a valid Delta job record") from None
    return records


def _job_of(kek_id: str) -> str:
    # Key ids are "<table>.<group>.k<job id>".
    return kek_id.rsplit(".", 1)[-1][1:]


def kek_ids_for_files(
    files: Iterable[str], records: Sequence[DeltaJobRecord], kek_ids: Sequence[str]
) -> set[str]:
    """Return the KEKs, among ``kek_ids``, that reading ``files`` may need.

    These are the KEKs of the jobs whose records name the files, and of every
    job without a record (one that failed before recording, or still runs),
    whose files may be among them. A file that no record names may need any
    KEK, so then all are returned.
    """
    by_file: dict[str, set[str]] = {}
    for record in records:
        for name in record.files:
            by_file.setdefault(name, set()).update(record.kek_ids)
    recorded_jobs = {record.job_id for record in records}
    needed = {k for k in kek_ids if _job_of(k) not in recorded_jobs}
    for name in files:
        if name not in by_file:
            return set(kek_ids)
        needed |= by_file[name]
    return needed & set(kek_ids)
