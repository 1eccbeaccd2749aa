"""parquet-mr's local key wrap, used to wrap DEKs with KEKs.

Format, as ``org.apache.parquet.crypto.keytools.KeyToolkit.encryptKeyLocally``
in parquet-hadoop writes it: AES-GCM with a random 12-byte nonce and a 16-byte
tag, the master key identifier (here the KEK id) as UTF-8 associated data, and
the result encoded as standard base64 of ``nonce || ciphertext || tag``.

This module needs only ``cryptography``; executors import it, never the HSM.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from spark_kms.errors import IntegrityError

__all__ = ["NONCE_LENGTH", "TAG_LENGTH", "unwrap_key_locally", "wrap_key_locally"]

NONCE_LENGTH = 12
TAG_LENGTH = 16
_KEY_LENGTHS = (16, 24, 32)


def wrap_key_locally(key: bytes, kek: bytes, key_id: str) -> str:
    """Wrap ``key`` with ``kek``, binding it to ``key_id``.

    :returns: base64 of nonce, ciphertext and tag.
    :raises ValueError: if ``kek`` is not 16, 24 or 32 bytes long.
    """
    _check_kek(kek)
    nonce = os.urandom(NONCE_LENGTH)
    sealed = AESGCM(kek).encrypt(nonce, key, key_id.encode("utf-8"))
    return base64.b64encode(nonce + sealed).decode("ascii")


def unwrap_key_locally(wrapped: str, kek: bytes, key_id: str) -> bytes:
    """Unwrap a key made by :func:`wrap_key_locally` or by parquet-mr.

    :raises IntegrityError: if the value is not valid base64, is too short, or
        fails authentication (wrong KEK, wrong key id or a changed byte).
    :raises ValueError: if ``kek`` is not 16, 24 or 32 bytes long.
    """
    _check_kek(kek)
    try:
        blob = base64.b64decode(wrapped.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as error:
        raise IntegrityError(f"wrapped key for key id '{key_id}' is not valid base64") from error
    if len(blob) < NONCE_LENGTH + TAG_LENGTH:
        raise IntegrityError(
            f"wrapped key for key id '{key_id}' is {len(blob)} bytes long, "
            f"shorter than nonce and tag ({NONCE_LENGTH + TAG_LENGTH} bytes)"
        )
    nonce, sealed = blob[:NONCE_LENGTH], blob[NONCE_LENGTH:]
    try:
        return AESGCM(kek).decrypt(nonce, sealed, key_id.encode("utf-8"))
    except InvalidTag:
        # Say nothing about which part was wrong: that would help an attacker.
        raise IntegrityError(
            f"wrapped key for key id '{key_id}' failed authentication: "
            "the file or key record was changed, or it belongs to another key"
        ) from None


def _check_kek(kek: bytes) -> None:
    if len(kek) not in _KEY_LENGTHS:
        raise ValueError(f"a KEK must be 16, 24 or 32 bytes long, got {len(kek)} bytes")
