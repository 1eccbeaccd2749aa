"""Parquet Modular Encryption on the executor side, without Spark or the HSM."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from spark_kms.errors import InvalidOptionError, KeyNotFoundError
from spark_kms.jobkeys import JobKeys
from spark_kms.parquet_crypto import (
    EncryptionPlan,
    is_encrypted_file,
    leaf_paths,
    open_encrypted_dataset,
    resolve_column_paths,
    write_encrypted_file,
)
from tests.helpers.independent_kms import read_with_independent_client

TABLE_KEK = "t.table.k1"
PII_KEK = "t.pii.k1"


@pytest.fixture
def keks() -> dict[str, bytes]:
    return {TABLE_KEK: os.urandom(32), PII_KEK: os.urandom(32)}


@pytest.fixture
def sample() -> pa.Table:
    return pa.table(
        {
            "id": pa.array([1, 2, 3], pa.int64()),
            "tailnum": ["N14228", "N24211", None],
            "point": pa.array([{"x": 1.5, "y": 2.5}] * 3),
            "tags": [["a"], [], ["b", "c"]],
            "attrs": pa.array([[("k", 1)], [], [("k", 2)]], pa.map_(pa.string(), pa.int64())),
        }
    )


def _plan(sample: pa.Table, keks: dict[str, bytes], pii: list[str]) -> EncryptionPlan:
    covered = [p for paths in resolve_column_paths(sample.schema, pii).values() for p in paths]
    rest = [p for p in leaf_paths(sample.schema) if p not in covered]
    return EncryptionPlan(
        job_id="job1",
        footer_kek_id=TABLE_KEK,
        column_keys={PII_KEK: covered, TABLE_KEK: rest},
        keys=JobKeys(keks),
    )


def _write(tmp_path: Path, sample: pa.Table, plan: EncryptionPlan, name: str) -> str:
    path = str(tmp_path / name)
    rows, _schema = write_encrypted_file(sample.to_batches(), path, plan=plan, filesystem=pafs.LocalFileSystem())
    assert rows == sample.num_rows
    return path


def test_leaf_paths_of_nested_types(sample: pa.Table) -> None:
    assert leaf_paths(sample.schema) == [
        "id",
        "tailnum",
        "point.x",
        "point.y",
        "tags.list.element",
        "attrs.key_value.key",
        "attrs.key_value.value",
    ]


def test_nested_column_covers_every_leaf(sample: pa.Table) -> None:
    resolved = resolve_column_paths(sample.schema, ["point", "tags", "attrs"])
    assert resolved["point"] == ["point.x", "point.y"]
    assert resolved["tags"] == ["tags.list.element"]
    assert resolved["attrs"] == ["attrs.key_value.key", "attrs.key_value.value"]


def test_unknown_column_lists_valid_paths(sample: pa.Table) -> None:
    with pytest.raises(InvalidOptionError, match=r"column 'tailnumber' .* does not exist; valid .*point\.x"):
        resolve_column_paths(sample.schema, ["tailnumber"])


def test_column_with_dot_refused() -> None:
    schema = pa.schema([("a.b", pa.int64())])
    with pytest.raises(InvalidOptionError, match="contains '.'"):
        resolve_column_paths(schema, ["a.b"])


def test_independent_client_reads_files(tmp_path: Path, sample: pa.Table, keks: dict[str, bytes]) -> None:
    path = _write(tmp_path, sample, _plan(sample, keks, ["tailnum", "point"]), "f.parquet")
    table, seen = read_with_independent_client(path, keks)
    assert table.equals(sample)
    assert {kek_id for kek_id, _wrapped, _dek in seen} == {TABLE_KEK, PII_KEK}


def test_every_file_gets_fresh_deks(tmp_path: Path, sample: pa.Table, keks: dict[str, bytes]) -> None:
    plan = _plan(sample, keks, ["tailnum"])
    deks_per_file = []
    for index in range(3):
        path = _write(tmp_path, sample, plan, f"f{index}.parquet")
        _table, seen = read_with_independent_client(path, keks)
        deks_per_file.append({dek for _kek_id, _wrapped, dek in seen})
    assert deks_per_file[0].isdisjoint(deks_per_file[1])
    assert deks_per_file[1].isdisjoint(deks_per_file[2])
    assert all(len(deks) >= 2 for deks in deks_per_file)


def test_files_are_in_encrypted_footer_mode(tmp_path: Path, sample: pa.Table, keks: dict[str, bytes]) -> None:
    path = _write(tmp_path, sample, _plan(sample, keks, ["tailnum"]), "f.parquet")
    data = Path(path).read_bytes()
    assert data[:4] == b"PARE"
    assert data[-4:] == b"PARE"
    assert is_encrypted_file(pafs.LocalFileSystem(), path)


def test_plain_pyarrow_cannot_read(tmp_path: Path, sample: pa.Table, keks: dict[str, bytes]) -> None:
    path = _write(tmp_path, sample, _plan(sample, keks, ["tailnum"]), "f.parquet")
    with pytest.raises(OSError, match="no decryption found"):
        pq.read_table(path)


def test_plaintext_values_absent_from_file(tmp_path: Path, sample: pa.Table, keks: dict[str, bytes]) -> None:
    path = _write(tmp_path, sample, _plan(sample, keks, ["tailnum"]), "f.parquet")
    data = Path(path).read_bytes()
    assert b"N14228" not in data
    assert b"tailnum" not in data


def test_column_key_needed_for_column(tmp_path: Path, sample: pa.Table, keks: dict[str, bytes]) -> None:
    path = _write(tmp_path, sample, _plan(sample, keks, ["tailnum"]), "f.parquet")
    footer_only = JobKeys({TABLE_KEK: keks[TABLE_KEK]})
    dataset = open_encrypted_dataset([path], keys=footer_only, filesystem=pafs.LocalFileSystem(), job_id="r1")
    assert dataset.to_table(columns=["id"]).column("id").to_pylist() == [1, 2, 3]
    with pytest.raises(KeyNotFoundError, match="KEK 't.pii.k1' is not among the keys"):
        dataset.to_table(columns=["tailnum"])


def test_uniform_plan_encrypts_every_column(tmp_path: Path, sample: pa.Table, keks: dict[str, bytes]) -> None:
    plan = EncryptionPlan(job_id="job2", footer_kek_id=TABLE_KEK, column_keys={}, keys=JobKeys(keks))
    path = _write(tmp_path, sample, plan, "u.parquet")
    table, seen = read_with_independent_client(path, keks)
    assert table.equals(sample)
    assert {kek_id for kek_id, _wrapped, _dek in seen} == {TABLE_KEK}
    assert b"N14228" not in Path(path).read_bytes()


def test_empty_iterator_writes_no_file(tmp_path: Path, keks: dict[str, bytes]) -> None:
    plan = EncryptionPlan(job_id="job3", footer_kek_id=TABLE_KEK, column_keys={}, keys=JobKeys(keks))
    path = str(tmp_path / "none.parquet")
    rows, schema = write_encrypted_file(iter([]), path, plan=plan, filesystem=pafs.LocalFileSystem())
    assert rows == 0
    assert schema is None
    assert not os.path.exists(path)


def _row_groups(path: str, keks: dict[str, bytes]) -> list[int]:
    dataset = open_encrypted_dataset([path], keys=JobKeys(keks), filesystem=pafs.LocalFileSystem(), job_id="rg")
    fragment = next(iter(dataset.get_fragments()))
    return [group.num_rows for group in fragment.row_groups]


def test_small_batches_share_row_group(tmp_path: Path, keks: dict[str, bytes]) -> None:
    table = pa.table({"id": pa.array(range(25_000), pa.int64()), "tailnum": ["N14228"] * 25_000})
    plan = EncryptionPlan(job_id="job4", footer_kek_id=TABLE_KEK, column_keys={}, keys=JobKeys(keks))
    path = str(tmp_path / "one.parquet")
    rows, _schema = write_encrypted_file(
        table.to_batches(max_chunksize=1000), path, plan=plan, filesystem=pafs.LocalFileSystem()
    )
    assert rows == 25_000
    assert _row_groups(path, keks) == [25_000]
    read, _seen = read_with_independent_client(path, keks)
    assert read.equals(table)


def test_row_group_limits(tmp_path: Path, keks: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    import spark_kms.parquet_crypto as parquet_crypto

    table = pa.table({"id": pa.array(range(25_000), pa.int64())})
    plan = EncryptionPlan(job_id="job5", footer_kek_id=TABLE_KEK, column_keys={}, keys=JobKeys(keks))
    batches = table.to_batches(max_chunksize=1000)

    monkeypatch.setattr(parquet_crypto, "ROW_GROUP_MAX_ROWS", 10_000)
    by_rows = str(tmp_path / "rows.parquet")
    write_encrypted_file(batches, by_rows, plan=plan, filesystem=pafs.LocalFileSystem())
    assert _row_groups(by_rows, keks) == [10_000, 10_000, 5_000]

    # 8,000 bytes is one batch of 1,000 int64 values.
    monkeypatch.setattr(parquet_crypto, "ROW_GROUP_MAX_BYTES", 3 * 8_000)
    by_bytes = str(tmp_path / "bytes.parquet")
    write_encrypted_file(batches, by_bytes, plan=plan, filesystem=pafs.LocalFileSystem())
    assert _row_groups(by_bytes, keks) == [3_000] * 8 + [1_000]


def test_large_batch_split_by_rows(tmp_path: Path, keks: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    import spark_kms.parquet_crypto as parquet_crypto

    monkeypatch.setattr(parquet_crypto, "ROW_GROUP_MAX_ROWS", 10_000)
    table = pa.table({"id": pa.array(range(25_000), pa.int64())})
    plan = EncryptionPlan(job_id="job6", footer_kek_id=TABLE_KEK, column_keys={}, keys=JobKeys(keks))
    path = str(tmp_path / "large.parquet")
    write_encrypted_file(table.to_batches(), path, plan=plan, filesystem=pafs.LocalFileSystem())
    assert _row_groups(path, keks) == [10_000, 10_000, 5_000]
