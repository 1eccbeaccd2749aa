"""Staged files left behind by write jobs whose driver died.

A write job stages its files in ``<table>/_spark_kms_staging/<job id>/`` and
its commit moves them into place. A driver killed before the commit record is
written leaves a staging folder that no reader looks at: the job never
happened, so its files are removed. A driver killed after the commit record is
written and before every file was moved leaves a committed job half in place:
recovery rolls it forward by moving the rest of its files.

Both the next write to the table and ``spark-kms verify --repair`` call
:func:`clean_stale_staging`. Only a folder untouched for ``older_than``
seconds counts as stale, because a folder that changed recently may belong to
a job that is still running.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow.fs as pafs

from spark_kms.keyring import CommitRecord, KeyringStore

__all__ = ["STALE_AFTER_SECONDS", "StagedJob", "clean_stale_staging", "list_staged_jobs"]

log = logging.getLogger(__name__)

# NOTE: a job whose tasks all finished more than this long before its commit
# would lose its staged files to another job's cleanup and fail to commit.
STALE_AFTER_SECONDS = 24 * 3600


@dataclass
class StagedJob:
    """One job's staging folder: its files (relative paths), age, and whether it committed."""

    job_id: str
    path: str
    files: list[str]
    age_seconds: float
    committed: bool


def list_staged_jobs(store: KeyringStore) -> list[StagedJob]:
    """Return every staging folder of the table at ``store``, oldest first."""
    filesystem = store.filesystem
    committed = {record.job_id for record in store.list_commit_records()}
    selector = pafs.FileSelector(store.staging_root, allow_not_found=True)
    now = time.time()
    jobs = []
    for folder in filesystem.get_file_info(selector):
        if folder.type != pafs.FileType.Directory:
            continue
        inner = filesystem.get_file_info(pafs.FileSelector(folder.path, recursive=True))
        # Relative to the job's folder: a partitioned job stages "col=value/part-....parquet".
        files = sorted(
            i.path[len(folder.path) + 1 :] for i in inner if i.type == pafs.FileType.File
        )
        newest = max([_mtime(folder), *(_mtime(i) for i in inner)])
        jobs.append(
            StagedJob(
                job_id=folder.base_name,
                path=folder.path,
                files=files,
                age_seconds=max(0.0, now - newest),
                committed=folder.base_name in committed,
            )
        )
    return sorted(jobs, key=lambda job: -job.age_seconds)


def clean_stale_staging(
    store: KeyringStore, *, older_than: float = STALE_AFTER_SECONDS
) -> list[StagedJob]:
    """Remove or roll forward every staging folder untouched for ``older_than`` seconds.

    :returns: the staging folders that were cleaned.
    """
    cleaned = []
    records = {record.job_id: record for record in store.list_commit_records()}
    for job in list_staged_jobs(store):
        if job.age_seconds < older_than:
            continue
        record = records.get(job.job_id)
        if record is not None:
            _roll_forward(store, job, record, list(records.values()))
        store.filesystem.delete_dir(job.path)
        log.warning(
            "%s staging folder of job %s in table %s: %d file(s), untouched for %.0f s",
            "rolled forward" if record is not None else "removed",
            job.job_id,
            store.location,
            len(job.files),
            job.age_seconds,
        )
        cleaned.append(job)
    return cleaned


def _roll_forward(
    store: KeyringStore, job: StagedJob, record: CommitRecord, records: list[CommitRecord]
) -> None:
    filesystem = store.filesystem
    for name in record.files:
        if name in job.files:
            if "/" in name:
                filesystem.create_dir(f"{store.location}/{name.rsplit('/', 1)[0]}")
            filesystem.move(f"{job.path}/{name}", f"{store.location}/{name}")
    if record.mode != "overwrite":
        return

    # An overwrite replaces every file committed before it.
    # NOTE: a file that no commit record names is left in place.
    replacing = set(record.files)
    present = set(store.list_data_files())
    for earlier in records:
        if (earlier.committed_at, earlier.job_id) >= (record.committed_at, record.job_id):
            continue
        for name in earlier.files:
            if name in present and name not in replacing:
                filesystem.delete_file(f"{store.location}/{name}")


def _mtime(info: pafs.FileInfo) -> float:
    stamp = info.mtime
    if stamp is None:
        return time.time()
    if isinstance(stamp, datetime):
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=timezone.utc)
        return stamp.timestamp()
    return float(stamp)
