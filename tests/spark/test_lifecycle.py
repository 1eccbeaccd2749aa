"""Key lifecycle with local Spark and the real SoftHSM2 token: rotation of written
tables, partition-level erasure, scheduled deletion, access policy and audit."""

from __future__ import annotations

import base64
import hashlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from chispa import assert_df_equality
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

import spark_kms
from spark_kms.errors import (
    AccessDeniedError,
    IntegrityError,
    InvalidOptionError,
    PartitionErasedError,
    PartitionsErasedWarning,
    TablePendingDeletionError,
)
from spark_kms.keyring import KeyringStore
from spark_kms.keyservice import KeyService
from spark_kms.settings import KmsSettings


def data_files(location: Path) -> list[Path]:
    """The visible Parquet files of the table at ``location``."""
    return sorted(
        p
        for p in location.rglob("*.parquet")
        if not any(part.startswith(("_", ".")) for part in p.relative_to(location).parts)
    )


def customers(spark: SparkSession, rows: int = 600, partitions: int = 3) -> DataFrame:
    return spark.range(rows, numPartitions=partitions).select(
        F.col("id"),
        (F.col("id") % 3 + 41).cast("int").alias("customer_id"),
        F.concat(F.lit("name-"), F.col("id").cast("string")).alias("name"),
        (F.col("id") * 1.5).alias("amount"),
    )


def file_hashes(location: Path) -> dict[str, tuple[str, int]]:
    """SHA-256 and modification time of every data file, by relative path."""
    return {
        str(p.relative_to(location)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in data_files(location)
    }


def kek_versions(location: Path) -> list[int]:
    folder = location / "_spark_kms" / "keks"
    return sorted(json.loads(p.read_text())["master_key_version"] for p in folder.glob("*.json"))


# Rotation ------------------------------------------------------------------------


def test_rotation_round_trip(spark: SparkSession, key_service: KeyService, table_name: str, tmp_path: Path) -> None:
    location = tmp_path / "t"
    first = customers(spark, 300, 3)
    spark_kms.write_table(first, str(location), table=table_name, column_keys="pii: name")
    meta, _ = key_service.open_table_for_read(str(location))
    old_label = meta.master_key_label
    before = file_hashes(location)

    report = key_service.rotate_table(table_name)

    assert report.table_key_version == 2
    assert report.records_rewrapped == 2
    assert file_hashes(location) == before
    assert key_service.hsm.count_keys(old_label, fresh_session=True) == 0
    assert kek_versions(location) == [2, 2]
    back = spark_kms.read_table(spark, str(location))
    assert_df_equality(first, back, ignore_row_order=True, ignore_nullable=True)

    second = customers(spark, 90, 1).withColumn("id", F.col("id") + 10_000)
    spark_kms.write_table(second, str(location), table=table_name, column_keys="pii: name")
    assert kek_versions(location) == [2, 2, 2, 2]
    back = spark_kms.read_table(spark, str(location))
    assert_df_equality(first.unionByName(second), back, ignore_row_order=True, ignore_nullable=True)


def test_rotation_cost_ignores_files(
    spark: SparkSession, key_service: KeyService, make_table_name, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    reports = {}
    for files in (2, 48):
        table = make_table_name(f"f{files}")
        location = tmp_path / table
        spark_kms.write_table(customers(spark, 4800, files), str(location), table=table)
        assert len(data_files(location)) == files
        before = file_hashes(location)
        reports[files] = key_service.rotate_table(table)
        assert file_hashes(location) == before
        assert len(spark_kms.read_table(spark, str(location)).collect()) == 4800
    # One KEK record per job whatever the number of files: a key generation,
    # a destruction, and unwrap, wrap and check of the one record.
    assert reports[2].records_total == reports[48].records_total == 1
    assert reports[2].hsm_operations == reports[48].hsm_operations == 2 + 3


def test_due_rotation_when_table_read(
    spark: SparkSession, key_service: KeyService, table_name: str, tmp_path: Path
) -> None:
    location = tmp_path / "t"
    source = customers(spark, 60, 2)
    spark_kms.write_table(source, str(location), table=table_name)
    store = KeyringStore(str(location))
    meta = store.read_metadata()
    assert meta is not None
    # The master key version became current 400 days ago: past the 365-day period.
    meta.master_key_since = (datetime.now(timezone.utc) - timedelta(days=400)).isoformat()
    store.write_metadata(meta)
    before = file_hashes(location)

    back = spark_kms.read_table(spark, str(location))
    assert_df_equality(source, back, ignore_row_order=True, ignore_nullable=True)

    meta = store.read_metadata()
    assert meta is not None
    assert meta.master_key_version == 2
    assert kek_versions(location) == [2]
    assert file_hashes(location) == before
    rotations = [
        r for r in key_service.audit.records() if r.get("table") == table_name and r["operation"] == "rotate"
    ]
    assert [(r["outcome"], r["trigger"]) for r in rotations] == [("ok", "scheduled")]


# Partitions ---------------------------------------------------------------------


def test_partitioned_round_trip(spark: SparkSession, key_service: KeyService, table_name: str, tmp_path: Path) -> None:
    location = tmp_path / "t"
    source = customers(spark)
    spark_kms.write_table(source, str(location), table=table_name, partition_by="customer_id", column_keys="pii: name")

    folders = sorted(p.name for p in location.iterdir() if not p.name.startswith("_"))
    assert folders == ["customer_id=41", "customer_id=42", "customer_id=43"]
    for file in data_files(location):
        data = file.read_bytes()
        assert data[:4] == data[-4:] == b"PARE"
    labels = key_service.hsm.list_key_labels(f"spark_kms/{table_name}/")
    assert len([label for label in labels if "/p/" in label]) == 3
    back = spark_kms.read_table(spark, str(location))
    assert back.columns == source.columns
    assert_df_equality(source, back, ignore_row_order=True, ignore_nullable=True)
    filtered = back.filter(F.col("customer_id") == 42).count()
    assert filtered == source.filter(F.col("customer_id") == 42).count()


def test_partitioned_null_and_string_values(spark: SparkSession, table_name: str, tmp_path: Path) -> None:
    location = tmp_path / "t"
    source = spark.createDataFrame(
        [(1, "acme/eu", 1.0), (2, None, 2.0), (3, "a=b", 3.0), (4, "acme/eu", 4.0)],
        "id long, tenant string, amount double",
    )
    spark_kms.write_table(source, str(location), table=table_name, partition_by="tenant")
    folders = sorted(p.name for p in location.iterdir() if not p.name.startswith("_"))
    assert folders == ["tenant=__HIVE_DEFAULT_PARTITION__", "tenant=a%3Db", "tenant=acme%2Feu"]
    back = spark_kms.read_table(spark, str(location))
    assert_df_equality(source, back, ignore_row_order=True, ignore_nullable=True)


def test_file_moved_to_other_partition(spark: SparkSession, table_name: str, tmp_path: Path) -> None:
    # A read task now reads several files, and each file must still decrypt
    # only with the KEKs of the partition folder it sits in.
    location = tmp_path / "t"
    spark_kms.write_table(customers(spark), str(location), table=table_name, partition_by="customer_id")
    moved = sorted((location / "customer_id=41").glob("*.parquet"))[0]
    target = location / "customer_id=42" / moved.name
    moved.rename(target)

    with pytest.raises(IntegrityError, match=f"cannot decrypt .*customer_id=42/{moved.name}"):
        with spark_kms.typed_errors():
            spark_kms.read_table(spark, str(location)).collect()


def test_partition_erasure_keeps_others(
    spark: SparkSession, key_service: KeyService, table_name: str, tmp_path: Path
) -> None:
    location = tmp_path / "t"
    source = customers(spark)
    spark_kms.write_table(source, str(location), table=table_name, partition_by="customer_id")
    erased_files = data_files(location / "customer_id=42")
    assert erased_files

    report = key_service.erase_partition(table_name, "customer_id=42")

    assert report.destroyed_objects == 1
    assert report.remaining_objects == 0
    assert data_files(location / "customer_id=42") == erased_files
    with pytest.warns(PartitionsErasedWarning, match="crypto-erased partition\\(s\\) customer_id=42"):
        back = spark_kms.read_table(spark, str(location))
    expected = source.filter(F.col("customer_id") != 42)
    assert_df_equality(expected, back, ignore_row_order=True, ignore_nullable=True)

    # The erased partition's KEKs cannot be unwrapped any more.
    meta, store = key_service.open_table_for_read(str(location))
    erased_keks = [k for k in store.list_kek_ids() if store.get_kek_record(k).partition_id == report_partition_id(store, "customer_id=42")]
    with pytest.raises(PartitionErasedError, match="partition customer_id=42"):
        key_service.unwrap_keks(meta, store, erased_keks)


def test_planned_read_after_partition_erasure(
    spark: SparkSession, key_service: KeyService, table_name: str, tmp_path: Path
) -> None:
    location = tmp_path / "t"
    source = customers(spark)
    spark_kms.write_table(source, str(location), table=table_name, partition_by="customer_id")
    frame = spark.read.format("kms_parquet").load(str(location))
    assert frame.count() == 600

    key_service.erase_partition(table_name, "customer_id=42")

    # Spark runs the partitions it planned for the first action again, KEKs
    # included, so the tasks themselves must skip the erased partition.
    expected = source.filter(F.col("customer_id") != 42)
    assert frame.count() == expected.count()
    assert_df_equality(expected, frame, ignore_row_order=True, ignore_nullable=True)


def test_planned_read_after_scheduled_deletion(
    spark: SparkSession, key_service: KeyService, table_name: str, tmp_path: Path
) -> None:
    location = str(tmp_path / "t")
    spark_kms.write_table(customers(spark, 30, 1), location, table=table_name)
    frame = spark.read.format("kms_parquet").load(location)
    assert frame.count() == 30

    schedule = key_service.schedule_deletion(table_name, days=3)

    with pytest.raises(TablePendingDeletionError, match=f"scheduled for deletion on {schedule.due_at[:10]}"):
        with spark_kms.typed_errors():
            frame.collect()
    key_service.cancel_deletion(table_name)


def report_partition_id(store: KeyringStore, folder: str) -> str:
    return next(r.partition_id for r in store.list_partition_records() if r.folder == folder)


def test_write_to_erased_partition_rejected(
    spark: SparkSession, key_service: KeyService, table_name: str, tmp_path: Path
) -> None:
    location = tmp_path / "t"
    spark_kms.write_table(customers(spark, 90, 1), str(location), table=table_name, partition_by="customer_id")
    key_service.erase_partition(table_name, "customer_id=42")
    store = KeyringStore(str(location))
    commits_before = len(store.list_commit_records())
    files_before = data_files(location)

    again = customers(spark, 30, 1).withColumn("id", F.col("id") + 1000)
    with pytest.raises(PartitionErasedError, match=f"partition customer_id=42 of table '{table_name}' was crypto-erased") as caught:
        spark_kms.write_table(again, str(location), table=table_name)
    assert caught.value.partition == "customer_id=42"
    assert caught.value.table == table_name

    assert data_files(location) == files_before
    assert len(store.list_commit_records()) == commits_before
    other = again.filter(F.col("customer_id") != 42)
    spark_kms.write_table(other, str(location), table=table_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PartitionsErasedWarning)
        back = spark_kms.read_table(spark, str(location))
        assert back.count() == 60 + other.count()


def test_partition_option_errors(spark: SparkSession, table_name: str, tmp_path: Path) -> None:
    source = customers(spark, 10, 1)
    cases = [
        ({"partition_by": "nope"}, "kms.partition_by column 'nope' is not in the DataFrame"),
        ({"partition_by": "amount"}, "cannot partition by column 'amount' of type double"),
        (
            {"partition_by": "name", "column_keys": "pii: name"},
            "partition column 'name' is listed under key group 'pii'",
        ),
    ]
    for options, message in cases:
        with pytest.raises(InvalidOptionError, match=message):
            spark_kms.write_table(source, str(tmp_path / "t"), table=table_name, **options)
        assert not (tmp_path / "t").exists()


# Scheduled deletion and policy ------------------------------------------------------


def test_pending_deletion_rejects_jobs(
    spark: SparkSession, key_service: KeyService, table_name: str, tmp_path: Path
) -> None:
    location = str(tmp_path / "t")
    source = customers(spark, 30, 1)
    spark_kms.write_table(source, location, table=table_name)
    schedule = key_service.schedule_deletion(table_name, days=3)
    day = schedule.due_at[:10]

    with pytest.raises(TablePendingDeletionError, match=f"scheduled for deletion on {day}.*spark-kms cancel-deletion {table_name}") as caught:
        with spark_kms.typed_errors():
            spark_kms.read_table(spark, location).collect()
    assert caught.value.table == table_name
    assert caught.value.deletion_due_at.startswith(day)
    with pytest.raises(TablePendingDeletionError, match=f"scheduled for deletion on {day}"):
        spark_kms.write_table(source, location, table=table_name)

    key_service.cancel_deletion(table_name)
    back = spark_kms.read_table(spark, location)
    assert_df_equality(source, back, ignore_row_order=True, ignore_nullable=True)


@pytest.fixture
def policy_session(spark: SparkSession, kms_settings: KmsSettings, tmp_path: Path) -> Iterator[Path]:
    """Bind kms_parquet to a policy file for one test, then back to the plain settings."""
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"rules": []}))
    spark_kms.configure(spark, replace(kms_settings, policy_file=str(policy)))
    try:
        yield policy
    finally:
        spark_kms.configure(spark, kms_settings)


def test_policy_denies_spark_user(
    spark: SparkSession, key_service: KeyService, policy_session: Path, table_name: str, tmp_path: Path
) -> None:
    user = spark.sparkContext.sparkUser()
    location = tmp_path / "t"
    with pytest.raises(AccessDeniedError, match=f"principal '{user}' may not perform 'encrypt' on table '{table_name}'") as caught:
        spark_kms.write_table(customers(spark, 10, 1), str(location), table=table_name)
    assert caught.value.principal == user
    assert caught.value.operation == "encrypt"
    assert caught.value.table == table_name
    assert not location.exists()
    assert key_service.registry.get(table_name) is None

    policy_session.write_text(json.dumps({"rules": [{"principals": [user], "tables": [table_name], "operations": ["encrypt"]}]}))
    spark_kms.write_table(customers(spark, 10, 1), str(location), table=table_name)
    with pytest.raises(AccessDeniedError, match=f"principal '{user}' may not perform 'decrypt'"):
        with spark_kms.typed_errors():
            spark_kms.read_table(spark, str(location)).collect()

    decisions = [
        (r["principal"], r["requested"], r["outcome"], r.get("application_id"))
        for r in key_service.audit.records()
        if r.get("table") == table_name and r["operation"] == "policy"
    ]
    application = spark.sparkContext.applicationId
    assert decisions[0] == (user, "encrypt", "deny", application)
    assert (user, "encrypt", "allow", application) in decisions
    assert decisions[-1] == (user, "decrypt", "deny", application)


def test_audit_names_spark_application(
    spark: SparkSession, key_service: KeyService, table_name: str, tmp_path: Path
) -> None:
    location = str(tmp_path / "t")
    spark_kms.write_table(customers(spark, 10, 1), location, table=table_name, partition_by="customer_id")
    spark_kms.read_table(spark, location).collect()
    records = [r for r in key_service.audit.records() if r.get("table") == table_name]
    wraps = [r for r in records if r["operation"] == "wrap_kek"]
    unwraps = [r for r in records if r["operation"] == "unwrap_kek"]
    assert len(wraps) == 3
    assert len(unwraps) == 3
    for record in wraps + unwraps:
        assert record["application_id"] == spark.sparkContext.applicationId
        assert record["principal"] == spark.sparkContext.sparkUser()
        assert record["partition"].startswith("customer_id=4")
        assert record["key_label"].startswith(f"spark_kms/{table_name}/")
        assert record["key_version"] == 1
        assert len(record["kek_ids"]) == 1


def test_lifecycle_leaves_no_secret(
    spark: SparkSession,
    key_service: KeyService,
    kms_settings: KmsSettings,
    spark_event_log: Path,
    table_name: str,
    tmp_path: Path,
) -> None:
    from spark_kms.partitioning import PartitionedWrite, PartitionSeed
    from spark_kms.rekey import rekey_table
    from tests.helpers.independent_kms import read_with_independent_client
    from tests.helpers.secrets import find_secrets

    location = tmp_path / "t"
    spark_kms.write_table(
        customers(spark, 200, 2), str(location), table=table_name, partition_by="customer_id", column_keys="pii: name"
    )
    secrets: list[bytes] = []

    def collect() -> None:
        meta, store = key_service.open_table_for_read(str(location))
        keys = key_service.unwrap_keks(meta, store, store.list_kek_ids())
        keks = {kek_id: keys.kek(kek_id) for kek_id in keys.key_ids}
        secrets.extend(keks.values())
        for kek_id in keks:
            secrets.append(base64.b64decode(store.get_kek_record(kek_id).wrapped_kek))
        for file in data_files(location):
            _table, seen = read_with_independent_client(str(file), keks)
            secrets.extend(dek for _kek_id, _wrapped, dek in seen)

    collect()
    key_service.rotate_table(table_name)
    collect()
    rekey_table(spark, table_name, service=key_service)
    collect()
    assert kms_settings.pin_file is not None
    secrets.append(Path(kms_settings.pin_file).read_text().strip().encode())

    seed = bytes(range(32))
    shown = repr(
        PartitionedWrite(
            table=table_name, job_id="j", column="c", seed=PartitionSeed(seed), table_group="table",
            groups=["table"], grouped_paths={}, leaves=["x"],
        )
    )
    assert find_secrets(shown, [seed]) == []
    audit = Path(kms_settings.audit_log).read_bytes()
    assert table_name.encode() in audit
    assert find_secrets(audit, secrets) == []
    events = b"".join(p.read_bytes() for p in spark_event_log.rglob("*") if p.is_file())
    assert find_secrets(events, secrets) == []


def test_verify_lists_erased_partitions(
    spark: SparkSession, key_service: KeyService, table_name: str, tmp_path: Path
) -> None:
    from spark_kms.verify import format_report, verify_table

    location = tmp_path / "t"
    spark_kms.write_table(customers(spark, 90, 1), str(location), table=table_name, partition_by="customer_id")
    key_service.erase_partition(table_name, "customer_id=42")

    report = verify_table(key_service, table_name)

    assert report.ok, format_report(report)
    assert report.erased_partitions == ["customer_id=42"]
    assert report.files_checked == len(data_files(location)) - len(data_files(location / "customer_id=42"))
    assert report.rows == 60
    assert "note customer_id=42: partition crypto-erased, its files are not checked" in format_report(report)
