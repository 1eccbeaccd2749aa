"""Delta Lake tables encrypted through the JVM bridge: real delta-spark, Spark and SoftHSM2."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from chispa import assert_df_equality
from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

import spark_kms
from spark_kms import delta_lake
from spark_kms.errors import (
    ConfigurationError,
    InvalidOptionError,
    TableErasedError,
    TableNotFoundError,
)
from spark_kms.keyring import KeyringStore
from spark_kms.keyservice import KeyService
from spark_kms.settings import KmsSettings
from tests.helpers.native import (
    decrypted_text,
    flights_sample,
    kek_ids_used,
    magic_of,
    parquet_files,
    plaintext_parquet_text,
    table_keks,
)

SAFE_STATISTICS = {"numRecords", "tightBounds"}


@pytest.fixture(scope="module")
def flights(spark: SparkSession) -> Iterator[DataFrame]:
    # Delta replays its log in 50 tasks by default; two suffice for these tables.
    spark.conf.set("spark.databricks.delta.snapshotPartitions", "2")
    yield flights_sample(spark).cache()
    spark.conf.unset("spark.databricks.delta.snapshotPartitions")


def assert_all_encrypted(location: Path) -> None:
    files = parquet_files(location)
    assert files, f"no Parquet file under {location}"
    for file in files:
        assert magic_of(file) == (b"PARE", b"PARE"), f"{file} is not encrypted"


def delta_version(spark: SparkSession, location: Path) -> int:
    row = DeltaTable.forPath(spark, str(location)).history(1).first()
    assert row is not None
    return int(row["version"])


def log_actions(location: Path) -> list[dict[str, object]]:
    """Return every action of the table's JSON commit files."""
    actions = []
    for commit in sorted((location / "_delta_log").glob("*.json")):
        actions += [json.loads(line) for line in commit.read_text().splitlines() if line]
    return actions


def test_delta_round_trip_encrypted(
    spark: SparkSession,
    flights: DataFrame,
    key_service: KeyService,
    table_name: str,
    tmp_path: Path,
) -> None:
    location = tmp_path / "flights_delta"
    first, second = flights.filter("day <= 3"), flights.filter("day > 3")
    spark_kms.write_delta(
        first,
        str(location),
        table=table_name,
        column_keys="pii: tailnum",
        mode="overwrite",
        options={"delta.checkpointInterval": "2"},
    )
    spark_kms.write_delta(second, str(location), table=table_name)

    back = spark_kms.read_delta(spark, str(location))

    assert_df_equality(flights, back, ignore_row_order=True, ignore_nullable=True)
    assert_all_encrypted(location)
    checkpoints = list((location / "_delta_log").glob("*.checkpoint.parquet"))
    assert checkpoints
    keks = table_keks(key_service, location)
    log_keks = {k for k in keks if k.startswith(f"{table_name}.delta_log.")}
    assert len(log_keks) == 1
    assert kek_ids_used(checkpoints[0], keks) == log_keks
    data_file = next(p for p in parquet_files(location) if "_delta_log" not in p.parts)
    used = kek_ids_used(data_file, keks)
    assert {k.split(".")[1] for k in used} == {"pii", "table"}


def test_delta_relative_path_after_chdir(
    spark: SparkSession, flights: DataFrame, table_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The JVM keeps its own working folder, so Spark must get the absolute location.
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    small = flights.limit(40)
    spark_kms.write_delta(small, "relative_delta", table=table_name, mode="overwrite")

    assert_all_encrypted(tmp_path / "work" / "relative_delta")
    back = spark_kms.read_delta(spark, "relative_delta")
    assert_df_equality(small, back, ignore_row_order=True, ignore_nullable=True)


def test_delta_rewrites_stay_encrypted(
    spark: SparkSession, flights: DataFrame, table_name: str, tmp_path: Path
) -> None:
    location = tmp_path / "rewritten"
    path = str(location)
    spark_kms.write_delta(flights, path, table=table_name, column_keys="pii: tailnum")
    victim = flights.orderBy("id").first()
    assert victim is not None
    expected = flights

    with spark_kms.table_keys(spark, path, table=table_name) as keys:
        assert set(keys.write_kek_ids) == {"pii", "table"}
        table = DeltaTable.forPath(spark, path)

        spark.sql(f"OPTIMIZE delta.`{path}`").collect()
        assert_df_equality(expected, table.toDF(), ignore_row_order=True, ignore_nullable=True)
        assert_all_encrypted(location)

        table.delete(F.col("tailnum") == victim["tailnum"])
        expected = expected.filter(
            (F.col("tailnum") != victim["tailnum"]) | F.col("tailnum").isNull()
        )
        assert_df_equality(expected, table.toDF(), ignore_row_order=True, ignore_nullable=True)
        assert_all_encrypted(location)

        table.update(F.col("flight") == 1545, {"dest": F.lit("ZZZ")})
        expected = expected.withColumn(
            "dest", F.when(F.col("flight") == 1545, "ZZZ").otherwise(F.col("dest"))
        )
        assert_df_equality(expected, table.toDF(), ignore_row_order=True, ignore_nullable=True)
        assert_all_encrypted(location)

        changes = (
            flights.filter("id < 100 or id >= 5990")
            .withColumn(
                "id", F.when(F.col("id") < 100, F.col("id")).otherwise(F.col("id") + 100_000)
            )
            .withColumn("arr_delay", F.lit(-1.0))
        )
        (
            table.alias("t")
            .merge(changes.alias("s"), "t.id = s.id")
            .whenMatchedUpdate(set={"arr_delay": "s.arr_delay"})
            .whenNotMatchedInsertAll()
            .execute()
        )
        # Rows the DELETE removed are inserted again, as are the new ids.
        present = [r["id"] for r in expected.select("id").collect()]
        expected = expected.withColumn(
            "arr_delay", F.when(F.col("id") < 100, -1.0).otherwise(F.col("arr_delay"))
        ).unionByName(changes.filter(~F.col("id").isin(present)))
        assert_df_equality(expected, table.toDF(), ignore_row_order=True, ignore_nullable=True)
        assert_all_encrypted(location)

    back = spark_kms.read_delta(spark, path)
    assert_df_equality(expected, back, ignore_row_order=True, ignore_nullable=True)
    operations = [a["commitInfo"]["operation"] for a in log_actions(location) if "commitInfo" in a]  # type: ignore[index]
    assert {"OPTIMIZE", "DELETE", "UPDATE", "MERGE"} <= set(operations)


def scan_delta_log(location: Path, keks: dict[str, bytes]) -> str:
    """Return the whole ``_delta_log`` as text, checkpoints decrypted with ``keks``."""
    parts = []
    for file in sorted((location / "_delta_log").rglob("*")):
        if not file.is_file():
            continue
        if file.name.endswith(".parquet"):
            parts.append(decrypted_text(file, keks) if keks else plaintext_parquet_text(file))
        else:
            parts.append(file.read_text(errors="replace"))
    return "\n".join(parts)


def statistics_names(text_of_actions: list[dict[str, object]]) -> set[str]:
    names: set[str] = set()
    for action in text_of_actions:
        add = action.get("add")
        if isinstance(add, dict) and add.get("stats"):
            names.update(json.loads(add["stats"]))
    return names


def test_delta_log_holds_no_column_values(
    spark: SparkSession,
    flights: DataFrame,
    key_service: KeyService,
    table_name: str,
    tmp_path: Path,
) -> None:
    location = tmp_path / "scanned"
    path = str(location)
    tailnums = sorted({r["tailnum"] for r in flights.select("tailnum").collect() if r["tailnum"]})
    assert len(tailnums) > 1000
    spark_kms.write_delta(
        flights,
        path,
        table=table_name,
        column_keys="pii: tailnum",
        options={"delta.checkpointInterval": "2"},
    )
    with spark_kms.table_keys(spark, path, table=table_name):
        table = DeltaTable.forPath(spark, path)
        table.delete(f"tailnum = '{tailnums[0]}'")
        table.update(f"tailnum = '{tailnums[1]}'", {"dest": "'ZZZ'"})
        (
            table.alias("t")
            .merge(
                flights.filter("id < 10").alias("s"),
                f"t.id = s.id AND s.tailnum <> '{tailnums[2]}'",
            )
            .whenMatchedUpdateAll()
            .execute()
        )
        spark.sql(f"DELETE FROM delta.`{path}` WHERE tailnum IN ('{tailnums[3]}', '{tailnums[4]}')")

    text = scan_delta_log(location, table_keks(key_service, location))

    assert list((location / "_delta_log").glob("*.checkpoint.parquet"))
    leaked = [value for value in tailnums if value in text]
    assert leaked == []
    assert "[redacted by spark_kms]" in text
    actions = log_actions(location)
    names = statistics_names(actions)
    assert names <= SAFE_STATISTICS
    assert "numRecords" in names
    configurations = [a["metaData"]["configuration"] for a in actions if "metaData" in a]  # type: ignore[index]
    assert configurations
    for configuration in configurations:
        assert configuration["delta.dataSkippingNumIndexedCols"] == "0"  # type: ignore[index]
    assert configurations[-1]["spark_kms.column_keys"] == "pii: tailnum"  # type: ignore[index]

    # The same scan finds the values in a Delta table written without spark_kms.
    plain = tmp_path / "plain"
    flights.write.format("delta").save(str(plain))
    plain_text = scan_delta_log(plain, {})
    assert [value for value in tailnums if value in plain_text]
    assert {"minValues", "maxValues"} <= statistics_names(log_actions(plain))


def write_properties(settings: KmsSettings, path: Path) -> Path:
    path.write_text("".join(f"{k} {v}\n" for k, v in settings.to_properties().items()))
    return path


def test_delta_erasure_with_cli(
    spark: SparkSession,
    flights: DataFrame,
    kms_settings: KmsSettings,
    table_name: str,
    tmp_path: Path,
) -> None:
    location = str(tmp_path / "to_erase")
    spark_kms.write_delta(
        flights.limit(100), location, table=table_name, column_keys="pii: tailnum"
    )
    earlier = spark_kms.read_delta(spark, location)
    assert earlier.count() == 100
    properties = write_properties(kms_settings, tmp_path / "spark-kms.conf")

    erased = subprocess.run(
        [
            str(Path(sys.executable).parent / "spark-kms"),
            "--conf-file",
            str(properties),
            "erase",
            table_name,
            "--yes",
        ],
        capture_output=True,
        text=True,
        check=False,
    )

    assert erased.returncode == 0, erased.stderr
    with pytest.raises(TableErasedError, match=f"table '{table_name}' was crypto-erased") as raised:
        spark_kms.read_delta(spark, location)
    assert raised.value.table == table_name
    # The session still has the KEKs it loaded before; the bridge rejects the files anyway.
    # (A count() would not open them: Delta answers it from the row counts in its log.)
    with pytest.raises(TableErasedError, match=f"table '{table_name}' was crypto-erased") as raised:
        with spark_kms.typed_errors():
            earlier.collect()
    assert raised.value.table == table_name
    spark_kms.release_keys(spark, location)


def test_delta_write_without_keys_rejected(
    spark: SparkSession, flights: DataFrame, table_name: str, tmp_path: Path
) -> None:
    location = tmp_path / "guarded"
    spark_kms.write_delta(flights.limit(100), str(location), table=table_name)
    version = delta_version(spark, location)
    files = parquet_files(location)

    with pytest.raises(ConfigurationError, match="no write keys for it"):
        with spark_kms.typed_errors():
            flights.limit(10).write.format("delta").mode("append").save(str(location))

    assert delta_version(spark, location) == version
    assert parquet_files(location) == files


def test_delta_table_without_properties_rejected(
    spark: SparkSession, flights: DataFrame, table_name: str, tmp_path: Path
) -> None:
    location = tmp_path / "bare"

    with spark_kms.table_keys(spark, str(location), table=table_name):
        with pytest.raises(ConfigurationError, match="rejected Delta commit"):
            with spark_kms.typed_errors():
                flights.limit(10).write.format("delta").save(str(location))

    assert not list((location / "_delta_log").glob("*.json"))


def test_plaintext_delta_table_not_adopted(
    spark: SparkSession, flights: DataFrame, table_name: str, tmp_path: Path
) -> None:
    location = str(tmp_path / "plain")
    flights.limit(10).write.format("delta").save(location)

    with pytest.raises(InvalidOptionError, match="spark_kms did not create"):
        spark_kms.write_delta(flights.limit(10), location, table=table_name)


def test_delta_keeps_column_keys(
    spark: SparkSession,
    flights: DataFrame,
    key_service: KeyService,
    table_name: str,
    tmp_path: Path,
) -> None:
    location = tmp_path / "layout"
    spark_kms.write_delta(
        flights.limit(10), str(location), table=table_name, column_keys="pii: tailnum"
    )
    before = set(parquet_files(location))

    spark_kms.write_delta(flights.limit(10), str(location), table=table_name)

    keks = table_keks(key_service, location)
    for file in set(parquet_files(location)) - before:
        groups = {k.split(".")[1] for k in kek_ids_used(file, keks)}
        assert groups == {"pii", "table"}
    with pytest.raises(InvalidOptionError, match="keeps its columns under the column keys"):
        spark_kms.write_delta(
            flights.limit(10), str(location), table=table_name, column_keys="pii: dest"
        )


def test_delta_partitions(
    spark: SparkSession, flights: DataFrame, table_name: str, tmp_path: Path
) -> None:
    location = tmp_path / "partitioned"

    with pytest.raises(InvalidOptionError, match="cannot be partition columns"):
        spark_kms.write_delta(
            flights,
            str(location),
            table=table_name,
            column_keys="pii: tailnum",
            partition_by=["tailnum"],
        )
    spark_kms.write_delta(
        flights,
        str(location),
        table=table_name,
        column_keys="pii: tailnum",
        partition_by=["origin"],
    )

    assert sorted(p.name for p in location.glob("origin=*")) == [
        "origin=EWR",
        "origin=JFK",
        "origin=LGA",
    ]
    assert_all_encrypted(location)
    back = spark_kms.read_delta(spark, str(location))
    assert_df_equality(
        flights, back.select(*flights.columns), ignore_row_order=True, ignore_nullable=True
    )


def test_delta_on_parquet_table_rejected(
    spark: SparkSession, flights: DataFrame, table_name: str, tmp_path: Path
) -> None:
    location = str(tmp_path / "parquet")
    spark_kms.write_parquet(flights.limit(10), location, table=table_name)

    with pytest.raises(InvalidOptionError, match="Delta would ignore them"):
        spark_kms.write_delta(flights.limit(10), location, table=table_name)
    with pytest.raises(TableNotFoundError, match="but no Delta log"):
        spark_kms.read_delta(spark, location)


def unwrapped_kek_ids(key_service: KeyService, table: str) -> list[str]:
    """Return the KEK ids of every successful unwrap of ``table`` in the audit log, in order."""
    ids: list[str] = []
    for record in key_service.audit.records():
        if record.get("table") == table and record.get("operation") == "unwrap_kek":
            if record.get("outcome") == "ok":
                ids += list(record.get("kek_ids") or [])
    return ids


def test_delta_read_unwraps_current_keks(
    spark: SparkSession,
    flights: DataFrame,
    key_service: KeyService,
    table_name: str,
    tmp_path: Path,
) -> None:
    location = str(tmp_path / "versions")
    spark_kms.write_delta(
        flights.limit(100), location, table=table_name, column_keys="pii: tailnum"
    )
    spark_kms.write_delta(flights.limit(50), location, table=table_name, mode="overwrite")
    records = sorted(delta_lake.job_records(KeyringStore(location)), key=lambda r: r.committed_at)
    assert len(records) == 2
    assert records[0].files
    assert records[1].files
    assert set(records[0].files).isdisjoint(records[1].files)
    seen = len(unwrapped_kek_ids(key_service, table_name))

    current = spark_kms.read_delta(spark, location)

    assert len(current.collect()) == 50
    unwrapped = unwrapped_kek_ids(key_service, table_name)[seen:]
    assert sorted(unwrapped) == sorted(
        [k for k in records[-1].kek_ids] + [f"{table_name}.delta_log.k{records[0].job_id}"]
    )
    spark_kms.release_keys(spark, location)

    first = spark_kms.read_delta(spark, location, options={"versionAsOf": "0"})

    assert len(first.collect()) == 100


def test_delta_delete_without_write_keys_rejected(
    spark: SparkSession, flights: DataFrame, table_name: str, tmp_path: Path
) -> None:
    location = tmp_path / "read_only"
    spark_kms.write_delta(flights.limit(100), str(location), table=table_name)
    spark_kms.read_delta(spark, str(location))
    version = delta_version(spark, location)

    # The read loaded the KEKs, but no write keys: the rewritten file is rejected.
    with pytest.raises(ConfigurationError, match="no write keys for it"):
        with spark_kms.typed_errors():
            DeltaTable.forPath(spark, str(location)).delete("id < 10")

    assert delta_version(spark, location) == version
    spark_kms.release_keys(spark, str(location))


def test_delta_property_change_rejected(
    spark: SparkSession, flights: DataFrame, table_name: str, tmp_path: Path
) -> None:
    location = tmp_path / "altered"
    spark_kms.write_delta(flights.limit(10), str(location), table=table_name)
    version = delta_version(spark, location)

    with spark_kms.table_keys(spark, str(location), table=table_name):
        with pytest.raises(ConfigurationError, match="would let _delta_log keep column statistics"):
            with spark_kms.typed_errors():
                spark.sql(
                    f"ALTER TABLE delta.`{location}` "
                    "SET TBLPROPERTIES ('delta.dataSkippingNumIndexedCols' = '32')"
                )

    assert delta_version(spark, location) == version
