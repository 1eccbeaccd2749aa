"""Helpers that look inside written tables: data files, KEKs, file layout and byte flips."""

from __future__ import annotations

import json
import struct
from datetime import timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pe

from spark_kms.keyservice import KeyService
from tests.helpers.independent_kms import RecordingLocalWrapClient


def data_files(location: Path) -> list[Path]:
    """Return the visible Parquet files of the table at ``location``."""
    return sorted(
        p
        for p in location.rglob("*.parquet")
        if not any(part.startswith(("_", ".")) for part in p.relative_to(location).parts)
    )


def staged_files(location: Path) -> list[Path]:
    """Return every file under the table's staging folder."""
    return sorted(p for p in (location / "_spark_kms_staging").rglob("*") if p.is_file())


def table_keks(key_service: KeyService, location: Path) -> dict[str, bytes]:
    """Unwrap every KEK record of the table at ``location`` (a test-only look inside)."""
    meta, store = key_service.open_table_for_read(str(location))
    keys = key_service.unwrap_keks(meta, store, store.list_kek_ids())
    return {kek_id: keys.kek(kek_id) for kek_id in keys.key_ids}


def file_metadata(path: Path, keks: dict[str, bytes]) -> pq.FileMetaData:
    """Return the decrypted footer of ``path``."""
    factory = pe.CryptoFactory(lambda _config: RecordingLocalWrapClient(keks, []))
    properties = factory.file_decryption_properties(
        pe.KmsConnectionConfig(kms_instance_id=f"tables-{path}"),
        pe.DecryptionConfiguration(cache_lifetime=timedelta(seconds=1)),
    )
    return pq.ParquetFile(str(path), decryption_properties=properties).metadata


def footer_range(path: Path) -> tuple[int, int]:
    """Return the offset and length of the file crypto metadata plus encrypted footer."""
    data = path.read_bytes()
    (length,) = struct.unpack("<I", data[-8:-4])
    return len(data) - 8 - length, length


def key_material_range(path: Path) -> tuple[int, int]:
    """Return the offset and length of the footer key material JSON in ``path``."""
    data = path.read_bytes()
    # parquet-mr and pyarrow order the JSON fields differently.
    marker = data.index(b'"keyMaterialType"', footer_range(path)[0])
    start = data.rindex(b"{", 0, marker)
    end = data.index(b"}", start) + 1
    json.loads(data[start:end])
    return start, end - start


def flip_byte(path: Path, offset: int) -> None:
    """Invert every bit of the byte at ``offset`` in ``path``."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def replace_bytes(path: Path, old: bytes, new: bytes) -> None:
    """Replace the one occurrence of ``old`` in ``path`` with ``new`` (same length)."""
    data = path.read_bytes()
    assert len(old) == len(new)
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))


def damage_key_material(path: Path, damage: str) -> str:
    """Make the footer key material JSON of ``path`` invalid; return its wrapped DEK.

    ``damage`` is ``brace`` (the JSON object opens with ``[``) or ``quote``
    (the wrapped DEK's opening quote is replaced).
    """
    start, length = key_material_range(path)
    material = path.read_bytes()[start : start + length]
    wrapped: str = json.loads(material)["wrappedDEK"]
    if damage == "brace":
        damaged = b"[" + material[1:]
    else:
        damaged = material.replace(b'"wrappedDEK":"', b'"wrappedDEK":x', 1)
    replace_bytes(path, material, damaged)
    return wrapped
