"""No KEK, DEK or wrapped key of the JVM bridge in plans, logs, errors, event log or the UI."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from spark_kms import bridge
from spark_kms.keyservice import KeyService
from spark_kms.settings import KmsSettings
from tests.helpers.independent_kms import read_with_independent_client
from tests.helpers.native import parquet_files, table_keks
from tests.helpers.secrets import find_secrets

JOB = Path(__file__).with_name("bridge_secret_job.py")


@pytest.fixture(scope="module")
def bridge_job(
    kms_settings: KmsSettings, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, object]:
    work = tmp_path_factory.mktemp("bridge-secret-scan")
    properties = work / "kms.conf"
    properties.write_text("".join(f"{k} {v}\n" for k, v in kms_settings.to_properties().items()))
    events = work / "events"
    events.mkdir()
    prefix = f"bridge_scan_{work.name.replace('-', '_')[-12:]}"
    result = subprocess.run(
        [sys.executable, str(JOB), str(properties), events.as_uri(), str(work), prefix],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return {"work": work, "events": events, "output": result.stdout + result.stderr}


@pytest.fixture(scope="module")
def secrets(bridge_job: dict[str, object], key_service: KeyService) -> list[bytes]:
    """KEKs, their wrapped records, and the DEKs and wrapped DEKs of every file."""
    work = bridge_job["work"]
    assert isinstance(work, Path)
    found: list[bytes] = []
    for location in (work / "parquet", work / "delta"):
        keks = table_keks(key_service, location)
        found += keks.values()
        meta, store = key_service.open_table_for_read(str(location))
        for kek_id in keks:
            found.append(base64.b64decode(store.get_kek_record(kek_id).wrapped_kek))
        for file in parquet_files(location):
            _table, seen = read_with_independent_client(str(file), keks)
            for _kek_id, wrapped, dek in seen:
                found += [dek, base64.b64decode(wrapped)]
    assert len(found) > 20
    return found


def test_scan_finds_keks_as_carried(bridge_job: dict[str, object], secrets: list[bytes]) -> None:
    work = bridge_job["work"]
    assert isinstance(work, Path)

    control = (work / "control.txt").read_text()

    assert find_secrets(control, secrets)


def test_job_output_has_no_kek(bridge_job: dict[str, object], secrets: list[bytes]) -> None:
    output = bridge_job["output"]
    assert isinstance(output, str)

    # The channels the job exercised: plans, DEBUG logs, SET, and the rejections.
    assert "== Physical Plan ==" in output
    assert "DEBUG" in output
    assert "org.apache.parquet.crypto" in output
    assert f"{bridge.KEKS}" in output
    assert "spark_kms.errors.ConfigurationError: rejected a write" in output
    assert "KeyNotFoundError" in output
    assert find_secrets(output, secrets) == []


def test_event_log_has_no_kek(bridge_job: dict[str, object], secrets: list[bytes]) -> None:
    events = bridge_job["events"]
    assert isinstance(events, Path)
    logs = [p for p in events.rglob("*") if p.is_file()]
    assert logs

    text = b"".join(log.read_bytes() for log in logs)

    assert b"SparkListenerSQLExecutionStart" in text
    # The session configuration reaches the event log, with the KEKs redacted.
    assert bridge.KEKS.encode() in text
    assert b"*********(redacted)" in text
    assert find_secrets(text, secrets) == []


def test_ui_has_no_kek(bridge_job: dict[str, object], secrets: list[bytes]) -> None:
    work = bridge_job["work"]
    assert isinstance(work, Path)

    shown = json.loads((work / "ui.json").read_text())

    assert "sparkProperties" in shown["environment"]
    assert "hadoopProperties" in shown["environment"]
    assert "planDescription" in shown["sql"]
    for page in ("environment", "sql", "jobs"):
        assert find_secrets(shown[page], secrets) == [], page
