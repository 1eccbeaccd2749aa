"""Spark's own Parquet writer and reader through the JVM bridge, with the real SoftHSM2 token."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from chispa import assert_df_equality
from py4j.protocol import Py4JJavaError
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

import spark_kms
from spark_kms import bridge
from spark_kms.errors import (
    ConfigurationError,
    InvalidOptionError,
    KeyNotFoundError,
    TableErasedError,
)
from spark_kms.keyring import STAGING_DIR, KeyringStore
from spark_kms.keyservice import KeyService
from spark_kms.localwrap import unwrap_key_locally
from tests.helpers.native import (
    flights_sample,
    kek_ids_used,
    magic_of,
    parquet_files,
    table_keks,
)

VECTORS = Path(__file__).resolve().parent.parent / "data" / "parquet-local-wrap.json"


@pytest.fixture(scope="module")
def flights(spark: SparkSession) -> DataFrame:
    return flights_sample(spark).cache()


def test_parquet_round_trip_with_column_key(
    spark: SparkSession,
    flights: DataFrame,
    key_service: KeyService,
    table_name: str,
    tmp_path: Path,
) -> None:
    location = tmp_path / "flights"
    spark_kms.write_parquet(flights, str(location), table=table_name, column_keys="pii: tailnum")

    back = spark_kms.read_parquet(spark, str(location))
    assert_df_equality(flights, back, ignore_row_order=True, ignore_nullable=True)

    files = parquet_files(location)
    assert len(files) == 3
    keks = table_keks(key_service, location)
    pii = [k for k in keks if k.startswith(f"{table_name}.pii.")]
    footer = [k for k in keks if k.startswith(f"{table_name}.table.")]
    assert len(pii) == 1
    assert len(footer) == 1
    for file in files:
        assert magic_of(file) == (b"PARE", b"PARE")
        assert b"N14228" not in file.read_bytes()
        # Read by a client written from the format's definition, not by spark_kms.
        assert kek_ids_used(file, keks) == {pii[0], footer[0]}


def test_kms_parquet_table_reads_natively(
    spark: SparkSession, flights: DataFrame, table_name: str, tmp_path: Path
) -> None:
    location = tmp_path / "written-by-pyarrow"
    spark_kms.write_table(flights, str(location), table=table_name, column_keys="pii: tailnum")

    back = spark_kms.read_parquet(spark, str(location))

    assert_df_equality(flights, back, ignore_row_order=True, ignore_nullable=True)


def test_native_files_read_by_kms_parquet(
    spark: SparkSession, flights: DataFrame, table_name: str, tmp_path: Path
) -> None:
    location = tmp_path / "written-by-spark"
    spark_kms.write_parquet(flights, str(location), table=table_name, column_keys="pii: tailnum")
    spark_kms.release_keys(spark, str(location))

    back = spark_kms.read_table(spark, str(location))

    with spark_kms.typed_errors():
        assert_df_equality(flights, back, ignore_row_order=True, ignore_nullable=True)


def test_both_paths_in_one_table(
    spark: SparkSession, flights: DataFrame, table_name: str, tmp_path: Path
) -> None:
    location = str(tmp_path / "mixed")
    first = flights.filter(F.col("month") == 1)
    spark_kms.write_table(first.limit(1000), location, table=table_name)
    spark_kms.write_parquet(first.limit(500), location, table=table_name)
    expected = first.limit(1000).unionByName(first.limit(500))

    by_spark = spark_kms.read_parquet(spark, location)
    by_pyarrow = spark_kms.read_table(spark, location)

    assert_df_equality(expected, by_spark, ignore_row_order=True, ignore_nullable=True)
    with spark_kms.typed_errors():
        assert_df_equality(expected, by_pyarrow, ignore_row_order=True, ignore_nullable=True)


def test_parquet_overwrite_keeps_keyring(
    spark: SparkSession, flights: DataFrame, table_name: str, tmp_path: Path
) -> None:
    location = tmp_path / "overwritten"
    spark_kms.write_parquet(flights, str(location), table=table_name)
    old_files = set(parquet_files(location))
    smaller = flights.limit(100)

    spark_kms.write_parquet(smaller, str(location), table=table_name, mode="overwrite")

    assert (location / "_spark_kms" / "table.json").is_file()
    assert not old_files & set(parquet_files(location))
    back = spark_kms.read_parquet(spark, str(location))
    assert_df_equality(smaller, back, ignore_row_order=True, ignore_nullable=True)


def test_parquet_overwrite_skips_undeleted_files(
    spark: SparkSession, flights: DataFrame, table_name: str, tmp_path: Path
) -> None:
    location = tmp_path / "overwritten"
    spark_kms.write_parquet(flights, str(location), table=table_name)
    old_files = {f.name: f.read_bytes() for f in parquet_files(location)}
    smaller = flights.limit(100)
    spark_kms.write_parquet(smaller, str(location), table=table_name, mode="overwrite")
    # As if deleting the replaced files had failed: put them back.
    for name, data in old_files.items():
        (location / name).write_bytes(data)

    back = spark_kms.read_parquet(spark, str(location))
    assert back.count() == 100
    assert_df_equality(smaller, back, ignore_row_order=True, ignore_nullable=True)
    by_kms_parquet = spark_kms.read_table(spark, str(location))
    assert by_kms_parquet.count() == 100


def test_parquet_relative_path_after_chdir(
    spark: SparkSession, flights: DataFrame, table_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The JVM keeps its own working folder, so Spark and pyarrow would resolve
    # a relative path to different folders without the absolute location.
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    small = flights.limit(50)
    spark_kms.write_parquet(small, "relative", table=table_name)

    files = parquet_files(tmp_path / "work" / "relative")
    assert len(files) >= 1
    assert all(magic_of(f) == (b"PARE", b"PARE") for f in files)
    back = spark_kms.read_parquet(spark, "relative")
    assert_df_equality(small, back, ignore_row_order=True, ignore_nullable=True)
    spark_kms.write_parquet(small, f"file:{tmp_path}/work/relative", table=table_name, mode="overwrite")
    assert spark_kms.read_parquet(spark, "relative").count() == 50


def test_parquet_append_keeps_column_keys(
    spark: SparkSession, flights: DataFrame, table_name: str, tmp_path: Path
) -> None:
    location = str(tmp_path / "keys")
    small = flights.limit(20)
    spark_kms.write_parquet(small, location, table=table_name, column_keys="pii: tailnum")
    spark_kms.write_parquet(small, location, table=table_name, mode="append")

    with pytest.raises(InvalidOptionError, match="with other column keys: its files keep column_keys 'pii: tailnum'"):
        spark_kms.write_parquet(small, location, table=table_name, column_keys="other: origin", mode="append")
    layouts = [r.column_keys for r in KeyringStore(location).list_commit_records()]
    assert layouts == [{"pii": ["tailnum"]}, {"pii": ["tailnum"]}]
    assert spark_kms.read_parquet(spark, location).count() == 40


def test_append_with_other_schema_rejected(
    spark: SparkSession, flights: DataFrame, table_name: str, tmp_path: Path
) -> None:
    location = str(tmp_path / "schema")
    spark_kms.write_parquet(flights.limit(10), location, table=table_name)

    with pytest.raises(InvalidOptionError, match="differs from the table schema"):
        spark_kms.write_parquet(flights.select("tailnum"), location, table=table_name)


def test_plain_writes_into_table_rejected(
    spark: SparkSession, flights: DataFrame, table_name: str, tmp_path: Path
) -> None:
    location = tmp_path / "guarded"
    spark_kms.write_parquet(flights.limit(100), str(location), table=table_name)
    before = sorted(p.name for p in location.iterdir())
    rows = flights.limit(10)

    with pytest.raises(ConfigurationError, match="no write keys for the table"):
        with spark_kms.typed_errors():
            rows.write.mode("append").parquet(str(location))
    with pytest.raises(ConfigurationError, match="deletes the folder with the table's keyring"):
        with spark_kms.typed_errors():
            rows.write.mode("overwrite").parquet(str(location))
    with pytest.raises(ConfigurationError, match="files would be plaintext"):
        with spark_kms.typed_errors():
            rows.write.mode("append").json(str(location))

    assert sorted(p.name for p in location.iterdir()) == before
    assert (location / "_spark_kms" / "table.json").is_file()


def test_write_keys_stay_with_their_table(
    spark: SparkSession,
    flights: DataFrame,
    make_table_name: Callable[[str], str],
    tmp_path: Path,
) -> None:
    first, second = make_table_name("_a"), make_table_name("_b")
    other = tmp_path / "other"
    spark_kms.write_parquet(flights.limit(10), str(other), table=second)
    plain = tmp_path / "plain"
    rows = flights.limit(10)

    with spark_kms.table_keys(spark, str(tmp_path / "keyed"), table=first):
        with pytest.raises(ConfigurationError, match=f"table '{second}'"):
            with spark_kms.typed_errors():
                rows.write.mode("append").parquet(str(other))
        rows.write.parquet(str(plain))

    # A folder outside every spark_kms table is written as without spark_kms.
    for file in parquet_files(plain):
        assert magic_of(file) == (b"PAR1", b"PAR1")


def test_read_after_release_needs_keys(
    spark: SparkSession, flights: DataFrame, table_name: str, tmp_path: Path
) -> None:
    location = str(tmp_path / "released")
    spark_kms.write_parquet(flights.limit(100), location, table=table_name)
    df = spark_kms.read_parquet(spark, location)
    assert df.count() == 100

    released = spark_kms.release_keys(spark, location)

    assert released == 1
    with pytest.raises(KeyNotFoundError, match=f"KEK '{table_name}.table.k"):
        with spark_kms.typed_errors():
            spark.read.parquet(location).count()


def test_erased_parquet_table_unreadable(
    spark: SparkSession, flights: DataFrame, table_name: str, tmp_path: Path
) -> None:
    location = str(tmp_path / "erased")
    spark_kms.write_parquet(flights.limit(100), location, table=table_name)
    earlier = spark_kms.read_parquet(spark, location)
    assert earlier.count() == 100

    spark_kms.erase_table(spark, table_name)

    with pytest.raises(TableErasedError, match=f"table '{table_name}' was crypto-erased") as raised:
        spark_kms.read_parquet(spark, location)
    assert raised.value.table == table_name
    with pytest.raises(TableErasedError, match=f"table '{table_name}' was crypto-erased") as raised:
        with spark_kms.typed_errors():
            earlier.count()
    assert raised.value.table == table_name
    assert not [k for k in bridge.loaded_kek_ids(spark) if k.startswith(f"{table_name}.")]


def test_plain_session_config_without_bridge_rejected(
    spark: SparkSession, flights: DataFrame, table_name: str, tmp_path: Path
) -> None:
    spark.conf.unset(bridge.CRYPTO_FACTORY)
    try:
        with pytest.raises(ConfigurationError, match="JVM bridge is not enabled"):
            spark_kms.write_parquet(flights.limit(1), str(tmp_path / "t"), table=table_name)
    finally:
        assert bridge.enable(spark)


def test_bridge_unwraps_parquet_mr_vectors(spark: SparkSession) -> None:
    jvm = spark._jvm
    assert jvm is not None
    vectors = json.loads(VECTORS.read_text())
    entries = [
        f"{v['aad_utf8']}:{base64.b64encode(bytes.fromhex(v['kek_hex'])).decode()}" for v in vectors
    ]
    configuration = jvm.org.apache.hadoop.conf.Configuration(False)
    configuration.set(bridge.KEKS, ",".join(entries))
    client = jvm.spark_kms.bridge.JobKmsClient()
    client.initialize(configuration, "vectors", "", "")

    for vector in vectors:
        dek = bytes(client.unwrapKey(vector["wrapped_b64"], vector["aad_utf8"]))
        assert dek.hex() == vector["dek_hex"]
        # A wrap by the bridge unwraps with the Python path's local wrap.
        wrapped = client.wrapKey(bytes.fromhex(vector["dek_hex"]), vector["aad_utf8"])
        kek = bytes.fromhex(vector["kek_hex"])
        assert unwrap_key_locally(wrapped, kek, vector["aad_utf8"]).hex() == vector["dek_hex"]
    assert "key ids" in client.toString()
    assert vectors[0]["kek_hex"] not in client.toString()


def test_bridge_rejects_unknown_kek(spark: SparkSession) -> None:
    jvm = spark._jvm
    assert jvm is not None
    client = jvm.spark_kms.bridge.JobKmsClient()
    client.initialize(jvm.org.apache.hadoop.conf.Configuration(False), "none", "", "")

    with pytest.raises(Py4JJavaError, match="KEK 't.table.k1', which is not loaded"):
        client.wrapKey(bytes(32), "t.table.k1")


def test_parquet_job_recorded_like_kms_parquet(
    spark: SparkSession,
    flights: DataFrame,
    key_service: KeyService,
    table_name: str,
    tmp_path: Path,
) -> None:
    location = str(tmp_path / "recorded")
    spark_kms.write_parquet(flights, location, table=table_name, column_keys="pii: tailnum")
    spark_kms.write_parquet(flights.limit(10), location, table=table_name, mode="overwrite")

    records = sorted(KeyringStore(location).list_commit_records(), key=lambda r: r.committed_at)

    assert [r.mode for r in records] == ["append", "overwrite"]
    assert [len(r.files) for r in records] == [3, len(KeyringStore(location).list_data_files())]
    assert [r.rows for r in records] == [flights.count(), 10]
    assert records[0].column_keys == {"pii": ["tailnum"]}
    assert {k.split(".")[1] for k in records[0].kek_ids} == {"pii", "table"}
    assert set(records[1].kek_ids).isdisjoint(records[0].kek_ids)
    # A kms_parquet read after the overwrite needs only the second job's KEK.
    spark_kms.release_keys(spark, location)
    back = spark_kms.read_table(spark, location)
    with spark_kms.typed_errors():
        assert back.count() == 10


def test_plaintext_file_in_table_rejected(
    spark: SparkSession, flights: DataFrame, table_name: str, tmp_path: Path
) -> None:
    location = tmp_path / "slipped"
    spark_kms.write_parquet(flights.limit(10), str(location), table=table_name)
    # A plaintext file put into the table folder behind spark_kms's back.
    outside = tmp_path / "outside"
    flights.limit(10).coalesce(1).write.parquet(str(outside))
    plain = parquet_files(outside)[0]
    (location / plain.name).write_bytes(plain.read_bytes())

    with pytest.raises(Exception, match="plaintext file"):
        spark_kms.read_parquet(spark, str(location)).collect()


def numbered(spark: SparkSession, start: int, count: int) -> DataFrame:
    """Return rows ``start`` to ``start + count - 1``, each with its id as a tail number."""
    return spark.range(start, start + count, numPartitions=2).select(
        F.col("id"), F.concat(F.lit("N"), F.col("id").cast("string")).alias("tailnum")
    )


def staged_entries(location: Path) -> list[Path]:
    return sorted((location / STAGING_DIR).glob("*"))


@pytest.mark.parametrize("mode", ["append", "overwrite"])
def test_failed_spark_job_changes_nothing(
    spark: SparkSession, table_name: str, tmp_path: Path, mode: str
) -> None:
    location = tmp_path / "failed"
    first = numbered(spark, 0, 100)
    spark_kms.write_parquet(first, str(location), table=table_name)
    files_before = {f.name: f.read_bytes() for f in parquet_files(location)}
    jobs_before = [r.job_id for r in KeyringStore(str(location)).list_commit_records()]

    # No type hints: Spark would take a hinted function for a pandas UDF.
    @F.udf("long")
    def reject_row_150(value):  # type: ignore[no-untyped-def]
        if value == 150:
            raise ValueError("row 150 is invalid")
        return value

    failing = numbered(spark, 100, 100).withColumn("id", reject_row_150("id"))
    with pytest.raises(Exception, match="row 150 is invalid"):
        spark_kms.write_parquet(failing, str(location), table=table_name, mode=mode)

    # parquet_files also finds the files of a staging folder left behind.
    assert {f.name: f.read_bytes() for f in parquet_files(location)} == files_before
    assert staged_entries(location) == []
    assert [r.job_id for r in KeyringStore(str(location)).list_commit_records()] == jobs_before
    back = spark_kms.read_parquet(spark, str(location))
    assert_df_equality(first, back, ignore_row_order=True, ignore_nullable=True)


@pytest.mark.parametrize("mode", ["append", "overwrite"])
def test_files_committed_meanwhile_not_counted(
    spark: SparkSession, table_name: str, tmp_path: Path, mode: str
) -> None:
    location = tmp_path / "concurrent"
    store = KeyringStore(str(location))
    first = numbered(spark, 0, 100)
    spark_kms.write_parquet(first, str(location), table=table_name)
    first_files = set(store.list_data_files())
    # Another job commits with kms_parquet. Its files wait outside the table
    # folder until the native write's tasks move them in, as if it committed then.
    other = numbered(spark, 1000, 50)
    spark_kms.write_table(other, str(location), table=table_name)
    other_files = set(store.list_data_files()) - first_files
    assert other_files
    waiting = tmp_path / "waiting"
    waiting.mkdir()
    for name in other_files:
        os.replace(location / name, waiting / name)
    jobs_before = {r.job_id for r in store.list_commit_records()}
    # The other job's KEK is not loaded, as in another process.
    spark_kms.release_keys(spark, str(location))

    def commit_other_job(batches: Iterator[object]) -> Iterator[object]:
        for name in other_files:
            try:
                os.replace(waiting / name, location / name)
            except FileNotFoundError:
                pass  # the other task moved it
        yield from batches

    native = numbered(spark, 500, 200).mapInPandas(
        commit_other_job, schema="id long, tailnum string"
    )
    spark_kms.write_parquet(native, str(location), table=table_name, mode=mode)

    assert sorted(p.name for p in waiting.iterdir()) == []
    [record] = [r for r in store.list_commit_records() if r.job_id not in jobs_before]
    assert record.mode == mode
    assert record.rows == 200
    assert record.files
    assert set(record.files).isdisjoint(first_files | other_files)
    assert staged_entries(location) == []
    expected = numbered(spark, 500, 200)
    if mode == "append":
        assert set(store.list_data_files()) == first_files | other_files | set(record.files)
        assert record.replaced == []
        expected = first.unionByName(other).unionByName(expected)
    else:
        # The other job committed before the overwrite did, so it is replaced too.
        assert set(store.list_data_files()) == set(record.files)
        assert sorted(record.replaced) == sorted(first_files | other_files)
    by_spark = spark_kms.read_parquet(spark, str(location))
    assert_df_equality(expected, by_spark, ignore_row_order=True, ignore_nullable=True)
    spark_kms.release_keys(spark, str(location))
    by_kms_parquet = spark_kms.read_table(spark, str(location))
    with spark_kms.typed_errors():
        assert_df_equality(expected, by_kms_parquet, ignore_row_order=True, ignore_nullable=True)
