"""Key service against the real token: KEK minting, unwrapping, erasure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spark_kms.errors import (
    ConfigurationError,
    IntegrityError,
    TableErasedError,
    TableNotFoundError,
)
from spark_kms.keyservice import KeyService


def test_mint_persists_wrapped_record(key_service: KeyService, table_name: str, tmp_path: Path) -> None:
    meta, store = key_service.open_table_for_write(table_name, str(tmp_path / "t"))
    keys = key_service.mint_keks(meta, store, ["table", "pii"], job_id="job1")
    assert keys.kek_ids == {"table": f"{table_name}.table.kjob1", "pii": f"{table_name}.pii.kjob1"}
    record = json.loads((tmp_path / "t" / "_spark_kms" / "keks" / f"{table_name}.pii.kjob1.json").read_text())
    assert record["master_key_label"] == meta.master_key_label
    assert record["group"] == "pii"
    kek = keys.keys.kek(f"{table_name}.pii.kjob1")
    assert kek.hex() not in json.dumps(record)


def test_unwrap_returns_minted_keks(key_service: KeyService, table_name: str, tmp_path: Path) -> None:
    meta, store = key_service.open_table_for_write(table_name, str(tmp_path / "t"))
    minted = key_service.mint_keks(meta, store, ["table", "pii"])
    meta, store = key_service.open_table_for_read(str(tmp_path / "t"))
    unwrapped = key_service.unwrap_keks(meta, store, minted.kek_ids.values())
    for kek_id in minted.kek_ids.values():
        assert unwrapped.kek(kek_id) == minted.keys.kek(kek_id)


def test_hsm_calls_one_per_group(key_service: KeyService, table_name: str, tmp_path: Path) -> None:
    meta, store = key_service.open_table_for_write(table_name, str(tmp_path / "t"))
    before = key_service.hsm.stats.encrypt
    key_service.mint_keks(meta, store, ["table", "pii", "geo"])
    assert key_service.hsm.stats.encrypt - before == 3


def test_kek_record_bound_to_its_id(key_service: KeyService, table_name: str, tmp_path: Path) -> None:
    location = tmp_path / "t"
    meta, store = key_service.open_table_for_write(table_name, str(location))
    keys = key_service.mint_keks(meta, store, ["table", "pii"], job_id="j")
    keks = location / "_spark_kms" / "keks"
    table_record = json.loads((keks / f"{table_name}.table.kj.json").read_text())
    pii_record = json.loads((keks / f"{table_name}.pii.kj.json").read_text())
    # Swap the wrapped values: each record then contains a KEK wrapped for another id.
    table_record["wrapped_kek"], pii_record["wrapped_kek"] = pii_record["wrapped_kek"], table_record["wrapped_kek"]
    (keks / f"{table_name}.table.kj.json").write_text(json.dumps(table_record))
    with pytest.raises(IntegrityError, match=f"KEK record {table_name}.table.kj .* failed authentication"):
        key_service.unwrap_keks(meta, store, [keys.kek_ids["table"]])


def test_record_ids_are_never_reused(key_service: KeyService, table_name: str, tmp_path: Path) -> None:
    meta, store = key_service.open_table_for_write(table_name, str(tmp_path / "t"))
    key_service.mint_keks(meta, store, ["table"], job_id="same")
    with pytest.raises(IntegrityError, match="already exists; KEK records are never replaced"):
        key_service.mint_keks(meta, store, ["table"], job_id="same")


def test_erase_destroys_key_and_tombstones(key_service: KeyService, table_name: str, tmp_path: Path) -> None:
    location = str(tmp_path / "t")
    meta, store = key_service.open_table_for_write(table_name, location)
    minted = key_service.mint_keks(meta, store, ["table"])
    report = key_service.erase_table(table_name)
    assert report.destroyed_objects == 1
    assert report.remaining_objects == 0
    assert key_service.hsm.count_keys(meta.master_key_label, fresh_session=True) == 0
    assert key_service.status(table_name).state == "erased"
    with pytest.raises(TableErasedError, match=f"table '{table_name}' was crypto-erased"):
        key_service.open_table_for_read(location)
    with pytest.raises(TableErasedError, match=f"table '{table_name}' was crypto-erased"):
        key_service.open_table_for_write(table_name, location)
    with pytest.raises(TableErasedError, match=f"table '{table_name}' was crypto-erased"):
        key_service.unwrap_keks(meta, store, minted.kek_ids.values())


def test_erased_name_never_recreated(key_service: KeyService, table_name: str, tmp_path: Path) -> None:
    key_service.open_table_for_write(table_name, str(tmp_path / "t"))
    key_service.erase_table(table_name)
    with pytest.raises(TableErasedError, match="choose a new table name"):
        key_service.open_table_for_write(table_name, str(tmp_path / "elsewhere"))
    assert key_service.hsm.list_key_labels(f"spark_kms/{table_name}/") == []


def test_erase_leaves_other_tables(key_service: KeyService, make_table_name, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    erased, kept = make_table_name("a"), make_table_name("b")
    key_service.open_table_for_write(erased, str(tmp_path / "a"))
    meta, store = key_service.open_table_for_write(kept, str(tmp_path / "b"))
    minted = key_service.mint_keks(meta, store, ["table"])
    key_service.erase_table(erased)
    meta, store = key_service.open_table_for_read(str(tmp_path / "b"))
    unwrapped = key_service.unwrap_keks(meta, store, minted.kek_ids.values())
    assert unwrapped.kek(minted.kek_ids["table"]) == minted.keys.kek(minted.kek_ids["table"])


def test_erase_twice_reports_nothing_left(key_service: KeyService, table_name: str, tmp_path: Path) -> None:
    key_service.open_table_for_write(table_name, str(tmp_path / "t"))
    key_service.erase_table(table_name)
    again = key_service.erase_table(table_name)
    assert again.destroyed_objects == 0
    assert again.remaining_objects == 0


def test_erase_unknown_table(key_service: KeyService) -> None:
    with pytest.raises(TableNotFoundError, match="no table 'never_written'"):
        key_service.erase_table("never_written")


def test_name_bound_to_location(key_service: KeyService, table_name: str, tmp_path: Path) -> None:
    key_service.open_table_for_write(table_name, str(tmp_path / "t"))
    with pytest.raises(ConfigurationError, match=f"table '{table_name}' is registered at .*use that location"):
        key_service.open_table_for_write(table_name, str(tmp_path / "other"))


def test_location_bound_to_name(key_service: KeyService, make_table_name, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first, second = make_table_name("a"), make_table_name("b")
    key_service.open_table_for_write(first, str(tmp_path / "t"))
    with pytest.raises(ConfigurationError, match=f"contains table '{first}', not '{second}'"):
        key_service.open_table_for_write(second, str(tmp_path / "t"))


def test_read_of_non_table(key_service: KeyService, tmp_path: Path) -> None:
    with pytest.raises(TableNotFoundError, match="contains no spark_kms table"):
        key_service.open_table_for_read(str(tmp_path / "nothing"))


def test_audit_records_hold_no_key_bytes(key_service: KeyService, table_name: str, tmp_path: Path) -> None:
    meta, store = key_service.open_table_for_write(table_name, str(tmp_path / "t"))
    minted = key_service.mint_keks(meta, store, ["table"])
    key_service.unwrap_keks(meta, store, minted.kek_ids.values())
    records = [r for r in key_service.audit.records() if r.get("table") == table_name]
    operations = [r["operation"] for r in records]
    assert operations == ["create_master_key", "wrap_kek", "unwrap_kek"]
    text = Path(key_service.settings.audit_log).read_text()
    kek = minted.keys.kek(minted.kek_ids["table"])
    assert kek.hex() not in text
    record = json.loads((tmp_path / "t" / "_spark_kms" / "keks" / f"{minted.kek_ids['table']}.json").read_text())
    assert record["wrapped_kek"] not in text
