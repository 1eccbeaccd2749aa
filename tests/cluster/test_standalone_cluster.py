"""spark_kms on a real Spark standalone cluster: a master and two workers on loopback.

The master, the workers and the driver are separate processes, so executors
share no memory with the driver: KEKs reach them only inside task payloads.
The driver (tests.cluster.cluster_job) runs writes, concurrent appends, a
task whose Python worker dies, a speculative task, rotation and erasure, and
reports what it observed; the logs and the event log are then scanned for
secrets.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spark_kms.keyservice import KeyService
from spark_kms.settings import KmsSettings
from tests.helpers.independent_kms import read_with_independent_client
from tests.helpers.secrets import find_secrets
from tests.helpers.tables import data_files, table_keks

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
SPARK_CLASS = Path(sys.executable).parent / "spark-class"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cluster_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "SPARK_LOCAL_IP": "127.0.0.1",
            "PYSPARK_PYTHON": sys.executable,
            "PYSPARK_DRIVER_PYTHON": sys.executable,
            "SPARK_KMS_LOG_LEVEL": "DEBUG",
            "SPARK_NO_DAEMONIZE": "1",
        }
    )
    return env


def wait_for(
    log: Path, text: str, count: int, process: subprocess.Popen[bytes], seconds: float
) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if log.exists() and log.read_text(errors="replace").count(text) >= count:
            return
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]
        time.sleep(0.5)
    pytest.fail(f"{text!r} did not appear {count} time(s) in {log} within {seconds} s")


class Cluster:
    """A running master and two workers."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"spark://127.0.0.1:{self.port}"
        self.processes: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def start(self) -> None:
        master_log = self.folder / "master.log"
        master = self._spawn(
            master_log,
            "org.apache.spark.deploy.master.Master",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--webui-port",
            str(free_port()),
        )
        wait_for(master_log, "I have been elected leader", 1, master, 120)
        # Spark never starts a speculative copy of a task on the host of its
        # running attempt, so the second worker goes by the name "localhost":
        # another host to Spark, the same loopback address 127.0.0.1 to the OS.
        for number, host in ((1, "127.0.0.1"), (2, "localhost")):
            workdir = self.folder / f"worker{number}"
            workdir.mkdir()
            worker_log = self.folder / f"worker{number}.log"
            worker = self._spawn(
                worker_log,
                "org.apache.spark.deploy.worker.Worker",
                self.url,
                "--host",
                host,
                "--cores",
                "1",
                "--memory",
                "1g",
                "-d",
                str(workdir),
                "--webui-port",
                str(free_port()),
            )
            wait_for(worker_log, "Successfully registered with master", 1, worker, 120)
        wait_for(master_log, "Registering worker", 2, master, 60)

    def _spawn(self, log: Path, *args: str) -> subprocess.Popen[bytes]:
        self.logs.append(log)
        with open(log, "wb") as output:
            process = subprocess.Popen(
                [str(SPARK_CLASS), *args],
                stdout=output,
                stderr=subprocess.STDOUT,
                env=cluster_env(),
                start_new_session=True,
            )
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
        for process in reversed(self.processes):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    running = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def cluster_run(
    cluster: Cluster, kms_settings: KmsSettings, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, object]:
    workdir = tmp_path_factory.mktemp("cluster-job")
    (workdir / "events").mkdir()
    properties = workdir / "spark-kms.conf"
    properties.write_text("".join(f"{k} {v}\n" for k, v in kms_settings.to_properties().items()))
    log = workdir / "driver.log"
    with open(log, "wb") as output:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.cluster.cluster_job",
                cluster.url,
                str(properties),
                str(workdir),
            ],
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=cluster_env(),
            timeout=900,
        )
    text = log.read_text(errors="replace")
    assert done.returncode == 0, text[-5000:]
    results: dict[str, object] = json.loads(text.strip().splitlines()[-1])
    results["_workdir"] = str(workdir)
    results["_driver_log"] = str(log)
    return results


def step(results: dict[str, object], name: str) -> dict[str, object]:
    value = results[name]
    assert isinstance(value, dict)
    assert "error" not in value, value.get("error")
    return value


def test_executors_are_separate_processes(cluster_run: dict[str, object]) -> None:
    processes = step(cluster_run, "processes")
    executor_jvms = processes["executor_jvm_pids"]
    assert isinstance(executor_jvms, list)
    assert len(executor_jvms) == 2
    assert processes["driver_jvm_pid"] not in executor_jvms
    assert processes["driver_python_pid"] not in processes["worker_python_pids"]  # type: ignore[operator]


def test_round_trip_on_cluster(cluster_run: dict[str, object]) -> None:
    result = step(cluster_run, "round_trip")
    assert result["equal"] is True
    assert result["rows"] == 4000
    assert result["files"] == 4
    assert result["filtered"] == result["filtered_expected"]
    assert result["all_rows_after_filter"] == 4000


def test_concurrent_appends_on_cluster(cluster_run: dict[str, object]) -> None:
    result = step(cluster_run, "concurrent_appends")
    assert result["errors"] == []
    assert result["ids"] is True
    assert result["rows"] == 5000
    # Three jobs, each with a table KEK and a pii KEK: an append without
    # kms.column_keys keeps the table's column keys.
    assert result["kek_records"] == 6
    assert result["verify_problems"] == []


def test_retried_task_leaves_one_copy(cluster_run: dict[str, object]) -> None:
    result = step(cluster_run, "task_retry")
    assert "p0-a0" in result["markers"]  # type: ignore[operator]
    assert "p0-a1" in result["markers"]  # type: ignore[operator]
    assert result["ids"] is True
    assert len(result["files"]) == 2  # type: ignore[arg-type]
    assert result["staged"] == []
    assert result["encrypted"] is True


def test_speculative_task_leaves_one_copy(cluster_run: dict[str, object]) -> None:
    result = step(cluster_run, "speculation")
    assert "p1-a1" in result["markers"]  # type: ignore[operator]
    assert result["ids"] is True
    assert len(result["files"]) == 2  # type: ignore[arg-type]
    after = step(cluster_run, "speculation_after")
    assert after["files"] == result["files"]
    assert after["ids"] is True
    assert after["verify_problems"] == []


def test_rotation_on_cluster(cluster_run: dict[str, object]) -> None:
    result = step(cluster_run, "rotation")
    assert result.get("skipped") is None
    assert result["same_rows"] is True


def test_erasure_on_cluster(cluster_run: dict[str, object]) -> None:
    result = step(cluster_run, "erasure")
    assert str(result["read_error"]).startswith("TableErasedError: table 'cluster_flights_")


def test_no_secret_in_cluster_logs(
    cluster: Cluster,
    cluster_run: dict[str, object],
    kms_settings: KmsSettings,
    key_service: KeyService,
) -> None:
    workdir = Path(str(cluster_run["_workdir"]))
    assert kms_settings.pin_file
    secrets = [Path(kms_settings.pin_file).read_text().strip().encode()]
    for table in ("retried", "speculated"):
        keks = table_keks(key_service, workdir / table)
        secrets += list(keks.values())
        for file in data_files(workdir / table):
            _rows, seen = read_with_independent_client(str(file), keks)
            secrets += [dek for _kek_id, _wrapped, dek in seen]
    # A PIN, two KEKs and a footer DEK per file of the two tables (2 files each).
    assert len(secrets) == 7
    files = [Path(str(cluster_run["_driver_log"])), *cluster.logs]
    files += [p for p in (workdir / "events").rglob("*") if p.is_file()]
    files += [
        p for p in cluster.folder.rglob("*") if p.is_file() and p.name in ("stdout", "stderr")
    ]
    assert sum(1 for p in files if p.name == "stderr") >= 2
    for path in files:
        assert find_secrets(path.read_bytes(), secrets) == [], path
