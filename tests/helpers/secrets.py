"""Scanning text for secret bytes in the encodings a leak would take."""

from __future__ import annotations

import base64
from collections.abc import Iterable


def encodings(secret: bytes) -> list[str]:
    """Return the forms of ``secret`` to look for: raw text, hex (both cases), base64 forms."""
    forms = [
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode(),
        base64.b64encode(secret).decode().rstrip("="),
    ]
    try:
        raw = secret.decode("utf-8")
    except UnicodeDecodeError:
        raw = ""
    if len(raw) >= 8:
        forms.append(raw)
    return forms


def find_secrets(text: str | bytes, secrets: Iterable[bytes]) -> list[str]:
    """Return a description of each secret found in ``text`` (empty when clean)."""
    found = []
    data = text if isinstance(text, bytes) else text.encode("utf-8", errors="replace")
    for number, secret in enumerate(secrets):
        if len(secret) >= 8 and secret in data:
            found.append(f"secret #{number} in raw bytes")
        for form in encodings(secret):
            if form.encode() in data:
                found.append(f"secret #{number} as {form[:6]}...")
    return found
