"""The kms_parquet data source in local Spark with the real SoftHSM2 token."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from chispa import assert_df_equality
from pyspark.errors import PySparkException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

import spark_kms
from spark_kms.datasource import KmsCommitMessage, data_source_class
from spark_kms.errors import (
    CommitError,
    InvalidOptionError,
    SparkKmsError,
    TableErasedError,
    TableNotFoundError,
    TableStateError,
)
from spark_kms.keyservice import KeyService
from spark_kms.settings import KmsSettings
from tests.helpers.independent_kms import read_with_independent_client


def flights_like(spark: SparkSession, rows: int = 2000, partitions: int = 4) -> DataFrame:
    return spark.range(rows, numPartitions=partitions).select(
        F.col("id"),
        F.concat(F.lit("N"), (F.col("id") % 97).cast("string"), F.lit("XY")).alias("tailnum"),
        (F.col("id") % 3000).cast("int").alias("flight"),
        F.element_at(
            F.array(F.lit("JFK"), F.lit("LGA"), F.lit("EWR")), (F.col("id") % 3 + 1).cast("int")
        ).alias("origin"),
        (F.col("id") * 0.5).alias("dep_delay"),
    )


def data_files(location: Path) -> list[Path]:
    return sorted(
        p
        for p in location.rglob("*.parquet")
        if not any(part.startswith("_") for part in p.relative_to(location).parts)
    )


def table_keks(key_service: KeyService, location: Path) -> dict[str, bytes]:
    meta, store = key_service.open_table_for_read(str(location))
    keys = key_service.unwrap_keks(meta, store, store.list_kek_ids())
    return {kek_id: keys.kek(kek_id) for kek_id in keys.key_ids}


def count_operations(key_service: KeyService, table: str, operation: str) -> int:
    return sum(
        1
        for r in key_service.audit.records()
        if r.get("table") == table and r.get("operation") == operation
    )


def test_round_trip_with_column_key(spark: SparkSession, table_name: str, tmp_path: Path) -> None:
    source = flights_like(spark)
    location = tmp_path / "flights"
    spark_kms.write_table(
        source, str(location), table=table_name, column_keys="pii: tailnum, flight"
    )
    back = spark_kms.read_table(spark, str(location))
    assert_df_equality(source, back, ignore_row_order=True, ignore_nullable=True)
    files = data_files(location)
    assert len(files) == 4
    for file in files:
        data = file.read_bytes()
        assert data[:4] == b"PARE"
        assert data[-4:] == b"PARE"
        assert b"N1XY" not in data


def test_plain_readers_fail_on_files(spark: SparkSession, table_name: str, tmp_path: Path) -> None:
    location = tmp_path / "t"
    spark_kms.write_table(flights_like(spark, 100, 1), str(location), table=table_name)
    file = data_files(location)[0]
    with pytest.raises(OSError, match="no decryption found"):
        pq.read_table(file)
    with pytest.raises(Exception, match="(?i)encrypt|magic|not a Parquet file"):
        spark.read.parquet(str(file)).collect()


def test_append_adds_rows(spark: SparkSession, table_name: str, tmp_path: Path) -> None:
    location = str(tmp_path / "t")
    first = flights_like(spark, 300, 2)
    second = flights_like(spark, 200, 2).withColumn("id", F.col("id") + 1000)
    spark_kms.write_table(first, location, table=table_name, column_keys="pii: tailnum")
    spark_kms.write_table(
        second, location, table=table_name, column_keys="pii: tailnum", mode="append"
    )
    back = spark_kms.read_table(spark, location)
    assert back.count() == 500
    assert_df_equality(first.unionByName(second), back, ignore_row_order=True, ignore_nullable=True)


def test_overwrite_replaces_rows(spark: SparkSession, table_name: str, tmp_path: Path) -> None:
    location = tmp_path / "t"
    spark_kms.write_table(flights_like(spark, 300, 3), str(location), table=table_name)
    replacement = flights_like(spark, 50, 2).withColumn("id", F.col("id") + 5000)
    spark_kms.write_table(replacement, str(location), table=table_name, mode="overwrite")
    back = spark_kms.read_table(spark, str(location))
    assert_df_equality(replacement, back, ignore_row_order=True, ignore_nullable=True)
    assert len(data_files(location)) == 2


def test_overwrite_may_change_schema(spark: SparkSession, table_name: str, tmp_path: Path) -> None:
    location = str(tmp_path / "t")
    spark_kms.write_table(flights_like(spark, 10, 1), location, table=table_name)
    narrow = spark.range(5).withColumnRenamed("id", "n")
    spark_kms.write_table(narrow, location, table=table_name, mode="overwrite")
    assert spark_kms.read_table(spark, location).columns == ["n"]


def test_append_with_other_schema_refused(
    spark: SparkSession, table_name: str, tmp_path: Path
) -> None:
    location = str(tmp_path / "t")
    spark_kms.write_table(flights_like(spark, 10, 1), location, table=table_name)
    with pytest.raises(InvalidOptionError, match="cannot append .* differs from the table schema"):
        spark_kms.write_table(spark.range(5), location, table=table_name)
    assert spark_kms.read_table(spark, location).count() == 10


def test_every_file_has_own_footer_dek(
    spark: SparkSession, key_service: KeyService, table_name: str, tmp_path: Path
) -> None:
    location = tmp_path / "t"
    spark_kms.write_table(
        flights_like(spark, 800, 4), str(location), table=table_name, column_keys="pii: tailnum"
    )
    keks = table_keks(key_service, location)
    footer_deks = []
    wrapped_deks = set()
    for file in data_files(location):
        _table, seen = read_with_independent_client(str(file), keks)
        kek_id, _wrapped, dek = seen[0]
        assert kek_id.endswith(tuple(k for k in keks if ".table." in k))
        footer_deks.append(dek)
        wrapped_deks.update(wrapped for _kek, wrapped, _dek in seen)
    assert len(footer_deks) == 4
    assert len(set(footer_deks)) == 4
    assert len(wrapped_deks) >= 4 * 2


def test_files_decrypt_with_independent_client(
    spark: SparkSession, key_service: KeyService, table_name: str, tmp_path: Path
) -> None:
    location = tmp_path / "t"
    source = flights_like(spark, 400, 2)
    spark_kms.write_table(source, str(location), table=table_name, column_keys="pii: tailnum")
    keks = table_keks(key_service, location)
    tables = [read_with_independent_client(str(f), keks)[0] for f in data_files(location)]
    combined = pa.concat_tables(tables).sort_by("id")
    assert combined.column("id").to_pylist() == list(range(400))
    assert combined.column("tailnum").to_pylist() == [f"N{i % 97}XY" for i in range(400)]


def test_hsm_calls_do_not_grow_with_files(
    spark: SparkSession,
    key_service: KeyService,
    make_table_name,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    counts = {}
    for partitions in (2, 16):
        name = make_table_name(f"p{partitions}")
        location = str(tmp_path / name)
        spark_kms.write_table(
            flights_like(spark, 1600, partitions), location, table=name, column_keys="pii: tailnum"
        )
        spark_kms.read_table(spark, location).count()
        assert len(data_files(Path(location))) == partitions
        counts[partitions] = (
            count_operations(key_service, name, "wrap_kek"),
            count_operations(key_service, name, "unwrap_kek"),
        )
    assert counts[2] == (2, 2)
    assert counts[16] == (2, 2)


def test_small_files_share_read_tasks(spark: SparkSession, table_name: str, tmp_path: Path) -> None:
    location = str(tmp_path / "t")
    source = flights_like(spark, 1600, 16)
    spark_kms.write_table(source, location, table=table_name, column_keys="pii: tailnum")
    assert len(data_files(Path(location))) == 16

    back = spark_kms.read_table(spark, location)
    # 16 files of a few KiB: one task per unit of the session's default
    # parallelism (4 in the test session), as Spark's own file scan sizes them.
    assert spark.sparkContext.defaultParallelism == 4
    assert back.rdd.getNumPartitions() == 4
    assert_df_equality(source, back, ignore_row_order=True, ignore_nullable=True)


def test_read_unwraps_each_kek_once(
    spark: SparkSession, key_service: KeyService, table_name: str, tmp_path: Path
) -> None:
    location = str(tmp_path / "t")
    for _ in range(3):
        spark_kms.write_table(flights_like(spark, 90, 3), location, table=table_name, mode="append")
    spark_kms.read_table(spark, location).count()
    # Three jobs, one KEK each, nine files: three unwraps.
    assert count_operations(key_service, table_name, "unwrap_kek") == 3


def test_projection_by_schema(spark: SparkSession, table_name: str, tmp_path: Path) -> None:
    location = str(tmp_path / "t")
    spark_kms.write_table(
        flights_like(spark, 100, 2), location, table=table_name, column_keys="pii: tailnum"
    )
    projected = spark.read.format("kms_parquet").schema("origin string, id bigint").load(location)
    assert projected.columns == ["origin", "id"]
    rows = sorted(projected.collect(), key=lambda r: r.id)
    assert rows[4].asDict() == {"origin": "LGA", "id": 4}


def test_projection_of_unknown_column(spark: SparkSession, table_name: str, tmp_path: Path) -> None:
    location = str(tmp_path / "t")
    spark_kms.write_table(flights_like(spark, 10, 1), location, table=table_name)
    with pytest.raises(InvalidOptionError, match="column 'nope' of type string is not in table"):
        with spark_kms.typed_errors():
            spark.read.format("kms_parquet").schema("nope string").load(location).collect()


@pytest.mark.parametrize("time_zone", ["UTC", "America/New_York"])
def test_timestamp_column_round_trip(
    spark: SparkSession, table_name: str, tmp_path: Path, time_zone: str
) -> None:
    location = str(tmp_path / "t")
    source = spark.sql(
        "SELECT id, timestamp'2024-03-10 01:30:00' + make_interval(0, 0, 0, 0, id, 0, 0) AS departed "
        "FROM range(6)"
    )
    spark.conf.set("spark.sql.session.timeZone", time_zone)
    try:
        spark_kms.write_table(source, location, table=table_name)
        back = spark_kms.read_table(spark, location)
        assert back.schema["departed"].dataType.simpleString() == "timestamp"
        assert_df_equality(source, back, ignore_row_order=True, ignore_nullable=True)
    finally:
        spark.conf.set("spark.sql.session.timeZone", "UTC")


def test_reused_dataframe_after_filter(
    spark: SparkSession, table_name: str, tmp_path: Path
) -> None:
    location = str(tmp_path / "t")
    spark_kms.write_table(flights_like(spark, 700, 2), location, table=table_name)
    frame = spark.read.format("kms_parquet").load(location)
    assert frame.count() == 700
    assert frame.filter("origin = 'JFK'").count() == 234
    assert frame.count() == 700
    assert len(frame.collect()) == 700


def test_filtered_aggregate(spark: SparkSession, table_name: str, tmp_path: Path) -> None:
    location = str(tmp_path / "t")
    source = flights_like(spark, 3000, 3)
    spark_kms.write_table(source, location, table=table_name, column_keys="pii: tailnum")

    def query(frame):
        return (
            frame.filter((F.col("origin") == "EWR") & (F.col("flight") < 1500))
            .groupBy("origin")
            .agg(F.count("*").alias("n"), F.sum("dep_delay").alias("delay"))
        )

    expected = query(source).collect()
    actual = query(spark.read.format("kms_parquet").load(location)).collect()
    assert actual == expected
    assert actual[0]["n"] == 500


def test_nested_column_under_column_key(
    spark: SparkSession, key_service: KeyService, table_name: str, tmp_path: Path
) -> None:
    location = tmp_path / "t"
    source = spark.range(20, numPartitions=1).select(
        "id",
        F.struct(F.col("id").alias("a"), F.lit("secret-value").alias("b")).alias("person"),
        F.array(F.col("id"), F.lit(7)).alias("scores"),
        F.create_map(F.lit("k"), F.col("id")).alias("attrs"),
    )
    spark_kms.write_table(
        source, str(location), table=table_name, column_keys="pii: person, scores, attrs"
    )
    back = spark_kms.read_table(spark, str(location))
    assert back.orderBy("id").collect() == source.orderBy("id").collect()
    keks = table_keks(key_service, location)
    _table, seen = read_with_independent_client(str(data_files(location)[0]), keks)
    pii_deks = {wrapped for kek_id, wrapped, _dek in seen if ".pii." in kek_id}
    # One DEK per leaf: person.a, person.b, scores.list.element, attrs.key_value.key and .value.
    assert len(pii_deks) == 5
    assert b"secret-value" not in data_files(location)[0].read_bytes()


def test_missing_table_option(spark: SparkSession, tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError, match="missing option kms.table"):
        with spark_kms.typed_errors():
            spark.range(3).write.format("kms_parquet").mode("append").save(str(tmp_path / "t"))
    assert not (tmp_path / "t").exists()


def test_unknown_column_in_column_keys(
    spark: SparkSession, table_name: str, tmp_path: Path
) -> None:
    location = str(tmp_path / "t")
    spark_kms.write_table(flights_like(spark, 10, 1), location, table=table_name)
    with pytest.raises(
        InvalidOptionError, match="column 'tailnumber' in kms.column_keys does not exist"
    ):
        spark_kms.write_table(
            flights_like(spark, 10, 1), location, table=table_name, column_keys="pii: tailnumber"
        )
    assert spark_kms.read_table(spark, location).count() == 10


@pytest.mark.parametrize(
    ("table", "column_keys", "message"),
    [
        pytest.param("bad:name", None, "invalid table name 'bad:name'", id="colon-in-table"),
        pytest.param("bad,name", None, "invalid table name 'bad,name'", id="comma-in-table"),
        pytest.param("bad;name", None, "invalid table name 'bad;name'", id="semicolon-in-table"),
        pytest.param(
            "good", "p:ii: tailnum", "a column name cannot contain ':'", id="colon-in-group"
        ),
        pytest.param("good", "p,ii: tailnum", "invalid key group name 'p,ii'", id="comma-in-group"),
    ],
)
def test_reserved_characters_refused(
    spark: SparkSession, tmp_path: Path, table: str, column_keys: str | None, message: str
) -> None:
    with pytest.raises(InvalidOptionError, match=message):
        spark_kms.write_table(
            flights_like(spark, 10, 1), str(tmp_path / "t"), table=table, column_keys=column_keys
        )
    assert not (tmp_path / "t").exists()


def test_write_to_erased_table(
    spark: SparkSession, key_service: KeyService, table_name: str, tmp_path: Path
) -> None:
    location = tmp_path / "t"
    spark_kms.write_table(flights_like(spark, 10, 1), str(location), table=table_name)
    files_before = data_files(location)
    spark_kms.erase_table(spark, table_name)
    with pytest.raises(TableErasedError, match=f"table '{table_name}' was crypto-erased"):
        spark_kms.write_table(flights_like(spark, 10, 1), str(location), table=table_name)
    assert data_files(location) == files_before


def test_erase_makes_table_unreadable(spark: SparkSession, make_table_name, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    erased, kept = make_table_name("gone"), make_table_name("kept")
    spark_kms.write_table(flights_like(spark, 50, 2), str(tmp_path / "gone"), table=erased)
    spark_kms.write_table(flights_like(spark, 50, 2), str(tmp_path / "kept"), table=kept)
    report = spark_kms.erase_table(spark, erased)
    assert report.remaining_objects == 0
    with pytest.raises(TableErasedError, match=f"table '{erased}' was crypto-erased") as caught:
        with spark_kms.typed_errors():
            spark.read.format("kms_parquet").load(str(tmp_path / "gone")).collect()
    assert caught.value.table == erased
    assert spark_kms.read_table(spark, str(tmp_path / "kept")).count() == 50


def test_erasure_with_live_dataframe(spark: SparkSession, table_name: str, tmp_path: Path) -> None:
    location = str(tmp_path / "t")
    spark_kms.write_table(flights_like(spark, 50, 2), location, table=table_name)
    frame = spark.read.format("kms_parquet").load(location)
    spark_kms.erase_table(spark, table_name)
    with pytest.raises(TableErasedError, match=f"table '{table_name}' was crypto-erased"):
        with spark_kms.typed_errors():
            frame.collect()


def test_erasure_after_first_action(spark: SparkSession, table_name: str, tmp_path: Path) -> None:
    location = str(tmp_path / "t")
    spark_kms.write_table(flights_like(spark, 50, 2), location, table=table_name)
    frame = spark.read.format("kms_parquet").load(location)
    filtered = frame.filter(F.col("flight") < 10)
    assert frame.count() == 50
    assert filtered.count() == 10

    spark_kms.erase_table(spark, table_name)

    # Spark reuses the partitions planned for the first action, KEKs included.
    for reused in (frame, filtered):
        with pytest.raises(TableErasedError, match=f"table '{table_name}' was crypto-erased"):
            with spark_kms.typed_errors():
                reused.collect()


def test_reused_dataframe_after_overwrite(spark: SparkSession, table_name: str, tmp_path: Path) -> None:
    location = str(tmp_path / "t")
    spark_kms.write_table(flights_like(spark, 50, 2), location, table=table_name)
    frame = spark.read.format("kms_parquet").load(location)
    assert frame.count() == 50
    spark_kms.write_table(flights_like(spark, 10, 1), location, table=table_name, mode="overwrite")

    with pytest.raises(TableStateError, match="no longer exists: an overwrite or a rekey replaced it"):
        with spark_kms.typed_errors():
            frame.collect()
    assert spark.read.format("kms_parquet").load(location).count() == 10


def test_read_of_plain_folder(spark: SparkSession, tmp_path: Path) -> None:
    spark.range(3).write.parquet(str(tmp_path / "plain"))
    with pytest.raises(TableNotFoundError, match="contains no spark_kms table"):
        with spark_kms.typed_errors():
            spark.read.format("kms_parquet").load(str(tmp_path / "plain")).collect()


@pytest.mark.parametrize("mode", ["error", "errorifexists", "ignore"])
def test_unsupported_save_modes(
    spark: SparkSession, table_name: str, tmp_path: Path, mode: str
) -> None:
    # Spark refuses these modes for every Python data source before spark_kms runs.
    with pytest.raises(PySparkException, match="UNSUPPORTED_DATA_SOURCE_SAVE_MODE"):
        spark.range(3).write.format("kms_parquet").option("kms.table", table_name).mode(mode).save(
            str(tmp_path / "t")
        )
    assert not (tmp_path / "t").exists()


def test_failed_job_commits_nothing(spark: SparkSession, table_name: str, tmp_path: Path) -> None:
    location = tmp_path / "t"
    spark_kms.write_table(flights_like(spark, 40, 2), str(location), table=table_name)
    files_before = data_files(location)
    failing = flights_like(spark, 40, 2).withColumn(
        "id",
        F.when(F.col("id") == 33, F.raise_error(F.lit("task failure on purpose"))).otherwise(
            F.col("id")
        ),
    )
    with pytest.raises(Exception, match="task failure on purpose"):
        spark_kms.write_table(failing, str(location), table=table_name)
    assert data_files(location) == files_before
    # NOTE: a task that Spark cancels may still finish its staged file after
    # the abort, so the hidden staging folder is not checked here; the next
    # write or `spark-kms verify --repair` removes such leftovers.
    assert spark_kms.read_table(spark, str(location)).count() == 40


def test_commit_refuses_plaintext_file(
    spark: SparkSession, kms_settings: KmsSettings, table_name: str, tmp_path: Path
) -> None:
    location = tmp_path / "t"
    spark_kms.write_table(flights_like(spark, 40, 2), str(location), table=table_name)
    files_before = data_files(location)
    source_cls = data_source_class(kms_settings)
    writer = source_cls({"path": str(location), "kms.table": table_name}).writer(
        flights_like(spark, 1, 1).schema, False
    )
    staging = Path(writer.staging)
    staging.mkdir(parents=True)
    pq.write_table(pa.table({"id": [1]}), staging / "part-plain.parquet")
    with pytest.raises(
        CommitError, match="not encrypted .*part-plain.parquet.*nothing was committed"
    ):
        writer.commit([KmsCommitMessage(files=["part-plain.parquet"], rows=1)])
    assert data_files(location) == files_before
    assert not staging.exists()
    commits = [
        json.loads(p.read_text()) for p in (location / "_spark_kms" / "commits").glob("*.json")
    ]
    assert all("part-plain.parquet" not in c["files"] for c in commits)


def test_errors_share_root(spark: SparkSession, tmp_path: Path) -> None:
    with pytest.raises(SparkKmsError):
        spark_kms.write_table(spark.range(1), str(tmp_path / "t"), table="a:b")


def test_overwrite_skips_undeleted_files(
    spark: SparkSession, table_name: str, tmp_path: Path
) -> None:
    location = tmp_path / "t"
    spark_kms.write_table(flights_like(spark, 100, 2), str(location), table=table_name)
    kept = {f.name: f.read_bytes() for f in data_files(location)}
    replacement = flights_like(spark, 10, 1).withColumn("id", F.col("id") + 900)
    spark_kms.write_table(replacement, str(location), table=table_name, mode="overwrite")
    # As if deleting the replaced files had failed: put them back.
    for name, data in kept.items():
        (location / name).write_bytes(data)
    back = spark_kms.read_table(spark, str(location))
    assert back.count() == 10
    assert_df_equality(replacement, back, ignore_row_order=True, ignore_nullable=True)


def test_write_into_delta_folder_refused(
    spark: SparkSession, table_name: str, tmp_path: Path
) -> None:
    location = tmp_path / "t"
    (location / "_delta_log").mkdir(parents=True)
    with pytest.raises(
        InvalidOptionError, match="contains a Delta table; write it with spark_kms.write_delta"
    ):
        spark_kms.write_table(flights_like(spark, 10, 1), str(location), table=table_name)
    assert not (location / "_spark_kms").exists()


def test_append_keeps_column_keys(spark: SparkSession, table_name: str, tmp_path: Path) -> None:
    location = tmp_path / "t"
    spark_kms.write_table(
        flights_like(spark, 10, 1), str(location), table=table_name, column_keys="pii: tailnum"
    )
    spark_kms.write_table(flights_like(spark, 10, 1), str(location), table=table_name)
    commits = sorted(
        (json.loads(p.read_text()) for p in (location / "_spark_kms" / "commits").glob("*.json")),
        key=lambda c: c["committed_at"],
    )
    assert [c["column_keys"] for c in commits] == [{"pii": ["tailnum"]}, {"pii": ["tailnum"]}]
    with pytest.raises(
        InvalidOptionError, match="cannot append .* with other column keys.*'pii: tailnum'"
    ):
        spark_kms.write_table(
            flights_like(spark, 10, 1), str(location), table=table_name, column_keys="pii: flight"
        )
    assert spark_kms.read_table(spark, str(location)).count() == 20


def test_new_table_in_parquet_folder_refused(
    spark: SparkSession, table_name: str, tmp_path: Path
) -> None:
    location = tmp_path / "plain"
    spark.range(5).write.parquet(str(location))
    with pytest.raises(InvalidOptionError, match="already contains .* Parquet file"):
        spark_kms.write_table(flights_like(spark, 10, 1), str(location), table=table_name)
    assert not (location / "_spark_kms").exists()
    assert spark.read.parquet(str(location)).count() == 5


def test_nested_tables_refused(spark: SparkSession, make_table_name, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    outer = tmp_path / "outer"
    spark_kms.write_table(flights_like(spark, 10, 1), str(outer), table=make_table_name("outer"))
    with pytest.raises(InvalidOptionError, match="inside the table at"):
        spark_kms.write_table(
            flights_like(spark, 10, 1), str(outer / "inner"), table=make_table_name("inner")
        )
    with pytest.raises(InvalidOptionError, match="contains the table at"):
        spark_kms.write_table(
            flights_like(spark, 10, 1), str(tmp_path), table=make_table_name("parent")
        )
    assert spark_kms.read_table(spark, str(outer)).count() == 10
