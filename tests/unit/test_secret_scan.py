"""The secret scanner used by the leak tests finds every encoding it claims to."""

from __future__ import annotations

import base64
import os

import pytest

from tests.helpers.secrets import find_secrets

SECRET = os.urandom(32)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(f"kek={SECRET.hex()}", id="hex"),
        pytest.param(f"kek={SECRET.hex().upper()}", id="upper-hex"),
        pytest.param(f"kek={base64.b64encode(SECRET).decode()}", id="base64"),
        pytest.param(f"kek={base64.urlsafe_b64encode(SECRET).decode()}", id="urlsafe-base64"),
    ],
)
def test_scanner_finds_encoded_secret(text: str) -> None:
    assert find_secrets(text, [SECRET]) != []


def test_scanner_finds_raw_bytes() -> None:
    assert find_secrets(b"prefix" + SECRET + b"suffix", [SECRET]) != []


def test_scanner_passes_clean_text() -> None:
    assert find_secrets("nothing to see " * 100, [SECRET]) == []
