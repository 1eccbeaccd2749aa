"""Re-key: rewrite a table's files with new DEKs under new KEKs, as a Spark job.

For a suspected leak of a KEK or a DEK. Rotation cannot help there, because it
keeps the KEKs and the DEKs; a rekey replaces both and leaves the master keys
as they are.

1. The driver lists the table's files and the commit records that name them,
   mints new KEKs (one per key group, per partition in a partitioned table)
   and unwraps the old ones once.
2. A Spark job rewrites each file in one task: it decrypts the file with the
   old KEKs and writes a copy with fresh DEKs under the new KEKs into
   ``_spark_kms_staging/<job id>/``, keeping the file's column key groups and
   partition folder.
3. Under the table lock the driver writes a journal (``_spark_kms/rekey.json``)
   and commit records for the new files, moves the new files in and deletes
   the old ones. Only then does it delete the old KEK records and commit
   records that no committed file needs any more. A rekey that stops after the
   journal was written is finished the next time a job opens the table or a
   rekey runs.

Files that a commit record lists as ``replaced`` (an overwrite failed to delete
them) are not part of the table. The rekey does not rewrite them but deletes
them if it can, and lists those it cannot delete as ``replaced`` in its own
commit record, so that readers keep skipping them.

Files of erased partitions cannot be decrypted and are left as they are.
Files appended while the rekey runs keep their own, new KEKs.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from spark_kms.errors import CommitError, IntegrityError, InvalidOptionError
from spark_kms.jobkeys import JobKeys
from spark_kms.keyring import CommitRecord, KeyringStore, TableMetadata, resolve_location
from spark_kms.options import TABLE_GROUP
from spark_kms.parquet_crypto import (
    is_encrypted_file,
    leaf_paths,
    open_encrypted_dataset,
    resolve_column_paths,
    write_encrypted_file,
)
from spark_kms.partitioning import partition_kek_ids, partition_of, partition_plan
from spark_kms.policy import ADMIN

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from spark_kms.keyservice import KeyService

__all__ = ["RekeyReport", "finish_pending_rekey", "rekey_table"]

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]


@dataclass
class RekeyReport:
    """Outcome of a rekey: files rewritten, KEKs replaced, time taken."""

    table: str
    job_id: str
    files: int
    rows: int
    new_kek_ids: list[str]
    removed_kek_ids: list[str]
    skipped_files: int
    seconds: float


@dataclass
class RekeyTask:
    """One file to rewrite; pickled to an executor with the KEKs it needs.

    :param column_keys: key group to the columns it covers, as the file was written.
    :param new_kek_ids: key group to the id of its new KEK.
    """

    location: str
    relative: str
    staged: str
    job_id: str
    old_keys: JobKeys
    new_keys: JobKeys
    new_kek_ids: dict[str, str]
    column_keys: dict[str, list[str]]

    def __repr__(self) -> str:
        return f"RekeyTask(relative={self.relative!r}, job_id={self.job_id!r})"


def rekey_table(
    spark: SparkSession,
    table: str,
    *,
    service: KeyService | None = None,
    progress: ProgressCallback | None = None,
) -> RekeyReport:
    """Rewrite every readable file of ``table`` with new DEKs under new KEKs.

    :param service: by default the key service :func:`spark_kms.configure`
        set up for ``spark``.
    :param progress: called with (files rewritten, files in total) as the
        Spark job advances, from a background thread.
    :raises AccessDeniedError: if the policy denies ``admin``.
    :raises TableErasedError: if the table is erased.
    :raises TablePendingDeletionError: if it is scheduled for deletion.
    :raises IntegrityError: if a file is named by no commit record.
    :raises CommitError: if a rewritten file is not encrypted; nothing is replaced.
    """
    from spark_kms.spark import _service_of

    started = time.monotonic()
    service = service or _service_of(spark)
    service.authorize(table, ADMIN, action="rekey")
    entry, _meta, store = service.registered_table(table)
    meta, store = service.check_writable(table, entry.location)
    finish_pending_rekey(service, store)

    job_id = uuid.uuid4().hex[:16]
    tasks, old_commits, replaced, skipped = _plan(service, meta, store, job_id)
    log.info(
        "rekey job %s on table %s: %d file(s) to rewrite, %d replaced file(s) to delete",
        job_id,
        table,
        len(tasks),
        len(replaced),
    )
    if not tasks:
        # The commit records that list the replaced files stay, so readers keep skipping them.
        _delete_replaced(store, table, job_id, replaced)
        return RekeyReport(table, job_id, 0, 0, [], [], skipped, time.monotonic() - started)

    staging = f"{store.staging_root}/{job_id}"
    try:
        results = _run_job(spark, tasks, table, job_id, progress)
        journal = _journal(store, meta, tasks, results, old_commits, replaced, job_id, staging)
        with service.table_lock(table):
            service.check_writable(table, store.location)
            store.write_rekey_journal(journal)
            removed = _apply_journal(service, store, journal, table)
    except BaseException:
        if store.read_rekey_journal() is None:
            _delete_dir(store, staging)
            service.audit.append("rekey", table=table, outcome="failed", job_id=job_id)
        raise

    new_ids = sorted({kek_id for task in tasks for kek_id in task.new_kek_ids.values()})
    rows = sum(rows for _relative, _staged, rows in results)
    report = RekeyReport(
        table, job_id, len(results), rows, new_ids, removed, skipped, time.monotonic() - started
    )
    service.audit.append(
        "rekey",
        table=table,
        outcome="ok",
        job_id=job_id,
        kek_ids=new_ids,
        removed_kek_ids=removed,
        files=len(results),
        rows=rows,
    )
    log.info(
        "rekey job %s on table %s: %d file(s), %d row(s) rewritten, %d old KEK record(s) "
        "removed, %.1f s",
        job_id,
        table,
        len(results),
        rows,
        len(removed),
        report.seconds,
    )
    return report


def _plan(
    service: KeyService, meta: TableMetadata, store: KeyringStore, job_id: str
) -> tuple[list[RekeyTask], list[CommitRecord], list[str], int]:
    # Returns the tasks and the commit records whose files they replace or
    # delete. Also returns the files an overwrite replaced but did not delete,
    # and the number of files skipped because their partition is erased.
    # Delta Lake's log names the data files, so renaming them would break the table.
    delta_log = store.filesystem.get_file_info(f"{store.location}/_delta_log")
    if delta_log.type != pafs.FileType.NotFound:
        raise InvalidOptionError(
            f"table '{meta.table}' is a Delta table (it has a _delta_log folder), and rekey "
            "renames the files that Delta's log names; rewrite a Delta table with a new job "
            "instead"
        )
    erased = set(service.erased_partitions(store.location)) if meta.partition_by else set()
    records = store.list_commit_records()
    # Readers skip the files that any commit record lists as replaced, so the
    # rekey must not rewrite them under new names, which readers would not skip.
    replaced_names = {name for record in records for name in record.replaced}
    files = store.list_data_files()
    replaced = [name for name in files if name in replaced_names]
    current = [name for name in files if name not in replaced_names]
    live = [name for name in current if partition_of(name) not in erased]
    by_file = {name: record for record in records for name in record.files}
    unknown = [name for name in live if name not in by_file]
    if unknown:
        raise IntegrityError(
            f"{len(unknown)} file(s) of table '{meta.table}' are named by no commit record "
            f"({', '.join(unknown[:5])}), so rekey cannot tell their keys and column groups. "
            "rekey rewrites tables written with format 'kms_parquet'; rewrite a table written "
            "through Spark's Parquet writer or Delta Lake with a new job, and check stray files "
            f"with 'spark-kms verify {meta.table}'"
        )
    column_keys = {name: _column_keys(store, by_file[name]) for name in live}

    # New KEKs: one per key group, per partition folder in a partitioned table.
    groups_by_folder: dict[str | None, set[str]] = {}
    for name in live:
        folder = partition_of(name) if meta.partition_by else None
        groups_by_folder.setdefault(folder, {TABLE_GROUP}).update(column_keys[name])
    new_keys: dict[str | None, Any] = {}
    for folder, groups in sorted(groups_by_folder.items(), key=lambda item: item[0] or ""):
        if folder is None:
            new_keys[None] = service.mint_keks(meta, store, groups, job_id=job_id)
        else:
            new_keys[folder] = service.mint_partition_keks(
                meta, store, folder, groups, job_id=job_id
            )

    old_ids = {
        name: partition_kek_ids(partition_of(name) if meta.partition_by else None, by_file[name].kek_ids)
        for name in live
    }
    old_keys = service.unwrap_keks(
        meta, store, {kek_id for ids in old_ids.values() for kek_id in ids}, job_id=job_id
    )

    tasks = []
    for number, name in enumerate(live):
        folder = partition_of(name) if meta.partition_by else None
        minted = new_keys[folder]
        staged_name = f"part-{number:05d}-{job_id}-{uuid.uuid4().hex[:12]}.parquet"
        tasks.append(
            RekeyTask(
                location=store.location,
                relative=name,
                staged=f"{folder}/{staged_name}" if folder else staged_name,
                job_id=job_id,
                old_keys=old_keys.subset(old_ids[name]),
                new_keys=minted.keys.subset(
                    minted.kek_ids[group] for group in (TABLE_GROUP, *column_keys[name])
                ),
                new_kek_ids={
                    group: minted.kek_ids[group] for group in (TABLE_GROUP, *column_keys[name])
                },
                column_keys=column_keys[name],
            )
        )
    # The records of replaced files go too, once their files are deleted,
    # because the overwrite record that listed them is deleted with its files.
    old_commits_by_id = {by_file[name].job_id: by_file[name] for name in live}
    for record in records:
        if any(name in replaced_names for name in record.files):
            old_commits_by_id[record.job_id] = record
    old_commits = sorted(old_commits_by_id.values(), key=lambda r: r.job_id)
    return tasks, old_commits, replaced, len(current) - len(live)


def _column_keys(store: KeyringStore, record: CommitRecord) -> dict[str, list[str]]:
    # The column key groups a committed job used. Records written before the
    # groups were stored are accepted when the job used the table group only.
    if record.column_keys is not None:
        return record.column_keys
    groups = {store.get_kek_record(kek_id).group for kek_id in record.kek_ids}
    if groups <= {TABLE_GROUP}:
        return {}
    raise InvalidOptionError(
        f"commit record {record.job_id} does not store which columns its key groups "
        f"{', '.join(sorted(groups - {TABLE_GROUP}))} cover, so rekey cannot rewrite its files; "
        "rewrite the table with mode('overwrite') and the same kms.column_keys instead"
    )


def _run_job(
    spark: SparkSession,
    tasks: list[RekeyTask],
    table: str,
    job_id: str,
    progress: ProgressCallback | None,
) -> list[tuple[str, str, int]]:
    from spark_kms.spark import typed_errors

    context = spark.sparkContext
    group = f"spark_kms-rekey-{job_id}"
    context.setJobGroup(group, f"spark-kms rekey {table}")
    stop = threading.Event()
    watcher = None
    if progress is not None:
        watcher = threading.Thread(
            target=_report_progress, args=(context, group, len(tasks), progress, stop), daemon=True
        )
        watcher.start()
    try:
        with typed_errors():
            results: list[tuple[str, str, int]] = (
                context.parallelize(tasks, len(tasks)).map(rewrite_file).collect()
            )
    finally:
        stop.set()
        if watcher is not None:
            watcher.join()
        context.setLocalProperty("spark.jobGroup.id", None)  # type: ignore[arg-type]
        context.setLocalProperty("spark.job.description", None)  # type: ignore[arg-type]
    if progress is not None:
        progress(len(results), len(tasks))
    return results


def _report_progress(
    context: Any, group: str, total: int, progress: ProgressCallback, stop: threading.Event
) -> None:
    # Polls Spark's status tracker; it only reads, so a failure here is logged
    # and never stops the job.
    last = -1
    while not stop.wait(0.5):
        try:
            tracker = context.statusTracker()
            done = 0
            for job in tracker.getJobIdsForGroup(group):
                info = tracker.getJobInfo(job)
                for stage in info.stageIds if info else []:
                    stage_info = tracker.getStageInfo(stage)
                    done += stage_info.numCompletedTasks if stage_info else 0
        except Exception as error:  # noqa: BLE001 (progress is best effort)
            log.debug("rekey progress unavailable: %s", error)
            continue
        if done != last and done < total:
            progress(done, total)
            last = done


def rewrite_file(task: RekeyTask) -> tuple[str, str, int]:
    """Rewrite one file with fresh DEKs under the new KEKs (runs on an executor).

    :returns: the file's path, the staged copy's path (both relative) and its rows.
    :raises IntegrityError: if the copy is not encrypted or has another row count.
    """
    filesystem, location = resolve_location(task.location)
    source = f"{location}/{task.relative}"
    target = f"{location}/_spark_kms_staging/{task.job_id}/{task.staged}"
    dataset = open_encrypted_dataset([source], keys=task.old_keys, filesystem=filesystem, job_id=task.job_id)
    schema = dataset.schema
    expected = dataset.count_rows()
    grouped_paths = {
        group: [path for leaves in resolve_column_paths(schema, columns).values() for path in leaves]
        for group, columns in task.column_keys.items()
    }
    plan = partition_plan(
        job_id=task.job_id,
        table_group=TABLE_GROUP,
        keys={group: (kek_id, task.new_keys.kek(kek_id)) for group, kek_id in task.new_kek_ids.items()},
        grouped_paths=grouped_paths,
        leaves=leaf_paths(schema),
    )
    filesystem.create_dir(target.rsplit("/", 1)[0], recursive=True)
    rows, _schema = write_encrypted_file(
        dataset.to_batches(batch_size=65536), target, plan=plan, filesystem=filesystem, schema=schema
    )
    if rows != expected or not is_encrypted_file(filesystem, target):
        raise IntegrityError(
            f"the rewritten copy of {task.relative} has {rows} of {expected} rows or is not "
            "encrypted; the rekey replaces nothing"
        )
    return task.relative, task.staged, rows


def _journal(
    store: KeyringStore,
    meta: TableMetadata,
    tasks: list[RekeyTask],
    results: list[tuple[str, str, int]],
    old_commits: list[CommitRecord],
    replaced: list[str],
    job_id: str,
    staging: str,
) -> dict[str, Any]:
    # Fail closed: every staged copy must be in encrypted-footer mode.
    plaintext = [
        staged for _relative, staged, _rows in results
        if not is_encrypted_file(store.filesystem, f"{staging}/{staged}")
    ]
    if plaintext:
        raise CommitError(
            f"rekey job {job_id} staged {len(plaintext)} file(s) that are not encrypted "
            f"({', '.join(plaintext[:5])}); nothing of table '{meta.table}' was replaced"
        )

    # One new commit record per column key layout, so that a later rekey finds the groups.
    rows_by_file = {relative: rows for relative, _staged, rows in results}
    layouts: dict[str, CommitRecord] = {}
    for task in tasks:
        layout = repr(sorted(task.column_keys.items()))
        record = layouts.get(layout)
        if record is None:
            record = CommitRecord(
                job_id=f"{job_id}-{len(layouts)}",
                committed_at=_now_text(),
                mode="rekey",
                files=[],
                kek_ids=[],
                column_keys=task.column_keys,
            )
            layouts[layout] = record
        record.files.append(task.staged)
        record.kek_ids = sorted(set(record.kek_ids) | set(task.new_kek_ids.values()))
        record.rows += rows_by_file[task.relative]
    return {
        "job_id": job_id,
        "staging": staging,
        "swaps": [{"old": relative, "new": staged} for relative, staged, _rows in results],
        "commits": [asdict(record) for record in layouts.values()],
        "old_commit_ids": [record.job_id for record in old_commits],
        "old_kek_ids": sorted({kek_id for record in old_commits for kek_id in record.kek_ids}),
        "replaced": replaced,
    }


def finish_pending_rekey(service: KeyService, store: KeyringStore) -> list[str]:
    """Finish a rekey that stopped after writing its journal; return the KEK ids removed.

    Does nothing when there is no journal.
    """
    if store.read_rekey_journal() is None:
        return []
    meta = store.read_metadata()
    if meta is None:
        return []
    with service.table_lock(meta.table):
        journal = store.read_rekey_journal()
        if journal is None:
            return []
        log.warning(
            "table %s: finishing rekey job %s, which stopped while committing",
            meta.table,
            journal.get("job_id"),
        )
        return _apply_journal(service, store, journal, meta.table)


def _apply_journal(
    service: KeyService, store: KeyringStore, journal: dict[str, Any], table: str
) -> list[str]:
    # Every step can run again after a crash: called under the table lock.
    try:
        job_id = str(journal["job_id"])
        commits = [CommitRecord(**record) for record in journal["commits"]]
        swaps = [(str(swap["old"]), str(swap["new"])) for swap in journal["swaps"]]
        staging = str(journal["staging"])
        old_commit_ids = [str(job) for job in journal["old_commit_ids"]]
        old_kek_ids = [str(kek_id) for kek_id in journal["old_kek_ids"]]
        # Journals written before replaced files were handled have no such list.
        replaced = [str(name) for name in journal.get("replaced", [])]
    except (KeyError, TypeError) as error:
        raise IntegrityError(
            f"the rekey journal {store.keyring}/rekey.json is not valid ({error}); restore the "
            "keyring from backup"
        ) from None
    filesystem = store.filesystem

    # 1. Delete the files an overwrite replaced. Until step 4 deletes the old
    #    commit records, those records keep readers away from them. Afterwards
    #    the first new record lists the files that could not be deleted.
    undeleted = _delete_replaced(store, table, job_id, replaced)
    if commits:
        commits[0].replaced = sorted(set(commits[0].replaced) | set(undeleted))

    # 2. New commit records first: a moved-in file is never without its KEKs.
    for record in commits:
        store.put_commit_record(record)

    # 3. Move each new file in, then delete the file it replaces.
    for old, new in swaps:
        staged, target = f"{staging}/{new}", f"{store.location}/{new}"
        if _exists(filesystem, staged) and not _exists(filesystem, target):
            filesystem.create_dir(target.rsplit("/", 1)[0], recursive=True)
            filesystem.move(staged, target)
        if _exists(filesystem, target):
            _delete_file(filesystem, f"{store.location}/{old}")
        else:
            log.error("rekey of %s: its new copy %s is missing; the old file is kept", old, new)

    # 4. Old commit records: gone when none of their files remain, else narrowed.
    existing = set(store.list_data_files())
    records = {record.job_id: record for record in store.list_commit_records()}
    for job in old_commit_ids:
        old_record = records.get(job)
        if old_record is None:
            continue
        remaining = [name for name in old_record.files if name in existing]
        if not remaining:
            store.delete_commit_record(job)
            del records[job]
        elif len(remaining) < len(old_record.files):
            kept_ids = {
                kek_id
                for name in remaining
                for kek_id in partition_kek_ids(partition_of(name), old_record.kek_ids)
            }
            records[job] = replace(old_record, files=remaining, kek_ids=sorted(kept_ids))
            store.put_commit_record(records[job])

    # 5. Old KEK records that no committed file needs any more.
    needed = {kek_id for record in records.values() for kek_id in record.kek_ids}
    removed = [kek_id for kek_id in old_kek_ids if kek_id not in needed]
    for kek_id in removed:
        store.delete_kek_record(kek_id)
    store.delete_rekey_journal()
    _delete_dir(store, staging)
    return removed


def _delete_replaced(store: KeyringStore, table: str, job_id: str, names: list[str]) -> list[str]:
    # Best effort: a file that cannot be deleted is logged and returned, not raised,
    # because it is no longer part of the table.
    undeleted = []
    for name in names:
        try:
            _delete_file(store.filesystem, f"{store.location}/{name}")
        except OSError as error:
            log.warning(
                "rekey job %s on table %s: failed to delete %s, which an overwrite replaced "
                "(%s); readers skip it, delete it by hand",
                job_id,
                table,
                name,
                error,
            )
            undeleted.append(name)
    return undeleted


def _exists(filesystem: Any, path: str) -> bool:
    return bool(filesystem.get_file_info(path).type == pafs.FileType.File)


def _delete_file(filesystem: Any, path: str) -> None:
    try:
        filesystem.delete_file(path)
    except FileNotFoundError:
        pass


def _delete_dir(store: KeyringStore, path: str) -> None:
    try:
        store.filesystem.delete_dir(path)
    except FileNotFoundError:
        pass


def _now_text() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
