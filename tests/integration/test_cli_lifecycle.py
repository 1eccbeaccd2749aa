"""The lifecycle commands of spark-kms, run as a separate process against the real token."""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from spark_kms.keyring import KeyringStore
from spark_kms.keyservice import KeyService
from spark_kms.partitioning import partition_folder
from spark_kms.registry import TableRegistry
from spark_kms.settings import KmsSettings


@pytest.fixture
def own_settings(kms_settings: KmsSettings, tmp_path: Path) -> KmsSettings:
    """Settings with a registry and audit log of this test only (--due visits every table)."""
    return replace(
        kms_settings,
        registry_dir=str(tmp_path / "registry"),
        audit_log=str(tmp_path / "audit.log"),
    )


@pytest.fixture
def service(own_settings: KmsSettings, key_service: KeyService) -> KeyService:
    return KeyService(own_settings, hsm=key_service.hsm)


def write_conf(settings: KmsSettings, path: Path) -> Path:
    path.write_text("".join(f"{k} {v}\n" for k, v in settings.to_properties().items()))
    return path


@pytest.fixture
def conf_file(own_settings: KmsSettings, tmp_path: Path) -> Path:
    return write_conf(own_settings, tmp_path / "kms.conf")


def run_cli(conf_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("SPARK_KMS_CONF", "SPARK_USER")}
    return subprocess.run(
        [sys.executable, "-m", "spark_kms.cli", "--conf-file", str(conf_file), *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
        env=environment,
    )


def make_table(service: KeyService, table: str, location: Path, jobs: int = 2) -> None:
    meta, store = service.open_table_for_write(table, str(location))
    for _ in range(jobs):
        service.mint_keks(meta, store, ["table"])


def age_master_key(location: Path, days: int) -> None:
    store = KeyringStore(str(location))
    meta = store.read_metadata()
    assert meta is not None
    meta.master_key_since = (datetime.now(timezone.utc) - timedelta(days=days)).isoformat()
    store.write_metadata(meta)


def test_rotate_command(conf_file: Path, service: KeyService, table_name: str, tmp_path: Path) -> None:
    make_table(service, table_name, tmp_path / "t")
    result = run_cli(conf_file, "rotate", table_name)
    assert result.returncode == 0, result.stderr
    assert f"rotated table '{table_name}': table master key now version 2" in result.stdout
    assert "2 of 2 KEK record(s) rewrapped, 1 old key object(s) destroyed" in result.stdout
    assert service.status(table_name).master_key_version == 2


def test_rotate_due_command(conf_file: Path, service: KeyService, make_table_name, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    due, fresh = make_table_name("due"), make_table_name("fresh")
    make_table(service, due, tmp_path / "due")
    make_table(service, fresh, tmp_path / "fresh")
    age_master_key(tmp_path / "due", 366)

    result = run_cli(conf_file, "rotate", "--due")
    assert result.returncode == 0, result.stderr
    assert f"rotated table '{due}'" in result.stdout
    assert fresh not in result.stdout
    assert service.status(due).master_key_version == 2
    assert service.status(fresh).master_key_version == 1

    again = run_cli(conf_file, "rotate", "--due")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "no table is due for rotation"


def test_rotate_needs_one_target(conf_file: Path) -> None:
    result = run_cli(conf_file, "rotate")
    assert result.returncode == 2
    assert "one of the arguments table --due is required" in result.stderr


def test_set_rotation_period_command(conf_file: Path, service: KeyService, table_name: str, tmp_path: Path) -> None:
    make_table(service, table_name, tmp_path / "t", jobs=0)
    result = run_cli(conf_file, "set-rotation-period", table_name, "90")
    assert result.returncode == 0, result.stderr
    assert f"table '{table_name}': rotation period 90 day(s), next rotation due" in result.stdout
    assert service.status(table_name).rotation_period_days == 90
    bad = run_cli(conf_file, "set-rotation-period", table_name, "4000")
    assert bad.returncode == 1
    assert "InvalidOptionError: invalid rotation period '4000'" in bad.stderr
    assert service.status(table_name).rotation_period_days == 90


def test_deletion_commands(conf_file: Path, service: KeyService, table_name: str, tmp_path: Path) -> None:
    make_table(service, table_name, tmp_path / "t", jobs=1)
    scheduled = run_cli(conf_file, "schedule-deletion", table_name, "--days", "3")
    assert scheduled.returncode == 0, scheduled.stderr
    due = datetime.fromisoformat(service.status(table_name).deletion_due_at or "")
    assert timedelta(days=2.99) < due - datetime.now(timezone.utc) <= timedelta(days=3)
    day = due.strftime("%Y-%m-%d")
    assert f"table '{table_name}' is scheduled for deletion on {day}" in scheduled.stdout
    assert f"run 'spark-kms cancel-deletion {table_name}'" in scheduled.stdout
    assert service.status(table_name).state == "pending_deletion"

    cancelled = run_cli(conf_file, "cancel-deletion", table_name)
    assert cancelled.returncode == 0, cancelled.stderr
    assert service.status(table_name).state == "active"

    out_of_range = run_cli(conf_file, "schedule-deletion", table_name, "--days", "31")
    assert out_of_range.returncode == 1
    assert "invalid deletion waiting period 31 days: give 1 to 30 days (default 7)" in out_of_range.stderr
    assert service.status(table_name).state == "active"

    nothing = run_cli(conf_file, "cancel-deletion", table_name)
    assert nothing.returncode == 1
    assert "is not scheduled for deletion" in nothing.stderr


def test_purge_due_command(conf_file: Path, service: KeyService, own_settings: KmsSettings, make_table_name, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    due, waiting = make_table_name("due"), make_table_name("waiting")
    make_table(service, due, tmp_path / "due", jobs=1)
    make_table(service, waiting, tmp_path / "waiting", jobs=1)
    service.schedule_deletion(due, days=1)
    service.schedule_deletion(waiting, days=7)
    # A day and a bit later for the first table: its due date moves into the past.
    registry = TableRegistry(own_settings.registry_dir)
    entry = registry.get(due)
    assert entry is not None
    entry.deletion_due_at = (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat()
    registry.put(entry)

    result = run_cli(conf_file, "purge-due")

    assert result.returncode == 0, result.stderr
    assert f"erased table '{due}' (deletion due): destroyed 1 master key object(s), 0 remain" in result.stdout
    assert waiting not in result.stdout
    assert service.status(due).state == "erased"
    assert service.status(waiting).state == "pending_deletion"
    assert service.hsm.list_key_labels(f"spark_kms/{due}/") == []
    again = run_cli(conf_file, "purge-due")
    assert again.stdout.strip() == "no table deletion is due"


def test_erase_partition_command(conf_file: Path, service: KeyService, table_name: str, tmp_path: Path) -> None:
    meta, store = service.open_table_for_write(table_name, str(tmp_path / "t"), partition_by="customer_id")
    for value in ("41", "42"):
        service.mint_partition_keks(meta, store, partition_folder("customer_id", value), ["table"], job_id="j")

    unconfirmed = run_cli(conf_file, "erase", table_name, "--partition", "customer_id=42")
    assert unconfirmed.returncode == 3
    assert "erase needs confirmation" in unconfirmed.stderr

    result = run_cli(conf_file, "erase", table_name, "--partition", "customer_id=42", "--yes")
    assert result.returncode == 0, result.stderr
    assert f"erased partition customer_id=42 of table '{table_name}': destroyed 1 master key object(s), 0 remain" in result.stdout
    states = {p["partition"]: p["state"] for p in service.status(table_name).partitions}
    assert states == {"customer_id=41": "active", "customer_id=42": "erased"}

    status = run_cli(conf_file, "status", table_name)
    assert "partition            customer_id=42 erased (master key v1)" in status.stdout
    unknown = run_cli(conf_file, "erase", table_name, "--partition", "customer_id=7", "--yes")
    assert unknown.returncode == 1
    assert "PartitionNotFoundError: table" in unknown.stderr


def test_policy_denies_cli_user(own_settings: KmsSettings, service: KeyService, table_name: str, tmp_path: Path) -> None:
    make_table(service, table_name, tmp_path / "t", jobs=1)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"rules": [{"principals": ["secops"], "tables": ["*"], "operations": ["admin"]}]}))
    conf = write_conf(replace(own_settings, policy_file=str(policy)), tmp_path / "policy.conf")
    user = getpass.getuser()

    for command in (["rotate", table_name], ["schedule-deletion", table_name], ["erase", table_name, "--yes"]):
        result = run_cli(conf, *command)
        assert result.returncode == 1
        assert f"AccessDeniedError: access denied: principal '{user}' may not perform 'admin (" in result.stderr
        assert f"on table '{table_name}'" in result.stderr
    status = service.status(table_name)
    assert status.state == "active"
    assert status.master_key_version == 1
    assert status.master_key_present is True
    denials = [r for r in service.audit.records() if r["operation"] == "policy" and r.get("table") == table_name]
    assert [(r["principal"], r["action"], r["outcome"]) for r in denials] == [
        (user, "rotate", "deny"),
        (user, "schedule-deletion", "deny"),
        (user, "erase", "deny"),
    ]


def test_audit_filters_and_verify(conf_file: Path, service: KeyService, own_settings: KmsSettings, make_table_name, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first, second = make_table_name("a"), make_table_name("b")
    make_table(service, first, tmp_path / "a", jobs=1)
    make_table(service, second, tmp_path / "b", jobs=2)
    service.rotate_table(second)

    by_table = run_cli(conf_file, "audit", "--table", second, "--operation", "wrap_kek")
    assert by_table.returncode == 0, by_table.stderr
    records = [json.loads(line) for line in by_table.stdout.splitlines()]
    assert len(records) == 2
    assert {r["table"] for r in records} == {second}
    assert {r["operation"] for r in records} == {"wrap_kek"}
    future = run_cli(conf_file, "audit", "--since", "2999-01-01")
    assert future.returncode == 0
    assert future.stdout == ""
    past = run_cli(conf_file, "audit", "--until", "2000-01-01T00:00:00")
    assert past.stdout == ""
    everything = run_cli(conf_file, "audit", "--since", "2000-01-01")
    assert len(everything.stdout.splitlines()) == service.audit.count()
    bad_time = run_cli(conf_file, "audit", "--since", "yesterday")
    assert bad_time.returncode == 2
    assert "invalid time" in bad_time.stderr

    intact = run_cli(conf_file, "audit", "--verify")
    assert intact.returncode == 0, intact.stdout
    assert intact.stdout.strip() == "audit log intact"

    log = Path(own_settings.audit_log)
    lines = log.read_bytes().splitlines(keepends=True)
    edited = json.loads(lines[2])
    edited["outcome"] = "failed"
    lines[2] = json.dumps(edited, sort_keys=True).encode() + b"\n"
    log.write_bytes(b"".join(lines))
    tampered = run_cli(conf_file, "audit", "--verify")
    assert tampered.returncode == 1
    assert "line 4: hash chain broken" in tampered.stdout

    log.write_bytes(b"".join(lines[:-1]))
    truncated = run_cli(conf_file, "audit", "--verify")
    assert truncated.returncode == 1
    assert f"the log has {len(lines) - 1} line(s) but {len(lines)} were appended" in truncated.stdout
