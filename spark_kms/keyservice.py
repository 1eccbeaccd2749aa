"""The key service: table master keys, KEKs and crypto-erasure, on the driver.

It is the only part that talks to the HSM. For a write job it mints one fresh
KEK per key group, wraps each in the HSM under the table's master key and
persists the wrapped record before any task runs. For a read it unwraps each
KEK the files need, once. Every key operation is written to the audit log.
"""

from __future__ import annotations

import base64
import fcntl
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone

from spark_kms.audit import AuditLog
from spark_kms.errors import (
    ConfigurationError,
    HsmUnavailableError,
    IntegrityError,
    KeyNotFoundError,
    SparkKmsError,
    TableErasedError,
    TableNotFoundError,
)
from spark_kms.hsm import Hsm
from spark_kms.jobkeys import JobKeys, check_name
from spark_kms.keyring import KekRecord, KeyringStore, TableMetadata
from spark_kms.registry import RegistryEntry, TableRegistry
from spark_kms.settings import KmsSettings

__all__ = ["EraseReport", "KeyService", "TableStatus", "WriteKeys", "master_key_label"]

log = logging.getLogger(__name__)

KEK_BYTES = 32


def master_key_label(table: str, table_id: str, version: int) -> str:
    """Return the HSM label of a table's master key version."""
    return f"spark_kms/{table}/{table_id}/v{version}"


def _master_key_prefix(table: str, table_id: str) -> str:
    return f"spark_kms/{table}/{table_id}/"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _kek_aad(table_id: str, kek_id: str) -> bytes:
    # Binds a wrapped KEK to its table and id, so a record moved to another
    # table or renamed fails authentication.
    return f"spark_kms:kek:{table_id}:{kek_id}".encode()


@dataclass
class WriteKeys:
    """KEKs minted for one write job: the key id of each key group, and the keys."""

    job_id: str
    kek_ids: dict[str, str]
    keys: JobKeys


@dataclass
class TableStatus:
    """What ``spark-kms status`` shows of a table."""

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


@dataclass
class EraseReport:
    """Outcome of a crypto-erasure."""

    table: str
    table_id: str
    destroyed_objects: int
    remaining_objects: int
    seconds: float


class KeyService:
    """Key lifecycle of spark_kms tables, backed by one HSM token.

    :param settings: where the HSM, registry and audit log are.
    :param hsm: an open :class:`Hsm`; by default one is opened from ``settings``
        on first use.
    """

    def __init__(self, settings: KmsSettings, *, hsm: Hsm | None = None) -> None:
        self.settings = settings
        self.registry = TableRegistry(settings.registry_dir)
        self.audit = AuditLog(settings.audit_log)
        self._hsm = hsm
        self._hsm_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"KeyService(token={self.settings.token_label!r}, registry={self.settings.registry_dir!r})"

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

    @contextmanager
    def _registry_lock(self) -> Iterator[None]:
        # Serializes table creation and erasure among the driver's processes.
        os.makedirs(self.settings.registry_dir, exist_ok=True)
        with open(os.path.join(self.settings.registry_dir, ".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def open_table_for_write(self, table: str, location: str) -> tuple[TableMetadata, KeyringStore]:
        """Return the metadata of ``table`` at ``location``, creating the table if new.

        :raises TableErasedError: if the table was erased.
        :raises ConfigurationError: if the name is registered at another location,
            or the location holds another table.
        """
        check_name("table", table)
        store = KeyringStore(location)
        with self._registry_lock():
            entry = self.registry.get(table)
            meta = store.read_metadata()
            if entry is not None and entry.state == "erased":
                raise TableErasedError(table, "choose a new table name to write new data")
            if meta is not None and meta.state == "erased":
                raise TableErasedError(meta.table, f"location {store.location}")
            if entry is not None and entry.location != store.location:
                raise ConfigurationError(
                    f"table '{table}' is registered at {entry.location}, not {store.location}; "
                    "use that location or another table name"
                )
            if meta is not None and meta.table != table:
                raise ConfigurationError(
                    f"{store.location} holds table '{meta.table}', not '{table}'; "
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
            if meta is None:
                meta = self._create_table(table, store)
        return meta, store

    def _create_table(self, table: str, store: KeyringStore) -> TableMetadata:
        table_id = uuid.uuid4().hex
        label = master_key_label(table, table_id, 1)
        self.hsm.generate_master_key(label)
        meta = TableMetadata(
            table=table,
            table_id=table_id,
            state="active",
            master_key_label=label,
            master_key_version=1,
            created_at=_now(),
        )
        store.write_metadata(meta)
        self.registry.put(
            RegistryEntry(
                table=table,
                table_id=table_id,
                location=store.location,
                state="active",
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

    def mint_keks(
        self,
        meta: TableMetadata,
        store: KeyringStore,
        groups: Iterable[str],
        *,
        job_id: str | None = None,
    ) -> WriteKeys:
        """Mint one KEK per key group, wrap each in the HSM and persist its record.

        This is one HSM call per group, whatever the number of files the job writes.
        """
        job_id = job_id or uuid.uuid4().hex[:16]
        kek_ids: dict[str, str] = {}
        keys: dict[str, bytes] = {}
        for group in sorted(set(groups)):
            check_name("key group", group)
            kek_id = f"{meta.table}.{group}.k{job_id}"
            kek = os.urandom(KEK_BYTES)
            try:
                wrapped = self.hsm.encrypt(
                    meta.master_key_label, kek, _kek_aad(meta.table_id, kek_id)
                )
            except KeyNotFoundError:
                self.audit.append(
                    "wrap_kek",
                    table=meta.table,
                    outcome="failed: master key missing",
                    kek_ids=[kek_id],
                )
                raise TableErasedError(
                    meta.table, "its master key is missing from the token"
                ) from None
            store.put_kek_record(
                KekRecord(
                    kek_id=kek_id,
                    table=meta.table,
                    table_id=meta.table_id,
                    group=group,
                    job_id=job_id,
                    created_at=_now(),
                    master_key_label=meta.master_key_label,
                    master_key_version=meta.master_key_version,
                    wrapped_kek=base64.b64encode(wrapped).decode("ascii"),
                )
            )
            self.audit.append(
                "wrap_kek",
                table=meta.table,
                outcome="ok",
                key_label=meta.master_key_label,
                key_version=meta.master_key_version,
                kek_ids=[kek_id],
                job_id=job_id,
            )
            kek_ids[group] = kek_id
            keys[kek_id] = kek
        return WriteKeys(job_id=job_id, kek_ids=kek_ids, keys=JobKeys(keys))

    def open_table_for_read(self, location: str) -> tuple[TableMetadata, KeyringStore]:
        """Return the metadata of the table at ``location``.

        :raises TableNotFoundError: if the location holds no spark_kms table.
        :raises TableErasedError: if the table was erased.
        """
        store = KeyringStore(location)
        meta = store.read_metadata()
        if meta is None:
            raise TableNotFoundError(
                f"{store.location} holds no spark_kms table ({store.keyring}/table.json is missing); "
                "write it with format 'kms_parquet' first"
            )
        entry = self.registry.get(meta.table)
        if meta.state == "erased" or (
            entry is not None and entry.state == "erased" and entry.table_id == meta.table_id
        ):
            raise TableErasedError(meta.table)
        return meta, store

    def unwrap_keks(
        self,
        meta: TableMetadata,
        store: KeyringStore,
        kek_ids: Iterable[str],
        *,
        job_id: str | None = None,
    ) -> JobKeys:
        """Unwrap each KEK in ``kek_ids`` once in the HSM.

        :raises TableErasedError: if the master key that wrapped a KEK is gone.
        :raises IntegrityError: if a KEK record was changed.
        :raises KeyNotFoundError: if a KEK record is missing.
        """
        keys: dict[str, bytes] = {}
        for kek_id in sorted(set(kek_ids)):
            record = store.get_kek_record(kek_id)
            if record.table_id != meta.table_id:
                raise IntegrityError(
                    f"KEK record {kek_id} belongs to table id {record.table_id}, not {meta.table_id}"
                )
            try:
                wrapped = base64.b64decode(record.wrapped_kek, validate=True)
            except ValueError:
                raise IntegrityError(
                    f"KEK record {kek_id} holds a wrapped key that is not valid base64"
                ) from None
            try:
                keys[kek_id] = self.hsm.decrypt(
                    record.master_key_label, wrapped, _kek_aad(meta.table_id, kek_id)
                )
            except KeyNotFoundError:
                self.audit.append(
                    "unwrap_kek",
                    table=meta.table,
                    outcome="failed: master key missing",
                    kek_ids=[kek_id],
                    job_id=job_id,
                )
                raise TableErasedError(
                    meta.table, f"master key {record.master_key_label} is missing from the token"
                ) from None
            except IntegrityError:
                self.audit.append(
                    "unwrap_kek",
                    table=meta.table,
                    outcome="failed: integrity",
                    kek_ids=[kek_id],
                    job_id=job_id,
                )
                raise IntegrityError(
                    f"KEK record {kek_id} of table '{meta.table}' failed authentication in the HSM: "
                    "the record was changed; restore it from backup"
                ) from None
            self.audit.append(
                "unwrap_kek",
                table=meta.table,
                outcome="ok",
                key_label=record.master_key_label,
                key_version=record.master_key_version,
                kek_ids=[kek_id],
                job_id=job_id,
            )
        return JobKeys(keys)

    def erase_table(self, table: str) -> EraseReport:
        """Crypto-erase ``table``: tombstone it, then destroy every master key version.

        Safe to call again after a failure: a tombstoned table keeps its state and
        the remaining key objects are destroyed.

        :raises TableNotFoundError: if the table was never registered.
        :raises HsmUnavailableError: if a key object could not be destroyed, or
            is still present afterwards; the table stays tombstoned, so retry.
        """
        started = time.monotonic()
        with self._registry_lock():
            entry = self.registry.get(table)
            if entry is None:
                raise TableNotFoundError(
                    f"no table '{table}' in the registry {self.settings.registry_dir}"
                )
            erased_at = entry.erased_at or _now()

            # 1. Tombstone first: from here on no KEK is minted and no key created.
            entry.state = "erased"
            entry.erased_at = erased_at
            self.registry.put(entry)
            self._tombstone_keyring(entry, erased_at)

            # 2. Destroy every master key version, then confirm with a new session.
            prefix = _master_key_prefix(table, entry.table_id)
            labels = self.hsm.list_key_labels(prefix)
            destroyed = 0
            try:
                for label in labels:
                    destroyed += self.hsm.destroy_keys(label)
            except SparkKmsError as error:
                self.audit.append(
                    "erase", table=table, outcome=f"failed: {error}", table_id=entry.table_id
                )
                raise
            remaining = sum(self.hsm.count_keys(label, fresh_session=True) for label in labels)
            remaining += len(self.hsm.list_key_labels(prefix))
            report = EraseReport(
                table, entry.table_id, destroyed, remaining, time.monotonic() - started
            )
            if remaining:
                self.audit.append(
                    "erase",
                    table=table,
                    outcome="failed: key objects remain",
                    table_id=entry.table_id,
                )
                raise HsmUnavailableError(
                    f"erasure of table '{table}' is incomplete: {remaining} key object(s) remain in "
                    f"token '{self.settings.token_label}'; run the erase again"
                )
        self.audit.append(
            "erase",
            table=table,
            outcome="ok",
            table_id=entry.table_id,
            key_labels=labels,
            destroyed_objects=destroyed,
        )
        log.info("crypto-erased table %s: destroyed %d master key object(s)", table, destroyed)
        return report

    def _tombstone_keyring(self, entry: RegistryEntry, erased_at: str) -> None:
        try:
            store = KeyringStore(entry.location)
            meta = store.read_metadata()
        except (OSError, SparkKmsError) as error:
            # The registry tombstone is what prevents re-creation; the keyring copy
            # only makes the state visible beside the data.
            log.warning("could not mark the keyring of table %s as erased: %s", entry.table, error)
            return
        if meta is not None and meta.table_id == entry.table_id and meta.state != "erased":
            meta.state = "erased"
            meta.erased_at = erased_at
            store.write_metadata(meta)

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
        return TableStatus(
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
        )

    def list_tables(self) -> list[RegistryEntry]:
        """Return every registered table, erased ones included."""
        return self.registry.entries()
