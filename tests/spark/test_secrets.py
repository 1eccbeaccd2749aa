"""No PIN, KEK, DEK or wrapped key in logs, plans, reprs, errors, event log or audit log."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from spark_kms.keyservice import KeyService
from spark_kms.settings import KmsSettings
from tests.helpers.independent_kms import read_with_independent_client
from tests.helpers.secrets import find_secrets

JOB = Path(__file__).with_name("secret_scan_job.py")


@pytest.fixture(scope="module")
def scanned_job(
    kms_settings: KmsSettings, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, object]:
    work = tmp_path_factory.mktemp("secret-scan")
    properties = work / "kms.conf"
    properties.write_text("".join(f"{k} {v}\n" for k, v in kms_settings.to_properties().items()))
    events = work / "events"
    events.mkdir()
    table = f"secret_scan_{work.name.replace('-', '_')[-12:]}"
    result = subprocess.run(
        [sys.executable, str(JOB), str(properties), events.as_uri(), str(work), table],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return {"work": work, "events": events, "output": result.stdout + result.stderr, "table": table}


def _secrets(key_service: KeyService, kms_settings: KmsSettings, location: Path) -> list[bytes]:
    meta, store = key_service.open_table_for_read(str(location))
    keys = key_service.unwrap_keks(meta, store, store.list_kek_ids())
    keks = {kek_id: keys.kek(kek_id) for kek_id in keys.key_ids}
    secrets = list(keks.values())
    for kek_id in keks:
        record = store.get_kek_record(kek_id)
        secrets.append(base64.b64decode(record.wrapped_kek))
    for file in sorted(location.glob("*.parquet")):
        _table, seen = read_with_independent_client(str(file), keks)
        for _kek_id, wrapped, dek in seen:
            secrets.append(dek)
            secrets.append(base64.b64decode(wrapped))
    assert kms_settings.pin_file is not None
    secrets.append(Path(kms_settings.pin_file).read_text().strip().encode())
    return secrets


def test_job_output_has_no_secret(
    scanned_job: dict, key_service: KeyService, kms_settings: KmsSettings
) -> None:
    secrets = _secrets(key_service, kms_settings, scanned_job["work"] / "table")
    output = scanned_job["output"]
    assert "JobKeys(key_ids=" in output
    assert "TableErasedError" in output
    assert "DEBUG" in output
    assert find_secrets(output, secrets) == []


def test_event_log_has_no_secret(
    scanned_job: dict, key_service: KeyService, kms_settings: KmsSettings
) -> None:
    secrets = _secrets(key_service, kms_settings, scanned_job["work"] / "table")
    logs = [p for p in scanned_job["events"].rglob("*") if p.is_file()]
    assert logs
    text = b"".join(log.read_bytes() for log in logs)
    assert b"SparkListenerApplicationStart" in text
    assert b"kms_parquet" in text
    assert find_secrets(text, secrets) == []


def test_audit_log_has_no_secret(
    scanned_job: dict, key_service: KeyService, kms_settings: KmsSettings
) -> None:
    secrets = _secrets(key_service, kms_settings, scanned_job["work"] / "table")
    text = Path(kms_settings.audit_log).read_bytes()
    operations = {json.loads(line)["operation"] for line in text.splitlines()}
    assert {"wrap_kek", "unwrap_kek", "erase"} <= operations
    assert find_secrets(text, secrets) == []


def test_keyring_holds_only_wrapped_keks(
    scanned_job: dict, key_service: KeyService, kms_settings: KmsSettings
) -> None:
    location = scanned_job["work"] / "table"
    meta, store = key_service.open_table_for_read(str(location))
    keys = key_service.unwrap_keks(meta, store, store.list_kek_ids())
    plaintext = [keys.kek(k) for k in keys.key_ids]
    for record in (location / "_spark_kms").rglob("*.json"):
        assert find_secrets(record.read_bytes(), plaintext) == []
