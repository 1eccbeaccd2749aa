"""Key lifecycle against the real SoftHSM2 token: rotation, scheduled deletion,
partition master keys and erasure, the access policy and the audit trail."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from spark_kms import rotation
from spark_kms.audit import verify_chain
from spark_kms.errors import (
    AccessDeniedError,
    HsmUnavailableError,
    IntegrityError,
    InvalidOptionError,
    PartitionErasedError,
    PartitionNotFoundError,
    TableErasedError,
    TablePendingDeletionError,
    TableStateError,
)
from spark_kms.keylabels import master_key_label
from spark_kms.keyring import KeyringStore
from spark_kms.keyservice import KeyService
from spark_kms.partitioning import partition_folder
from spark_kms.settings import KmsSettings
from tests.helpers.hsm_lookups import count_lookups
from tests.helpers.secrets import find_secrets


def later(days: float) -> Callable[[], datetime]:
    """A clock that runs ``days`` ahead of the real one."""
    return lambda: datetime.now(timezone.utc) + timedelta(days=days)


@pytest.fixture
def service(kms_settings: KmsSettings, key_service: KeyService) -> KeyService:
    """A key service of its own (so tests may move its clock) on the shared HSM connection."""
    return KeyService(kms_settings, hsm=key_service.hsm)


def write_jobs(service: KeyService, table: str, location: Path, jobs: int, groups: list[str]) -> dict[str, bytes]:
    """Mint the KEKs of ``jobs`` write jobs; return every KEK by id."""
    meta, store = service.open_table_for_write(table, str(location))
    keks: dict[str, bytes] = {}
    for _ in range(jobs):
        minted = service.mint_keks(meta, store, groups)
        keks.update({kek_id: minted.keys.kek(kek_id) for kek_id in minted.keys.key_ids})
    return keks


def records(location: Path) -> dict[str, dict]:  # type: ignore[type-arg]
    folder = location / "_spark_kms" / "keks"
    return {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}


def audit_of(service: KeyService, table: str) -> list[dict]:  # type: ignore[type-arg]
    return [r for r in service.audit.records() if r.get("table") == table]


# Rotation ----------------------------------------------------------------------


def test_rotation_rewraps_every_record(service: KeyService, table_name: str, tmp_path: Path) -> None:
    location = tmp_path / "t"
    keks = write_jobs(service, table_name, location, jobs=3, groups=["table", "pii"])
    meta, _ = service.open_table_for_read(str(location))
    old_label = meta.master_key_label

    report = service.rotate_table(table_name)

    assert report.resumed is False
    assert report.table_key_version == 2
    assert report.records_total == 6
    assert report.records_rewrapped == 6
    assert report.destroyed_objects == 1
    new_label = master_key_label(table_name, meta.table_id, 2)
    assert {r["master_key_label"] for r in records(location).values()} == {new_label}
    assert {r["master_key_version"] for r in records(location).values()} == {2}
    assert service.hsm.count_keys(old_label, fresh_session=True) == 0
    assert service.hsm.count_keys(new_label, fresh_session=True) == 1

    meta, store = service.open_table_for_read(str(location))
    unwrapped = service.unwrap_keks(meta, store, keks)
    for kek_id, kek in keks.items():
        assert unwrapped.kek(kek_id) == kek
    status = service.status(table_name)
    assert status.master_key_version == 2
    assert status.master_key_present is True
    assert status.rotation_in_progress is False


def test_new_writes_use_new_version(service: KeyService, table_name: str, tmp_path: Path) -> None:
    write_jobs(service, table_name, tmp_path / "t", jobs=1, groups=["table"])
    service.rotate_table(table_name)
    meta, store = service.open_table_for_write(table_name, str(tmp_path / "t"))
    minted = service.mint_keks(meta, store, ["table"])
    record = store.get_kek_record(minted.kek_ids["table"])
    assert record.master_key_version == 2
    assert record.master_key_label.endswith("/v2")


def test_rotation_cost_follows_records(service: KeyService, make_table_name, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    costs = {}
    for jobs in (2, 8):
        table = make_table_name(f"j{jobs}")
        write_jobs(service, table, tmp_path / table, jobs=jobs, groups=["table"])
        report = service.rotate_table(table)
        costs[jobs] = report.hsm_operations
    # One key generation and one destruction, then unwrap, wrap and check per record.
    assert costs[2] == 2 + 3 * 2
    assert costs[8] == 2 + 3 * 8


def test_rotation_lookups_stay_constant(
    service: KeyService, make_table_name, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    lookups = count_lookups(monkeypatch)
    counts = {}
    for jobs in (2, 20):
        table = make_table_name(f"j{jobs}")
        write_jobs(service, table, tmp_path / table, jobs=jobs, groups=["table"])
        lookups.clear()
        report = service.rotate_table(table)
        assert report.records_rewrapped == jobs
        counts[jobs] = len(lookups)
    # The check that version 2 is new, then versions 1 and 2 once in the one batch.
    assert counts[2] == 3
    assert counts[20] == 3


def test_rotation_in_several_batches(
    service: KeyService, table_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    location = tmp_path / "t"
    keks = write_jobs(service, table_name, location, jobs=10, groups=["table"])
    monkeypatch.setattr(rotation, "REWRAP_BATCH_RECORDS", 4)
    lookups = count_lookups(monkeypatch)
    encrypts, decrypts = service.hsm.stats.encrypt, service.hsm.stats.decrypt

    report = service.rotate_table(table_name)

    assert report.records_rewrapped == 10
    assert report.hsm_operations == 2 + 3 * 10
    assert service.hsm.stats.encrypt - encrypts == 10
    assert service.hsm.stats.decrypt - decrypts == 20
    # Batches of 4, 4 and 2 records each look up versions 1 and 2.
    assert len(lookups) == 1 + 3 * 2
    assert {r["master_key_version"] for r in records(location).values()} == {2}
    rewraps = [r for r in audit_of(service, table_name) if r["operation"] == "rewrap_kek"]
    assert sorted(kek_id for r in rewraps for kek_id in r["kek_ids"]) == sorted(keks)
    meta, store = service.open_table_for_read(str(location))
    unwrapped = service.unwrap_keks(meta, store, keks)
    assert all(unwrapped.kek(kek_id) == kek for kek_id, kek in keks.items())


def test_rotation_names_tampered_record(service: KeyService, table_name: str, tmp_path: Path) -> None:
    location = tmp_path / "t"
    keks = write_jobs(service, table_name, location, jobs=6, groups=["table"])
    store = KeyringStore(str(location))
    order = store.list_kek_ids()
    victim = location / "_spark_kms" / "keks" / f"{order[3]}.json"
    original = victim.read_text()
    record = json.loads(original)
    wrapped = bytearray(base64.b64decode(record["wrapped_kek"]))
    wrapped[-1] ^= 0x01
    record["wrapped_kek"] = base64.b64encode(bytes(wrapped)).decode()
    victim.write_text(json.dumps(record))

    with pytest.raises(IntegrityError, match=f"KEK record {order[3]} of table '{table_name}' failed authentication"):
        service.rotate_table(table_name)

    # The records before the tampered one are rewrapped, the others are not yet.
    versions = {kek_id: r["master_key_version"] for kek_id, r in records(location).items()}
    assert [versions[kek_id] for kek_id in order] == [2, 2, 2, 1, 1, 1]
    victim.write_text(original)
    report = service.rotate_table(table_name)
    assert report.records_rewrapped == 3
    assert {r["master_key_version"] for r in records(location).values()} == {2}
    meta, store = service.open_table_for_read(str(location))
    unwrapped = service.unwrap_keks(meta, store, keks)
    assert all(unwrapped.kek(kek_id) == kek for kek_id, kek in keks.items())


def test_missing_key_after_erasure_named(service: KeyService, table_name: str, tmp_path: Path) -> None:
    # A rotation whose master key disappears reports the erasure that destroyed it.
    location = tmp_path / "t"
    keks = write_jobs(service, table_name, location, jobs=1, groups=["table"])
    meta, store = service.open_table_for_read(str(location))
    record = store.get_kek_record(next(iter(keks)))
    rotation._raise_if_erased(store, meta, record)

    service.erase_table(table_name)

    with pytest.raises(TableErasedError, match="erased during the rotation"):
        rotation._raise_if_erased(store, meta, record)


def test_unwrap_looks_each_version_up_once(
    service: KeyService, table_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    location = tmp_path / "t"
    keks = write_jobs(service, table_name, location, jobs=6, groups=["table", "pii"])
    meta, store = service.open_table_for_read(str(location))
    lookups = count_lookups(monkeypatch)
    decrypts = service.hsm.stats.decrypt

    unwrapped = service.unwrap_keks(meta, store, keks, job_id="0123456789abcdef")

    assert lookups == [meta.master_key_label]
    assert service.hsm.stats.decrypt - decrypts == 12
    assert all(unwrapped.kek(kek_id) == kek for kek_id, kek in keks.items())
    unwraps = [r for r in audit_of(service, table_name) if r["operation"] == "unwrap_kek"]
    assert sorted(kek_id for r in unwraps for kek_id in r["kek_ids"]) == sorted(keks)
    assert {r["outcome"] for r in unwraps} == {"ok"}


def test_interrupted_rotation_resumes(
    service: KeyService, table_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    location = tmp_path / "t"
    keks = write_jobs(service, table_name, location, jobs=4, groups=["table"])
    meta, _ = service.open_table_for_read(str(location))
    old_label = meta.master_key_label
    replaced: list[str] = []
    original = KeyringStore.replace_kek_record

    def stop_after_two(store: KeyringStore, record) -> None:  # type: ignore[no-untyped-def]
        if len(replaced) == 2:
            raise HsmUnavailableError("simulated crash in the middle of a rotation")
        replaced.append(record.kek_id)
        original(store, record)

    monkeypatch.setattr(KeyringStore, "replace_kek_record", stop_after_two)
    with pytest.raises(HsmUnavailableError, match="simulated crash"):
        service.rotate_table(table_name)
    monkeypatch.undo()

    # Half-way: both versions are in the token and every record unwraps.
    versions = [r["master_key_version"] for r in records(location).values()]
    assert sorted(versions) == [1, 1, 2, 2]
    assert service.hsm.count_keys(old_label, fresh_session=True) == 1
    # The keyring is read directly: opening the table would resume the rotation.
    store = KeyringStore(str(location))
    meta = store.read_metadata()
    assert meta is not None
    assert meta.rotation_started_at is not None
    assert meta.master_key_version == 2
    unwrapped = service.unwrap_keks(meta, store, keks)
    assert all(unwrapped.kek(kek_id) == kek for kek_id, kek in keks.items())
    minted = service.mint_keks(meta, store, ["table"])
    assert store.get_kek_record(minted.kek_ids["table"]).master_key_version == 2

    report = service.rotate_table(table_name)

    assert report.resumed is True
    assert report.table_key_version == 2
    assert report.records_rewrapped == 2
    assert {r["master_key_version"] for r in records(location).values()} == {2}
    assert service.hsm.count_keys(old_label, fresh_session=True) == 0
    meta, store = service.open_table_for_read(str(location))
    assert meta.rotation_started_at is None
    assert meta.rotation_pending is None
    unwrapped = service.unwrap_keks(meta, store, keks)
    assert all(unwrapped.kek(kek_id) == kek for kek_id, kek in keks.items())


def test_interrupted_rotation_resumes_on_open(
    service: KeyService, table_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    location = tmp_path / "t"
    write_jobs(service, table_name, location, jobs=2, groups=["table"])

    def crash(store: KeyringStore, record) -> None:  # type: ignore[no-untyped-def]
        raise HsmUnavailableError("simulated crash before any record was rewrapped")

    monkeypatch.setattr(KeyringStore, "replace_kek_record", crash)
    with pytest.raises(HsmUnavailableError, match="simulated crash"):
        service.rotate_table(table_name)
    monkeypatch.undo()

    meta, _ = service.open_table_for_read(str(location))

    assert meta.rotation_started_at is None
    assert meta.master_key_version == 2
    assert {r["master_key_version"] for r in records(location).values()} == {2}
    assert service.hsm.list_key_labels(f"spark_kms/{table_name}/") == [meta.master_key_label]
    outcomes = [(r["outcome"], r.get("resumed")) for r in audit_of(service, table_name) if r["operation"] == "rotate"]
    assert outcomes == [("failed: HsmUnavailableError", None), ("ok", True)]


def test_rotation_reuses_orphan_version(service: KeyService, table_name: str, tmp_path: Path) -> None:
    write_jobs(service, table_name, tmp_path / "t", jobs=1, groups=["table"])
    meta, _ = service.open_table_for_read(str(tmp_path / "t"))
    # A rotation that stopped right after creating version 2 left it in the token.
    orphan = master_key_label(table_name, meta.table_id, 2)
    service.hsm.generate_master_key(orphan)
    report = service.rotate_table(table_name)
    assert report.table_key_version == 2
    assert service.hsm.count_keys(orphan, fresh_session=True) == 1
    assert service.hsm.list_key_labels(f"spark_kms/{table_name}/") == [orphan]


def test_due_rotation_runs_on_open(service: KeyService, table_name: str, tmp_path: Path) -> None:
    write_jobs(service, table_name, tmp_path / "t", jobs=2, groups=["table"])
    meta, _ = service.open_table_for_read(str(tmp_path / "t"))
    assert meta.master_key_version == 1

    service.clock = later(364)
    meta, _ = service.open_table_for_read(str(tmp_path / "t"))
    assert meta.master_key_version == 1

    service.clock = later(366)
    meta, _ = service.open_table_for_read(str(tmp_path / "t"))
    assert meta.master_key_version == 2
    rotations = [r for r in audit_of(service, table_name) if r["operation"] == "rotate"]
    assert [(r["outcome"], r["trigger"]) for r in rotations] == [("ok", "scheduled")]


def test_rotate_due_picks_due_tables(
    kms_settings: KmsSettings, key_service: KeyService, make_table_name, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    # A registry of its own: rotate_due visits every registered table.
    settings = replace(kms_settings, registry_dir=str(tmp_path / "registry"))
    service = KeyService(settings, hsm=key_service.hsm)
    short, default, never = make_table_name("short"), make_table_name("default"), make_table_name("never")
    service.open_table_for_write(short, str(tmp_path / "short"), rotation_period_days=30)
    service.open_table_for_write(default, str(tmp_path / "default"))
    service.open_table_for_write(never, str(tmp_path / "never"), rotation_period_days=0)

    service.clock = later(31)
    rotated = [report.table for report in service.rotate_due()]
    assert short in rotated
    assert default not in rotated
    assert never not in rotated

    service.clock = later(400)
    rotated = [report.table for report in service.rotate_due()]
    assert default in rotated
    assert never not in rotated
    assert service.status(never).rotation_due_at is None


def test_rotation_period_changes(service: KeyService, table_name: str, tmp_path: Path) -> None:
    service.open_table_for_write(table_name, str(tmp_path / "t"))
    assert service.status(table_name).rotation_period_days == 365
    service.set_rotation_period(table_name, 90)
    assert service.status(table_name).rotation_period_days == 90
    with pytest.raises(InvalidOptionError, match="invalid rotation period '3651'"):
        service.set_rotation_period(table_name, 3651)
    with pytest.raises(InvalidOptionError, match="has a rotation period of 90 days, not 30"):
        service.open_table_for_write(table_name, str(tmp_path / "t"), rotation_period_days=30)


def test_rotation_of_erased_table(service: KeyService, table_name: str, tmp_path: Path) -> None:
    service.open_table_for_write(table_name, str(tmp_path / "t"))
    service.erase_table(table_name)
    with pytest.raises(TableErasedError, match=f"table '{table_name}' was crypto-erased"):
        service.rotate_table(table_name)


# Scheduled deletion --------------------------------------------------------------


def test_pending_deletion_rejects_use(service: KeyService, table_name: str, tmp_path: Path) -> None:
    location = str(tmp_path / "t")
    write_jobs(service, table_name, tmp_path / "t", jobs=1, groups=["table"])
    schedule = service.schedule_deletion(table_name, days=7)
    due = datetime.fromisoformat(schedule.due_at)
    assert timedelta(days=6.99) < due - datetime.now(timezone.utc) <= timedelta(days=7)
    day = due.strftime("%Y-%m-%d")

    with pytest.raises(TablePendingDeletionError, match=f"scheduled for deletion on {day}.*spark-kms cancel-deletion {table_name}"):
        service.open_table_for_read(location)
    with pytest.raises(TablePendingDeletionError, match=f"scheduled for deletion on {day}"):
        service.open_table_for_write(table_name, location)
    assert service.status(table_name).state == "pending_deletion"
    assert service.status(table_name).deletion_due_at == schedule.due_at
    with pytest.raises(TableStateError, match="already scheduled for deletion"):
        service.schedule_deletion(table_name, days=3)

    service.cancel_deletion(table_name)
    meta, _ = service.open_table_for_read(location)
    assert meta.state == "active"
    assert meta.deletion_due_at is None
    assert service.status(table_name).state == "active"
    with pytest.raises(TableStateError, match="is not scheduled for deletion"):
        service.cancel_deletion(table_name)


@pytest.mark.parametrize("days", [0, 31, -1])
def test_deletion_days_out_of_range(service: KeyService, table_name: str, tmp_path: Path, days: int) -> None:
    service.open_table_for_write(table_name, str(tmp_path / "t"))
    with pytest.raises(InvalidOptionError, match=f"invalid deletion waiting period {days} days: give 1 to 30"):
        service.schedule_deletion(table_name, days=days)
    assert service.status(table_name).state == "active"


def test_purge_due_erases_due_tables(service: KeyService, make_table_name, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    soon, later_table = make_table_name("soon"), make_table_name("later")
    for name in (soon, later_table):
        service.open_table_for_write(name, str(tmp_path / name))
    service.schedule_deletion(soon, days=1)
    service.schedule_deletion(later_table, days=30)

    assert service.purge_due() == []
    service.clock = later(2)
    reports = service.purge_due()

    assert [r.table for r in reports] == [soon]
    assert reports[0].destroyed_objects == 1
    assert reports[0].remaining_objects == 0
    assert service.hsm.list_key_labels(f"spark_kms/{soon}/") == []
    assert service.status(soon).state == "erased"
    assert service.status(later_table).state == "pending_deletion"
    with pytest.raises(TableErasedError):
        service.open_table_for_read(str(tmp_path / soon))
    erase = [r for r in audit_of(service, soon) if r["operation"] == "erase"]
    assert [(r["outcome"], r["trigger"]) for r in erase] == [("ok", "scheduled")]


def test_due_deletion_runs_on_open(service: KeyService, table_name: str, tmp_path: Path) -> None:
    service.open_table_for_write(table_name, str(tmp_path / "t"))
    service.schedule_deletion(table_name, days=1)
    service.clock = later(1.01)
    with pytest.raises(TableErasedError, match=f"table '{table_name}' was crypto-erased"):
        service.open_table_for_read(str(tmp_path / "t"))
    assert service.status(table_name).state == "erased"
    assert service.hsm.list_key_labels(f"spark_kms/{table_name}/") == []


# Partition master keys ------------------------------------------------------------


def partition_keks(service: KeyService, table: str, location: Path, values: list[str]) -> dict[str, dict[str, bytes]]:
    """Create a table partitioned by customer_id with KEKs in each partition; return them by folder."""
    meta, store = service.open_table_for_write(table, str(location), partition_by="customer_id")
    keks = {}
    for value in values:
        folder = partition_folder("customer_id", value)
        minted = service.mint_partition_keks(meta, store, folder, ["table"], job_id="j1")
        keks[folder] = {kek_id: minted.keys.kek(kek_id) for kek_id in minted.keys.key_ids}
    return keks


def test_each_partition_has_master_key(service: KeyService, table_name: str, tmp_path: Path) -> None:
    keks = partition_keks(service, table_name, tmp_path / "t", ["41", "42"])
    labels = service.hsm.list_key_labels(f"spark_kms/{table_name}/")
    assert len([label for label in labels if "/p/" in label]) == 2
    store = KeyringStore(str(tmp_path / "t"))
    folders = [r.folder for r in store.list_partition_records()]
    assert folders == ["customer_id=41", "customer_id=42"]
    for by_id in keks.values():
        for kek_id in by_id:
            record = store.get_kek_record(kek_id)
            assert record.partition_id is not None
            assert "/p/" in record.master_key_label
    status = service.status(table_name)
    assert status.partition_by == "customer_id"
    assert [p["partition"] for p in status.partitions] == folders


def test_erase_partition_leaves_others(service: KeyService, table_name: str, tmp_path: Path) -> None:
    location = tmp_path / "t"
    keks = partition_keks(service, table_name, location, ["41", "42"])

    report = service.erase_partition(table_name, "customer_id=42")

    assert report.partition == "customer_id=42"
    assert report.destroyed_objects == 1
    assert report.remaining_objects == 0
    meta, store = service.open_table_for_read(str(location))
    kept = service.unwrap_keks(meta, store, keks["customer_id=41"])
    assert all(kept.kek(kek_id) == kek for kek_id, kek in keks["customer_id=41"].items())
    with pytest.raises(PartitionErasedError, match=f"partition customer_id=42 of table '{table_name}' was crypto-erased"):
        service.unwrap_keks(meta, store, keks["customer_id=42"])
    with pytest.raises(PartitionErasedError, match="write this data to another partition value"):
        service.mint_partition_keks(meta, store, "customer_id=42", ["table"], job_id="j2")
    assert service.erased_partitions(str(location)) == ["customer_id=42"]
    assert [p["state"] for p in service.status(table_name).partitions] == ["active", "erased"]


def test_erase_partition_bad_requests(service: KeyService, make_table_name, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    partitioned, plain = make_table_name("p"), make_table_name("plain")
    partition_keks(service, partitioned, tmp_path / "p", ["41"])
    service.open_table_for_write(plain, str(tmp_path / "plain"))
    with pytest.raises(PartitionNotFoundError, match="has no partition customer_id=7; its partitions are customer_id=41"):
        service.erase_partition(partitioned, "customer_id=7")
    with pytest.raises(InvalidOptionError, match="is partitioned by 'customer_id', not 'tenant'"):
        service.erase_partition(partitioned, "tenant=41")
    with pytest.raises(InvalidOptionError, match="give it as column=value"):
        service.erase_partition(partitioned, "41")
    with pytest.raises(InvalidOptionError, match="is not partitioned"):
        service.erase_partition(plain, "customer_id=41")


def test_rotation_covers_partition_keys(service: KeyService, table_name: str, tmp_path: Path) -> None:
    location = tmp_path / "t"
    keks = partition_keks(service, table_name, location, ["41", "42", "43"])
    service.erase_partition(table_name, "customer_id=43")

    report = service.rotate_table(table_name)

    assert report.master_keys_rotated == 3  # the table's key and two active partitions
    assert report.records_rewrapped == 2
    assert report.destroyed_objects == 3
    store = KeyringStore(str(location))
    versions = {r.folder: (r.state, r.master_key_version) for r in store.list_partition_records()}
    assert versions == {
        "customer_id=41": ("active", 2),
        "customer_id=42": ("active", 2),
        "customer_id=43": ("erased", 1),
    }
    meta, store = service.open_table_for_read(str(location))
    for folder in ("customer_id=41", "customer_id=42"):
        unwrapped = service.unwrap_keks(meta, store, keks[folder])
        assert all(unwrapped.kek(kek_id) == kek for kek_id, kek in keks[folder].items())
    labels = service.hsm.list_key_labels(f"spark_kms/{table_name}/")
    assert sorted(label.rsplit("/", 1)[-1] for label in labels) == ["v2", "v2", "v2"]


def test_partition_layout_is_fixed(service: KeyService, table_name: str, tmp_path: Path) -> None:
    partition_keks(service, table_name, tmp_path / "t", ["41"])
    with pytest.raises(InvalidOptionError, match="is partitioned by 'customer_id', so it cannot be written with kms.partition_by 'region'"):
        service.open_table_for_write(table_name, str(tmp_path / "t"), partition_by="region")
    meta, _ = service.open_table_for_write(table_name, str(tmp_path / "t"))
    assert meta.partition_by == "customer_id"


# Access policy ----------------------------------------------------------------------


@pytest.fixture
def policy_settings(kms_settings: KmsSettings, tmp_path: Path) -> KmsSettings:
    policy = {
        "rules": [
            {"principals": ["writer"], "tables": ["*"], "operations": ["encrypt", "decrypt"]},
            {"principals": ["reader"], "tables": ["*"], "operations": ["decrypt"]},
            {"principals": ["secops"], "tables": ["*"], "operations": ["admin"]},
        ]
    }
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))
    return replace(kms_settings, policy_file=str(path))


def as_principal(settings: KmsSettings, key_service: KeyService, principal: str) -> KeyService:
    return KeyService(settings, hsm=key_service.hsm, principal=principal)


def test_denied_write_creates_nothing(policy_settings: KmsSettings, key_service: KeyService, table_name: str, tmp_path: Path) -> None:
    reader = as_principal(policy_settings, key_service, "reader")
    with pytest.raises(AccessDeniedError, match=f"principal 'reader' may not perform 'encrypt' on table '{table_name}'") as caught:
        reader.open_table_for_write(table_name, str(tmp_path / "t"))
    assert caught.value.principal == "reader"
    assert caught.value.table == table_name
    assert caught.value.operation == "encrypt"
    assert not (tmp_path / "t").exists()
    assert reader.registry.get(table_name) is None
    assert reader.hsm.list_key_labels(f"spark_kms/{table_name}/") == []
    decisions = [r for r in audit_of(reader, table_name) if r["operation"] == "policy"]
    assert [(r["principal"], r["requested"], r["outcome"]) for r in decisions] == [("reader", "encrypt", "deny")]


def test_policy_operations_per_principal(policy_settings: KmsSettings, key_service: KeyService, table_name: str, tmp_path: Path) -> None:
    location = str(tmp_path / "t")
    writer = as_principal(policy_settings, key_service, "writer")
    reader = as_principal(policy_settings, key_service, "reader")
    admin = as_principal(policy_settings, key_service, "secops")
    meta, store = writer.open_table_for_write(table_name, location)
    writer.mint_keks(meta, store, ["table"])
    reader.open_table_for_read(location)

    with pytest.raises(AccessDeniedError, match="may not perform 'decrypt'"):
        admin.open_table_for_read(location)
    for request in (
        lambda: writer.rotate_table(table_name),
        lambda: writer.schedule_deletion(table_name, days=7),
        lambda: reader.erase_table(table_name),
        lambda: reader.set_rotation_period(table_name, 30),
    ):
        with pytest.raises(AccessDeniedError, match=r"may not perform 'admin \(.*\)'"):
            request()
    assert writer.status(table_name).master_key_version == 1
    assert writer.status(table_name).state == "active"

    admin.rotate_table(table_name)
    assert admin.status(table_name).master_key_version == 2
    decisions = [
        (r["principal"], r.get("action"), r["outcome"])
        for r in audit_of(admin, table_name)
        if r["operation"] == "policy" and r["requested"] == "admin"
    ]
    assert ("writer", "rotate", "deny") in decisions
    assert ("secops", "rotate", "allow") in decisions


def test_no_policy_allows_all(key_service: KeyService, table_name: str, tmp_path: Path) -> None:
    assert key_service.settings.policy_file is None
    anyone = KeyService(key_service.settings, hsm=key_service.hsm, principal="anyone")
    meta, store = anyone.open_table_for_write(table_name, str(tmp_path / "t"))
    anyone.mint_keks(meta, store, ["table"])
    anyone.rotate_table(table_name)
    assert not [r for r in audit_of(anyone, table_name) if r["operation"] == "policy"]


# Audit trail -----------------------------------------------------------------------


def test_audit_trail_of_lifecycle(service: KeyService, table_name: str, tmp_path: Path, kms_settings: KmsSettings) -> None:
    keks = write_jobs(service, table_name, tmp_path / "t", jobs=2, groups=["table"])
    service.rotate_table(table_name)
    service.schedule_deletion(table_name, days=7)
    service.cancel_deletion(table_name)
    service.erase_table(table_name)

    trail = audit_of(service, table_name)
    operations = [r["operation"] for r in trail]
    assert operations == [
        "create_master_key",
        "wrap_kek",
        "wrap_kek",
        "create_master_key",
        "rewrap_kek",
        "rewrap_kek",
        "destroy_master_key",
        "rotate",
        "schedule_deletion",
        "cancel_deletion",
        "erase",
    ]
    for record in trail:
        assert {"time", "principal", "operation", "table", "outcome", "prev"} <= set(record)
    rewrap = trail[4]
    assert rewrap["key_version"] == 2
    assert rewrap["previous_key_label"].endswith("/v1")
    assert rewrap["kek_ids"][0] in keks

    text = Path(kms_settings.audit_log).read_bytes()
    pin = Path(kms_settings.pin_file or "").read_text().strip().encode()
    assert find_secrets(text, [*keks.values(), pin]) == []
    assert verify_chain(kms_settings.audit_log) == []
