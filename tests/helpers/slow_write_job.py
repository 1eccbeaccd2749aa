"""A driver that starts an append to a kms_parquet table and then stalls in one task.

Run as ``python -m tests.helpers.slow_write_job PROPERTIES LOCATION TABLE``. The task writes
The job has two tasks: the first stages its file and finishes, the second
sleeps, so a test can kill this driver after the KEK record is persisted and a
file is staged, and before the commit.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import pyarrow as pa
from pyspark import TaskContext
from pyspark.sql import SparkSession

import spark_kms
from spark_kms.settings import KmsSettings


def stall_second_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    context = TaskContext.get()
    if context is not None and context.partitionId() == 1:
        time.sleep(600)
    yield from batches


def main(properties: str, location: str, table: str) -> None:
    spark = (
        SparkSession.builder.master("local[2]")
        .appName("spark_kms slow write")
        .config("spark.ui.enabled", "false")
        .getOrCreate()
    )
    spark_kms.configure(spark, KmsSettings.from_file(properties))
    df = spark.range(0, 50, numPartitions=2).selectExpr("id", "concat('N', id) AS tailnum")
    df = df.mapInArrow(stall_second_partition, df.schema)
    spark_kms.write_table(df, location, table=table)


if __name__ == "__main__":
    main(*sys.argv[1:4])
