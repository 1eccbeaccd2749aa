"""A driver that appends rows to a kms_parquet table once a start file exists.

``python -m tests.helpers.append_job PROPERTIES LOCATION TABLE START COUNT GO_FILE``:
the session starts first, then the job waits for GO_FILE so that two such
drivers append at the same moment.
"""

from __future__ import annotations

import os
import sys
import time

from pyspark.sql import SparkSession

import spark_kms
from spark_kms.settings import KmsSettings


def main(properties: str, location: str, table: str, start: str, count: str, go_file: str) -> None:
    spark = (
        SparkSession.builder.master("local[1]")
        .appName("spark_kms append")
        .config("spark.ui.enabled", "false")
        .getOrCreate()
    )
    spark_kms.configure(spark, KmsSettings.from_file(properties))
    df = spark.range(int(start), int(start) + int(count), numPartitions=2).selectExpr(
        "id", "concat('N', id) AS tailnum"
    )
    print("ready", flush=True)
    deadline = time.monotonic() + 120
    while not os.path.exists(go_file) and time.monotonic() < deadline:
        time.sleep(0.05)
    spark_kms.write_table(df, location, table=table)
    print("committed", flush=True)
    spark.stop()


if __name__ == "__main__":
    main(*sys.argv[1:7])
