"""The key service: master keys, KEKs and the key lifecycle of tables, on the driver.

It is the only part that talks to the HSM. For a write job it mints one fresh
KEK per key group, wraps each in the HSM under the table's master key and
persists the wrapped record before any task runs. For a read it unwraps each
KEK the files need, once. Every key operation is written to the audit log.

Lifecycle: master-key rotation (:mod:`spark_kms.rotation`), scheduled deletion
with a waiting period, crypto-erasure of a table or of one partition value, and
the access policy, checked before any key is created or used. Opening a table
also runs what is due on it: a deletion whose date has passed, or a rotation
whose period has passed or that was interrupted.

Locks, taken in this order: the registry lock serializes table creation,
deletion scheduling and erasure. The table lock serializes every change of
``table.json``, of partition records and of a table's master keys. The
rotation lock lets one rotation run per table.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, NoReturn

import pyarrow.fs as pafs

from spark_kms import erasure, rotation
from spark_kms.audit import AuditLog, current_principal, parse_time
from spark_kms.erasure import (
    DEFAULT_DELETION_DAYS,
    MANUAL,
    SCHEDULED,
    DeletionSchedule,
    EraseReport,
    display_time,
    timestamp,
)
from spark_kms.errors import (
    AccessDeniedError,
    ConfigurationError,
    IntegrityError,
    InvalidOptionError,
    KeyNotFoundError,
    PartitionErasedError,
    SparkKmsError,
    TableErasedError,
    TableNotFoundError,
    TablePendingDeletionError,
)
from spark_kms.hsm import Hsm
from spark_kms.jobkeys import JobKeys, check_name
from spark_kms.keylabels import (
    kek_aad,
    master_key_label,
    partition_master_key_label,
)
from spark_kms.keyring import (
    ACTIVE,
    ERASED,
    KEYRING_DIR,
    PENDING_DELETION,
    KekRecord,
    KeyringStore,
    PartitionRecord,
    TableMetadata,
)
from spark_kms.locks import FileLock, file_lock
from spark_kms.partitioning import (
    partition_id,
    partition_kek_id,
)
from spark_kms.policy import ADMIN, DECRYPT, ENCRYPT, AccessPolicy
from spark_kms.registry import RegistryEntry, TableRegistry
from spark_kms.rekey import finish_pending_rekey
from spark_kms.rotation import RotationReport
from spark_kms.settings import KmsSettings, parse_rotation_period

__all__ = [
    "DeletionSchedule",
    "EraseReport",
    "KeyService",
    "RotationReport",
    "TableStatus",
    "WriteKeys",
    "master_key_label",
]

log = logging.getLogger(__name__)

KEK_BYTES = 32


@dataclass
class WriteKeys:
    """KEKs minted for one write job: the key id of each key group, and the keys."""

    job_id: str
    kek_ids: dict[str, str]
    keys: JobKeys


@dataclass
class TableStatus:
    """State of a table, as ``spark-kms status`` prints it."""

    table: str
    table_id: str
    state: str
    location: str
    master_key_label: str
    master_key_version: int
    master_key_present: bool
    kek_records: int
    data_files: int
    created_at: str
    erased_at: str | None
    rotation_period_days: int = 0
    master_key_since: str | None = None
    rotation_due_at: str | None = None
    rotation_in_progress: bool = False
    deletion_due_at: str | None = None
    partition_by: str | None = None
    partitions: list[dict[str, Any]] = field(default_factory=list)


class KeyService:
    """Key lifecycle of spark_kms tables, backed by one HSM token.

    :param settings: where the HSM, registry, audit log and access policy are.
    :param hsm: an open :class:`Hsm`; by default one is opened from ``settings``
        on first use.
    :param principal: who is asking, for the access policy and the audit log;
        by default :func:`spark_kms.audit.current_principal` at each request.
    :param application_id: the Spark application id written into audit records.
    """

    def __init__(
        self,
        settings: KmsSettings,
        *,
        hsm: Hsm | None = None,
        principal: str | None = None,
        application_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.registry = TableRegistry(settings.registry_dir)
        self.audit = AuditLog(
            settings.audit_log, principal=principal, application_id=application_id
        )
        self.policy = AccessPolicy(settings.policy_file) if settings.policy_file else None
        self.application_id = application_id
        # The clock of every lifecycle date (rotation, scheduled deletion);
        # tests move it forward instead of waiting.
        self.clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)
        self._principal = principal
        self._hsm = hsm
        self._hsm_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"KeyService(token={self.settings.token_label!r}, registry={self.settings.registry_dir!r})"

    @property
    def principal(self) -> str:
        """Who is asking: the principal given at construction, else the Spark or OS user."""
        return self._principal or current_principal()

    @property
    def hsm(self) -> Hsm:
        """The HSM connection, opened on first use."""
        with self._hsm_lock:
            if self._hsm is None:
                self._hsm = Hsm(
                    module_path=self.settings.module_path,
                    token_label=self.settings.token_label,
                    pin_file=self.settings.pin_file,
                    pin_env=self.settings.pin_env,
                    softhsm2_conf=self.settings.softhsm2_conf,
                )
            return self._hsm

    def close(self) -> None:
        """Close the HSM connection if it is open."""
        with self._hsm_lock:
            if self._hsm is not None:
                self._hsm.close()
                self._hsm = None

    def now(self) -> str:
        """Return the current time of :attr:`clock` as stored in records (ISO 8601, UTC)."""
        return timestamp(self.clock())

    # Locks ------------------------------------------------------------------

    @contextmanager
    def registry_lock(self) -> Iterator[None]:
        """Hold the lock that serializes table creation, deletion scheduling and erasure."""
        with self._lock_file(".lock").hold():
            yield

    @contextmanager
    def table_lock(self, table: str) -> Iterator[None]:
        """Hold the lock that serializes changes to ``table``'s metadata and master keys."""
        with self._lock_file(f".locks/{table}.lock").hold():
            yield

    def rotation_lock(self, table: str) -> FileLock:
        """Return the lock that lets one rotation of ``table`` run at a time."""
        return self._lock_file(f".locks/{table}.rotation.lock")

    def _lock_file(self, name: str) -> FileLock:
        return file_lock(os.path.join(self.settings.registry_dir, name))

    def update_metadata(
        self, store: KeyringStore, table_id: str, change: Callable[[TableMetadata], None]
    ) -> TableMetadata:
        """Apply ``change`` to the current ``table.json`` under the table lock and write it.

        Every change of ``table.json`` goes through here, so that no writer
        replaces the file with a copy it read before another change.

        :raises TableNotFoundError: if the keyring is gone.
        :raises IntegrityError: if the location now contains another table.
        """
        meta = store.read_metadata()
        if meta is None:
            raise TableNotFoundError(
                f"{store.location} contains no spark_kms table ({store.keyring}/table.json is missing)"
            )
        with self.table_lock(meta.table):
            meta = self.current_metadata(store, table_id)
            change(meta)
            store.write_metadata(meta)
        return meta

    def current_metadata(self, store: KeyringStore, table_id: str) -> TableMetadata:
        """Return ``table.json`` as it is now, checking that it still describes table ``table_id``.

        :raises TableNotFoundError: if the keyring is gone.
        :raises IntegrityError: if the location now contains another table.
        """
        meta = store.read_metadata()
        if meta is None:
            raise TableNotFoundError(
                f"{store.location} contains no spark_kms table ({store.keyring}/table.json is missing)"
            )
        if meta.table_id != table_id:
            raise IntegrityError(
                f"{store.location} now contains table id {meta.table_id}, not {table_id}; "
                "the location was replaced"
            )
        return meta

    # Policy -----------------------------------------------------------------

    def authorize(
        self, table: str, operation: str, *, action: str | None = None, partition: str | None = None
    ) -> None:
        """Check that the access policy allows the principal ``operation`` on ``table``.

        Without a policy file every request is allowed and nothing is recorded;
        with one, the decision is written to the audit log.

        :param action: the admin command (``rotate``, ``erase``, ...), for the
            audit record and the error message.
        :raises AccessDeniedError: naming principal, table and operation.
        :raises ConfigurationError: if the policy file is missing or invalid.
        """
        if self.policy is None:
            return
        principal = self.principal
        allowed = self.policy.allows(principal, table, operation)
        self.audit.append(
            "policy",
            table=table,
            outcome="allow" if allowed else "deny",
            requested=operation,
            action=action,
            partition=partition,
        )
        if not allowed:
            requested = f"{operation} ({action})" if action else operation
            log.warning(
                "access denied: principal %s, operation %s, table %s", principal, requested, table
            )
            raise AccessDeniedError(principal, table, requested, self.policy.path)

    # Opening tables ---------------------------------------------------------

    def open_table_for_write(
        self,
        table: str,
        location: str,
        *,
        partition_by: str | None = None,
        rotation_period_days: int | None = None,
    ) -> tuple[TableMetadata, KeyringStore]:
        """Return the metadata of ``table`` at ``location``, creating the table if new.

        Checks the ``encrypt`` permission first, then runs what is due on the
        table (a scheduled deletion, a rotation).

        :param partition_by: for a new table, the column whose values each get a
            master key. For an existing table it must match, and ``None`` keeps
            the table's column.
        :param rotation_period_days: for a new table, its rotation period
            (default: the ``spark.kms.rotation.period.days`` setting).
        :raises AccessDeniedError: if the policy denies ``encrypt``.
        :raises TableErasedError: if the table was erased.
        :raises TablePendingDeletionError: if the table is scheduled for deletion.
        :raises ConfigurationError: if the name is registered at another location,
            or the location contains another table.
        :raises InvalidOptionError: if ``partition_by`` or ``rotation_period_days``
            contradicts the existing table.
        """
        check_name("table", table)
        self.authorize(table, ENCRYPT)
        store = KeyringStore(location)
        existing = store.read_metadata()
        if existing is not None and existing.table == table:
            self._run_due_actions(existing, self.registry.get(table), store)
        with self.registry_lock():
            entry = self.registry.get(table)
            meta = store.read_metadata()
            self._check_identity(table, store, entry, meta)
            if meta is None:
                meta = self._create_table(table, store, partition_by, rotation_period_days)
            else:
                self._raise_for_state(meta, entry)
                meta = self._check_layout(meta, store, partition_by, rotation_period_days)
        return meta, store

    def _check_identity(
        self,
        table: str,
        store: KeyringStore,
        entry: RegistryEntry | None,
        meta: TableMetadata | None,
    ) -> None:
        if entry is not None and entry.state == ERASED:
            raise TableErasedError(table, "choose a new table name to write new data")
        if meta is not None and meta.state == ERASED:
            raise TableErasedError(meta.table, f"location {store.location}")
        if entry is not None and entry.location != store.location:
            raise ConfigurationError(
                f"table '{table}' is registered at {entry.location}, not {store.location}; "
                "use that location or another table name"
            )
        if meta is not None and meta.table != table:
            raise ConfigurationError(
                f"{store.location} contains table '{meta.table}', not '{table}'; "
                f"set kms.table to '{meta.table}' or write to another location"
            )
        if meta is not None and entry is not None and meta.table_id != entry.table_id:
            raise IntegrityError(
                f"table '{table}' has id {entry.table_id} in the registry but "
                f"{meta.table_id} at {store.location}; the location was replaced"
            )
        if meta is None and entry is not None:
            raise IntegrityError(
                f"table '{table}' is registered at {store.location} but its keyring "
                f"({store.keyring}) is missing; restore it from backup"
            )

    def _check_layout(
        self,
        meta: TableMetadata,
        store: KeyringStore,
        partition_by: str | None,
        rotation_period_days: int | None,
    ) -> TableMetadata:
        if rotation_period_days is not None and rotation_period_days != meta.rotation_period_days:
            raise InvalidOptionError(
                f"table '{meta.table}' has a rotation period of {meta.rotation_period_days} days, "
                f"not {rotation_period_days}; change it with 'spark-kms set-rotation-period "
                f"{meta.table} {rotation_period_days}'"
            )
        if partition_by is None or partition_by == meta.partition_by:
            return meta
        if meta.partition_by is None and not store.list_commit_records():
            # Nothing was committed yet, so the layout can still be chosen.
            def set_partition(current: TableMetadata) -> None:
                current.partition_by = partition_by

            return self.update_metadata(store, meta.table_id, set_partition)
        current = (
            f"partitioned by '{meta.partition_by}'" if meta.partition_by else "not partitioned"
        )
        raise InvalidOptionError(
            f"table '{meta.table}' is {current}, so it cannot be written with "
            f"kms.partition_by '{partition_by}'; drop the option or write to a new table"
        )

    def _create_table(
        self,
        table: str,
        store: KeyringStore,
        partition_by: str | None,
        rotation_period_days: int | None,
    ) -> TableMetadata:
        period = self.settings.rotation_period_days
        if rotation_period_days is not None:
            period = parse_rotation_period(str(rotation_period_days), "kms.rotation_period_days")
        _check_new_location(table, store)
        table_id = uuid.uuid4().hex
        label = master_key_label(table, table_id, 1)
        self.hsm.generate_master_key(label)
        now = self.now()
        meta = TableMetadata(
            table=table,
            table_id=table_id,
            state=ACTIVE,
            master_key_label=label,
            master_key_version=1,
            created_at=now,
            master_key_since=now,
            rotation_period_days=period,
            partition_by=partition_by,
        )
        store.write_metadata(meta)
        self.registry.put(
            RegistryEntry(
                table=table,
                table_id=table_id,
                location=store.location,
                state=ACTIVE,
                created_at=meta.created_at,
            )
        )
        self.audit.append(
            "create_master_key",
            table=table,
            outcome="ok",
            key_label=label,
            key_version=1,
            table_id=table_id,
        )
        log.info(
            "created table %s (id %s) at %s with master key %s",
            table,
            table_id,
            store.location,
            label,
        )
        return meta

    def open_table_for_read(
        self, location: str, *, operation: str | None = DECRYPT
    ) -> tuple[TableMetadata, KeyringStore]:
        """Return the metadata of the table at ``location``.

        Checks the permission ``operation`` first (``None``: no check, for a
        caller that checked already), then runs what is due on the table.

        :raises TableNotFoundError: if the location contains no spark_kms table.
        :raises AccessDeniedError: if the policy denies ``operation``.
        :raises TableErasedError: if the table was erased.
        :raises TablePendingDeletionError: if the table is scheduled for deletion.
        """
        store = KeyringStore(location)
        meta = store.read_metadata()
        if meta is None:
            raise TableNotFoundError(
                f"{store.location} contains no spark_kms table ({store.keyring}/table.json is missing); "
                "write it with format 'kms_parquet' first"
            )
        if operation is not None:
            self.authorize(meta.table, operation)
        entry = self.registry.get(meta.table)
        if entry is not None and entry.table_id != meta.table_id:
            entry = None
        if self._run_due_actions(meta, entry, store):
            meta = self.current_metadata(store, meta.table_id)
            entry = self.registry.get(meta.table)
        self._raise_for_state(meta, entry)
        return meta, store

    def check_writable(self, table: str, location: str) -> tuple[TableMetadata, KeyringStore]:
        """Return the current metadata of ``table`` for a commit, without a policy decision.

        :raises TableErasedError: if the table was erased while the job ran.
        :raises TablePendingDeletionError: if it was scheduled for deletion meanwhile.
        """
        store = KeyringStore(location)
        entry = self.registry.get(table)
        meta = store.read_metadata()
        self._check_identity(table, store, entry, meta)
        if meta is None:
            raise TableNotFoundError(
                f"{store.location} contains no spark_kms table ({store.keyring}/table.json is missing)"
            )
        self._raise_for_state(meta, entry)
        return meta, store

    def registered_table(self, table: str) -> tuple[RegistryEntry, TableMetadata, KeyringStore]:
        """Return the registry entry, metadata and keyring of a registered, not erased table.

        :raises TableNotFoundError: if the table was never registered.
        :raises TableErasedError: if it was erased.
        :raises IntegrityError: if its keyring is missing or describes another table.
        """
        entry = self.registry.get(table)
        if entry is None:
            raise TableNotFoundError(
                f"no table '{table}' in the registry {self.settings.registry_dir}; "
                "'spark-kms keys list' shows the registered tables"
            )
        if entry.state == ERASED:
            raise TableErasedError(table)
        store = KeyringStore(entry.location)
        meta = store.read_metadata()
        if meta is None:
            raise IntegrityError(
                f"table '{table}' is registered at {entry.location} but its keyring "
                f"({store.keyring}) is missing; restore it from backup"
            )
        if meta.table_id != entry.table_id:
            raise IntegrityError(
                f"table '{table}' has id {entry.table_id} in the registry but "
                f"{meta.table_id} at {store.location}; the location was replaced"
            )
        return entry, meta, store

    def _raise_for_state(self, meta: TableMetadata, entry: RegistryEntry | None) -> None:
        if entry is not None and entry.table_id != meta.table_id:
            entry = None
        if meta.state == ERASED or (entry is not None and entry.state == ERASED):
            raise TableErasedError(meta.table)
        due = _deletion_due(meta, entry)
        if due is not None:
            raise TablePendingDeletionError(meta.table, display_time(due))

    def _run_due_actions(
        self, meta: TableMetadata, entry: RegistryEntry | None, store: KeyringStore
    ) -> bool:
        """Run a due deletion or rotation of the table; return whether one ran.

        A rekey that stopped while committing is finished first.

        A due deletion erases the table (the caller then gets
        :class:`TableErasedError`). A due rotation is skipped when another
        process is rotating the table. A failed rotation leaves the table
        usable: the failure is logged and audited, and the next use retries.
        """
        if store.read_rekey_journal() is not None:
            finish_pending_rekey(self, store)
        due = _deletion_due(meta, entry)
        if due is not None:
            try:
                due_time = parse_time(due)
            except ValueError:
                log.error("table %s: invalid deletion date %r; deletion not run", meta.table, due)
                return False
            if entry is None or due_time > self.clock():
                return False
            log.warning(
                "table %s: its scheduled deletion was due on %s; erasing it", meta.table, due
            )
            self.erase_table(meta.table, trigger=SCHEDULED)
            return True
        if meta.state != ACTIVE or not rotation.needs_rotation(meta, self.clock()):
            return False
        try:
            report = rotation.rotate_store(self, store, trigger=SCHEDULED, blocking=False)
        except SparkKmsError as error:
            log.warning(
                "table %s: due master-key rotation failed, retried at next use: %s",
                meta.table,
                error,
            )
            return False
        return report is not None

    # KEKs --------------------------------------------------------------------

    def mint_keks(
        self,
        meta: TableMetadata,
        store: KeyringStore,
        groups: Iterable[str],
        *,
        job_id: str | None = None,
    ) -> WriteKeys:
        """Mint one KEK per key group, wrap each in the HSM and persist its record.

        This is one HSM call per group, whatever the number of files the job
        writes. The KEKs are wrapped under the table's current master key
        version, read again under the table lock so that a rotation that
        started after ``meta`` was read is respected.
        """
        job_id = job_id or uuid.uuid4().hex[:16]
        kek_ids: dict[str, str] = {}
        keys: dict[str, bytes] = {}
        with self.table_lock(meta.table):
            current = self.current_metadata(store, meta.table_id)
            if current.state == ERASED:
                raise TableErasedError(current.table)
            for group in sorted(set(groups)):
                check_name("key group", group)
                kek_id = f"{current.table}.{group}.k{job_id}"
                kek = os.urandom(KEK_BYTES)
                self._wrap_and_store(
                    current,
                    store,
                    kek_id=kek_id,
                    kek=kek,
                    group=group,
                    job_id=job_id,
                    label=current.master_key_label,
                    version=current.master_key_version,
                )
                kek_ids[group] = kek_id
                keys[kek_id] = kek
        return WriteKeys(job_id=job_id, kek_ids=kek_ids, keys=JobKeys(keys))

    def persist_partition_keks(
        self,
        meta: TableMetadata,
        store: KeyringStore,
        *,
        job_id: str,
        keks: Mapping[str, Mapping[str, tuple[str, bytes]]],
    ) -> None:
        """Wrap the KEKs of each partition under its own master key and persist the records.

        A partition value seen for the first time gets a new master key. Every
        partition is checked before anything is wrapped, so a job that touches
        an erased partition persists nothing.

        :param keks: partition folder to key group to (KEK id, KEK).
        :raises PartitionErasedError: if one of the partitions was erased.
        """
        with self.table_lock(meta.table):
            current = self.current_metadata(store, meta.table_id)
            if current.state == ERASED:
                raise TableErasedError(current.table)
            for folder in sorted(keks):
                record = store.get_partition_record(partition_id(folder))
                if record is not None and record.state == ERASED:
                    raise PartitionErasedError(
                        current.table, folder, "write this data to another partition value"
                    )
            for folder, by_group in sorted(keks.items()):
                record = self._partition_record(current, store, folder)
                for group, (kek_id, kek) in sorted(by_group.items()):
                    self._wrap_and_store(
                        current,
                        store,
                        kek_id=kek_id,
                        kek=kek,
                        group=group,
                        job_id=job_id,
                        label=record.master_key_label,
                        version=record.master_key_version,
                        partition=folder,
                        partition_id=record.partition_id,
                    )

    def mint_partition_keks(
        self,
        meta: TableMetadata,
        store: KeyringStore,
        folder: str,
        groups: Iterable[str],
        *,
        job_id: str,
    ) -> WriteKeys:
        """Mint random KEKs for one partition, wrapped under its master key (for rekey)."""
        minted = {
            group: (partition_kek_id(meta.table, group, folder, job_id), os.urandom(KEK_BYTES))
            for group in sorted(set(groups))
        }
        self.persist_partition_keks(meta, store, job_id=job_id, keks={folder: minted})
        return WriteKeys(
            job_id=job_id,
            kek_ids={group: kek_id for group, (kek_id, _kek) in minted.items()},
            keys=JobKeys(dict(minted.values())),
        )

    def _partition_record(
        self, meta: TableMetadata, store: KeyringStore, folder: str
    ) -> PartitionRecord:
        # Called under the table lock: returns the partition's record, creating
        # its master key and record for a new partition value.
        pid = partition_id(folder)
        record = store.get_partition_record(pid)
        if record is not None:
            if record.table_id != meta.table_id or record.folder != folder:
                raise IntegrityError(
                    f"partition record {pid} of table '{meta.table}' names {record.folder!r} of "
                    f"table id {record.table_id}, not {folder!r}; restore the keyring from backup"
                )
            return record
        label = partition_master_key_label(meta.table, meta.table_id, pid, 1)
        # A key left by a commit that stopped before writing the record is reused.
        if not self.hsm.key_exists(label):
            self.hsm.generate_master_key(label)
        now = self.now()
        record = PartitionRecord(
            partition_id=pid,
            table_id=meta.table_id,
            column=meta.partition_by or folder.split("=", 1)[0],
            folder=folder,
            state=ACTIVE,
            master_key_label=label,
            master_key_version=1,
            master_key_since=now,
            created_at=now,
        )
        store.put_partition_record(record)
        self.audit.append(
            "create_master_key",
            table=meta.table,
            outcome="ok",
            partition=folder,
            key_label=label,
            key_version=1,
            table_id=meta.table_id,
        )
        log.info("created master key %s for partition %s of table %s", label, folder, meta.table)
        return record

    def _wrap_and_store(
        self,
        meta: TableMetadata,
        store: KeyringStore,
        *,
        kek_id: str,
        kek: bytes,
        group: str,
        job_id: str,
        label: str,
        version: int,
        partition: str | None = None,
        partition_id: str | None = None,
    ) -> None:
        try:
            wrapped = self.hsm.encrypt(label, kek, kek_aad(meta.table_id, kek_id))
        except KeyNotFoundError:
            self.audit.append(
                "wrap_kek",
                table=meta.table,
                outcome="failed: master key missing",
                partition=partition,
                key_label=label,
                kek_ids=[kek_id],
                job_id=job_id,
            )
            if partition is not None:
                raise PartitionErasedError(
                    meta.table, partition, "its master key is missing from the token"
                ) from None
            raise TableErasedError(meta.table, "its master key is missing from the token") from None
        store.put_kek_record(
            KekRecord(
                kek_id=kek_id,
                table=meta.table,
                table_id=meta.table_id,
                group=group,
                job_id=job_id,
                created_at=self.now(),
                master_key_label=label,
                master_key_version=version,
                wrapped_kek=base64.b64encode(wrapped).decode("ascii"),
                partition_id=partition_id,
            )
        )
        self.audit.append(
            "wrap_kek",
            table=meta.table,
            outcome="ok",
            partition=partition,
            key_label=label,
            key_version=version,
            kek_ids=[kek_id],
            job_id=job_id,
        )

    def unwrap_keks(
        self,
        meta: TableMetadata,
        store: KeyringStore,
        kek_ids: Iterable[str],
        *,
        job_id: str | None = None,
    ) -> JobKeys:
        """Unwrap each KEK in ``kek_ids`` once in the HSM.

        Callers check the ``decrypt`` permission first, with
        :meth:`open_table_for_read`. A record rewrapped by a concurrent rotation
        is read again, so a read that overlaps a rotation succeeds.

        :raises TableErasedError: if the master key that wrapped a KEK is gone.
        :raises PartitionErasedError: if the KEK belongs to an erased partition.
        :raises IntegrityError: if a KEK record was changed.
        :raises KeyNotFoundError: if a KEK record is missing.
        """
        records: list[KekRecord] = []
        for kek_id in sorted(set(kek_ids)):
            record = store.get_kek_record(kek_id)
            if record.table_id != meta.table_id:
                raise IntegrityError(
                    f"KEK record {kek_id} belongs to table id {record.table_id}, not {meta.table_id}"
                )
            records.append(record)
        # One HSM session for all records, so each master key version is looked
        # up once. The audit records are written after the session ends.
        outcomes: dict[str, bytes | SparkKmsError] = {}
        with self.hsm.batch() as batch:
            for record in records:
                try:
                    outcomes[record.kek_id] = batch.decrypt(
                        record.master_key_label,
                        _wrapped_bytes(record),
                        kek_aad(meta.table_id, record.kek_id),
                    )
                except (KeyNotFoundError, IntegrityError) as error:
                    outcomes[record.kek_id] = error

        keys: dict[str, bytes] = {}
        for record in records:
            outcome = outcomes[record.kek_id]
            try:
                if isinstance(outcome, KeyNotFoundError):
                    keys[record.kek_id], record = self._unwrap_rewrapped(meta, store, record)
                elif isinstance(outcome, SparkKmsError):
                    raise outcome
                else:
                    keys[record.kek_id] = outcome
            except KeyNotFoundError:
                self._audit_unwrap(meta, store, record, "failed: master key missing", job_id)
                self._raise_key_missing(meta, store, record)
            except IntegrityError:
                self._audit_unwrap(meta, store, record, "failed: integrity", job_id)
                raise IntegrityError(
                    f"KEK record {record.kek_id} of table '{meta.table}' failed authentication "
                    "in the HSM: the record was changed; restore it from backup"
                ) from None
            self._audit_unwrap(meta, store, record, "ok", job_id)
        return JobKeys(keys)

    def _unwrap_rewrapped(
        self, meta: TableMetadata, store: KeyringStore, record: KekRecord
    ) -> tuple[bytes, KekRecord]:
        # A rotation may rewrap the record and destroy its old master key
        # between reading the record and unwrapping it. The record is then
        # read again and unwrapped under the new version.
        again = store.get_kek_record(record.kek_id)
        if again.master_key_label == record.master_key_label:
            raise KeyNotFoundError(
                f"no key labelled '{record.master_key_label}' in token '{self.hsm.token_label}'"
            )
        kek = self.hsm.decrypt(
            again.master_key_label, _wrapped_bytes(again), kek_aad(meta.table_id, again.kek_id)
        )
        return kek, again

    def _raise_key_missing(
        self, meta: TableMetadata, store: KeyringStore, record: KekRecord
    ) -> NoReturn:
        if record.partition_id is not None:
            partition = store.get_partition_record(record.partition_id)
            folder = partition.folder if partition is not None else record.partition_id
            raise PartitionErasedError(
                meta.table,
                folder,
                f"master key {record.master_key_label} is missing from the token",
            ) from None
        raise TableErasedError(
            meta.table, f"master key {record.master_key_label} is missing from the token"
        ) from None

    def _audit_unwrap(
        self,
        meta: TableMetadata,
        store: KeyringStore,
        record: KekRecord,
        outcome: str,
        job_id: str | None,
    ) -> None:
        partition = None
        if record.partition_id is not None:
            partition_record = store.get_partition_record(record.partition_id)
            partition = partition_record.folder if partition_record else record.partition_id
        self.audit.append(
            "unwrap_kek",
            table=meta.table,
            outcome=outcome,
            partition=partition,
            key_label=record.master_key_label,
            key_version=record.master_key_version,
            kek_ids=[record.kek_id],
            job_id=job_id,
        )

    # Rotation ----------------------------------------------------------------

    def rotate_table(self, table: str) -> RotationReport:
        """Rotate every master key of ``table``; see :mod:`spark_kms.rotation`.

        Resumes an interrupted rotation instead of starting a new one.

        :raises AccessDeniedError: if the policy denies ``admin``.
        :raises TableNotFoundError: if the table was never registered.
        :raises TableErasedError: if it was erased.
        :raises TablePendingDeletionError: if it is scheduled for deletion.
        """
        self.authorize(table, ADMIN, action="rotate")
        entry, meta, store = self.registered_table(table)
        self._raise_for_state(meta, entry)
        report = rotation.rotate_store(self, store, trigger=MANUAL, blocking=True)
        assert report is not None  # a blocking rotation always runs
        return report

    def rotate_due(self) -> list[RotationReport]:
        """Rotate every active registered table whose rotation is due or was interrupted.

        For a scheduler (``spark-kms rotate --due``). A due rotation is the
        policy of the table, so it runs without an ``admin`` decision, like a
        rotation that runs when a job touches the table. A table whose
        rotation fails is logged and skipped, and the first error is raised
        after every table was tried.
        """
        reports: list[RotationReport] = []
        failures: list[SparkKmsError] = []
        for entry in self.registry.entries():
            if entry.state != ACTIVE:
                continue
            try:
                _entry, meta, store = self.registered_table(entry.table)
                if not rotation.needs_rotation(meta, self.clock()):
                    continue
                report = rotation.rotate_store(self, store, trigger=SCHEDULED, blocking=True)
            except SparkKmsError as error:
                log.error("due rotation of table %s failed: %s", entry.table, error)
                failures.append(error)
                continue
            if report is not None:
                reports.append(report)
        if failures:
            raise failures[0]
        return reports

    def set_rotation_period(self, table: str, days: int) -> TableMetadata:
        """Set the rotation period of ``table`` in days (0 turns automatic rotation off).

        :raises InvalidOptionError: if ``days`` is not 0 to 3650.
        :raises AccessDeniedError: if the policy denies ``admin``.
        """
        if not isinstance(days, int) or isinstance(days, bool):
            raise InvalidOptionError(f"invalid rotation period {days!r}: give whole days")
        parse_rotation_period(str(days), f"table '{table}'")
        self.authorize(table, ADMIN, action="set-rotation-period")
        _entry, meta, store = self.registered_table(table)

        def set_period(current: TableMetadata) -> None:
            current.rotation_period_days = days

        meta = self.update_metadata(store, meta.table_id, set_period)
        self.audit.append(
            "set_rotation_period", table=table, outcome="ok", rotation_period_days=days
        )
        log.info("table %s: rotation period set to %d day(s)", table, days)
        return meta

    # Scheduled deletion and erasure (spark_kms.erasure) ---------------------

    def schedule_deletion(self, table: str, days: int = DEFAULT_DELETION_DAYS) -> DeletionSchedule:
        """Schedule the crypto-erasure of ``table`` in ``days`` days (1 to 30, default 7).

        Until then reads and writes raise :class:`TablePendingDeletionError`;
        :meth:`cancel_deletion` restores the table. When due, the deletion runs
        at the next :meth:`purge_due` or the next time a job opens the table.

        :raises InvalidOptionError: if ``days`` is out of range.
        :raises AccessDeniedError: if the policy denies ``admin``.
        :raises TableStateError: if a deletion is already scheduled.
        """
        return erasure.schedule_deletion(self, table, days)

    def cancel_deletion(self, table: str) -> None:
        """Cancel the scheduled deletion of ``table``; reads and writes work again.

        :raises AccessDeniedError: if the policy denies ``admin``.
        :raises TableStateError: if no deletion is scheduled.
        :raises TableErasedError: if the deletion already ran.
        """
        erasure.cancel_deletion(self, table)

    def purge_due(self) -> list[EraseReport]:
        """Erase every registered table whose scheduled deletion is due.

        The deletion was decided by the principal who scheduled it, so this
        runs without an ``admin`` decision. Each erasure is audited with
        trigger ``scheduled``.
        """
        return erasure.purge_due(self)

    def erase_table(self, table: str, *, trigger: str = MANUAL) -> EraseReport:
        """Crypto-erase ``table``: tombstone it, then destroy every master key version.

        Every master key of the table goes, its partitions' keys included.
        Safe to call again after a failure: a tombstoned table keeps its state
        and the remaining key objects are destroyed.

        :param trigger: ``manual`` (checks the ``admin`` permission) or
            ``scheduled`` (a due deletion, decided when it was scheduled).
        :raises AccessDeniedError: if the policy denies ``admin``.
        :raises TableNotFoundError: if the table was never registered.
        :raises HsmUnavailableError: if a key object could not be destroyed, or
            is still present afterwards; the table stays tombstoned, so retry.
        """
        return erasure.erase_table(self, table, trigger=trigger)

    def erase_partition(self, table: str, partition: str) -> EraseReport:
        """Crypto-erase one partition value of ``table``, given as ``column=value``.

        The partition is tombstoned, then its master key versions are
        destroyed. Its files stay on disk but cannot be decrypted. Reads of
        the table skip them with a warning, and writes of that value are
        rejected with :class:`PartitionErasedError`.

        :raises AccessDeniedError: if the policy denies ``admin``.
        :raises InvalidOptionError: if the table is not partitioned, the column
            is not its partition column, or the value does not fit its type.
        :raises PartitionNotFoundError: if no data was ever written to that value.
        :raises HsmUnavailableError: if a key object remains; retry.
        """
        return erasure.erase_partition(self, table, partition)

    def erased_partitions(self, location: str) -> list[str]:
        """Return the folders of the erased partitions of the table at ``location``."""
        store = KeyringStore(location)
        return [r.folder for r in store.list_partition_records() if r.state == ERASED]

    # Status -----------------------------------------------------------------------

    def status(self, table: str) -> TableStatus:
        """Return the state of ``table``.

        :raises TableNotFoundError: if the table was never registered.
        """
        entry = self.registry.get(table)
        if entry is None:
            raise TableNotFoundError(
                f"no table '{table}' in the registry {self.settings.registry_dir}"
            )
        store = KeyringStore(entry.location)
        meta = store.read_metadata()
        label = meta.master_key_label if meta else master_key_label(table, entry.table_id, 1)
        version = meta.master_key_version if meta else 1
        status = TableStatus(
            table=table,
            table_id=entry.table_id,
            state=entry.state,
            location=entry.location,
            master_key_label=label,
            master_key_version=version,
            master_key_present=self.hsm.count_keys(label) == 1,
            kek_records=len(store.list_kek_ids()),
            data_files=len(store.list_data_files()),
            created_at=entry.created_at,
            erased_at=entry.erased_at,
            deletion_due_at=entry.deletion_due_at,
        )
        if meta is not None:
            due = rotation.rotation_due_at(meta)
            status.rotation_period_days = meta.rotation_period_days
            status.master_key_since = meta.master_key_since or meta.created_at
            status.rotation_due_at = timestamp(due) if due is not None else None
            status.rotation_in_progress = meta.rotation_started_at is not None
            status.partition_by = meta.partition_by
            status.partitions = [
                {
                    "partition": record.folder,
                    "state": record.state,
                    "master_key_version": record.master_key_version,
                }
                for record in store.list_partition_records()
            ]
        return status

    def list_tables(self) -> list[RegistryEntry]:
        """Return every registered table, erased ones included."""
        return self.registry.entries()


def _deletion_due(meta: TableMetadata, entry: RegistryEntry | None) -> str | None:
    # The due date of a pending deletion, from the registry entry when it
    # names this table, else from the keyring.
    if entry is not None and entry.table_id == meta.table_id and entry.state == PENDING_DELETION:
        return entry.deletion_due_at or meta.deletion_due_at or ""
    if meta.state == PENDING_DELETION:
        return meta.deletion_due_at or ""
    return None


def _check_new_location(table: str, store: KeyringStore) -> None:
    """Raise unless ``store``'s location can hold a new table.

    A new table must not start in a folder of plaintext Parquet files, nor
    inside or above another table, whose reads would then meet files under
    keys they were not given.
    """
    filesystem = store.filesystem
    parent = store.location
    while "/" in parent.strip("/"):
        parent = parent.rsplit("/", 1)[0] or "/"
        marker = f"{parent.rstrip('/')}/{KEYRING_DIR}/table.json"
        if filesystem.get_file_info(marker).type == pafs.FileType.File:
            raise InvalidOptionError(
                f"cannot create table '{table}' at {store.location}: it is inside the table "
                f"at {parent}; choose a location outside other tables"
            )
    selector = pafs.FileSelector(store.location, recursive=True, allow_not_found=True)
    for info in filesystem.get_file_info(selector):
        if info.path.endswith(f"/{KEYRING_DIR}/table.json"):
            inner = info.path[: -len(f"/{KEYRING_DIR}/table.json")]
            raise InvalidOptionError(
                f"cannot create table '{table}' at {store.location}: the folder contains the "
                f"table at {inner}; choose a location outside other tables"
            )
    existing = store.list_data_files()
    if existing:
        raise InvalidOptionError(
            f"cannot create table '{table}' at {store.location}: the folder already contains "
            f"{len(existing)} Parquet file(s) that are not part of a spark_kms table "
            f"(for example {existing[0]}); write the table to an empty folder"
        )


def _wrapped_bytes(record: KekRecord) -> bytes:
    try:
        return base64.b64decode(record.wrapped_kek, validate=True)
    except ValueError:
        raise IntegrityError(
            f"KEK record {record.kek_id} contains a wrapped key that is not valid base64"
        ) from None
