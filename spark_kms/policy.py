"""Access policy: which principals may encrypt, decrypt or administer which tables.

The policy is a JSON file named by ``spark.kms.policy.file``::

    {
      "rules": [
        {"description": "ETL jobs write and read the flight tables",
         "principals": ["etl-*"], "tables": ["flights*"], "operations": ["encrypt", "decrypt"]},
        {"principals": ["secops"], "tables": ["*"], "operations": ["admin"]}
      ]
    }

A request is allowed when at least one rule lists a pattern matching the
principal, a pattern matching the table name, and the operation. Patterns are
shell-style and case-sensitive (:func:`fnmatch.fnmatchcase`: ``*``, ``?``,
``[abc]``). Everything else is denied. The operations are ``encrypt`` (write:
create a table and mint KEKs), ``decrypt`` (read: unwrap KEKs) and ``admin``
(rotate, rekey, schedule or cancel deletion, erase, set the rotation period).

Without a policy file every principal may do every operation. A policy file
that is set but missing or invalid denies everything, with a
:class:`ConfigurationError`. The file is read again when its modification time
changes, so an edit takes effect without a restart.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from fnmatch import fnmatchcase

from spark_kms.errors import ConfigurationError

__all__ = ["ADMIN", "DECRYPT", "ENCRYPT", "OPERATIONS", "AccessPolicy", "PolicyRule", "parse_policy"]

ENCRYPT = "encrypt"
DECRYPT = "decrypt"
ADMIN = "admin"
OPERATIONS = (ENCRYPT, DECRYPT, ADMIN)

_RULE_KEYS = {"description", "principals", "tables", "operations"}


@dataclass(frozen=True)
class PolicyRule:
    """One allow rule: principal patterns, table name patterns and operations."""

    principals: tuple[str, ...]
    tables: tuple[str, ...]
    operations: frozenset[str]
    description: str = ""

    def allows(self, principal: str, table: str, operation: str) -> bool:
        """Tell whether this rule allows ``principal`` to do ``operation`` on ``table``."""
        return (
            operation in self.operations
            and any(fnmatchcase(principal, p) for p in self.principals)
            and any(fnmatchcase(table, t) for t in self.tables)
        )


class AccessPolicy:
    """The policy file at ``path``, parsed on first use and again whenever it changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._rules: tuple[PolicyRule, ...] = ()

    def __repr__(self) -> str:
        return f"AccessPolicy(path={self.path!r})"

    def allows(self, principal: str, table: str, operation: str) -> bool:
        """Tell whether some rule allows ``principal`` to do ``operation`` on ``table``.

        :raises ConfigurationError: if the file is missing or invalid, or
            ``operation`` is not one of :data:`OPERATIONS`.
        """
        if operation not in OPERATIONS:
            raise ConfigurationError(
                f"unknown policy operation {operation!r}; valid operations are "
                + ", ".join(OPERATIONS)
            )
        return any(rule.allows(principal, table, operation) for rule in self.rules())

    def rules(self) -> tuple[PolicyRule, ...]:
        """Return the rules of the file as it is now.

        :raises ConfigurationError: if the file is missing or invalid.
        """
        try:
            info = os.stat(self.path)
        except OSError as error:
            raise ConfigurationError(
                f"cannot read the access policy {self.path}: {error.strerror}; fix "
                "spark.kms.policy.file, or unset it to allow every principal every operation"
            ) from error
        stamp = (info.st_mtime_ns, info.st_size)
        with self._lock:
            if stamp != self._stamp:
                self._rules = parse_policy(_read(self.path), self.path)
                self._stamp = stamp
            return self._rules


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigurationError(f"cannot read the access policy {path}: {error}") from error


def parse_policy(text: str, source: str) -> tuple[PolicyRule, ...]:
    """Parse the text of a policy file.

    :raises ConfigurationError: naming ``source`` and the rule, if the text is
        not a JSON object with a list of valid ``rules``.
    """
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise ConfigurationError(f"the access policy {source} is not valid JSON") from None
    if not isinstance(data, dict) or set(data) != {"rules"} or not isinstance(data["rules"], list):
        raise ConfigurationError(
            f'the access policy {source} must be a JSON object with one key, "rules", '
            "holding a list of rules"
        )
    return tuple(_parse_rule(rule, number, source) for number, rule in enumerate(data["rules"], 1))


def _parse_rule(rule: object, number: int, source: str) -> PolicyRule:
    where = f"rule {number} of the access policy {source}"
    if not isinstance(rule, dict):
        raise ConfigurationError(f"{where} is not a JSON object")
    unknown = sorted(set(rule) - _RULE_KEYS)
    if unknown:
        raise ConfigurationError(
            f"{where} has unknown key(s) {', '.join(unknown)}; valid keys are "
            + ", ".join(sorted(_RULE_KEYS))
        )
    lists = {}
    for key in ("principals", "tables", "operations"):
        value = rule.get(key)
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(item, str) and item for item in value)
        ):
            raise ConfigurationError(f'{where} needs "{key}": a non-empty list of strings')
        lists[key] = value
    bad = sorted(set(lists["operations"]) - set(OPERATIONS))
    if bad:
        raise ConfigurationError(
            f"{where} has unknown operation(s) {', '.join(bad)}; valid operations are "
            + ", ".join(OPERATIONS)
        )
    description = rule.get("description", "")
    if not isinstance(description, str):
        raise ConfigurationError(f'{where} has a "description" that is not a string')
    return PolicyRule(
        principals=tuple(lists["principals"]),
        tables=tuple(lists["tables"]),
        operations=frozenset(lists["operations"]),
        description=description,
    )
