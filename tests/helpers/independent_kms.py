"""A pyarrow KMS client written from the format's definition, apart from spark_kms.

It shares no code with spark_kms.localwrap: it decodes parquet-mr's local wrap
(base64 of a 12-byte nonce, the AES-GCM ciphertext and a 16-byte tag, with the
key id as associated data) directly with `cryptography`, and it records every
wrapped DEK it unwraps and every DEK it returns, so tests can inspect them.
"""

from __future__ import annotations

import base64
from datetime import timedelta

import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pe
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


class RecordingLocalWrapClient(pe.KmsClient):
    def __init__(self, keks: dict[str, bytes], seen: list[tuple[str, str, bytes]]) -> None:
        super().__init__()
        self.keks = keks
        self.seen = seen

    def wrap_key(self, key_bytes: bytes, master_key_identifier: str) -> str:
        raise AssertionError("this client only reads")

    def unwrap_key(self, wrapped_key: str, master_key_identifier: str) -> bytes:
        blob = base64.b64decode(wrapped_key)
        nonce, sealed = blob[:12], blob[12:]
        dek = AESGCM(self.keks[master_key_identifier]).decrypt(nonce, sealed, master_key_identifier.encode())
        self.seen.append((master_key_identifier, wrapped_key, dek))
        return dek


def read_with_independent_client(path: str, keks: dict[str, bytes]) -> tuple[object, list[tuple[str, str, bytes]]]:
    """Read the whole file at ``path``; return the table and every (kek id, wrapped DEK, DEK)."""
    seen: list[tuple[str, str, bytes]] = []
    factory = pe.CryptoFactory(lambda _config: RecordingLocalWrapClient(keks, seen))
    properties = factory.file_decryption_properties(
        pe.KmsConnectionConfig(kms_instance_id=f"independent-{path}"),
        pe.DecryptionConfiguration(cache_lifetime=timedelta(seconds=1)),
    )
    table = pq.ParquetFile(path, decryption_properties=properties).read()
    return table, seen
