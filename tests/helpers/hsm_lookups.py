"""Counting of the key lookups an Hsm makes in its token."""

from __future__ import annotations

import pytest

from spark_kms.hsm import Hsm


def count_lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the label of every key lookup in the token (C_FindObjects by label)."""
    lookups: list[str] = []
    find_key_in = Hsm._find_key_in

    def counting(hsm: Hsm, session: object, label: str) -> object:
        lookups.append(label)
        return find_key_in(hsm, session, label)

    monkeypatch.setattr(Hsm, "_find_key_in", counting)
    return lookups
