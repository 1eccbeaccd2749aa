"""Cost curves for ``scripts/bench.py``: HSM calls, erasure and rotation.

- HSM calls per write job (and per read job) at several partition counts: the
  kms_parquet writer calls the HSM once per key group per job, so the count
  must not grow with the number of files.
- Crypto-erasure and master-key rotation time for tables of several file
  counts. The tables are built without Spark: one write job's KEKs (one per
  key group) and N small encrypted files written with
  :func:`spark_kms.parquet_crypto.write_encrypted_file`, plus the commit
  record that names them. Neither operation reads a data file, so the time
  must not grow with N.
- Rotation time by number of KEK records, which is what rotation does scale
  with: it rewraps every record.

HSM calls are counted in the audit log, one line per key operation, because
Spark plans data source jobs in its own Python worker processes, whose
PKCS#11 counters the driver cannot see.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from spark_kms.keyring import CommitRecord
from spark_kms.parquet_crypto import EncryptionPlan, write_encrypted_file

__all__ = ["hsm_calls_since", "run_curves"]

HSM_OPERATIONS = ("create_master_key", "wrap_kek", "unwrap_kek", "rotate", "erase")
KEY_GROUPS = ("table", "pii")
PII_COLUMN = "tailnum"


def hsm_calls_since(service: Any, mark: int, table: str) -> dict[str, int]:
    """Count the successful key operations on ``table`` that the audit log recorded after line ``mark``."""
    counts: dict[str, int] = {}
    for number, record in enumerate(service.audit.records()):
        if number < mark or record.get("table") != table or record.get("outcome") != "ok":
            continue
        operation = str(record.get("operation"))
        if operation in HSM_OPERATIONS:
            counts[operation] = counts.get(operation, 0) + 1
    return counts


def run_curves(
    spark: Any,
    service: Any,
    source: Any,
    work: Path,
    *,
    partitions: list[int],
    files: list[int],
    runs: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Measure every curve; see the module docstring."""
    sample = _sample_batch(source)
    return {
        "hsm_calls_by_partitions": hsm_calls_by_partitions(spark, service, source, work, partitions, log),
        "lifecycle_by_files": lifecycle_by_files(service, sample, work, files, runs, log),
        "rotation_by_kek_records": rotation_by_kek_records(service, sample, work, [1, 10, 100], runs, log),
    }


def hsm_calls_by_partitions(
    spark: Any, service: Any, source: Any, work: Path, counts: list[int], log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Write the table in ``count`` partitions, then read it back, counting HSM calls of each job.

    With the JVM bridge present, Spark's own Parquet writer and reader write
    and read a second table the same way.
    """
    import spark_kms

    paths = {"kms": "bench_partitions", "native_encrypted": "bench_partitions_native"}
    paths = {key: str(work / "tables" / table) for key, table in paths.items()}
    native = hasattr(spark_kms, "write_parquet") and spark_kms.bridge.is_enabled(spark)

    def write_kms(frame: Any) -> None:
        (
            frame.write.format("kms_parquet")
            .option("kms.table", "bench_partitions")
            .option("kms.column_keys", f"pii: {PII_COLUMN}")
            .mode("overwrite")
            .save(paths["kms"])
        )

    def read_kms() -> Any:
        return spark.read.format("kms_parquet").load(paths["kms"])

    def write_native(frame: Any) -> None:
        spark_kms.write_parquet(frame, paths["native_encrypted"], table="bench_partitions_native",
                                column_keys=f"pii: {PII_COLUMN}", mode="overwrite")

    def read_native() -> Any:
        # The KEKs a previous read loaded stay in the session, so release them
        # to count the HSM calls of a read job that starts from nothing.
        spark_kms.release_keys(spark, paths["native_encrypted"])
        return spark_kms.read_parquet(spark, paths["native_encrypted"])

    jobs = {"kms": (write_kms, read_kms, "bench_partitions")}
    if native:
        jobs["native_encrypted"] = (write_native, read_native, "bench_partitions_native")
    points = []
    for count in counts:
        frame = source.repartition(count)
        for key, (write, read, table) in jobs.items():
            mark = service.audit.count()
            started = time.perf_counter()
            write(frame)
            write_seconds = time.perf_counter() - started
            write_calls = hsm_calls_since(service, mark, table)

            mark = service.audit.count()
            started = time.perf_counter()
            read().write.format("noop").mode("overwrite").save()
            read_seconds = time.perf_counter() - started
            read_calls = hsm_calls_since(service, mark, table)

            written = len(list(Path(paths[key]).glob("*.parquet")))
            points.append({
                "variant": key,
                "partitions": count,
                "files": written,
                "write_hsm_calls": write_calls,
                "read_hsm_calls": read_calls,
                "write_seconds": write_seconds,
                "read_seconds": read_seconds,
            })
            log(f"curve {key} partitions={count}: {written} files, write HSM calls {write_calls}, "
                f"read HSM calls {read_calls}, write {write_seconds:.1f} s, read {read_seconds:.1f} s")
    return points


def lifecycle_by_files(
    service: Any, sample: pa.RecordBatch, work: Path, counts: list[int], runs: int,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Rotate, then erase, a table of N files, ``runs`` times for each N."""
    points = []
    for count in counts:
        rotate_seconds, erase_seconds, rotate_calls = [], [], []
        for run in range(runs):
            table = f"bench_files_{count}_{run}_{uuid.uuid4().hex[:6]}"
            location = work / "lifecycle" / table
            _build_table(service, table, location, sample, files=count, jobs=1)

            report = service.rotate_table(table)
            rotate_seconds.append(report.seconds)
            rotate_calls.append(report.hsm_operations)

            erased = service.erase_table(table)
            erase_seconds.append(erased.seconds)
            if erased.remaining_objects:
                raise AssertionError(f"erasure of {table} left {erased.remaining_objects} key object(s)")
        points.append({
            "files": count,
            "kek_records": len(KEY_GROUPS),
            "rotate": _stats(rotate_seconds),
            "rotate_hsm_operations": rotate_calls,
            "erase": _stats(erase_seconds),
        })
        log(f"curve files={count}: rotate median {statistics.median(rotate_seconds) * 1000:.0f} ms, "
            f"erase median {statistics.median(erase_seconds) * 1000:.0f} ms")
    return points


def rotation_by_kek_records(
    service: Any, sample: pa.RecordBatch, work: Path, jobs: list[int], runs: int,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Rotate tables written by 1, 10 and 100 jobs: rotation rewraps every KEK record."""
    points = []
    for count in jobs:
        seconds, operations = [], []
        for run in range(runs):
            table = f"bench_jobs_{count}_{run}_{uuid.uuid4().hex[:6]}"
            location = work / "lifecycle" / table
            _build_table(service, table, location, sample, files=count, jobs=count)
            report = service.rotate_table(table)
            seconds.append(report.seconds)
            operations.append(report.hsm_operations)
            service.erase_table(table)
        points.append({
            "jobs": count,
            "kek_records": count * len(KEY_GROUPS),
            "rotate": _stats(seconds),
            "rotate_hsm_operations": operations,
        })
        log(f"curve KEK records={count * len(KEY_GROUPS)}: rotate median "
            f"{statistics.median(seconds) * 1000:.0f} ms")
    return points


def _build_table(
    service: Any, table: str, location: Path, sample: pa.RecordBatch, *, files: int, jobs: int
) -> None:
    # Each job mints one KEK per key group, as a kms_parquet write job does,
    # and writes its share of the files under them.
    meta, store = service.open_table_for_write(table, str(location))
    per_job = [files // jobs + (1 if j < files % jobs else 0) for j in range(jobs)]
    for job_files in per_job:
        job_id = uuid.uuid4().hex[:16]
        minted = service.mint_keks(meta, store, list(KEY_GROUPS), job_id=job_id)
        footer_kek = minted.kek_ids["table"]
        other_columns = [name for name in sample.schema.names if name != PII_COLUMN]
        plan = EncryptionPlan(
            job_id=job_id,
            footer_kek_id=footer_kek,
            column_keys={minted.kek_ids["pii"]: [PII_COLUMN], footer_kek: other_columns},
            keys=minted.keys,
        )
        names = []
        for number in range(job_files):
            name = f"part-{number:05d}-{job_id}.parquet"
            write_encrypted_file([sample], f"{store.location}/{name}", plan=plan, filesystem=store.filesystem)
            names.append(name)
        store.put_commit_record(
            CommitRecord(
                job_id=job_id,
                committed_at=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                mode="append",
                files=names,
                kek_ids=sorted(minted.keys.key_ids),
                rows=sample.num_rows * job_files,
            )
        )


def _sample_batch(source: Any) -> pa.RecordBatch:
    # Ten rows of the benchmark table, as the Arrow batch a task would write.
    table = pa.Table.from_pandas(source.limit(10).toPandas(), preserve_index=False)
    return table.replace_schema_metadata(None).combine_chunks().to_batches()[0]


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "seconds": values,
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }
