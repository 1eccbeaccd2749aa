"""The driver of the standalone-cluster test, run in a process of its own.

``python -m tests.cluster.cluster_job MASTER_URL PROPERTIES WORKDIR`` runs
each step against the cluster and prints one JSON object with what it
observed as its last line. The test asserts on those values; this script
asserts nothing, so that one failing step does not hide the others.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
from pyspark import TaskContext
from pyspark.sql import DataFrame, SparkSession

import spark_kms
from spark_kms.keyservice import KeyService
from spark_kms.settings import KmsSettings
from spark_kms.verify import verify_location


def sample(spark: SparkSession, start: int, end: int, partitions: int) -> DataFrame:
    return spark.range(start, end, numPartitions=partitions).selectExpr(
        "id",
        "concat('N', id, 'XY') AS tailnum",
        "CAST(id % 300 AS INT) AS flight",
        "id * 0.5 AS dep_delay",
    )


def visible_files(location: Path) -> list[str]:
    return sorted(
        str(p.relative_to(location))
        for p in location.rglob("*.parquet")
        if not any(part.startswith(("_", ".")) for part in p.relative_to(location).parts)
    )


def staged(location: Path) -> list[str]:
    return sorted(str(p) for p in (location / "_spark_kms_staging").rglob("*") if p.is_file())


def ids(spark: SparkSession, location: Path) -> list[int]:
    with spark_kms.typed_errors():
        return sorted(
            r.id for r in spark_kms.read_table(spark, str(location)).select("id").collect()
        )


def step(results: dict[str, Any], name: str, action: Callable[[], Any]) -> None:
    started = time.monotonic()
    try:
        results[name] = action()
    except Exception as error:  # noqa: BLE001 (reported to the test)
        results[name] = {
            "error": f"{type(error).__name__}: {error}",
            "trace": traceback.format_exc()[-2000:],
        }
    results.setdefault("seconds", {})[name] = round(time.monotonic() - started, 1)


def fail_first_attempt(
    marker_dir: str,
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        context = TaskContext.get()
        assert context is not None
        Path(marker_dir, f"p{context.partitionId()}-a{context.attemptNumber()}").touch()
        first = True
        for batch in batches:
            yield batch
            # Kill the Python worker in the middle of the write of partition 0's
            # first attempt: its staged file is left half written.
            if first and context.partitionId() == 0 and context.attemptNumber() == 0:
                time.sleep(1)
                os._exit(1)
            first = False

    return run


def slow_first_attempt(
    marker_dir: str,
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        context = TaskContext.get()
        assert context is not None
        Path(marker_dir, f"p{context.partitionId()}-a{context.attemptNumber()}").touch()
        if context.partitionId() == 1 and context.attemptNumber() == 0:
            time.sleep(45)
        yield from batches

    return run


def main(master: str, properties: str, workdir: str) -> None:
    settings = KmsSettings.from_file(properties)
    root = Path(workdir)
    spark = (
        SparkSession.builder.master(master)
        .appName("spark_kms cluster test")
        .config("spark.executor.cores", "1")
        .config("spark.executor.memory", "1g")
        .config("spark.cores.max", "2")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.eventLog.enabled", "true")
        .config("spark.eventLog.dir", (root / "events").as_uri())
        .config("spark.executorEnv.SPARK_KMS_LOG_LEVEL", "DEBUG")
        .config("spark.executorEnv.PYSPARK_PYTHON", sys.executable)
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.task.maxFailures", "4")
        .config("spark.speculation", "true")
        .config("spark.speculation.interval", "200ms")
        .config("spark.speculation.multiplier", "1.5")
        .config("spark.speculation.quantile", "0.5")
        .config("spark.speculation.minTaskRuntime", "2s")
        .getOrCreate()
    )
    service: KeyService = spark_kms.configure(spark, settings)
    results: dict[str, Any] = {}
    run_id = uuid.uuid4().hex[:8]

    def processes() -> dict[str, Any]:
        pairs = (
            spark.sparkContext.parallelize(range(8), 8)
            .map(lambda _: (os.getpid(), os.getppid()))
            .collect()
        )
        return {
            "driver_python_pid": os.getpid(),
            "driver_jvm_pid": spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid(),  # type: ignore[union-attr]
            "executor_jvm_pids": sorted({parent for _pid, parent in pairs}),
            "worker_python_pids": sorted({pid for pid, _parent in pairs}),
            "executors": sorted(
                e.split(":")[0]
                for e in spark.sparkContext._jsc.sc()
                .getExecutorMemoryStatus()
                .keySet()
                .toList()
                .mkString(",")
                .split(",")  # type: ignore[union-attr]
            ),
        }

    step(results, "processes", processes)

    # Write, read, append and verify on the cluster.
    flights = root / "flights"
    flights_table = f"cluster_flights_{run_id}"

    def round_trip() -> dict[str, Any]:
        source = sample(spark, 0, 4000, 4)
        spark_kms.write_table(
            source, str(flights), table=flights_table, column_keys="pii: tailnum, flight"
        )
        back = spark_kms.read_table(spark, str(flights))
        expected = sorted(tuple(r) for r in source.collect())
        actual = sorted(tuple(r) for r in back.collect())
        filtered = back.filter("flight = 7").count()
        return {
            "equal": expected == actual,
            "rows": len(actual),
            "files": len(visible_files(flights)),
            "filtered": filtered,
            "filtered_expected": sum(1 for r in expected if r[2] == 7),
            "all_rows_after_filter": back.count(),
        }

    step(results, "round_trip", round_trip)

    def concurrent_appends() -> dict[str, Any]:
        errors: list[str] = []

        def append(start: int) -> None:
            try:
                spark_kms.write_table(
                    sample(spark, start, start + 500, 2), str(flights), table=flights_table
                )
            except Exception as error:  # noqa: BLE001
                errors.append(f"{type(error).__name__}: {error}")

        threads = [threading.Thread(target=append, args=(start,)) for start in (10_000, 20_000)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        got = ids(spark, flights)
        report = verify_location(service, str(flights))
        return {
            "errors": errors,
            "ids": got == sorted([*range(4000), *range(10_000, 10_500), *range(20_000, 20_500)]),
            "rows": len(got),
            "kek_records": len(list((flights / "_spark_kms" / "keks").iterdir())),
            "verify_problems": [f"{p.name}: {p.problem}" for p in report.problems],
        }

    step(results, "concurrent_appends", concurrent_appends)

    # A task whose Python worker dies mid-write is retried.
    retried = root / "retried"
    markers_retry = root / "markers-retry"
    markers_retry.mkdir()

    def task_retry() -> dict[str, Any]:
        source = sample(spark, 0, 2000, 2)
        flaky = source.mapInArrow(fail_first_attempt(str(markers_retry)), source.schema)
        spark_kms.write_table(flaky, str(retried), table=f"cluster_retry_{run_id}")
        got = ids(spark, retried)
        return {
            "markers": sorted(p.name for p in markers_retry.iterdir()),
            "ids": got == list(range(2000)),
            "files": visible_files(retried),
            "staged": staged(retried),
            "encrypted": all(
                (retried / f).read_bytes()[:4] == b"PARE"
                and (retried / f).read_bytes()[-4:] == b"PARE"
                for f in visible_files(retried)
            ),
        }

    step(results, "task_retry", task_retry)

    # A slow first attempt gets a speculative copy; one result per partition commits.
    speculated = root / "speculated"
    markers_speculation = root / "markers-speculation"
    markers_speculation.mkdir()

    def speculation() -> dict[str, Any]:
        source = sample(spark, 0, 2000, 2)
        slow = source.mapInArrow(slow_first_attempt(str(markers_speculation)), source.schema)
        started = time.monotonic()
        spark_kms.write_table(slow, str(speculated), table=f"cluster_speculation_{run_id}")
        took = time.monotonic() - started
        got = ids(spark, speculated)
        return {
            "markers": sorted(p.name for p in markers_speculation.iterdir()),
            "write_seconds": round(took, 1),
            "ids": got == list(range(2000)),
            "files": visible_files(speculated),
        }

    step(results, "speculation", speculation)

    # The slow attempt may still be running: give it time to finish or be killed,
    # then look for what it left behind.
    time.sleep(50)
    step(
        results,
        "speculation_after",
        lambda: {
            "files": visible_files(speculated),
            "ids": ids(spark, speculated) == list(range(2000)),
            "verify_problems": [
                p.problem for p in verify_location(service, str(speculated)).problems
            ],
        },
    )

    def rotation() -> dict[str, Any]:
        if not hasattr(service, "rotate_table"):
            return {"skipped": "no rotation in this version"}
        before = ids(spark, flights)
        report = service.rotate_table(flights_table)
        return {"same_rows": ids(spark, flights) == before, "report": repr(report)}

    step(results, "rotation", rotation)

    def erasure() -> dict[str, Any]:
        spark_kms.erase_table(spark, flights_table)
        try:
            ids(spark, flights)
        except spark_kms.TableErasedError as error:
            return {"read_error": f"TableErasedError: {error}"}
        return {"read_error": None}

    step(results, "erasure", erasure)

    spark.stop()
    print(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:4])
