"""Names of master keys in the HSM and the associated data that binds a wrapped KEK.

A table's master key versions are labelled ``spark_kms/<table>/<table id>/v<n>``
and the master key versions of one partition value
``spark_kms/<table>/<table id>/p/<partition id>/v<n>``, so every key of a table
shares the prefix ``spark_kms/<table>/<table id>/`` that erasure destroys.
"""

from __future__ import annotations

import re

__all__ = [
    "kek_aad",
    "master_key_label",
    "partition_key_prefix",
    "partition_master_key_label",
    "table_key_prefix",
    "versions_in_scope",
]


def master_key_label(table: str, table_id: str, version: int) -> str:
    """Return the HSM label of a table's master key version."""
    return f"spark_kms/{table}/{table_id}/v{version}"


def partition_master_key_label(table: str, table_id: str, partition_id: str, version: int) -> str:
    """Return the HSM label of a master key version of one partition value."""
    return f"{partition_key_prefix(table, table_id, partition_id)}v{version}"


def table_key_prefix(table: str, table_id: str) -> str:
    """Return the label prefix of every master key of a table, its partitions' included."""
    return f"spark_kms/{table}/{table_id}/"


def partition_key_prefix(table: str, table_id: str, partition_id: str) -> str:
    """Return the label prefix of the master key versions of one partition value."""
    return f"{table_key_prefix(table, table_id)}p/{partition_id}/"


def versions_in_scope(labels: list[str], prefix: str) -> list[str]:
    """Return the labels that are a version directly under ``prefix`` (``<prefix>v<n>``).

    A table's prefix also starts the labels of its partitions' keys; this keeps
    only the table's own versions.
    """
    pattern = re.compile(re.escape(prefix) + r"v[0-9]+")
    return [label for label in labels if pattern.fullmatch(label)]


def kek_aad(table_id: str, kek_id: str) -> bytes:
    """Return the AES-GCM associated data of a wrapped KEK.

    It binds the wrapped KEK to its table and id, so a record moved to another
    table or renamed fails authentication.
    """
    return f"spark_kms:kek:{table_id}:{kek_id}".encode()
