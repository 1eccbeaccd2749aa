"""Schema edge cases on every write path: each round-trips with equal values or is rejected up front.

The paths are the kms_parquet data source, Spark's own Parquet writer and
Delta Lake through the JVM bridge.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest
from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import (
    ArrayType,
    BinaryType,
    BooleanType,
    ByteType,
    DateType,
    DecimalType,
    DoubleType,
    FloatType,
    IntegerType,
    LongType,
    MapType,
    ShortType,
    StringType,
    StructField,
    StructType,
    TimestampNTZType,
    TimestampType,
)

import spark_kms
from spark_kms.errors import InvalidOptionError
from tests.helpers.tables import data_files


@dataclass(frozen=True)
class WritePath:
    """One way to write and read an encrypted table."""

    name: str
    write: Callable[..., None]
    read: Callable[[SparkSession, str], DataFrame]


KMS_PARQUET = WritePath("kms_parquet", spark_kms.write_table, spark_kms.read_table)
PATHS = [
    pytest.param(KMS_PARQUET, id="kms_parquet"),
    pytest.param(
        WritePath("parquet", spark_kms.write_parquet, spark_kms.read_parquet), id="native-parquet"
    ),
    pytest.param(WritePath("delta", spark_kms.write_delta, spark_kms.read_delta), id="delta"),
]


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest) -> WritePath:
    """Each write path: the kms_parquet data source, Spark's Parquet writer, Delta Lake."""
    return request.param  # type: ignore[no-any-return]


def encrypted_files(location: Path) -> list[Path]:
    """Return every Parquet file of the table, Delta's own folders included."""
    return sorted(p for p in location.rglob("*.parquet") if "_spark_kms" not in p.parts)


def round_trip(
    spark: SparkSession,
    df: DataFrame,
    location: Path,
    table: str,
    column_keys: str | None = None,
    path: WritePath = KMS_PARQUET,
) -> DataFrame:
    path.write(df, str(location), table=table, column_keys=column_keys)
    with spark_kms.typed_errors():
        back = path.read(spark, str(location))
        expected, actual = df.collect(), back.collect()
    # Compared in Python: chispa sorts by columns, which fails on dotted names and maps.
    assert [(f.name, f.dataType) for f in back.schema] == [(f.name, f.dataType) for f in df.schema]
    assert sorted(expected, key=repr) == sorted(actual, key=repr)
    files = encrypted_files(location)
    assert files
    for file in files:
        assert file.read_bytes()[:4] == b"PARE"
        assert file.read_bytes()[-4:] == b"PARE"
    return back


def test_names_with_dots_spaces_and_letters(
    spark: SparkSession, table_name: str, tmp_path: Path, path: WritePath
) -> None:
    schema = StructType(
        [
            StructField("a.b", LongType()),
            StructField("with space", StringType()),
            StructField("größe", DoubleType()),
            StructField("名前", StringType()),
            StructField("émigré", IntegerType()),
        ]
    )
    df = spark.createDataFrame([(1, "x y", 1.5, "東京", 7), (2, None, None, None, None)], schema)
    if path.name == "delta":
        # Delta Lake rejects spaces, ',;{}()=', tabs and newlines in names unless
        # column mapping is on, before any file is written.
        location = tmp_path / "spaced"
        with pytest.raises(AnalysisException, match="INVALID_CHARACTERS_IN_COLUMN_NAMES"):
            path.write(df, str(location), table=table_name)
        assert encrypted_files(location) == []
        df = df.withColumnRenamed("with space", "with_underscore")
        back = round_trip(
            spark, df, tmp_path / "t", f"{table_name}_2", column_keys="pii: 名前, größe", path=path
        )
        assert back.columns == ["a.b", "with_underscore", "größe", "名前", "émigré"]
        return
    back = round_trip(
        spark, df, tmp_path / "t", table_name, column_keys="pii: with space, 名前, größe", path=path
    )
    assert back.columns == ["a.b", "with space", "größe", "名前", "émigré"]
    assert back.filter(F.col("`a.b`") == 2).count() == 1


def test_dotted_name_under_column_key_rejected(
    spark: SparkSession, table_name: str, tmp_path: Path
) -> None:
    df = spark.createDataFrame([(1, "x")], "`a.b` long, c string")
    with pytest.raises(InvalidOptionError, match=r"column 'a\.b' contains '\.'"):
        spark_kms.write_table(df, str(tmp_path / "t"), table=table_name, column_keys="pii: a.b")
    assert not (tmp_path / "t").exists()


def test_nested_types_under_column_key(
    spark: SparkSession, table_name: str, tmp_path: Path, path: WritePath
) -> None:
    schema = StructType(
        [
            StructField("id", LongType()),
            StructField(
                "person",
                StructType(
                    [
                        StructField("name", StringType()),
                        StructField("address", StructType([StructField("city", StringType())])),
                    ]
                ),
            ),
            StructField("tags", ArrayType(StringType())),
            StructField("scores", MapType(StringType(), DoubleType())),
            StructField("matrix", ArrayType(ArrayType(IntegerType()))),
            StructField(
                "events",
                ArrayType(
                    StructType([StructField("at", LongType()), StructField("kind", StringType())])
                ),
            ),
        ]
    )
    rows = [
        (1, ("Ann", ("Oslo",)), ["a", "b"], {"x": 1.0}, [[1, 2], []], [(1, "start")]),
        (2, None, [], {}, None, []),
        (3, ("Bo", None), None, None, [[None]], None),
    ]
    df = spark.createDataFrame(rows, schema)
    round_trip(
        spark,
        df,
        tmp_path / "t",
        table_name,
        column_keys="pii: person, tags, scores; more: matrix, events",
        path=path,
    )


def test_empty_dataframe(spark: SparkSession, table_name: str, tmp_path: Path) -> None:
    df = spark.createDataFrame([], "id long, name string")
    location = tmp_path / "t"
    spark_kms.write_table(df, str(location), table=table_name, column_keys="pii: name")
    back = spark_kms.read_table(spark, str(location))
    assert back.count() == 0
    assert back.schema.simpleString() == "struct<id:bigint,name:string>"
    # An append of rows to the empty table reads back.
    spark_kms.write_table(
        spark.createDataFrame([(1, "a")], "id long, name string"), str(location), table=table_name
    )
    assert [tuple(r) for r in spark_kms.read_table(spark, str(location)).collect()] == [(1, "a")]


def test_all_null_columns(
    spark: SparkSession, table_name: str, tmp_path: Path, path: WritePath
) -> None:
    schema = "id long, s string, d decimal(10,2), t timestamp, b binary, l array<int>"
    df = spark.createDataFrame([(i, None, None, None, None, None) for i in range(5)], schema)
    round_trip(spark, df, tmp_path / "t", table_name, column_keys="pii: s, b", path=path)


def test_null_type_column(spark: SparkSession, table_name: str, tmp_path: Path) -> None:
    # A column of Spark's NullType (lit(None) without a cast).
    df = spark.range(3).withColumn("nothing", F.lit(None))
    location = tmp_path / "t"
    try:
        spark_kms.write_table(df, str(location), table=table_name)
    except InvalidOptionError as error:
        assert "nothing" in str(error)
        assert data_files(location) == []
        return
    back = spark_kms.read_table(spark, str(location))
    assert [tuple(r) for r in back.orderBy("id").collect()] == [(0, None), (1, None), (2, None)]


def test_very_wide_rows(
    spark: SparkSession, table_name: str, tmp_path: Path, path: WritePath
) -> None:
    width = 400
    df = spark.range(20, numPartitions=2).select(
        "id",
        *[(F.col("id") * number).cast("string").alias(f"c{number}") for number in range(width)],
    )
    groups = "; ".join(
        f"g{group}: " + ", ".join(f"c{n}" for n in range(group, width, 4)) for group in range(4)
    )
    round_trip(spark, df, tmp_path / "t", table_name, column_keys=groups, path=path)


def test_long_values(spark: SparkSession, table_name: str, tmp_path: Path) -> None:
    df = spark.range(3, numPartitions=1).select("id", F.repeat(F.lit("x"), 500_000).alias("big"))
    round_trip(spark, df, tmp_path / "t", table_name, column_keys="pii: big")


def test_decimal_timestamp_binary_types(
    spark: SparkSession, table_name: str, tmp_path: Path, path: WritePath
) -> None:
    schema = StructType(
        [
            StructField("d38", DecimalType(38, 18)),
            StructField("d9", DecimalType(9, 2)),
            StructField("d0", DecimalType(20, 0)),
            StructField("ts", TimestampType()),
            StructField("ts_ntz", TimestampNTZType()),
            StructField("day", DateType()),
            StructField("raw", BinaryType()),
            StructField("flag", BooleanType()),
            StructField("tiny", ByteType()),
            StructField("small", ShortType()),
            StructField("real", FloatType()),
        ]
    )
    utc = dt.timezone.utc
    rows = [
        (
            Decimal("12345678901234567890.123456789012345678"),
            Decimal("-1234567.89"),
            Decimal("99999999999999999999"),
            dt.datetime(1900, 1, 1, 0, 0, 0, 1, tzinfo=utc),
            dt.datetime(9999, 12, 31, 23, 59, 59, 999999),
            dt.date(1, 1, 1),
            bytes(range(256)),
            True,
            -128,
            32767,
            float("inf"),
        ),
        (
            Decimal("0E-18"),
            Decimal("0.01"),
            Decimal("-1"),
            dt.datetime(2026, 3, 29, 1, 30, tzinfo=utc),
            dt.datetime(1970, 1, 1),
            dt.date(9999, 12, 31),
            b"",
            False,
            127,
            -32768,
            float("-0.0"),
        ),
        (None,) * 11,
    ]
    df = spark.createDataFrame(rows, schema)
    round_trip(spark, df, tmp_path / "t", table_name, column_keys="pii: d38, ts, raw", path=path)


def test_nan_values(spark: SparkSession, table_name: str, tmp_path: Path) -> None:
    df = spark.createDataFrame([(1, float("nan")), (2, 1.0)], "id long, x double")
    location = tmp_path / "t"
    spark_kms.write_table(df, str(location), table=table_name)
    back = sorted(tuple(r) for r in spark_kms.read_table(spark, str(location)).collect())
    assert back[0][0] == 1
    assert back[0][1] != back[0][1]
    assert back[1] == (2, 1.0)
