"""Rekey as a Spark job, with local Spark and the real SoftHSM2 token."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import pytest
from chispa import assert_df_equality
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

import spark_kms
from spark_kms import cli
from spark_kms import rekey as rekey_module
from spark_kms.errors import (
    IntegrityError,
    InvalidOptionError,
    PartitionsErasedWarning,
    TablePendingDeletionError,
)
from spark_kms.keyring import KeyringStore
from spark_kms.keyservice import KeyService
from spark_kms.rekey import rekey_table
from spark_kms.settings import KmsSettings
from spark_kms.verify import verify_table
from tests.helpers.independent_kms import read_with_independent_client


def data_files(location: Path) -> list[Path]:
    return sorted(
        p
        for p in location.rglob("*.parquet")
        if not any(part.startswith(("_", ".")) for part in p.relative_to(location).parts)
    )


def orders(spark: SparkSession, rows: int = 400, partitions: int = 4) -> DataFrame:
    return spark.range(rows, numPartitions=partitions).select(
        F.col("id"),
        (F.col("id") % 2 + 7).cast("int").alias("customer_id"),
        F.concat(F.lit("card-"), F.col("id").cast("string")).alias("card"),
        (F.col("id") * 2.5).alias("amount"),
    )


def all_keks(key_service: KeyService, location: Path) -> dict[str, bytes]:
    meta, store = key_service.open_table_for_read(str(location))
    erased = {r.partition_id for r in store.list_partition_records() if r.state == "erased"}
    ids = [k for k in store.list_kek_ids() if store.get_kek_record(k).partition_id not in erased]
    keys = key_service.unwrap_keks(meta, store, ids)
    return {kek_id: keys.kek(kek_id) for kek_id in keys.key_ids}


def deks_of(files: list[Path], keks: dict[str, bytes]) -> tuple[set[bytes], set[str]]:
    """Every DEK in the files' key material, and the KEK ids that wrap them."""
    deks: set[bytes] = set()
    kek_ids: set[str] = set()
    for file in files:
        _table, seen = read_with_independent_client(str(file), keks)
        deks.update(dek for _kek_id, _wrapped, dek in seen)
        kek_ids.update(kek_id for kek_id, _wrapped, _dek in seen)
    return deks, kek_ids


def test_rekey_replaces_keks_and_deks(
    spark: SparkSession, key_service: KeyService, table_name: str, tmp_path: Path
) -> None:
    location = tmp_path / "t"
    first = orders(spark, 400, 4)
    second = orders(spark, 100, 2).withColumn("id", F.col("id") + 10_000)
    spark_kms.write_table(first, str(location), table=table_name, column_keys="pii: card")
    spark_kms.write_table(second, str(location), table=table_name, column_keys="pii: card")
    old_files = data_files(location)
    old_keks = all_keks(key_service, location)
    old_deks, _ = deks_of(old_files, old_keks)
    assert len(old_keks) == 4
    seen_progress: list[tuple[int, int]] = []

    report = rekey_table(
        spark, table_name, service=key_service, progress=lambda done, total: seen_progress.append((done, total))
    )

    assert report.files == 6
    assert report.rows == 500
    assert sorted(report.removed_kek_ids) == sorted(old_keks)
    assert seen_progress[-1] == (6, 6)
    new_files = data_files(location)
    assert len(new_files) == 6
    assert not set(new_files) & set(old_files)
    store = KeyringStore(str(location))
    assert set(store.list_kek_ids()) == set(report.new_kek_ids)
    assert len(report.new_kek_ids) == 2
    assert [r.job_id for r in store.list_commit_records()] == [f"{report.job_id}-0"]
    assert store.list_commit_records()[0].column_keys == {"pii": ["card"]}

    new_keks = all_keks(key_service, location)
    new_deks, wrapping = deks_of(new_files, new_keks)
    assert wrapping == set(report.new_kek_ids)
    assert not new_deks & old_deks
    with pytest.raises(KeyError):
        read_with_independent_client(str(new_files[0]), old_keks)
    back = spark_kms.read_table(spark, str(location))
    assert_df_equality(first.unionByName(second), back, ignore_row_order=True, ignore_nullable=True)
    assert not (location / "_spark_kms" / "rekey.json").exists()
    assert not (location / "_spark_kms_staging" / report.job_id).exists()


def test_rekey_partitioned_skips_erased(
    spark: SparkSession, key_service: KeyService, table_name: str, tmp_path: Path
) -> None:
    location = tmp_path / "t"
    source = orders(spark, 300, 3)
    spark_kms.write_table(source, str(location), table=table_name, partition_by="customer_id")
    key_service.erase_partition(table_name, "customer_id=8")
    erased_files = {p: p.read_bytes() for p in data_files(location / "customer_id=8")}
    kept_before = data_files(location / "customer_id=7")

    report = spark_kms.rekey_table(spark, table_name)

    assert report.files == len(kept_before)
    assert report.skipped_files == len(erased_files)
    assert {p: p.read_bytes() for p in data_files(location / "customer_id=8")} == erased_files
    kept_after = data_files(location / "customer_id=7")
    assert len(kept_after) == len(kept_before)
    assert not set(kept_after) & set(kept_before)
    store = KeyringStore(str(location))
    assert all(f".k{report.job_id}" in kek_id for kek_id in report.new_kek_ids)
    assert all(store.get_kek_record(k).partition_id is not None for k in report.new_kek_ids)
    with pytest.warns(PartitionsErasedWarning, match="customer_id=8"):
        back = spark_kms.read_table(spark, str(location))
    assert_df_equality(source.filter(F.col("customer_id") == 7), back, ignore_row_order=True, ignore_nullable=True)


def test_interrupted_rekey_finished_on_read(
    spark: SparkSession, key_service: KeyService, table_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    location = tmp_path / "t"
    source = orders(spark, 200, 2)
    spark_kms.write_table(source, str(location), table=table_name)
    old_ids = set(KeyringStore(str(location)).list_kek_ids())

    def crash(store: KeyringStore, kek_id: str) -> None:
        raise OSError("simulated crash while removing old KEK records")

    monkeypatch.setattr(KeyringStore, "delete_kek_record", crash)
    with pytest.raises(OSError, match="simulated crash"):
        rekey_table(spark, table_name, service=key_service)
    monkeypatch.undo()
    journal = json.loads((location / "_spark_kms" / "rekey.json").read_text())
    assert set(journal["old_kek_ids"]) == old_ids

    back = spark_kms.read_table(spark, str(location))
    assert_df_equality(source, back, ignore_row_order=True, ignore_nullable=True)
    assert not (location / "_spark_kms" / "rekey.json").exists()
    assert not set(KeyringStore(str(location)).list_kek_ids()) & old_ids
    assert len(data_files(location)) == 2


def test_rekey_of_pending_table_rejected(
    spark: SparkSession, key_service: KeyService, table_name: str, tmp_path: Path
) -> None:
    location = tmp_path / "t"
    spark_kms.write_table(orders(spark, 20, 1), str(location), table=table_name)
    before = {p: p.read_bytes() for p in data_files(location)}
    key_service.schedule_deletion(table_name, days=2)
    with pytest.raises(TablePendingDeletionError, match=f"run 'spark-kms cancel-deletion {table_name}'"):
        rekey_table(spark, table_name, service=key_service)
    assert {p: p.read_bytes() for p in data_files(location)} == before
    key_service.cancel_deletion(table_name)


def test_rekey_command(
    spark: SparkSession, kms_settings: KmsSettings, key_service: KeyService, table_name: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    location = tmp_path / "t"
    source = orders(spark, 300, 3)
    spark_kms.write_table(source, str(location), table=table_name)
    conf = tmp_path / "kms.conf"
    conf.write_text("".join(f"{k} {v}\n" for k, v in kms_settings.to_properties().items()))

    # The command reuses the running session (one SparkContext per process) and leaves it running.
    code = cli.main(["--conf-file", str(conf), "rekey", table_name])

    output = capsys.readouterr().out
    assert code == 0, output
    assert f"rekey {table_name}: 3/3 file(s) rewritten" in output
    assert f"rekeyed table '{table_name}': 3 file(s) and 300 row(s) rewritten with new DEKs under 1 new KEK(s), 1 old KEK record(s) removed" in output
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = spark_kms.read_table(spark, str(location))
    assert_df_equality(source, back, ignore_row_order=True, ignore_nullable=True)
    rekeys = [r for r in key_service.audit.records() if r.get("table") == table_name and r["operation"] == "rekey"]
    assert [(r["outcome"], r["files"], r["rows"]) for r in rekeys] == [("ok", 3, 300)]


def test_rekey_rejects_unrecorded_files(
    spark: SparkSession, key_service: KeyService, table_name: str, tmp_path: Path
) -> None:
    location = tmp_path / "t"
    spark_kms.write_table(orders(spark, 40, 1), str(location), table=table_name)
    original = data_files(location)[0]
    stray = location / "part-stray.parquet"
    stray.write_bytes(original.read_bytes())
    before = {p: p.read_bytes() for p in data_files(location)}
    records_before = KeyringStore(str(location)).list_kek_ids()

    with pytest.raises(IntegrityError, match="1 file\\(s\\) of table .* are named by no commit record \\(part-stray.parquet\\)"):
        rekey_table(spark, table_name, service=key_service)

    assert {p: p.read_bytes() for p in data_files(location)} == before
    assert KeyringStore(str(location)).list_kek_ids() == records_before


def test_rekey_rejects_delta_tables(
    spark: SparkSession, key_service: KeyService, table_name: str, tmp_path: Path
) -> None:
    location = tmp_path / "t"
    spark_kms.write_table(orders(spark, 20, 1), str(location), table=table_name)
    (location / "_delta_log").mkdir()
    before = {p: p.read_bytes() for p in data_files(location)}

    with pytest.raises(InvalidOptionError, match=f"table '{table_name}' is a Delta table"):
        rekey_table(spark, table_name, service=key_service)

    assert {p: p.read_bytes() for p in data_files(location)} == before


def overwrite_leaving_old_files(
    spark: SparkSession, table_name: str, location: Path
) -> tuple[DataFrame, dict[Path, bytes]]:
    """Overwrite a table and put the replaced files back, as if deleting them had failed."""
    spark_kms.write_table(orders(spark, 200, 2), str(location), table=table_name, column_keys="pii: card")
    replaced_files = {p: p.read_bytes() for p in data_files(location)}
    replacement = orders(spark, 30, 1).withColumn("id", F.col("id") + 5_000)
    spark_kms.write_table(
        replacement, str(location), table=table_name, column_keys="pii: card", mode="overwrite"
    )
    for path, data in replaced_files.items():
        path.write_bytes(data)
    return replacement, replaced_files


def test_rekey_drops_replaced_files(
    spark: SparkSession, key_service: KeyService, table_name: str, tmp_path: Path
) -> None:
    location = tmp_path / "t"
    replacement, replaced_files = overwrite_leaving_old_files(spark, table_name, location)

    report = rekey_table(spark, table_name, service=key_service)

    back = spark_kms.read_table(spark, str(location))
    assert_df_equality(replacement, back, ignore_row_order=True, ignore_nullable=True)
    native = spark_kms.read_parquet(spark, str(location))
    assert_df_equality(replacement, native, ignore_row_order=True, ignore_nullable=True)

    assert report.files == 1
    assert report.rows == 30
    assert not set(replaced_files) & set(data_files(location))
    assert len(data_files(location)) == 1
    store = KeyringStore(str(location))
    assert [r.job_id for r in store.list_commit_records()] == [f"{report.job_id}-0"]
    verified = verify_table(key_service, table_name)
    assert verified.problems == []
    assert verified.unrecorded_files == []


def test_rekey_keeps_undeletable_replaced_files_out(
    spark: SparkSession, key_service: KeyService, table_name: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    location = tmp_path / "t"
    replacement, replaced_files = overwrite_leaving_old_files(spark, table_name, location)
    undeletable = {str(path) for path in replaced_files}
    delete_file = rekey_module._delete_file

    def fail_on_replaced(filesystem: Any, path: str) -> None:
        if path in undeletable:
            raise PermissionError(13, "Permission denied", path)
        delete_file(filesystem, path)

    monkeypatch.setattr(rekey_module, "_delete_file", fail_on_replaced)
    with caplog.at_level(logging.WARNING, logger="spark_kms.rekey"):
        report = rekey_table(spark, table_name, service=key_service)
    monkeypatch.undo()

    assert report.files == 1
    assert report.rows == 30
    assert not (location / "_spark_kms" / "rekey.json").exists()
    assert set(replaced_files) <= set(data_files(location))
    for path in replaced_files:
        assert any(
            path.name in r.getMessage() and table_name in r.getMessage() for r in caplog.records
        ), f"no warning names {path.name}"
    store = KeyringStore(str(location))
    rekey_record = next(r for r in store.list_commit_records() if r.mode == "rekey")
    assert sorted(rekey_record.replaced) == sorted(p.name for p in replaced_files)
    back = spark_kms.read_table(spark, str(location))
    assert_df_equality(replacement, back, ignore_row_order=True, ignore_nullable=True)
    native = spark_kms.read_parquet(spark, str(location))
    assert_df_equality(replacement, native, ignore_row_order=True, ignore_nullable=True)
    assert verify_table(key_service, table_name).problems == []

    # A later rekey deletes the files and still leaves them out.
    again = rekey_table(spark, table_name, service=key_service)
    assert again.files == 1
    assert not set(replaced_files) & set(data_files(location))
    back = spark_kms.read_table(spark, str(location))
    assert_df_equality(replacement, back, ignore_row_order=True, ignore_nullable=True)
    native = spark_kms.read_parquet(spark, str(location))
    assert_df_equality(replacement, native, ignore_row_order=True, ignore_nullable=True)
    assert verify_table(key_service, table_name).problems == []
