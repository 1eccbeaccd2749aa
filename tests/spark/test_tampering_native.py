"""Tampered files of tables written by Spark's own Parquet writer through the JVM bridge.

Spark's reader (parquet-mr) reports the failure; the test checks that it
names the file and that no row comes back. A file changed in one byte must
never read as other values.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

import spark_kms
from spark_kms.keyservice import KeyService
from spark_kms.verify import verify_location
from tests.helpers.secrets import find_secrets
from tests.helpers.tables import (
    damage_key_material,
    data_files,
    file_metadata,
    flip_byte,
    footer_range,
    key_material_range,
    replace_bytes,
    table_keks,
)


def sample(spark: SparkSession) -> DataFrame:
    return spark.range(400, numPartitions=2).select(
        F.col("id"),
        F.concat(F.lit("N"), F.col("id").cast("string")).alias("tailnum"),
        (F.col("id") * 2).alias("double_id"),
    )


@pytest.fixture
def written(spark: SparkSession, table_name: str, tmp_path: Path) -> Path:
    location = tmp_path / "t"
    spark_kms.write_parquet(
        sample(spark), str(location), table=table_name, column_keys="pii: tailnum"
    )
    assert len(data_files(location)) == 2
    # Later reads must unwrap the keys again, as a new session would.
    spark_kms.release_keys(spark, str(location))
    return location


def assert_read_fails_naming(spark: SparkSession, location: Path, name: str) -> None:
    rows: list[object] = []
    with pytest.raises(Exception, match=name) as caught:
        with spark_kms.typed_errors():
            rows.extend(spark_kms.read_parquet(spark, str(location)).collect())
    assert rows == []
    assert "PARE" not in type(caught.value).__name__


def test_native_data_page_flip(spark: SparkSession, key_service: KeyService, written: Path) -> None:
    victim = data_files(written)[0]
    column = file_metadata(victim, table_keks(key_service, written)).row_group(0).column(1)
    flip_byte(victim, column.data_page_offset + column.total_compressed_size - 1)

    assert_read_fails_naming(spark, written, victim.name)
    assert [p.name for p in verify_location(key_service, str(written)).problems] == [victim.name]


def test_native_footer_flip(spark: SparkSession, key_service: KeyService, written: Path) -> None:
    victim = data_files(written)[1]
    start, length = footer_range(victim)
    flip_byte(victim, start + length - 20)

    assert_read_fails_naming(spark, written, victim.name)
    assert [p.name for p in verify_location(key_service, str(written)).problems] == [victim.name]


def test_native_wrapped_dek_flip(
    spark: SparkSession, key_service: KeyService, written: Path
) -> None:
    victim = data_files(written)[0]
    start, length = key_material_range(victim)
    material = json.loads(victim.read_bytes()[start : start + length])
    wrapped = base64.b64decode(material["wrappedDEK"])
    changed = bytes([wrapped[0], wrapped[1] ^ 0x01]) + wrapped[2:]
    replace_bytes(victim, material["wrappedDEK"].encode(), base64.b64encode(changed))

    assert_read_fails_naming(spark, written, victim.name)
    assert [p.name for p in verify_location(key_service, str(written)).problems] == [victim.name]


def test_native_plaintext_file_planted(
    spark: SparkSession, key_service: KeyService, written: Path
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    planted = written / "part-99999-planted.parquet"
    pq.write_table(pa.table({"id": [1], "tailnum": ["x"], "double_id": [2]}), planted)

    assert_read_fails_naming(spark, written, planted.name)
    problems = verify_location(key_service, str(written)).problems
    assert [p.name for p in problems] == [planted.name]


@pytest.mark.parametrize("damage", ["brace", "quote"])
def test_native_invalid_key_metadata_hides_dek(spark: SparkSession, written: Path, damage: str) -> None:
    victim = data_files(written)[0]
    wrapped = damage_key_material(victim, damage)

    with pytest.raises(Exception, match=victim.name) as caught:
        with spark_kms.typed_errors():
            spark_kms.read_parquet(spark, str(written)).collect()
    message = f"{caught.value}\n{caught.value!r}"
    assert "key metadata of the file is invalid" in message
    assert wrapped not in message
    assert find_secrets(message, [base64.b64decode(wrapped)]) == []
