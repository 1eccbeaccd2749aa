"""A driver killed between persisting its KEK record and committing.

A second driver process (tests.helpers.slow_write_job) starts an append
whose task stalls after staging its first batch; the test kills that driver's
whole process group with SIGKILL once the job's KEK record and staged file
exist, then checks what a later reader, ``spark-kms verify`` and the next
write see.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pyspark.sql import SparkSession

import spark_kms
from spark_kms import cli
from spark_kms.keyring import KeyringStore
from spark_kms.keyservice import KeyService
from spark_kms.settings import KmsSettings
from spark_kms.staging import list_staged_jobs
from spark_kms.verify import verify_location
from tests.helpers.tables import data_files, staged_files

ROOT = Path(__file__).resolve().parents[2]
JOB = "tests.helpers.slow_write_job"
TWO_DAYS = 2 * 24 * 3600


def write_properties(settings: KmsSettings, folder: Path) -> Path:
    path = folder / "spark-kms.conf"
    path.write_text("".join(f"{k} {v}\n" for k, v in settings.to_properties().items()))
    return path


def kill_driver_before_commit(properties: Path, location: Path, table: str, log: Path) -> None:
    keks_before = set((location / "_spark_kms" / "keks").iterdir())
    with open(log, "wb") as output:
        driver = subprocess.Popen(
            # As a module: run as a script, tests/helpers would shadow the standard
            # library's secrets module with tests/helpers/secrets.py.
            [sys.executable, "-m", JOB, str(properties), str(location), table],
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=ROOT,
        )
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                new_keks = set((location / "_spark_kms" / "keks").iterdir()) - keks_before
                if new_keks and staged_files(location):
                    break
                assert driver.poll() is None, log.read_text()[-3000:]
                time.sleep(0.2)
            else:
                pytest.fail("the driver staged no file within 120 s")
        finally:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(timeout=60)


def backdate(folder: Path, seconds: float) -> None:
    stamp = time.time() - seconds
    for path in [folder, *folder.rglob("*")]:
        os.utime(path, (stamp, stamp))


def run_cli(capsys: pytest.CaptureFixture[str], properties: Path, *args: str) -> tuple[int, str]:
    code = cli.main(["--conf-file", str(properties), *args])
    return code, capsys.readouterr().out


def test_killed_driver_leaves_table_readable(
    spark: SparkSession,
    key_service: KeyService,
    kms_settings: KmsSettings,
    table_name: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    location = tmp_path / "t"
    source = spark.range(0, 100, numPartitions=2).selectExpr("id", "concat('N', id) AS tailnum")
    spark_kms.write_table(source, str(location), table=table_name)
    rows_before = sorted(tuple(r) for r in spark_kms.read_table(spark, str(location)).collect())
    files_before = data_files(location)
    keks_before = sorted(p.name for p in (location / "_spark_kms" / "keks").iterdir())
    properties = write_properties(kms_settings, tmp_path)

    kill_driver_before_commit(properties, location, table_name, tmp_path / "driver.log")

    # The killed job's KEK record stays, nothing of it is visible, the table reads as before.
    keks_after = sorted(p.name for p in (location / "_spark_kms" / "keks").iterdir())
    assert set(keks_before) < set(keks_after)
    assert len(keks_after) == len(keks_before) + 1
    assert data_files(location) == files_before
    rows_after = sorted(tuple(r) for r in spark_kms.read_table(spark, str(location)).collect())
    assert rows_after == rows_before
    staged = list_staged_jobs(KeyringStore(str(location)))
    assert len(staged) == 1
    assert staged[0].committed is False

    # verify reports the staged job but no problem, and --repair leaves a fresh folder alone.
    code, output = run_cli(capsys, properties, "verify", table_name, "--repair")
    assert code == 0
    assert f"staged job {staged[0].job_id}: 1 file(s)" in output
    assert "(never committed)" in output
    assert staged_files(location)

    # Once the folder is stale, the next write removes it and commits normally.
    backdate(location / "_spark_kms_staging", TWO_DAYS)
    spark_kms.write_table(source, str(location), table=table_name)
    assert staged_files(location) == []
    assert spark_kms.read_table(spark, str(location)).count() == 200
    report = verify_location(key_service, str(location))
    assert report.problems == []
    assert report.rows == 200
    assert report.staged_jobs == []
    assert len(list((location / "_spark_kms" / "keks").iterdir())) == len(keks_before) + 2


def test_repair_rolls_committed_job_forward(
    spark: SparkSession,
    key_service: KeyService,
    kms_settings: KmsSettings,
    table_name: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A driver that died halfway through moving its committed files: the
    # commit record exists, one file is in place and one is still staged.
    location = tmp_path / "t"
    spark_kms.write_table(spark.range(0, 40, numPartitions=1), str(location), table=table_name)
    spark_kms.write_table(spark.range(40, 100, numPartitions=2), str(location), table=table_name)
    store = KeyringStore(str(location))
    second = store.list_commit_records()[-1]
    staging = location / "_spark_kms_staging" / second.job_id
    staging.mkdir(parents=True)
    (location / second.files[0]).rename(staging / second.files[0])
    # And a job that never committed.
    orphan = location / "_spark_kms_staging" / "0123456789abcdef"
    orphan.mkdir()
    (orphan / "part-00000-orphan.parquet").write_bytes(b"PARE" + b"\0" * 64)
    properties = write_properties(kms_settings, tmp_path)

    code, output = run_cli(capsys, properties, "verify", table_name)
    assert code == 1
    assert f"PROBLEM {second.files[0]}: a commit record names this file but it is missing" in output
    assert spark_kms.read_table(spark, str(location)).count() == 70

    code, output = run_cli(capsys, properties, "verify", table_name, "--repair", "--older-than", "0")
    assert code == 0
    assert f"repaired staging folder of job {second.job_id}: rolled forward 1 file(s)" in output
    assert "repaired staging folder of job 0123456789abcdef: removed 1 file(s)" in output
    assert staged_files(location) == []
    assert sorted(p.name for p in data_files(location)) == sorted(
        store.list_commit_records()[0].files + second.files
    )
    rows = sorted(r.id for r in spark_kms.read_table(spark, str(location)).collect())
    assert rows == list(range(100))
