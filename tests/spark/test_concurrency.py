"""Jobs started at once from several threads of one driver, on one table and on many."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession

import spark_kms
from spark_kms.keyring import KeyringStore
from spark_kms.keyservice import KeyService
from spark_kms.verify import verify_location
from tests.helpers.tables import data_files, staged_files


def sample(spark: SparkSession, start: int, rows: int) -> DataFrame:
    return spark.range(start, start + rows, numPartitions=2).selectExpr(
        "id", "concat('N', id) AS tailnum"
    )


def run_at_once(actions: list[Callable[[], object]]) -> list[str]:
    """Run each action in its own thread, all released together; return the errors."""
    barrier = threading.Barrier(len(actions))
    errors: list[str] = []

    def run(action: Callable[[], object]) -> None:
        barrier.wait()
        try:
            action()
        except Exception as error:  # noqa: BLE001 (reported to the test)
            errors.append(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=run, args=(action,)) for action in actions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    return errors


def test_two_appends_at_once(
    spark: SparkSession, key_service: KeyService, table_name: str, tmp_path: Path
) -> None:
    location = tmp_path / "t"
    spark_kms.write_table(sample(spark, 0, 100), str(location), table=table_name)

    errors = run_at_once(
        [
            lambda: spark_kms.write_table(
                sample(spark, 1000, 100), str(location), table=table_name
            ),
            lambda: spark_kms.write_table(
                sample(spark, 2000, 100), str(location), table=table_name
            ),
        ]
    )

    assert errors == []
    ids = sorted(r.id for r in spark_kms.read_table(spark, str(location)).collect())
    assert ids == [*range(100), *range(1000, 1100), *range(2000, 2100)]
    store = KeyringStore(str(location))
    assert len(store.list_kek_ids()) == 3
    assert len(store.list_commit_records()) == 3
    assert len(data_files(location)) == 6
    assert staged_files(location) == []
    report = verify_location(key_service, str(location))
    assert report.problems == []
    assert report.rows == 300


def test_many_tables_from_many_threads(
    spark: SparkSession, make_table_name, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    names = [make_table_name(f"_{number}") for number in range(4)]
    counts: dict[str, int] = {}

    def write_then_read(number: int) -> None:
        location = str(tmp_path / f"t{number}")
        spark_kms.write_table(
            sample(spark, number * 1000, 50 + number),
            location,
            table=names[number],
            column_keys="pii: tailnum",
        )
        counts[names[number]] = spark_kms.read_table(spark, location).count()

    errors = run_at_once([lambda number=number: write_then_read(number) for number in range(4)])

    assert errors == []
    assert counts == {names[number]: 50 + number for number in range(4)}


def test_filtered_then_full_read_from_threads(
    spark: SparkSession, table_name: str, tmp_path: Path
) -> None:
    # Reads of one reused DataFrame from several threads, with and without a filter.
    location = str(tmp_path / "t")
    spark_kms.write_table(sample(spark, 0, 200), location, table=table_name)
    df = spark_kms.read_table(spark, location)
    counts: dict[str, int] = {}

    def count(name: str, condition: str | None) -> None:
        counts[name] = (df.filter(condition) if condition else df).count()

    errors = run_at_once(
        [
            lambda: count("small", "id < 10"),
            lambda: count("all", None),
            lambda: count("large", "id >= 150"),
        ]
    )

    assert errors == []
    assert counts == {"small": 10, "all": 200, "large": 50}
    assert df.count() == 200
