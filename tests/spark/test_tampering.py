"""Tampered files and key records give an integrity error naming them, never wrong rows.

Each test writes a small table with the real token, changes one byte (or one
key id) on disk, and then reads through Spark and runs ``spark-kms verify``.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

import spark_kms
from spark_kms.errors import IntegrityError
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


def sample(spark: SparkSession, rows: int = 400, partitions: int = 2) -> DataFrame:
    return spark.range(rows, numPartitions=partitions).select(
        F.col("id"),
        F.concat(F.lit("N"), F.col("id").cast("string")).alias("tailnum"),
        (F.col("id") * 2).alias("double_id"),
    )


@pytest.fixture
def written(spark: SparkSession, key_service: KeyService, table_name: str, tmp_path: Path) -> Path:
    location = tmp_path / "t"
    spark_kms.write_table(
        sample(spark), str(location), table=table_name, column_keys="pii: tailnum"
    )
    assert len(data_files(location)) == 2
    return location


def read_all(spark: SparkSession, location: Path) -> list[tuple[int, str, int]]:
    with spark_kms.typed_errors():
        rows = spark_kms.read_table(spark, str(location)).collect()
    return [tuple(row) for row in rows]


def assert_read_names(spark: SparkSession, location: Path, name: str) -> None:
    with pytest.raises(IntegrityError, match=f"cannot decrypt .*{name}") as caught:
        read_all(spark, location)
    assert "Traceback" not in str(caught.value)


def assert_verify_names(key_service: KeyService, location: Path, name: str) -> None:
    report = verify_location(key_service, str(location))
    assert [p.name for p in report.problems] == [name]
    assert report.files_checked == 2


def test_untouched_table_verifies(
    spark: SparkSession, key_service: KeyService, written: Path
) -> None:
    report = verify_location(key_service, str(written))
    assert report.problems == []
    assert report.files_checked == 2
    assert report.rows == 400
    assert len(read_all(spark, written)) == 400


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_data_page_byte(
    spark: SparkSession, key_service: KeyService, written: Path, where: str
) -> None:
    victim = data_files(written)[0]
    column = file_metadata(victim, table_keks(key_service, written)).row_group(0).column(1)
    start = column.data_page_offset
    end = start + column.total_compressed_size
    offset = {
        "first": end - column.total_compressed_size // 3,
        "middle": (start + end) // 2,
        "last": end - 1,
    }[where]
    flip_byte(victim, offset)

    assert_read_names(spark, written, victim.name)
    assert_verify_names(key_service, written, victim.name)


def test_flipped_footer_byte(spark: SparkSession, key_service: KeyService, written: Path) -> None:
    victim = data_files(written)[1]
    start, length = footer_range(victim)
    flip_byte(victim, start + length - 20)

    assert_read_names(spark, written, victim.name)
    assert_verify_names(key_service, written, victim.name)


def test_flipped_wrapped_dek(spark: SparkSession, key_service: KeyService, written: Path) -> None:
    victim = data_files(written)[0]
    start, length = key_material_range(victim)
    material = json.loads(victim.read_bytes()[start : start + length])
    wrapped = base64.b64decode(material["wrappedDEK"])
    changed = bytes([wrapped[0], wrapped[1] ^ 0x01]) + wrapped[2:]
    replace_bytes(victim, material["wrappedDEK"].encode(), base64.b64encode(changed))

    assert_read_names(spark, written, victim.name)
    assert_verify_names(key_service, written, victim.name)


def test_footer_names_other_kek(
    spark: SparkSession, key_service: KeyService, written: Path, make_table_name
) -> None:  # type: ignore[no-untyped-def]
    # A footer that names the KEK of another job of the same table, of equal length.
    spark_kms.write_table(
        sample(spark, 10, 1),
        str(written),
        table=json.loads((written / "_spark_kms" / "table.json").read_text())["table"],
    )
    victim = data_files(written)[0]
    start, length = key_material_range(victim)
    own = json.loads(victim.read_bytes()[start : start + length])["masterKeyID"]
    other = next(
        k for k in table_keks(key_service, written) if k != own and k.split(".")[1] == "table"
    )
    replace_bytes(victim, f'"masterKeyID":"{own}"'.encode(), f'"masterKeyID":"{other}"'.encode())

    assert_read_names(spark, written, victim.name)
    report = verify_location(key_service, str(written))
    assert [p.name for p in report.problems] == [victim.name]


def test_plaintext_file_dropped_in(
    spark: SparkSession, key_service: KeyService, written: Path
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    planted = written / "part-99999-planted.parquet"
    pq.write_table(pa.table({"id": [1], "tailnum": ["x"], "double_id": [2]}), planted)

    report = verify_location(key_service, str(written))
    assert [p.name for p in report.problems] == [planted.name]
    assert "plaintext" in report.problems[0].problem
    assert_read_names(spark, written, planted.name)


def test_flipped_kek_record(spark: SparkSession, key_service: KeyService, written: Path) -> None:
    keks = written / "_spark_kms" / "keks"
    record_path = sorted(keks.glob("*.table.*.json"))[0]
    record = json.loads(record_path.read_text())
    wrapped = bytearray(base64.b64decode(record["wrapped_kek"]))
    wrapped[20] ^= 0x01
    record["wrapped_kek"] = base64.b64encode(bytes(wrapped)).decode()
    record_path.write_text(json.dumps(record))
    kek_id = record["kek_id"]

    with pytest.raises(IntegrityError, match=f"KEK record {kek_id} .* failed authentication"):
        read_all(spark, written)
    report = verify_location(key_service, str(written))
    names = [p.name for p in report.problems]
    assert names[0] == f"_spark_kms/keks/{kek_id}.json"
    assert sorted(names[1:]) == [f.name for f in data_files(written)]


def test_kek_record_moved_to_other_id(
    spark: SparkSession, key_service: KeyService, written: Path
) -> None:
    keks = written / "_spark_kms" / "keks"
    table_record, pii_record = (
        sorted(keks.glob("*.table.*.json"))[0],
        sorted(keks.glob("*.pii.*.json"))[0],
    )
    # Swap the wrapped values of two records: each is authentic, but bound to the other id.
    first, second = json.loads(table_record.read_text()), json.loads(pii_record.read_text())
    first["wrapped_kek"], second["wrapped_kek"] = second["wrapped_kek"], first["wrapped_kek"]
    table_record.write_text(json.dumps(first))
    pii_record.write_text(json.dumps(second))

    with pytest.raises(IntegrityError, match="KEK record .* failed authentication"):
        read_all(spark, written)


def test_damaged_stored_schema(spark: SparkSession, written: Path) -> None:
    path = written / "_spark_kms" / "table.json"
    meta = json.loads(path.read_text())
    meta["spark_schema"] = '{"type": "struct", "fields": [1]}'
    path.write_text(json.dumps(meta))

    with pytest.raises(
        IntegrityError, match=f"schema stored in the keyring of table '{meta['table']}'"
    ):
        read_all(spark, written)


@pytest.mark.parametrize("damage", ["brace", "quote"])
def test_invalid_key_metadata_hides_dek(spark: SparkSession, written: Path, damage: str) -> None:
    victim = data_files(written)[0]
    wrapped = damage_key_material(victim, damage)

    with pytest.raises(Exception, match=victim.name) as caught:
        with spark_kms.typed_errors():
            spark_kms.read_table(spark, str(written)).collect()
    message = f"{caught.value}\n{caught.value!r}"
    assert "key metadata of the file is invalid" in message
    assert wrapped not in message
    assert find_secrets(message, [base64.b64decode(wrapped)]) == []
