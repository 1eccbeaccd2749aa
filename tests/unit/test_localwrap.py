"""parquet-mr's local key wrap, checked against vectors parquet-mr itself produced."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from spark_kms.errors import IntegrityError
from spark_kms.localwrap import unwrap_key_locally, wrap_key_locally

# Made with org.apache.parquet.crypto.keytools.KeyToolkit.encryptKeyLocally,
# parquet-hadoop 1.17.0; see tests/data/README.md.
VECTORS = json.loads((Path(__file__).parent.parent / "data" / "parquet-local-wrap.json").read_text())


def _flip_bit(data: bytes, index: int) -> bytes:
    changed = bytearray(data)
    changed[index] ^= 0x01
    return bytes(changed)


@pytest.mark.parametrize("vector", VECTORS, ids=[v["aad_utf8"] for v in VECTORS])
def test_unwrap_parquet_mr_vector(vector: dict[str, str]) -> None:
    dek = unwrap_key_locally(vector["wrapped_b64"], bytes.fromhex(vector["kek_hex"]), vector["aad_utf8"])
    assert dek.hex() == vector["dek_hex"]


@pytest.mark.parametrize("vector", VECTORS, ids=[v["aad_utf8"] for v in VECTORS])
def test_unwrap_rejects_changed_wrapped_value(vector: dict[str, str]) -> None:
    blob = base64.b64decode(vector["wrapped_b64"])
    for index in (0, 12, len(blob) - 1):
        changed = base64.b64encode(_flip_bit(blob, index)).decode()
        with pytest.raises(IntegrityError, match="failed authentication"):
            unwrap_key_locally(changed, bytes.fromhex(vector["kek_hex"]), vector["aad_utf8"])


@pytest.mark.parametrize("vector", VECTORS, ids=[v["aad_utf8"] for v in VECTORS])
def test_unwrap_rejects_changed_kek(vector: dict[str, str]) -> None:
    kek = _flip_bit(bytes.fromhex(vector["kek_hex"]), 0)
    with pytest.raises(IntegrityError, match="failed authentication"):
        unwrap_key_locally(vector["wrapped_b64"], kek, vector["aad_utf8"])


@pytest.mark.parametrize("vector", VECTORS, ids=[v["aad_utf8"] for v in VECTORS])
def test_unwrap_rejects_changed_key_id(vector: dict[str, str]) -> None:
    key_id = _flip_bit(vector["aad_utf8"].encode(), 0).decode()
    with pytest.raises(IntegrityError, match="failed authentication"):
        unwrap_key_locally(vector["wrapped_b64"], bytes.fromhex(vector["kek_hex"]), key_id)


@pytest.mark.parametrize("kek_length", [16, 24, 32])
def test_wrap_round_trip(kek_length: int) -> None:
    kek = bytes(range(kek_length))
    wrapped = wrap_key_locally(b"\x42" * 32, kek, "t.table.k1")
    blob = base64.b64decode(wrapped)
    assert len(blob) == 12 + 32 + 16
    assert unwrap_key_locally(wrapped, kek, "t.table.k1") == b"\x42" * 32


def test_wrap_uses_fresh_nonce() -> None:
    kek = bytes(32)
    first = wrap_key_locally(b"\x01" * 16, kek, "k")
    second = wrap_key_locally(b"\x01" * 16, kek, "k")
    assert first != second


def test_unwrap_rejects_invalid_base64() -> None:
    with pytest.raises(IntegrityError, match="not valid base64"):
        unwrap_key_locally("not base64!", bytes(16), "k")


def test_unwrap_rejects_short_value() -> None:
    with pytest.raises(IntegrityError, match="shorter than nonce and tag"):
        unwrap_key_locally(base64.b64encode(b"x" * 20).decode(), bytes(16), "k")


def test_wrap_rejects_bad_kek_length() -> None:
    with pytest.raises(ValueError, match="16, 24 or 32 bytes"):
        wrap_key_locally(b"\x01" * 16, b"short", "k")
