"""Jobs started at once from several threads of one driver, or from two drivers."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession

import spark_kms
from spark_kms.keyring import KeyringStore
from spark_kms.keyservice import KeyService
from spark_kms.settings import KmsSettings
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


def test_two_drivers_append_at_once(
    spark: SparkSession,
    key_service: KeyService,
    kms_settings: KmsSettings,
    table_name: str,
    tmp_path: Path,
) -> None:
    location = tmp_path / "t"
    spark_kms.write_table(sample(spark, 0, 100), str(location), table=table_name)
    properties = tmp_path / "spark-kms.conf"
    properties.write_text("".join(f"{k} {v}\n" for k, v in kms_settings.to_properties().items()))
    go = tmp_path / "go"
    root = Path(__file__).resolve().parents[2]

    drivers = []
    for start in (1000, 2000):
        log = open(tmp_path / f"driver-{start}.log", "w")  # noqa: SIM115 (closed below)
        drivers.append(
            (
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "tests.helpers.append_job",
                        str(properties),
                        str(location),
                        table_name,
                        str(start),
                        "100",
                        str(go),
                    ],
                    cwd=root,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    deadline = time.monotonic() + 180
    logs = [tmp_path / f"driver-{start}.log" for start in (1000, 2000)]
    while not all("ready" in p.read_text() for p in logs) and time.monotonic() < deadline:
        time.sleep(0.2)
    go.touch()
    codes = [driver.wait(timeout=300) for driver, _log in drivers]
    for _driver, log in drivers:
        log.close()

    assert codes == [0, 0], [p.read_text()[-2000:] for p in logs]
    ids = sorted(r.id for r in spark_kms.read_table(spark, str(location)).collect())
    assert ids == [*range(100), *range(1000, 1100), *range(2000, 2100)]
    store = KeyringStore(str(location))
    assert len(store.list_kek_ids()) == 3
    assert len(store.list_commit_records()) == 3
    assert staged_files(location) == []
    assert verify_location(key_service, str(location)).problems == []
