"""Property-based tests of every parser of stored or user-given text.

Each parser must return a result or raise a SparkKmsError for any input: no
other exception and no hang (each example has a deadline).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import pyarrow.fs as pafs
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from spark_kms.audit import AuditLog, verify_chain
from spark_kms.errors import SparkKmsError
from spark_kms.footer import (
    FooterKeyMaterial,
    parse_crypto_metadata,
    parse_key_material,
    read_footer_key_material,
)
from spark_kms.jobkeys import JobKeys, check_name
from spark_kms.keyring import CommitRecord, KekRecord, TableMetadata
from spark_kms.localwrap import unwrap_key_locally, wrap_key_locally
from spark_kms.options import parse_column_keys, parse_write_options
from spark_kms.registry import TableRegistry
from spark_kms.settings import KmsSettings, load_properties_file

# A deadline turns a hang into a failure; it is generous so that a loaded CI
# machine does not fail a parser that is merely slow once.
FUZZ = settings(
    max_examples=300,
    deadline=10_000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

KEK_RECORD = {
    "kek_id": "t.table.k1",
    "table": "t",
    "table_id": "0" * 32,
    "group": "table",
    "job_id": "j1",
    "created_at": "2026-01-01T00:00:00.000+00:00",
    "master_key_label": "spark_kms/t/0/v1",
    "master_key_version": 1,
    "wrapped_kek": "AAAA",
    "format_version": 1,
}
TABLE_METADATA = {
    "table": "t",
    "table_id": "0" * 32,
    "state": "active",
    "master_key_label": "spark_kms/t/0/v1",
    "master_key_version": 1,
    "created_at": "2026-01-01T00:00:00.000+00:00",
    "spark_schema": None,
    "erased_at": None,
    "format_version": 1,
}
COMMIT_RECORD = {
    "job_id": "j1",
    "committed_at": "2026-01-01T00:00:00.000+00:00",
    "mode": "append",
    "files": ["part-00000.parquet"],
    "kek_ids": ["t.table.k1"],
    "rows": 3,
    "format_version": 1,
}
KEY_MATERIAL = {
    "keyMaterialType": "PKMT1",
    "internalStorage": True,
    "isFooterKey": True,
    "kmsInstanceID": "spark_kms-j1",
    "kmsInstanceURL": "DEFAULT",
    "masterKeyID": "t.table.k1",
    "wrappedDEK": "AAAA",
    "doubleWrapping": False,
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def dicts_like(valid: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects near ``valid``: fields dropped, given other JSON values, or added."""
    return st.fixed_dictionaries(
        {},
        optional={key: st.just(value) | json_values for key, value in valid.items()},
    ).flatmap(
        lambda base: st.dictionaries(st.text(max_size=8), json_values, max_size=3).map(
            lambda extra: {**extra, **base}
        )
    )


def records_like(valid: dict[str, Any]) -> st.SearchStrategy[str]:
    """JSON texts near ``valid``, other JSON values and raw text."""
    mutated = dicts_like(valid)
    return st.one_of(
        mutated.map(json.dumps),
        json_values.map(json.dumps),
        st.text(max_size=200),
        st.just("[" * 100_000),
        st.just('{"a":' * 50_000),
    )


def accepts_or_raises_typed(parse: Callable[[], Any]) -> Any:
    try:
        return parse()
    except SparkKmsError:
        return None


@FUZZ
@given(records_like(KEK_RECORD))
def test_kek_record_parser(text: str) -> None:
    record = accepts_or_raises_typed(lambda: KekRecord.from_json(text, "keks/x.json"))
    if record is not None:
        assert isinstance(record.wrapped_kek, str)
        assert isinstance(record.master_key_version, int)


@FUZZ
@given(records_like(TABLE_METADATA))
@example(json.dumps({**TABLE_METADATA, "erased_at": 5}))
@example(json.dumps({**TABLE_METADATA, "spark_schema": "{"}))
def test_table_metadata_parser(text: str) -> None:
    meta = accepts_or_raises_typed(lambda: TableMetadata.from_json(text, "table.json"))
    if meta is not None:
        assert meta.state in ("active", "erased")
        assert meta.spark_schema is None or isinstance(meta.spark_schema, str)
        assert meta.erased_at is None or isinstance(meta.erased_at, str)


@FUZZ
@given(records_like(COMMIT_RECORD))
def test_commit_record_parser(text: str) -> None:
    record = accepts_or_raises_typed(lambda: CommitRecord.from_json(text, "commits/j.json"))
    if record is not None:
        assert all(isinstance(name, str) for name in record.files)
        assert all(isinstance(kek_id, str) for kek_id in record.kek_ids)


@FUZZ
@given(
    st.text(max_size=200)
    | json_values.map(json.dumps)
    | st.fixed_dictionaries(
        {"type": st.just("struct"), "fields": st.lists(json_values, max_size=3)}
    ).map(json.dumps)
)
@example('{"type": "struct", "fields": [1]}')
@example(
    '{"type": "struct", "fields": [{"name": "a", "type": "nope", "nullable": true, "metadata": {}}]}'
)
def test_stored_schema_parser(text: str) -> None:
    from pyspark.sql.types import StructType

    from spark_kms.datasource import _parse_stored_schema

    schema = accepts_or_raises_typed(lambda: _parse_stored_schema("t", text))
    assert schema is None or isinstance(schema, StructType)


def test_valid_records_parse() -> None:
    assert KekRecord.from_json(json.dumps(KEK_RECORD), "k").kek_id == "t.table.k1"
    assert TableMetadata.from_json(json.dumps(TABLE_METADATA), "m").table == "t"
    assert CommitRecord.from_json(json.dumps(COMMIT_RECORD), "c").rows == 3


@FUZZ
@given(st.text(max_size=300) | st.from_regex(r"([a-z_]{0,8}\s*:\s*([a-z. ]{0,6},?){0,3};?){0,4}"))
def test_column_keys_parser(text: str) -> None:
    groups = accepts_or_raises_typed(lambda: parse_column_keys(text))
    if groups is not None:
        for group, columns in groups.items():
            assert check_name("key group", group) == group
            assert all(column and column == column.strip() for column in columns)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["kms.table", "KMS.TABLE", "kms.column_keys", "kms.x", "path"])
        | st.text(max_size=12),
        st.text(max_size=40),
        max_size=4,
    )
)
def test_write_options_parser(options: dict[str, str]) -> None:
    parsed = accepts_or_raises_typed(lambda: parse_write_options(options))
    if parsed is not None:
        assert check_name("table", parsed.table) == parsed.table


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(
            sorted(
                KmsSettings.from_properties(
                    {
                        "spark.kms.hsm.module": "m",
                        "spark.kms.hsm.token": "t",
                        "spark.kms.hsm.pin.env": "P",
                        "spark.kms.registry": "r",
                        "spark.kms.audit.log": "a",
                    }
                ).to_properties()
            )
        )
        | st.text(max_size=20),
        st.text(max_size=20),
        max_size=8,
    )
)
def test_settings_parser(properties: dict[str, str]) -> None:
    parsed = accepts_or_raises_typed(lambda: KmsSettings.from_properties(properties))
    if parsed is not None:
        assert (parsed.pin_file is None) != (parsed.pin_env is None)


@FUZZ
@given(st.binary(max_size=400) | st.text(max_size=300).map(str.encode))
def test_properties_file_parser(data: bytes) -> None:
    with tempfile.NamedTemporaryFile(suffix=".conf", delete=False) as handle:
        handle.write(data)
    try:
        properties = accepts_or_raises_typed(lambda: load_properties_file(handle.name))
    finally:
        os.unlink(handle.name)
    if properties is not None:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in properties.items())


@FUZZ
@given(
    records_like(
        {
            "table": "t",
            "table_id": "0",
            "location": "/x",
            "state": "active",
            "created_at": "c",
            "erased_at": None,
        }
    )
    | st.binary(max_size=100).map(lambda b: b.decode("latin-1"))
)
def test_registry_entry_parser(text: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        with open(
            os.path.join(folder, "t.json"), "w", encoding="utf-8", errors="surrogatepass"
        ) as handle:
            handle.write(text)
        entry = accepts_or_raises_typed(lambda: TableRegistry(folder).get("t"))
    if entry is not None:
        assert isinstance(entry.location, str)
        assert entry.state in ("active", "erased")


@FUZZ
@given(records_like(KEY_MATERIAL).map(str.encode) | st.binary(max_size=200))
def test_key_material_parser(data: bytes) -> None:
    material = accepts_or_raises_typed(lambda: parse_key_material(data, "f.parquet"))
    if material is not None:
        assert isinstance(material, FooterKeyMaterial)
        assert material.kek_id == json.loads(data)["masterKeyID"]


def crypto_metadata(key_metadata: bytes) -> bytes:
    """Encode a FileCryptoMetaData (Thrift compact) as parquet-cpp writes it."""
    algorithm = b"\x1c" + b"\x1c" + b"\x28\x08" + b"12345678" + b"\x00" + b"\x00"
    length = len(key_metadata)
    varint = bytearray()
    while True:
        byte = length & 0x7F
        length >>= 7
        varint.append(byte | (0x80 if length else 0))
        if not length:
            break
    return algorithm + b"\x18" + bytes(varint) + key_metadata + b"\x00"


def test_crypto_metadata_of_valid_material() -> None:
    material = json.dumps(KEY_MATERIAL).encode()
    assert parse_crypto_metadata(crypto_metadata(material), "f") == material
    assert parse_key_material(material, "f").kek_id == "t.table.k1"


@FUZZ
@given(st.binary(max_size=300))
@example(b"\x1c\x1c\x00\x00\x18\xff\xff\xff\xff\x0f")
@example(b"\x19\xfc" + b"\xff" * 10)
@example(b"\x1b\xff\xff\xff\xff\x0f\x11")
@example(b"\x1c" * 200)
def test_crypto_metadata_parser(data: bytes) -> None:
    accepts_or_raises_typed(lambda: parse_crypto_metadata(data, "f.parquet"))


@FUZZ
@given(st.data())
def test_crypto_metadata_byte_flips(data: st.DataObject) -> None:
    encoded = bytearray(crypto_metadata(json.dumps(KEY_MATERIAL).encode()))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(encoded) - 1))
        encoded[position] ^= data.draw(st.integers(1, 255))
    result = accepts_or_raises_typed(
        lambda: parse_key_material(parse_crypto_metadata(bytes(encoded), "f"), "f")
    )
    assert result is None or isinstance(result, FooterKeyMaterial)


@FUZZ
@given(st.binary(max_size=200), st.binary(max_size=16), st.integers(0, 2**32 - 1))
def test_file_tail_reader(body: bytes, head: bytes, length: int) -> None:
    with tempfile.NamedTemporaryFile(suffix=".parquet", delete=False) as handle:
        handle.write(b"PARE" + head + body + struct.pack("<I", length) + b"PARE")
    try:
        accepts_or_raises_typed(
            lambda: read_footer_key_material(pafs.LocalFileSystem(), handle.name)
        )
    finally:
        os.unlink(handle.name)


@FUZZ
@given(
    st.text(max_size=120)
    | st.binary(max_size=60).map(lambda b: __import__("base64").b64encode(b).decode())
)
def test_wrapped_dek_parser(wrapped: str) -> None:
    kek = bytes(range(32))
    accepts_or_raises_typed(lambda: unwrap_key_locally(wrapped, kek, "t.table.k1"))


def test_wrapped_dek_round_trip() -> None:
    kek = bytes(range(32))
    assert unwrap_key_locally(wrap_key_locally(b"k" * 32, kek, "a"), kek, "a") == b"k" * 32


@FUZZ
@given(st.dictionaries(st.text(max_size=30), st.binary(min_size=16, max_size=16), max_size=3))
def test_job_key_ids(keys: dict[str, bytes]) -> None:
    parsed = accepts_or_raises_typed(lambda: JobKeys(keys))
    if parsed is not None:
        assert parsed.key_ids == sorted(keys)


@FUZZ
@given(st.lists(st.binary(max_size=80) | st.just(b"[" * 50_000), max_size=5))
def test_audit_log_parsers(lines: list[bytes]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "audit.log")
        with open(path, "wb") as handle:
            handle.write(b"\n".join(lines))
        problems = verify_chain(path)
        records = list(AuditLog(path).records())
    assert all(isinstance(problem, str) for problem in problems)
    assert all(isinstance(record, dict) for record in records)


@pytest.mark.parametrize("record", [KEK_RECORD, TABLE_METADATA, COMMIT_RECORD])
def test_records_survive_dump_and_parse(record: dict[str, Any]) -> None:
    parsers = {
        id(KEK_RECORD): KekRecord,
        id(TABLE_METADATA): TableMetadata,
        id(COMMIT_RECORD): CommitRecord,
    }
    parsed = parsers[id(record)].from_json(json.dumps(record), "x")
    assert {k: v for k, v in asdict(parsed).items() if k in record} == record


POLICY_RULE = {
    "principals": ["alice"],
    "tables": ["flights"],
    "operations": ["encrypt", "decrypt"],
    "description": "readers",
}


@FUZZ
@given(
    records_like({"rules": [POLICY_RULE]})
    | st.lists(dicts_like(POLICY_RULE), max_size=2).map(lambda rules: json.dumps({"rules": rules}))
)
@example(json.dumps({"rules": [POLICY_RULE]}))
def test_policy_parser(text: str) -> None:
    from spark_kms.policy import PolicyRule, parse_policy

    rules = accepts_or_raises_typed(lambda: parse_policy(text, "policy.json"))
    if rules is not None:
        assert all(isinstance(rule, PolicyRule) for rule in rules)


@FUZZ
@given(st.text(max_size=40) | st.integers(-10, 5000).map(str))
def test_rotation_period_parser(text: str) -> None:
    from spark_kms.settings import parse_rotation_period

    days = accepts_or_raises_typed(lambda: parse_rotation_period(text, "kms.rotation_period_days"))
    assert days is None or 0 <= days <= 3650


@FUZZ
@given(st.text(max_size=60))
def test_partition_spec_parser(text: str) -> None:
    from spark_kms.partitioning import parse_partition_spec

    parsed = accepts_or_raises_typed(lambda: parse_partition_spec(text))
    if parsed is not None:
        assert parsed[0] and parsed[0] == parsed[0].strip()


@FUZZ
@given(
    st.none() | st.text(max_size=40),
    st.sampled_from(["int64", "int32", "bool", "date32", "string"]),
)
def test_partition_value_parser(text: str | None, type_name: str) -> None:
    import pyarrow as pa

    from spark_kms.partitioning import parse_value

    data_type = {
        "int64": pa.int64(),
        "int32": pa.int32(),
        "bool": pa.bool_(),
        "date32": pa.date32(),
        "string": pa.string(),
    }[type_name]
    accepts_or_raises_typed(lambda: parse_value(text, data_type))


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(
            ["kms.table", "kms.column_keys", "kms.partition_by", "kms.rotation_period_days"]
        ),
        st.text(max_size=30) | st.sampled_from(["t1", "pii: a", "day", "30", "-1", "x" * 70]),
        max_size=4,
    )
)
def test_write_options_with_lifecycle_keys(options: dict[str, str]) -> None:
    accepts_or_raises_typed(lambda: parse_write_options(options))
