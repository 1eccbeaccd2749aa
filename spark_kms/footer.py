"""The tail of an encrypted Parquet file, read without any key.

A file in encrypted footer mode ends with (Parquet Modular Encryption spec,
"Encrypted footer mode")::

    FileCryptoMetaData | encrypted footer | 4-byte little-endian length of both | "PARE"

``FileCryptoMetaData`` is a Thrift struct in the compact protocol: field 1 is
the encryption algorithm (a union), field 2 the footer key metadata. With
spark_kms and parquet-mr's key tools the key metadata is the footer's key
material, a JSON object of type ``PKMT1`` whose ``masterKeyID`` is the KEK id
and whose ``wrappedDEK`` is the footer DEK wrapped by that KEK.

Every parser here takes stored, possibly hostile bytes: any malformed input
raises :class:`IntegrityError` naming the file, never another exception.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from spark_kms.errors import IntegrityError
from spark_kms.jobkeys import KEY_ID_PATTERN

__all__ = [
    "FooterKeyMaterial",
    "parse_crypto_metadata",
    "parse_key_material",
    "read_footer_key_material",
]

MAGIC_ENCRYPTED = b"PARE"
MAGIC_PLAIN = b"PAR1"
KEY_MATERIAL_TYPE = "PKMT1"

# Thrift compact protocol type ids.
_STOP, _TRUE, _FALSE, _I8, _I16, _I32, _I64, _DOUBLE = 0, 1, 2, 3, 4, 5, 6, 7
_BINARY, _LIST, _SET, _MAP, _STRUCT = 8, 9, 10, 11, 12
_MAX_DEPTH = 32
# A footer key metadata larger than this is not key material of any known writer.
_MAX_KEY_METADATA = 64 * 1024


@dataclass(frozen=True)
class FooterKeyMaterial:
    """The footer key material of one file: which KEK wraps the footer DEK.

    ``wrapped_dek`` is ciphertext, but it is still kept out of the ``repr``.
    """

    kek_id: str
    wrapped_dek: str
    kms_instance_id: str

    def __repr__(self) -> str:
        return (
            f"FooterKeyMaterial(kek_id={self.kek_id!r}, kms_instance_id={self.kms_instance_id!r})"
        )


def read_footer_key_material(filesystem: Any, path: str) -> FooterKeyMaterial:
    """Read the footer key material of the Parquet file at ``path``.

    :raises IntegrityError: naming ``path`` if the file is not in encrypted
        footer mode or its tail is malformed.
    """
    with filesystem.open_input_file(path) as handle:
        size = handle.size()
        if size < 12:
            raise IntegrityError(f"{path} is {size} bytes long, too short for a Parquet file")
        head = handle.read_at(4, 0)
        tail = handle.read_at(8, size - 8)
        if head == MAGIC_PLAIN or tail[4:] == MAGIC_PLAIN:
            raise IntegrityError(f"{path} is a plaintext Parquet file (magic PAR1), not encrypted")
        if head != MAGIC_ENCRYPTED or tail[4:] != MAGIC_ENCRYPTED:
            raise IntegrityError(f"{path} does not begin and end with the magic PARE")
        (length,) = struct.unpack("<I", tail[:4])
        if length <= 0 or length > size - 12:
            raise IntegrityError(f"{path} has an invalid footer length {length}")
        footer = handle.read_at(length, size - 8 - length)
    return parse_key_material(parse_crypto_metadata(footer, path), path)


def parse_crypto_metadata(data: bytes, source: str) -> bytes:
    """Return the footer key metadata of the ``FileCryptoMetaData`` at the start of ``data``.

    :raises IntegrityError: naming ``source`` if the struct is malformed or has
        no key metadata.
    """
    reader = _CompactReader(data, source)
    key_metadata: bytes | None = None
    has_algorithm = False
    for field_id, field_type in reader.fields():
        if field_id == 1 and field_type == _STRUCT:
            reader.skip(field_type, 0)
            has_algorithm = True
        elif field_id == 2 and field_type == _BINARY:
            key_metadata = reader.binary(_MAX_KEY_METADATA)
        else:
            reader.skip(field_type, 0)
    if not has_algorithm:
        raise IntegrityError(f"{source}: the file crypto metadata names no encryption algorithm")
    if key_metadata is None:
        raise IntegrityError(f"{source}: the file crypto metadata has no footer key metadata")
    return key_metadata


def parse_key_material(data: bytes, source: str) -> FooterKeyMaterial:
    """Parse footer key material (``PKMT1`` JSON, stored inside the file).

    :raises IntegrityError: naming ``source`` if it is not valid internal
        footer key material with a valid KEK id.
    """
    try:
        material = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise IntegrityError(f"{source}: the footer key material is not valid JSON") from None
    if not isinstance(material, dict):
        raise IntegrityError(f"{source}: the footer key material is not a JSON object")
    if material.get("keyMaterialType") != KEY_MATERIAL_TYPE:
        raise IntegrityError(
            f"{source}: the footer key material is not of type {KEY_MATERIAL_TYPE}"
        )
    if material.get("internalStorage") is not True:
        raise IntegrityError(
            f"{source}: the footer key material is stored outside the file, which spark_kms "
            "does not write or read"
        )
    if material.get("isFooterKey") is not True:
        raise IntegrityError(f"{source}: the footer key material is not marked as the footer key's")
    if material.get("doubleWrapping") is not False:
        raise IntegrityError(
            f"{source}: the footer DEK is double-wrapped, which spark_kms does not write"
        )
    kek_id = material.get("masterKeyID")
    if not isinstance(kek_id, str) or not KEY_ID_PATTERN.match(kek_id):
        raise IntegrityError(f"{source}: the footer key material has an invalid KEK id")
    wrapped = material.get("wrappedDEK")
    if not isinstance(wrapped, str) or not wrapped:
        raise IntegrityError(f"{source}: the footer key material has no wrapped DEK")
    instance = material.get("kmsInstanceID", "")
    return FooterKeyMaterial(
        kek_id=kek_id,
        wrapped_dek=wrapped,
        kms_instance_id=instance if isinstance(instance, str) else "",
    )


class _CompactReader:
    """A bounds-checked reader of the Thrift compact protocol."""

    def __init__(self, data: bytes, source: str) -> None:
        self.data = data
        self.source = source
        self.position = 0

    def _fail(self, reason: str) -> IntegrityError:
        return IntegrityError(f"{self.source}: malformed file crypto metadata ({reason})")

    def byte(self) -> int:
        if self.position >= len(self.data):
            raise self._fail("truncated")
        value = self.data[self.position]
        self.position += 1
        return value

    def varint(self) -> int:
        result = 0
        for shift in range(0, 64, 7):
            value = self.byte()
            result |= (value & 0x7F) << shift
            if not value & 0x80:
                return result
        raise self._fail("varint longer than 10 bytes")

    def binary(self, limit: int) -> bytes:
        length = self.varint()
        if length > limit or self.position + length > len(self.data):
            raise self._fail(f"binary field of {length} bytes")
        value = self.data[self.position : self.position + length]
        self.position += length
        return value

    def fields(self) -> Any:
        """Yield ``(field id, type)`` for each field of a struct, up to its stop byte."""
        last_id = 0
        while True:
            header = self.byte()
            field_type = header & 0x0F
            if field_type == _STOP:
                return
            delta = header >> 4
            if delta:
                field_id = last_id + delta
            else:
                raw = self.varint()
                field_id = (raw >> 1) ^ -(raw & 1)
            last_id = field_id
            yield field_id, field_type

    def skip(self, field_type: int, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise self._fail(f"nested deeper than {_MAX_DEPTH} levels")
        if field_type in (_TRUE, _FALSE):
            return
        if field_type == _I8:
            self.byte()
        elif field_type in (_I16, _I32, _I64):
            self.varint()
        elif field_type == _DOUBLE:
            self.position += 8
            if self.position > len(self.data):
                raise self._fail("truncated")
        elif field_type == _BINARY:
            self.binary(len(self.data))
        elif field_type in (_LIST, _SET):
            header = self.byte()
            count = header >> 4
            if count == 15:
                count = self.varint()
            self._skip_elements(header & 0x0F, count, depth)
        elif field_type == _MAP:
            count = self.varint()
            if count > len(self.data) - self.position:
                raise self._fail(f"map of {count} entries")
            if count:
                types = self.byte()
                for _ in range(count):
                    self._skip_element(types >> 4, depth)
                    self._skip_element(types & 0x0F, depth)
        elif field_type == _STRUCT:
            for _field_id, inner in self.fields():
                self.skip(inner, depth + 1)
        else:
            raise self._fail(f"unknown type {field_type}")

    def _skip_elements(self, element_type: int, count: int, depth: int) -> None:
        # Each element takes at least one byte, so a count beyond the data is malformed.
        if count > len(self.data) - self.position:
            raise self._fail(f"collection of {count} elements")
        for _ in range(count):
            self._skip_element(element_type, depth)

    def _skip_element(self, element_type: int, depth: int) -> None:
        # Inside collections a boolean takes one byte (unlike a boolean field).
        if element_type in (_TRUE, _FALSE):
            self.byte()
        else:
            self.skip(element_type, depth + 1)
