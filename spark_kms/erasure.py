"""Scheduled deletion and crypto-erasure of tables and of single partitions.

A scheduled deletion marks the table ``pending_deletion`` in the registry and
in its keyring, which stops reads and writes until the deletion is cancelled
or becomes due. A due deletion erases the table exactly as an immediate
erasure does: tombstone first, so that no KEK is minted and no key is created
again, then destroy every master key version under the table's label prefix
and confirm with a new PKCS#11 session that none remains.

Erasing one partition value tombstones its partition record and destroys only
the master key versions of that partition.

The public entry points are the :class:`~spark_kms.keyservice.KeyService`
methods of the same names.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from spark_kms.audit import parse_time
from spark_kms.errors import (
    HsmUnavailableError,
    InvalidOptionError,
    PartitionNotFoundError,
    SparkKmsError,
    TableNotFoundError,
    TableStateError,
)
from spark_kms.keylabels import partition_key_prefix, table_key_prefix
from spark_kms.keyring import ACTIVE, ERASED, PENDING_DELETION, KeyringStore, TableMetadata
from spark_kms.partitioning import (
    format_value,
    parse_partition_spec,
    parse_value,
    partition_folder,
    partition_id,
    partition_type,
)
from spark_kms.policy import ADMIN
from spark_kms.registry import RegistryEntry

if TYPE_CHECKING:
    from spark_kms.keyservice import KeyService

__all__ = [
    "DEFAULT_DELETION_DAYS",
    "MANUAL",
    "MAX_DELETION_DAYS",
    "MIN_DELETION_DAYS",
    "SCHEDULED",
    "DeletionSchedule",
    "EraseReport",
    "display_time",
]

log = logging.getLogger(__name__)

MIN_DELETION_DAYS = 1
MAX_DELETION_DAYS = 30
DEFAULT_DELETION_DAYS = 7

# Values of the audit field ``trigger``: who started a lifecycle operation.
MANUAL = "manual"
SCHEDULED = "scheduled"


@dataclass
class EraseReport:
    """Outcome of a crypto-erasure of a table, or of one partition when ``partition`` is set."""

    table: str
    table_id: str
    destroyed_objects: int
    remaining_objects: int
    seconds: float
    partition: str | None = None


@dataclass
class DeletionSchedule:
    """A table's scheduled deletion: when it was scheduled and when it becomes due."""

    table: str
    scheduled_at: str
    due_at: str


def timestamp(moment: datetime) -> str:
    """Return ``moment`` as stored in records: ISO 8601 in UTC, to the millisecond."""
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def display_time(text: str) -> str:
    """Return a stored ISO 8601 time as ``YYYY-MM-DD HH:MM UTC`` (the text itself if invalid)."""
    try:
        return parse_time(text).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return text


def schedule_deletion(
    service: KeyService, table: str, days: int = DEFAULT_DELETION_DAYS
) -> DeletionSchedule:
    """Implement :meth:`KeyService.schedule_deletion`."""
    if (
        not isinstance(days, int)
        or isinstance(days, bool)
        or not MIN_DELETION_DAYS <= days <= MAX_DELETION_DAYS
    ):
        raise InvalidOptionError(
            f"invalid deletion waiting period {days!r} days: give {MIN_DELETION_DAYS} to "
            f"{MAX_DELETION_DAYS} days (default {DEFAULT_DELETION_DAYS}), or use "
            f"'spark-kms erase {table}' for an immediate erasure"
        )
    service.authorize(table, ADMIN, action="schedule-deletion")
    with service.registry_lock():
        entry, meta, store = service.registered_table(table)
        if entry.state == PENDING_DELETION:
            raise TableStateError(
                f"table '{table}' is already scheduled for deletion on "
                f"{display_time(entry.deletion_due_at or '')}; run 'spark-kms cancel-deletion "
                f"{table}' first to choose another date"
            )
        now = service.clock()
        scheduled_at = timestamp(now)
        due_at = timestamp(now + timedelta(days=days))

        # The registry entry decides, so it is written first; the keyring
        # copy makes the state visible to drivers on other hosts.
        entry.state = PENDING_DELETION
        entry.deletion_scheduled_at = scheduled_at
        entry.deletion_due_at = due_at
        service.registry.put(entry)

        def mark_pending(current: TableMetadata) -> None:
            current.state = PENDING_DELETION
            current.deletion_scheduled_at = scheduled_at
            current.deletion_due_at = due_at

        service.update_metadata(store, meta.table_id, mark_pending)
    service.audit.append(
        "schedule_deletion",
        table=table,
        outcome="ok",
        table_id=entry.table_id,
        deletion_due_at=due_at,
        trigger=MANUAL,
    )
    log.warning("table %s scheduled for deletion on %s", table, due_at)
    return DeletionSchedule(table=table, scheduled_at=scheduled_at, due_at=due_at)


def cancel_deletion(service: KeyService, table: str) -> None:
    """Implement :meth:`KeyService.cancel_deletion`."""
    service.authorize(table, ADMIN, action="cancel-deletion")
    with service.registry_lock():
        entry, meta, store = service.registered_table(table)
        if entry.state != PENDING_DELETION and meta.state != PENDING_DELETION:
            raise TableStateError(
                f"table '{table}' is not scheduled for deletion, so there is nothing to cancel"
            )
        due_at = entry.deletion_due_at or meta.deletion_due_at

        def mark_active(current: TableMetadata) -> None:
            current.state = ACTIVE
            current.deletion_scheduled_at = None
            current.deletion_due_at = None

        # Reverse order of scheduling: the registry entry, which decides, last.
        service.update_metadata(store, meta.table_id, mark_active)
        entry.state = ACTIVE
        entry.deletion_scheduled_at = None
        entry.deletion_due_at = None
        service.registry.put(entry)
    service.audit.append(
        "cancel_deletion",
        table=table,
        outcome="ok",
        table_id=entry.table_id,
        deletion_due_at=due_at,
    )
    log.warning("scheduled deletion of table %s (due %s) cancelled", table, due_at)


def purge_due(service: KeyService) -> list[EraseReport]:
    """Implement :meth:`KeyService.purge_due`."""
    reports = []
    now = service.clock()
    for entry in service.registry.entries():
        if entry.state != PENDING_DELETION or not entry.deletion_due_at:
            continue
        if parse_time(entry.deletion_due_at) > now:
            continue
        reports.append(service.erase_table(entry.table, trigger=SCHEDULED))
    return reports


# Erasure --------------------------------------------------------------------


def erase_table(service: KeyService, table: str, *, trigger: str = MANUAL) -> EraseReport:
    """Implement :meth:`KeyService.erase_table`."""
    if trigger == MANUAL:
        service.authorize(table, ADMIN, action="erase")
    started = time.monotonic()
    with service.registry_lock():
        entry = service.registry.get(table)
        if entry is None:
            raise TableNotFoundError(
                f"no table '{table}' in the registry {service.settings.registry_dir}"
            )
        with service.table_lock(table):
            report, labels = _erase_locked(service, entry, started, trigger)
    service.audit.append(
        "erase",
        table=table,
        outcome="ok",
        table_id=entry.table_id,
        key_labels=labels,
        destroyed_objects=report.destroyed_objects,
        trigger=trigger,
    )
    log.info(
        "crypto-erased table %s: destroyed %d master key object(s)",
        table,
        report.destroyed_objects,
    )
    return report


def _erase_locked(
    service: KeyService, entry: RegistryEntry, started: float, trigger: str
) -> tuple[EraseReport, list[str]]:
    table = entry.table
    erased_at = entry.erased_at or service.now()

    # 1. Tombstone first: from here on no KEK is minted and no key created.
    entry.state = ERASED
    entry.erased_at = erased_at
    entry.deletion_due_at = None
    service.registry.put(entry)
    _tombstone_keyring(service, entry, erased_at)

    # 2. Destroy every master key version, then confirm with a new session.
    prefix = table_key_prefix(table, entry.table_id)
    labels, destroyed, remaining = _destroy_under(service, prefix, table, "erase", trigger)
    report = EraseReport(table, entry.table_id, destroyed, remaining, time.monotonic() - started)
    if remaining:
        service.audit.append(
            "erase",
            table=table,
            outcome="failed: key objects remain",
            table_id=entry.table_id,
            trigger=trigger,
        )
        raise HsmUnavailableError(
            f"erasure of table '{table}' is incomplete: {remaining} key object(s) remain in "
            f"token '{service.settings.token_label}'; run the erase again"
        )
    return report, labels


def _destroy_under(
    service: KeyService,
    prefix: str,
    table: str,
    operation: str,
    trigger: str,
    partition: str | None = None,
) -> tuple[list[str], int, int]:
    # Destroys every key labelled with ``prefix`` and counts, with a new
    # session, the objects that remain.
    labels = service.hsm.list_key_labels(prefix)
    destroyed = 0
    try:
        for label in labels:
            destroyed += service.hsm.destroy_keys(label)
    except SparkKmsError as error:
        service.audit.append(
            operation,
            table=table,
            outcome=f"failed: {error}",
            partition=partition,
            trigger=trigger,
        )
        raise
    remaining = sum(service.hsm.count_keys(label, fresh_session=True) for label in labels)
    remaining += len(service.hsm.list_key_labels(prefix))
    return labels, destroyed, remaining


def _tombstone_keyring(service: KeyService, entry: RegistryEntry, erased_at: str) -> None:
    try:
        store = KeyringStore(entry.location)
        meta = store.read_metadata()
    except (OSError, SparkKmsError) as error:
        # The registry tombstone is what prevents re-creation; the keyring copy
        # only makes the state visible beside the data.
        log.warning("could not mark the keyring of table %s as erased: %s", entry.table, error)
        return
    if meta is not None and meta.table_id == entry.table_id and meta.state != ERASED:
        meta.state = ERASED
        meta.erased_at = erased_at
        meta.deletion_due_at = None
        store.write_metadata(meta)


def erase_partition(service: KeyService, table: str, partition: str) -> EraseReport:
    """Implement :meth:`KeyService.erase_partition`."""
    service.authorize(table, ADMIN, action="erase", partition=partition)
    started = time.monotonic()
    _entry, meta, store = service.registered_table(table)
    folder = _partition_folder(meta, partition)
    with service.table_lock(table):
        record = store.get_partition_record(partition_id(folder))
        if record is None:
            known = [r.folder for r in store.list_partition_records()]
            raise PartitionNotFoundError(
                f"table '{table}' has no partition {folder}; its partitions are "
                + (", ".join(known[:10]) + (" ..." if len(known) > 10 else "") or "none")
            )
        if record.state != ERASED:
            record.state = ERASED
            record.erased_at = service.now()
            store.put_partition_record(record)
        prefix = partition_key_prefix(table, meta.table_id, record.partition_id)
        labels, destroyed, remaining = _destroy_under(
            service, prefix, table, "erase_partition", MANUAL, folder
        )
    report = EraseReport(
        table, meta.table_id, destroyed, remaining, time.monotonic() - started, folder
    )
    if remaining:
        service.audit.append(
            "erase_partition",
            table=table,
            outcome="failed: key objects remain",
            partition=folder,
        )
        raise HsmUnavailableError(
            f"erasure of partition {folder} of table '{table}' is incomplete: {remaining} key "
            f"object(s) remain in token '{service.settings.token_label}'; run the erase again"
        )
    service.audit.append(
        "erase_partition",
        table=table,
        outcome="ok",
        partition=folder,
        table_id=meta.table_id,
        key_labels=labels,
        destroyed_objects=destroyed,
        trigger=MANUAL,
    )
    log.info(
        "crypto-erased partition %s of table %s: destroyed %d master key object(s)",
        folder,
        table,
        destroyed,
    )
    return report


def _partition_folder(meta: TableMetadata, spec: str) -> str:
    if meta.partition_by is None:
        raise InvalidOptionError(
            f"table '{meta.table}' is not partitioned, so it has no partition {spec!r}; "
            f"erase the whole table with 'spark-kms erase {meta.table}'"
        )
    column, raw = parse_partition_spec(spec)
    if column != meta.partition_by:
        raise InvalidOptionError(
            f"table '{meta.table}' is partitioned by '{meta.partition_by}', not '{column}'; "
            f"give the partition as {meta.partition_by}=<value>"
        )
    value = parse_value(raw, partition_type(meta.spark_schema, column))
    return partition_folder(column, format_value(column, value))
