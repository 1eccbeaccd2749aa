"""The spark-kms command line against the real token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spark_kms.keyservice import KeyService
from spark_kms.settings import KmsSettings


@pytest.fixture
def conf_file(kms_settings: KmsSettings, tmp_path: Path) -> Path:
    path = tmp_path / "kms.conf"
    path.write_text("".join(f"{k} {v}\n" for k, v in kms_settings.to_properties().items()))
    return path


def run_cli(
    conf_file: Path, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "SPARK_KMS_CONF"}
    return subprocess.run(
        [sys.executable, "-m", "spark_kms.cli", "--conf-file", str(conf_file), *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=120,
        env=environment,
    )


def test_init_checks_token(conf_file: Path, kms_settings: KmsSettings) -> None:
    result = run_cli(conf_file, "init")
    assert result.returncode == 0, result.stderr
    assert f"token '{kms_settings.token_label}'" in result.stdout
    assert "login and AES-GCM check passed" in result.stdout


def test_status_and_keys_list(
    conf_file: Path, key_service: KeyService, table_name: str, tmp_path: Path
) -> None:
    meta, store = key_service.open_table_for_write(table_name, str(tmp_path / "t"))
    key_service.mint_keks(meta, store, ["table"])
    status = run_cli(conf_file, "status", table_name, "--json")
    assert status.returncode == 0, status.stderr
    fields = json.loads(status.stdout)
    assert fields["state"] == "active"
    assert fields["master_key_present"] is True
    assert fields["kek_records"] == 1
    listing = run_cli(conf_file, "keys", "list")
    assert listing.returncode == 0, listing.stderr
    line = next(line for line in listing.stdout.splitlines() if line.startswith(table_name))
    assert line.split()[1:3] == ["active", "v1"]


def test_erase_asks_for_confirmation(
    conf_file: Path, key_service: KeyService, table_name: str, tmp_path: Path
) -> None:
    key_service.open_table_for_write(table_name, str(tmp_path / "t"))
    declined = run_cli(conf_file, "erase", table_name)
    assert declined.returncode == 3
    assert "pass --yes" in declined.stderr
    assert key_service.status(table_name).state == "active"


def test_erase_with_yes(
    conf_file: Path, key_service: KeyService, table_name: str, tmp_path: Path
) -> None:
    meta, _store = key_service.open_table_for_write(table_name, str(tmp_path / "t"))
    result = run_cli(conf_file, "erase", table_name, "--yes")
    assert result.returncode == 0, result.stderr
    assert "destroyed 1 master key object(s), 0 remain" in result.stdout
    assert key_service.hsm.count_keys(meta.master_key_label, fresh_session=True) == 0
    status = json.loads(run_cli(conf_file, "status", table_name, "--json").stdout)
    assert status["state"] == "erased"
    assert status["master_key_present"] is False


def test_erase_unknown_table(conf_file: Path) -> None:
    result = run_cli(conf_file, "erase", "no_such_table", "--yes")
    assert result.returncode == 1
    assert "TableNotFoundError: no table 'no_such_table'" in result.stderr


def test_audit_filters_by_table(
    conf_file: Path, key_service: KeyService, table_name: str, tmp_path: Path
) -> None:
    meta, store = key_service.open_table_for_write(table_name, str(tmp_path / "t"))
    key_service.mint_keks(meta, store, ["table", "pii"])
    result = run_cli(conf_file, "audit", "--table", table_name)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["operation"] for r in records] == ["create_master_key", "wrap_kek", "wrap_kek"]
    for record in records:
        assert {"time", "principal", "operation", "table", "outcome"} <= record.keys()
        assert record["table"] == table_name
        assert record["outcome"] == "ok"
    assert records[1]["key_label"] == meta.master_key_label


def test_missing_settings(tmp_path: Path) -> None:
    result = run_cli(tmp_path / "absent.conf", "init")
    assert result.returncode == 1
    assert "cannot read properties file" in result.stderr
