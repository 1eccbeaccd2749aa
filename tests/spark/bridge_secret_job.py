"""A Spark job that sends KEKs through the JVM bridge on every path, for the secret scan test.

Run as a script: `bridge_secret_job.py PROPERTIES EVENT_LOG_DIR WORK_DIR TABLE_PREFIX`.
It logs at DEBUG (Spark, parquet-mr, Delta and spark_kms), runs its own Spark
UI on 127.0.0.1, writes and reads a Parquet table and a Delta table with
Spark's own writer and reader, rewrites the Delta table, prints every plan and
the errors of rejected operations, and saves what the UI shows. The test scans
all of it for the tables' keys.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import urllib.request

os.environ["SPARK_KMS_LOG_LEVEL"] = "DEBUG"

from pyspark.sql import DataFrame, SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

import spark_kms  # noqa: E402
from spark_kms import bridge  # noqa: E402
from spark_kms.settings import KmsSettings  # noqa: E402

EXPLAIN_MODES = ("simple", "extended", "codegen", "cost", "formatted")


def explain_all(df: DataFrame) -> None:
    for mode in EXPLAIN_MODES:
        df.explain(mode=mode)


def print_error(label: str, action: object) -> None:
    """Run ``action`` and print the full text of the error it raises."""
    assert callable(action)
    try:
        action()
    except Exception as error:  # noqa: BLE001 (every error text is scanned)
        print(f"{label}: {type(error).__name__}: {error}")
        cause = error.__cause__
        if cause is not None:
            print(f"{label} cause: {type(cause).__name__}: {cause}")
    else:
        raise AssertionError(f"{label} did not fail")


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 (our own UI)
        return str(response.read().decode("utf-8"))


def main(properties: str, event_log: str, work: str, prefix: str) -> None:
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    settings = KmsSettings.from_file(properties)
    spark = (
        SparkSession.builder.master("local[2]")
        .config("spark.ui.enabled", "true")
        .config("spark.ui.port", "0")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.eventLog.enabled", "true")
        .config("spark.eventLog.dir", event_log)
        .config("spark.eventLog.compress", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.databricks.delta.snapshotPartitions", "2")
        .config(map=spark_kms.session_config())
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("DEBUG")
    spark_kms.configure(spark, settings)
    source = spark.range(300, numPartitions=2).select(
        "id",
        F.concat(F.lit("N"), F.col("id").cast("string"), F.lit("ZX")).alias("tailnum"),
        (F.col("id") * 1.5).alias("dep_delay"),
    )

    # Spark's own Parquet writer and reader.
    parquet = os.path.join(work, "parquet")
    spark_kms.write_parquet(source, parquet, table=f"{prefix}_p", column_keys="pii: tailnum")
    frame = spark_kms.read_parquet(spark, parquet)
    explain_all(frame.filter("id > 10"))
    print(sorted(frame.collect())[:3])

    # Delta Lake: write, read, rewrite.
    delta = os.path.join(work, "delta")
    spark_kms.write_delta(
        source,
        delta,
        table=f"{prefix}_d",
        column_keys="pii: tailnum",
        options={"delta.checkpointInterval": "2"},
    )
    table = spark_kms.read_delta(spark, delta)
    explain_all(table.groupBy("tailnum").count())
    print(table.count())
    with spark_kms.table_keys(spark, delta, table=f"{prefix}_d") as keys:
        print(keys)
        spark.sql(f"EXPLAIN EXTENDED DELETE FROM delta.`{delta}` WHERE tailnum = 'N7ZX'").show(
            truncate=False
        )
        spark.sql(f"DELETE FROM delta.`{delta}` WHERE tailnum = 'N7ZX'")
        spark.sql(f"UPDATE delta.`{delta}` SET dep_delay = 0 WHERE id < 5")
        spark.sql(f"OPTIMIZE delta.`{delta}`").collect()
        # The session configuration, as SET shows it.
        spark.sql("SET").show(1000, truncate=False)
        spark.sql(f"SET {bridge.KEKS}").show(truncate=False)
        # What the scan must be able to find: the KEKs as the bridge carries them.
        with (
            bridge._py4j_silenced(),
            open(os.path.join(work, "control.txt"), "w", encoding="utf-8") as handle,
        ):
            handle.write(spark.conf.get(bridge.KEKS) or "")

    # Rejected operations and their messages.
    print_error("plain append", lambda: source.write.mode("append").parquet(parquet))
    print_error(
        "plain Delta append", lambda: source.write.format("delta").mode("append").save(delta)
    )
    spark_kms.release_keys(spark)
    print_error("read without keys", lambda: spark.read.parquet(parquet).collect())
    with spark_kms.typed_errors():
        print_error("typed read without keys", lambda: spark.read.parquet(parquet).collect())

    # What the UI shows: the environment and the SQL executions with their plans.
    application = spark.sparkContext.applicationId
    api = f"{spark.sparkContext.uiWebUrl}/api/v1/applications/{application}"
    with open(os.path.join(work, "ui.json"), "w", encoding="utf-8") as handle:
        json.dump(
            {
                "environment": fetch(f"{api}/environment"),
                "sql": fetch(f"{api}/sql?details=true&planDescription=true"),
                "jobs": fetch(f"{api}/jobs"),
            },
            handle,
        )
    spark.stop()


if __name__ == "__main__":
    main(*sys.argv[1:5])
