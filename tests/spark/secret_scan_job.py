"""A Spark job that exercises every output channel, for the secret scan test.

Run as a script: `secret_scan_job.py PROPERTIES EVENT_LOG_DIR WORK_DIR TABLE`.
It logs at DEBUG on the driver and in the Python workers, writes and reads an
encrypted table, prints plans, reprs and error messages, and erases a second
table. The test then scans everything it printed for secrets.
"""

from __future__ import annotations

import logging
import os
import sys

os.environ["SPARK_KMS_LOG_LEVEL"] = "DEBUG"

from pyspark.sql import SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

import spark_kms  # noqa: E402
from spark_kms.datasource import data_source_class  # noqa: E402
from spark_kms.settings import KmsSettings  # noqa: E402


def main(properties: str, event_log: str, work: str, table: str) -> None:
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    settings = KmsSettings.from_file(properties)
    spark = (
        SparkSession.builder.master("local[2]")
        .config("spark.ui.enabled", "false")
        .config("spark.eventLog.enabled", "true")
        .config("spark.eventLog.dir", event_log)
        .config("spark.eventLog.compress", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("DEBUG")
    service = spark_kms.configure(spark, settings)
    print(repr(service))

    location = os.path.join(work, "table")
    source = spark.range(500, numPartitions=3).select(
        "id", F.concat(F.lit("N"), F.col("id").cast("string")).alias("tailnum")
    )
    writer = (
        source.write.format("kms_parquet")
        .option("kms.table", table)
        .option("kms.column_keys", "pii: tailnum")
    )
    writer.mode("append").save(location)

    frame = spark.read.format("kms_parquet").load(location)
    frame.explain(extended=True)
    print(frame.filter("id > 10")._jdf.queryExecution().toString())
    print(sorted(frame.collect())[:3])

    # Reprs of the objects that carry keys to the tasks.
    data_source = data_source_class(settings)({"path": location})
    reader = data_source.reader(frame.schema)
    print(repr(reader), [repr(p) for p in reader.partitions()])
    job_writer = data_source_class(settings)({"path": location, "kms.table": table}).writer(
        source.schema, False
    )
    print(repr(job_writer), repr(job_writer.plan), str(job_writer.plan.keys))
    job_writer.abort([])

    # Error messages: an erased table, and a bad projection.
    erased = os.path.join(work, "erased")
    source.write.format("kms_parquet").option("kms.table", table + "_erased").mode("append").save(
        erased
    )
    spark_kms.erase_table(spark, table + "_erased")
    for action in (
        lambda: spark.read.format("kms_parquet").load(erased).collect(),
        lambda: spark.read.format("kms_parquet").schema("nope int").load(location).collect(),
    ):
        try:
            with spark_kms.typed_errors():
                action()
        except Exception as error:  # noqa: BLE001 (printed for the scan)
            print(f"{type(error).__name__}: {error}")
            print(repr(error))
            print(f"cause: {error.__cause__}")
    spark.stop()


if __name__ == "__main__":
    main(*sys.argv[1:5])
