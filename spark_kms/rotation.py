"""Master-key rotation without touching data.

A rotation gives every master key of a table a new version in the HSM: the
table's own key and, in a partitioned table, the key of each partition value
that is not erased. It rewraps every KEK record under the new versions, and
only then destroys the old versions. Data files are never read or written: the KEKs, and so the DEKs in
the files' footers, stay the same. The cost is three HSM calls per KEK record
(unwrap, wrap, and an unwrap that checks the new record) plus one key
generation and one destruction per master key, whatever the size of the data.
Records are rewrapped in batches of ``REWRAP_BATCH_RECORDS``, and each batch
looks up each master key version it uses once, because a lookup by label scans
the whole token in SoftHSM2 2.6.

Phases, each safe to interrupt:

1. Under the table lock, ``rotation_started_at`` and the list of master keys
   to rotate (``rotation_pending``) are written to ``table.json``. Then each
   listed key gets version n + 1, which becomes current, so new KEKs are
   wrapped under it from then on, and leaves the list. A key version left in
   the token by an interrupted phase 1 is reused.
2. Each KEK record not wrapped under its current version is rewrapped and
   replaced atomically (a new file renamed over the old one). Until phase 3
   ends both versions are in the token, so every record unwraps. A failed
   record leaves itself and the records after it in its batch unchanged.
3. Under the table lock, records wrapped meanwhile are rewrapped, the old
   versions are destroyed and their absence is confirmed with a new session,
   and ``rotation_started_at`` is cleared.

A rotation that stopped in any phase resumes from ``rotation_started_at`` when
it runs again, on ``spark-kms rotate``, ``spark-kms rotate --due`` or the next
time a job opens the table.
"""

from __future__ import annotations

import base64
import hmac
import logging
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from spark_kms.audit import parse_time
from spark_kms.errors import (
    HsmUnavailableError,
    IntegrityError,
    KeyNotFoundError,
    PartitionErasedError,
    SparkKmsError,
    TableErasedError,
    TableNotFoundError,
)
from spark_kms.keylabels import (
    kek_aad,
    master_key_label,
    partition_key_prefix,
    partition_master_key_label,
    table_key_prefix,
    versions_in_scope,
)
from spark_kms.keyring import ACTIVE, ERASED, KekRecord, KeyringStore, TableMetadata

if TYPE_CHECKING:
    from spark_kms.hsm import HsmBatch
    from spark_kms.keyservice import KeyService

__all__ = ["RotationReport", "needs_rotation", "rotate_store", "rotation_due_at"]

log = logging.getLogger(__name__)

# The entry of ``rotation_pending`` that stands for the table's own master key.
TABLE_SCOPE = "table"

# KEK records rewrapped per HSM batch. A larger batch makes fewer key lookups,
# but holds the process-wide PKCS#11 call lock longer.
REWRAP_BATCH_RECORDS = 256

# A KEK record's master key label, version and partition folder after rotation.
RewrapTarget = tuple[str, int, str | None]


@dataclass
class RotationReport:
    """Outcome of one rotation of a table."""

    table: str
    trigger: str
    resumed: bool
    master_keys_rotated: int
    table_key_version: int
    records_total: int
    records_rewrapped: int
    destroyed_objects: int
    hsm_operations: int
    seconds: float


def rotation_due_at(meta: TableMetadata) -> datetime | None:
    """Return when the table's next rotation is due, or ``None`` if automatic rotation is off."""
    if meta.rotation_period_days == 0:
        return None
    since = parse_time(meta.master_key_since or meta.created_at)
    return since + timedelta(days=meta.rotation_period_days)


def needs_rotation(meta: TableMetadata, now: datetime) -> bool:
    """Tell whether the table's rotation is due at ``now`` or was interrupted."""
    if meta.rotation_started_at is not None:
        return True
    due = rotation_due_at(meta)
    return due is not None and due <= now


def rotate_store(
    service: KeyService, store: KeyringStore, *, trigger: str, blocking: bool
) -> RotationReport | None:
    """Rotate every master key of the table at ``store``, or finish an interrupted rotation.

    The caller checks the access policy and the table state.

    :param blocking: wait for a rotation of this table that another thread or
        process runs; when false, return ``None`` at once instead.
    :raises TableErasedError: if the table is erased before or during the rotation.
    :raises HsmUnavailableError: if an old version could not be destroyed; the
        rotation is then unfinished and the next run completes it.
    """
    meta = store.read_metadata()
    if meta is None:
        raise TableNotFoundError(f"{store.location} contains no spark_kms table")
    table = meta.table
    with service.rotation_lock(table).hold(blocking=blocking) as held:
        if not held:
            log.info("table %s: a rotation is already running; this one is skipped", table)
            return None
        started = time.monotonic()
        operations = service.hsm.stats.key_operations
        try:
            resumed, rotated = _switch_versions(service, store, table, meta.table_id)
            total, rewrapped = _rewrap_records(service, store, meta.table_id)
            with service.table_lock(table):
                _total, stragglers = _rewrap_records(service, store, meta.table_id)
                destroyed = _retire_old_versions(service, store, meta.table_id, trigger)
                current = service.update_metadata(store, meta.table_id, _finish)
        except SparkKmsError as error:
            service.audit.append(
                "rotate",
                table=table,
                outcome=f"failed: {type(error).__name__}",
                trigger=trigger,
                error=str(error),
            )
            raise
        report = RotationReport(
            table=table,
            trigger=trigger,
            resumed=resumed,
            master_keys_rotated=rotated,
            table_key_version=current.master_key_version,
            records_total=total,
            records_rewrapped=rewrapped + stragglers,
            destroyed_objects=destroyed,
            hsm_operations=service.hsm.stats.key_operations - operations,
            seconds=time.monotonic() - started,
        )
    service.audit.append(
        "rotate",
        table=table,
        outcome="ok",
        trigger=trigger,
        resumed=resumed,
        key_label=current.master_key_label,
        key_version=current.master_key_version,
        records_rewrapped=report.records_rewrapped,
        destroyed_objects=destroyed,
    )
    log.info(
        "rotated table %s to master key version %d: %d of %d KEK record(s) rewrapped, "
        "%d old key object(s) destroyed, %d HSM call(s), %.3f s",
        table,
        current.master_key_version,
        report.records_rewrapped,
        total,
        destroyed,
        report.hsm_operations,
        report.seconds,
    )
    return report


def _finish(meta: TableMetadata) -> None:
    meta.rotation_started_at = None
    meta.rotation_pending = None


def _switch_versions(
    service: KeyService, store: KeyringStore, table: str, table_id: str
) -> tuple[bool, int]:
    # Phase 1: returns whether an interrupted rotation is resumed and how many
    # master keys got a new version now.
    rotated = 0
    with service.table_lock(table):
        meta = service.current_metadata(store, table_id)
        if meta.state == ERASED:
            raise TableErasedError(meta.table)
        resumed = meta.rotation_started_at is not None
        if not resumed:
            meta.rotation_started_at = service.now()
            meta.rotation_pending = [TABLE_SCOPE] + [
                p.partition_id for p in store.list_partition_records() if p.state == ACTIVE
            ]
            store.write_metadata(meta)

        for scope in list(meta.rotation_pending or []):
            if scope == TABLE_SCOPE:
                version = meta.master_key_version + 1
                label = master_key_label(meta.table, meta.table_id, version)
                _new_key_version(service, meta.table, label, version, None)
                meta.master_key_label = label
                meta.master_key_version = version
                meta.master_key_since = service.now()
                rotated += 1
            else:
                rotated += _switch_partition(service, store, meta, scope)
            # A crash between the partition record and this write rotates that
            # partition once more on resume, which costs one extra key version.
            meta.rotation_pending = [s for s in meta.rotation_pending or [] if s != scope]
            store.write_metadata(meta)
    return resumed, rotated


def _switch_partition(
    service: KeyService, store: KeyringStore, meta: TableMetadata, partition_id: str
) -> int:
    record = store.get_partition_record(partition_id)
    if record is None or record.state != ACTIVE:
        return 0
    version = record.master_key_version + 1
    label = partition_master_key_label(meta.table, meta.table_id, partition_id, version)
    _new_key_version(service, meta.table, label, version, record.folder)
    store.put_partition_record(
        replace(
            record,
            master_key_label=label,
            master_key_version=version,
            master_key_since=service.now(),
        )
    )
    return 1


def _new_key_version(
    service: KeyService, table: str, label: str, version: int, partition: str | None
) -> None:
    # A version created by an interrupted phase 1 is in the token but named by
    # no record yet; it is used as it is.
    if service.hsm.key_exists(label):
        log.info("table %s: reusing master key %s from an interrupted rotation", table, label)
        return
    service.hsm.generate_master_key(label)
    service.audit.append(
        "create_master_key",
        table=table,
        outcome="ok",
        partition=partition,
        key_label=label,
        key_version=version,
    )


def _rewrap_records(service: KeyService, store: KeyringStore, table_id: str) -> tuple[int, int]:
    # Phase 2: returns the number of KEK records and of records rewrapped.
    meta = service.current_metadata(store, table_id)
    current: dict[str | None, RewrapTarget] = {
        None: (meta.master_key_label, meta.master_key_version, None)
    }
    erased: set[str] = set()
    for partition in store.list_partition_records():
        if partition.state == ERASED:
            erased.add(partition.partition_id)
        else:
            current[partition.partition_id] = (
                partition.master_key_label,
                partition.master_key_version,
                partition.folder,
            )

    total = rewrapped = 0
    pending: list[tuple[KekRecord, RewrapTarget]] = []
    for kek_id in store.list_kek_ids():
        total += 1
        record = store.get_kek_record(kek_id)
        if record.partition_id in erased:
            continue
        target = current.get(record.partition_id)
        if target is None:
            raise IntegrityError(
                f"KEK record {kek_id} of table '{meta.table}' names partition "
                f"{record.partition_id}, which has no partition record; restore the keyring "
                "from backup"
            )
        if record.master_key_label != target[0]:
            pending.append((record, target))
        if len(pending) == REWRAP_BATCH_RECORDS:
            rewrapped += _rewrap_batch(service, store, meta, pending)
            pending = []
    rewrapped += _rewrap_batch(service, store, meta, pending)
    return total, rewrapped


def _rewrap_batch(
    service: KeyService,
    store: KeyringStore,
    meta: TableMetadata,
    pending: list[tuple[KekRecord, RewrapTarget]],
) -> int:
    # Every HSM call of the batch runs first, in one session, so that the
    # PKCS#11 call lock is not held while the records are written.
    if not pending:
        return 0
    rewrapped: list[bytes] = []
    failure: SparkKmsError | None = None
    with service.hsm.batch() as batch:
        for record, target in pending:
            try:
                rewrapped.append(_rewrap(batch, meta, record, target[0]))
            except (KeyNotFoundError, IntegrityError) as error:
                failure = error
                break
    # The records rewrapped before a failure are kept, so a rerun has less to do.
    for (record, target), wrapped in zip(pending, rewrapped, strict=False):
        _replace_record(service, store, meta, record, target, wrapped)
    if failure is not None:
        record = pending[len(rewrapped)][0]
        if isinstance(failure, KeyNotFoundError):
            _raise_if_erased(store, meta, record)
        raise failure
    return len(rewrapped)


def _raise_if_erased(store: KeyringStore, meta: TableMetadata, record: KekRecord) -> None:
    # A master key that went missing during the rotation was usually destroyed
    # by an erasure of the table or of the record's partition.
    current = store.read_metadata()
    if current is None or current.state == ERASED:
        raise TableErasedError(meta.table, "erased during the rotation")
    if record.partition_id is not None:
        partition = store.get_partition_record(record.partition_id)
        if partition is not None and partition.state == ERASED:
            raise PartitionErasedError(
                meta.table,
                partition.folder,
                "erased during the rotation; run the rotation again to rotate the others",
            )


def _rewrap(batch: HsmBatch, meta: TableMetadata, record: KekRecord, label: str) -> bytes:
    # Returns the record's KEK wrapped under ``label``, checked to unwrap to the same KEK.
    aad = kek_aad(meta.table_id, record.kek_id)
    try:
        wrapped = base64.b64decode(record.wrapped_kek, validate=True)
    except ValueError:
        raise IntegrityError(
            f"KEK record {record.kek_id} contains a wrapped key that is not valid base64"
        ) from None
    try:
        kek = batch.decrypt(record.master_key_label, wrapped, aad)
    except IntegrityError:
        raise IntegrityError(
            f"KEK record {record.kek_id} of table '{meta.table}' failed authentication in the "
            "HSM: the record was changed; restore it from backup, then run the rotation again"
        ) from None
    except KeyNotFoundError:
        raise KeyNotFoundError(
            f"KEK record {record.kek_id} of table '{meta.table}' is wrapped by master key "
            f"{record.master_key_label}, which is missing from the token, so it cannot be "
            "rewrapped; restore the key or the record from backup"
        ) from None
    rewrapped = batch.encrypt(label, kek, aad)

    # The old record is replaced only once the new one is known to unwrap to the same KEK.
    if not hmac.compare_digest(batch.decrypt(label, rewrapped, aad), kek):
        raise IntegrityError(
            f"KEK record {record.kek_id} rewrapped under {label} did not unwrap to the same KEK; "
            "the record was left unchanged"
        )
    del kek
    return rewrapped


def _replace_record(
    service: KeyService,
    store: KeyringStore,
    meta: TableMetadata,
    record: KekRecord,
    target: RewrapTarget,
    rewrapped: bytes,
) -> None:
    label, version, partition = target
    store.replace_kek_record(
        replace(
            record,
            master_key_label=label,
            master_key_version=version,
            wrapped_kek=base64.b64encode(rewrapped).decode("ascii"),
        )
    )
    service.audit.append(
        "rewrap_kek",
        table=meta.table,
        outcome="ok",
        partition=partition,
        key_label=label,
        key_version=version,
        previous_key_label=record.master_key_label,
        kek_ids=[record.kek_id],
    )


def _retire_old_versions(
    service: KeyService, store: KeyringStore, table_id: str, trigger: str
) -> int:
    # Phase 3, under the table lock: destroys every master key version that is
    # no longer current and returns the number of objects destroyed.
    meta = service.current_metadata(store, table_id)
    labels = service.hsm.list_key_labels(table_key_prefix(meta.table, meta.table_id))
    old = [
        label
        for label in versions_in_scope(labels, table_key_prefix(meta.table, meta.table_id))
        if label != meta.master_key_label
    ]
    for partition in store.list_partition_records():
        if partition.state != ACTIVE:
            continue
        prefix = partition_key_prefix(meta.table, meta.table_id, partition.partition_id)
        old += [
            label
            for label in versions_in_scope(labels, prefix)
            if label != partition.master_key_label
        ]

    destroyed = sum(service.hsm.destroy_keys(label) for label in old)
    remaining = sum(service.hsm.count_keys(label, fresh_session=True) for label in old)
    if remaining:
        raise HsmUnavailableError(
            f"rotation of table '{meta.table}' could not destroy {remaining} old master key "
            f"object(s) in token '{service.settings.token_label}'; run 'spark-kms rotate "
            f"{meta.table}' again to finish it"
        )
    if old:
        service.audit.append(
            "destroy_master_key",
            table=meta.table,
            outcome="ok",
            key_labels=old,
            destroyed_objects=destroyed,
            trigger=trigger,
        )
    return destroyed
