"""``spark-kms verify``: check that every file of a table is encrypted and decrypts.

For each Parquet file of the table it checks, in this order, and reports the
first failure under the file's name:

1. the file begins and ends with ``PARE`` (encrypted footer mode);
2. its footer key material parses and names a KEK;
3. that KEK has a record in the keyring, and the record unwraps in the HSM;
4. the whole file (footer, every column chunk and page) decrypts and
   authenticates with the table's KEKs.

It also reports KEK records that fail to unwrap, committed files that are
missing, files that no commit record names, and staging folders of jobs that
never finished. The files and KEK records of crypto-erased partitions cannot
decrypt by design, so they are listed as erased and not checked. With
``repair`` it cleans stale staging folders (see :mod:`spark_kms.staging`); it
never changes a data file or a KEK record.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pyarrow as pa

from spark_kms.errors import (
    IntegrityError,
    KeyNotFoundError,
    SparkKmsError,
    TableNotFoundError,
    TableStateError,
)
from spark_kms.footer import read_footer_key_material
from spark_kms.jobkeys import JobKeys
from spark_kms.keyring import KeyringStore, TableMetadata
from spark_kms.keyservice import KeyService
from spark_kms.parquet_crypto import open_encrypted_dataset
from spark_kms.partitioning import partition_id, partition_of
from spark_kms.staging import STALE_AFTER_SECONDS, StagedJob, clean_stale_staging, list_staged_jobs

__all__ = ["FileProblem", "VerifyReport", "verify_location", "verify_table"]

log = logging.getLogger(__name__)


@dataclass
class FileProblem:
    """One problem, with the table-relative name of the file or record it concerns."""

    name: str
    problem: str


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_table`."""

    table: str
    location: str
    files_checked: int = 0
    rows: int = 0
    problems: list[FileProblem] = field(default_factory=list)
    unrecorded_files: list[str] = field(default_factory=list)
    staged_jobs: list[StagedJob] = field(default_factory=list)
    cleaned_jobs: list[StagedJob] = field(default_factory=list)
    erased_partitions: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no file or KEK record has a problem."""
        return not self.problems


def verify_table(
    service: KeyService,
    table: str,
    *,
    repair: bool = False,
    older_than: float = STALE_AFTER_SECONDS,
) -> VerifyReport:
    """Verify the registered table ``table``; see the module docstring.

    :param repair: clean staging folders untouched for ``older_than`` seconds.
    :raises TableNotFoundError: if the table is not registered.
    :raises TableErasedError: if the table was erased.
    """
    entry = service.registry.get(table)
    if entry is None:
        raise TableNotFoundError(
            f"no table '{table}' in the registry {service.settings.registry_dir}"
        )
    return verify_location(service, entry.location, repair=repair, older_than=older_than)


def verify_location(
    service: KeyService,
    location: str,
    *,
    repair: bool = False,
    older_than: float = STALE_AFTER_SECONDS,
) -> VerifyReport:
    """Verify the table stored at ``location``; see :func:`verify_table`."""
    meta, store = service.open_table_for_read(location)
    report = VerifyReport(table=meta.table, location=store.location)

    if repair:
        report.cleaned_jobs = clean_stale_staging(store, older_than=older_than)
    report.staged_jobs = list_staged_jobs(store)

    report.erased_partitions = service.erased_partitions(store.location)
    erased = set(report.erased_partitions)
    keys = _unwrap_every_kek(service, meta, store, report)
    every_file = store.list_data_files()
    files = [name for name in every_file if partition_of(name) not in erased]
    recorded = {name for record in store.list_commit_records() for name in record.files}
    report.unrecorded_files = [name for name in files if name not in recorded]
    for name in sorted(recorded - set(every_file)):
        if not _overwritten(store, name):
            report.problems.append(
                FileProblem(name, "a commit record names this file but it is missing")
            )

    for name in files:
        problem = _check_file(store, name, keys, report)
        if problem is not None:
            report.problems.append(FileProblem(name, problem))
        report.files_checked += 1

    log.info(
        "verified table %s: %d file(s), %d row(s), %d problem(s)",
        meta.table,
        report.files_checked,
        report.rows,
        len(report.problems),
    )
    return report


def _unwrap_every_kek(
    service: KeyService, meta: TableMetadata, store: KeyringStore, report: VerifyReport
) -> dict[str, bytes | None]:
    # One HSM call per KEK record; a record that fails is reported and its
    # files are then reported as undecryptable, without stopping the others.
    keys: dict[str, bytes | None] = {}
    erased = {partition_id(folder) for folder in report.erased_partitions}
    for kek_id in store.list_kek_ids():
        try:
            if erased and store.get_kek_record(kek_id).partition_id in erased:
                continue
            unwrapped = service.unwrap_keks(meta, store, [kek_id], job_id="verify")
        except (IntegrityError, KeyNotFoundError, TableStateError) as error:
            report.problems.append(FileProblem(f"_spark_kms/keks/{kek_id}.json", str(error)))
            keys[kek_id] = None
            continue
        keys[kek_id] = unwrapped.kek(kek_id)
    return keys


def _check_file(
    store: KeyringStore, name: str, keys: dict[str, bytes | None], report: VerifyReport
) -> str | None:
    path = f"{store.location}/{name}"
    try:
        material = read_footer_key_material(store.filesystem, path)
    except SparkKmsError as error:
        return str(error).replace(f"{path}: ", "").replace(path, "the file")
    except OSError as error:
        return f"cannot read the file: {error}"

    if material.kek_id not in keys:
        return f"its footer names KEK {material.kek_id}, which has no record in the keyring"
    if keys[material.kek_id] is None:
        return f"its footer names KEK {material.kek_id}, whose record failed to unwrap"

    usable = JobKeys({k: v for k, v in keys.items() if v is not None})
    try:
        dataset = open_encrypted_dataset(
            [path], keys=usable, filesystem=store.filesystem, job_id="verify"
        )
        table = dataset.to_table()
    except SparkKmsError as error:
        return f"it does not decrypt: {error}"
    except (OSError, pa.ArrowException) as error:
        return f"it does not decrypt: {type(error).__name__}: {error}"
    report.rows += table.num_rows
    return None


def _overwritten(store: KeyringStore, name: str) -> bool:
    # A file of a job that a later overwrite replaced is gone on purpose.
    records = store.list_commit_records()
    named_at = max((r.committed_at, r.job_id) for r in records if name in r.files)
    return any(r.mode == "overwrite" and (r.committed_at, r.job_id) > named_at for r in records)


def format_report(report: VerifyReport) -> list[str]:
    """Return the lines ``spark-kms verify`` prints for ``report``."""
    lines = [f"PROBLEM {p.name}: {p.problem}" for p in report.problems]
    for name in report.unrecorded_files:
        lines.append(f"note {name}: no commit record names this file (written by another path?)")
    for folder in report.erased_partitions:
        lines.append(f"note {folder}: partition crypto-erased, its files are not checked")
    for job in report.cleaned_jobs:
        action = "rolled forward" if job.committed else "removed"
        lines.append(
            f"repaired staging folder of job {job.job_id}: {action} {len(job.files)} file(s)"
        )
    for job in report.staged_jobs:
        state = "committed, rolled forward by --repair" if job.committed else "never committed"
        lines.append(
            f"staged job {job.job_id}: {len(job.files)} file(s), untouched for "
            f"{job.age_seconds:.0f} s ({state})"
        )
    verdict = "OK" if report.ok else f"FAILED, {len(report.problems)} problem(s)"
    lines.append(
        f"table '{report.table}' at {report.location}: {report.files_checked} file(s), "
        f"{report.rows} row(s) decrypted: {verdict}"
    )
    return lines
