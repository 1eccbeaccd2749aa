"""Hive-style partition folders, partition KEK derivation and batch splitting."""

from __future__ import annotations

import datetime
import pickle

import pyarrow as pa
import pytest

from spark_kms.errors import InvalidOptionError
from spark_kms.jobkeys import KEY_ID_PATTERN
from spark_kms.partitioning import (
    HIVE_NULL,
    PartitionSeed,
    derive_partition_keys,
    format_value,
    parse_partition_spec,
    parse_value,
    partition_folder,
    partition_id,
    partition_kek_ids,
    partition_of,
    partition_type,
    split_by_partition,
    unescape_path_name,
)


@pytest.mark.parametrize(
    ("value", "folder"),
    [
        pytest.param("42", "customer=42", id="plain"),
        pytest.param("a/b", "customer=a%2Fb", id="slash"),
        pytest.param("x=y", "customer=x%3Dy", id="equals"),
        pytest.param("50%", "customer=50%25", id="percent"),
        pytest.param("tab\there", "customer=tab%09here", id="control"),
        pytest.param("café", "customer=café", id="unicode-kept"),
        pytest.param(None, f"customer={HIVE_NULL}", id="null"),
    ],
)
def test_folder_names_follow_spark(value: str | None, folder: str) -> None:
    assert partition_folder("customer", value) == folder
    if value is not None:
        assert unescape_path_name(folder.split("=", 1)[1]) == value


def test_folder_name_too_long() -> None:
    with pytest.raises(InvalidOptionError, match="longer than 255 bytes"):
        partition_folder("customer", "x" * 300)


@pytest.mark.parametrize(
    ("value", "data_type", "text"),
    [
        pytest.param(42, pa.int32(), "42", id="int"),
        pytest.param(-7, pa.int64(), "-7", id="negative"),
        pytest.param(True, pa.bool_(), "true", id="bool"),
        pytest.param(datetime.date(2026, 12, 4), pa.date32(), "2026-12-04", id="date"),
        pytest.param("acme", pa.string(), "acme", id="string"),
    ],
)
def test_values_round_trip(value: object, data_type: pa.DataType, text: str) -> None:
    assert format_value("c", value) == text
    assert parse_value(text, data_type) == value


def test_value_parsing_errors() -> None:
    with pytest.raises(InvalidOptionError, match="empty string value"):
        format_value("tenant", "")
    with pytest.raises(InvalidOptionError, match="'4x' is not a valid int32 value"):
        parse_value("4x", pa.int32())
    with pytest.raises(InvalidOptionError, match="'maybe' is not a valid bool value"):
        parse_value("maybe", pa.bool_())
    assert parse_value(HIVE_NULL, pa.int32()) is None
    assert parse_value("042", pa.int32()) == 42


def test_partition_spec_and_paths() -> None:
    assert parse_partition_spec("customer_id=42") == ("customer_id", "42")
    assert parse_partition_spec("tenant=a=b") == ("tenant", "a=b")
    with pytest.raises(InvalidOptionError, match="give it as column=value"):
        parse_partition_spec("42")
    assert partition_of("customer_id=42/part-0.parquet") == "customer_id=42"
    assert partition_of("part-0.parquet") is None


def test_partition_type_from_spark_schema() -> None:
    schema = '{"type":"struct","fields":[{"name":"c","type":"integer","nullable":true,"metadata":{}}]}'
    assert partition_type(schema, "c") == pa.int32()
    assert partition_type(schema, "other") == pa.string()
    assert partition_type(None, "c") == pa.string()
    assert partition_type("not json", "c") == pa.string()


def test_derived_keks_per_partition() -> None:
    seed = PartitionSeed(b"\x01" * 32)
    first = derive_partition_keys(seed, "t", "job1", "c=1", ["table", "pii"])
    again = derive_partition_keys(PartitionSeed(b"\x01" * 32), "t", "job1", "c=1", ["table", "pii"])
    other = derive_partition_keys(seed, "t", "job1", "c=2", ["table", "pii"])
    assert first == again
    assert first["table"][1] != other["table"][1]
    assert first["table"][1] != first["pii"][1]
    assert len(first["table"][1]) == 32
    for kek_id, _kek in [*first.values(), *other.values()]:
        assert KEY_ID_PATTERN.match(kek_id)
    assert first["table"][0] == f"t.table.p{partition_id('c=1')}.kjob1"
    other_seed = derive_partition_keys(PartitionSeed(b"\x02" * 32), "t", "job1", "c=1", ["table"])
    assert other_seed["table"][1] != first["table"][1]


def test_partition_kek_ids_filter() -> None:
    ids = [f"t.table.p{partition_id('c=1')}.kj", f"t.table.p{partition_id('c=2')}.kj"]
    assert partition_kek_ids("c=1", ids) == ids[:1]
    assert partition_kek_ids(None, ids) == ids


def test_seed_never_shown() -> None:
    seed = PartitionSeed(bytes(range(32)))
    assert "redacted" in repr(seed)
    assert bytes(range(32)).hex() not in repr(seed) + str(seed)
    assert pickle.loads(pickle.dumps(seed)).derive("x") == seed.derive("x")
    with pytest.raises(ValueError, match="32 bytes"):
        PartitionSeed(b"short")


def test_split_groups_rows_by_value() -> None:
    batch = pa.record_batch(
        {"id": [1, 2, 3, 4, 5], "c": [2, None, 1, 2, None], "v": ["a", "b", "c", "d", "e"]}
    )
    parts = {text: part.to_pydict() for text, part in split_by_partition(batch, "c")}
    assert parts == {
        "1": {"id": [3], "v": ["c"]},
        "2": {"id": [1, 4], "v": ["a", "d"]},
        None: {"id": [2, 5], "v": ["b", "e"]},
    }
