"""Parsing of the ``kms.*`` writer and reader options.

Writer options:

``kms.table`` (required)
    Table name: 1 to 64 letters, digits, ``_`` or ``-``.
``kms.column_keys`` (default: none)
    Column key groups, ``group: col, col; group2: col``. Each group gets its
    own KEK; every other column and the footer are encrypted under the table's
    group, named ``table``. A struct, list or map column name covers all its leaves.
``kms.partition_by`` (default: the table's partition column, if any)
    A column that splits the table into Hive-style folders ``column=value``,
    each value with its own master key, so one value can be crypto-erased
    alone. It is fixed when the table is created; the column must be of type
    string, integer, boolean or date.
``kms.rotation_period_days`` (default: ``spark.kms.rotation.period.days``, 365)
    Master-key rotation period of a new table in days, 0 for no automatic
    rotation; ``spark-kms set-rotation-period`` changes it later.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from spark_kms.errors import InvalidOptionError
from spark_kms.jobkeys import check_name
from spark_kms.settings import parse_rotation_period

__all__ = [
    "TABLE_GROUP",
    "WriteOptions",
    "append_column_keys",
    "parse_column_keys",
    "parse_write_options",
]

TABLE_GROUP = "table"
TABLE = "kms.table"
COLUMN_KEYS = "kms.column_keys"
PARTITION_BY = "kms.partition_by"
ROTATION_PERIOD_DAYS = "kms.rotation_period_days"
_WRITE_KEYS = {TABLE, COLUMN_KEYS, PARTITION_BY, ROTATION_PERIOD_DAYS}
_READ_KEYS: set[str] = set()


@dataclass(frozen=True)
class WriteOptions:
    """Parsed writer options."""

    table: str
    column_keys: dict[str, list[str]] = field(default_factory=dict)
    partition_by: str | None = None
    rotation_period_days: int | None = None


def parse_column_keys(text: str) -> dict[str, list[str]]:
    """Parse ``group: col, col; group2: col`` into group to columns.

    :raises InvalidOptionError: for an empty or malformed group, an invalid
        group name, a group named ``table``, or a column listed twice.
    """
    groups: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        group, colon, columns_text = part.partition(":")
        group = group.strip()
        if not colon:
            raise InvalidOptionError(
                f"invalid {COLUMN_KEYS} entry {part.strip()!r}: expected 'group: column, column'"
            )
        check_name("key group", group)
        if group == TABLE_GROUP:
            raise InvalidOptionError(
                f"key group name '{TABLE_GROUP}' is reserved for the footer and the columns "
                f"without a column key; choose another name in {COLUMN_KEYS}"
            )
        if group in groups:
            raise InvalidOptionError(f"key group '{group}' appears twice in {COLUMN_KEYS}")
        columns = [c.strip() for c in columns_text.split(",")]
        if not columns or any(not c for c in columns):
            raise InvalidOptionError(
                f"key group '{group}' in {COLUMN_KEYS} has an empty column name"
            )
        for column in columns:
            if ":" in column:
                raise InvalidOptionError(
                    f"invalid entry {part.strip()!r} in {COLUMN_KEYS}: a column name cannot contain "
                    "':', which separates a key group from its columns; one group is 'group: col, col'"
                )
            if column in seen:
                raise InvalidOptionError(
                    f"column '{column}' is listed under key groups '{seen[column]}' and '{group}'; "
                    "a column takes one key"
                )
            seen[column] = group
        groups[group] = columns
    return groups


def parse_write_options(options: Mapping[str, str]) -> WriteOptions:
    """Parse the writer options of ``kms_parquet``.

    :raises InvalidOptionError: if ``kms.table`` is missing, an option is
        invalid, or an unknown ``kms.*`` option is given.
    """
    lowered = {k.lower(): v for k, v in options.items()}
    unknown = sorted(k for k in lowered if k.startswith("kms.") and k not in _WRITE_KEYS)
    if unknown:
        raise InvalidOptionError(
            f"unknown option(s) {', '.join(unknown)}; kms_parquet writer options are "
            + ", ".join(sorted(_WRITE_KEYS))
        )
    table = lowered.get(TABLE, "").strip()
    if not table:
        raise InvalidOptionError(
            f"missing option {TABLE}: name the table, for example .option('{TABLE}', 'flights')"
        )
    check_name("table", table)
    column_keys = parse_column_keys(lowered.get(COLUMN_KEYS, ""))
    partition_by = lowered.get(PARTITION_BY, "").strip() or None
    if partition_by is not None and partition_by.startswith(("_", ".")):
        raise InvalidOptionError(
            f"invalid {PARTITION_BY} column {partition_by!r}: folders that start with '_' or "
            "'.' are not read as table data; partition by another column"
        )
    period_text = lowered.get(ROTATION_PERIOD_DAYS, "").strip()
    period = parse_rotation_period(period_text, ROTATION_PERIOD_DAYS) if period_text else None
    return WriteOptions(
        table=table,
        column_keys=column_keys,
        partition_by=partition_by,
        rotation_period_days=period,
    )


def append_column_keys(
    table: str,
    stored: Mapping[str, list[str]] | None,
    requested: Mapping[str, list[str]] | None,
    *,
    option: str,
    overwrite: str,
) -> dict[str, list[str]]:
    """Return the column keys of an append to ``table``, whose last write used ``stored``.

    An append keeps the table's layout, so that no column moves under another
    key. Without ``requested`` the stored layout is used. ``option`` and
    ``overwrite`` name the caller's option and overwrite mode in the message.

    :raises InvalidOptionError: if ``requested`` differs from ``stored``.
    """
    if stored is None:
        return {g: list(c) for g, c in (requested or {}).items()}
    if not requested:
        return {g: list(c) for g, c in stored.items()}
    if {g: sorted(c) for g, c in requested.items()} != {g: sorted(c) for g, c in stored.items()}:
        layout = "; ".join(f"{g}: {', '.join(c)}" for g, c in stored.items()) or "(none)"
        raise InvalidOptionError(
            f"cannot append to table '{table}' with other column keys: its files keep "
            f"{option} '{layout}'; pass the same column keys, leave the option out to use "
            f"the table's, or rewrite the table with {overwrite}"
        )
    return {g: list(c) for g, c in requested.items()}
