"""Access policy parsing and decisions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from spark_kms.errors import ConfigurationError
from spark_kms.policy import AccessPolicy

RULES = {
    "rules": [
        {
            "description": "ETL writes and reads the flight tables",
            "principals": ["etl-*"],
            "tables": ["flights*"],
            "operations": ["encrypt", "decrypt"],
        },
        {"principals": ["analyst"], "tables": ["flights"], "operations": ["decrypt"]},
        {"principals": ["secops"], "tables": ["*"], "operations": ["admin"]},
    ]
}


def _policy(tmp_path: Path, data: object) -> AccessPolicy:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return AccessPolicy(str(path))


@pytest.mark.parametrize(
    ("principal", "table", "operation", "allowed"),
    [
        pytest.param("etl-nightly", "flights_2026", "encrypt", True, id="pattern-write"),
        pytest.param("etl-nightly", "flights", "admin", False, id="etl-no-admin"),
        pytest.param("etl-nightly", "planes", "decrypt", False, id="other-table"),
        pytest.param("analyst", "flights", "decrypt", True, id="analyst-read"),
        pytest.param("analyst", "flights", "encrypt", False, id="analyst-write"),
        pytest.param("analyst", "flights_2026", "decrypt", False, id="analyst-exact-name"),
        pytest.param("secops", "anything", "admin", True, id="admin-any"),
        pytest.param("Secops", "anything", "admin", False, id="case-sensitive"),
        pytest.param("mallory", "flights", "decrypt", False, id="unknown-principal"),
    ],
)
def test_policy_decisions(
    tmp_path: Path, principal: str, table: str, operation: str, allowed: bool
) -> None:
    assert _policy(tmp_path, RULES).allows(principal, table, operation) is allowed


def test_policy_reloaded_after_edit(tmp_path: Path) -> None:
    policy = _policy(tmp_path, RULES)
    assert not policy.allows("mallory", "flights", "decrypt")
    edited = {"rules": [*RULES["rules"], {"principals": ["mallory"], "tables": ["flights"], "operations": ["decrypt"]}]}
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(edited))
    os.utime(path, ns=(1, 1))
    assert policy.allows("mallory", "flights", "decrypt")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param("{", "is not valid JSON", id="not-json"),
        pytest.param([], 'must be a JSON object with one key, "rules"', id="list"),
        pytest.param({"rules": [], "extra": 1}, 'one key, "rules"', id="extra-key"),
        pytest.param({"rules": ["x"]}, "rule 1 of the access policy .* is not a JSON object", id="rule-not-object"),
        pytest.param(
            {"rules": [{"principals": ["a"], "tables": ["t"], "operations": ["read"]}]},
            "unknown operation\\(s\\) read; valid operations are encrypt, decrypt, admin",
            id="bad-operation",
        ),
        pytest.param(
            {"rules": [{"principals": [], "tables": ["t"], "operations": ["admin"]}]},
            '"principals": a non-empty list of strings',
            id="empty-principals",
        ),
        pytest.param(
            {"rules": [{"principals": ["a"], "tables": "t", "operations": ["admin"]}]},
            '"tables": a non-empty list of strings',
            id="tables-not-list",
        ),
        pytest.param(
            {"rules": [{"principals": ["a"], "tables": ["t"], "operations": ["admin"], "effect": "deny"}]},
            "unknown key\\(s\\) effect",
            id="unknown-key",
        ),
    ],
)
def test_invalid_policy_rejected(tmp_path: Path, data: object, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        _policy(tmp_path, data).allows("a", "t", "admin")


def test_missing_policy_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read the access policy .*missing.json"):
        AccessPolicy(str(tmp_path / "missing.json")).allows("a", "t", "admin")


def test_unknown_operation_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="unknown policy operation 'delete'"):
        _policy(tmp_path, RULES).allows("secops", "t", "delete")


def test_example_policy_parses() -> None:
    example = AccessPolicy(str(Path(__file__).resolve().parents[2] / "conf" / "policy.json.example"))
    assert len(example.rules()) == 3
    assert example.allows("etl-nightly", "flights_2026", "encrypt")
    assert example.allows("alice", "flights", "decrypt")
    assert not example.allows("alice", "flights", "encrypt")
    assert example.allows("secops", "anything", "admin")
