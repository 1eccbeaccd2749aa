"""The lifecycle commands of ``spark-kms``: rotate, rekey, scheduled deletion, partition erasure.

:func:`add_lifecycle_commands` adds them to the parser of :mod:`spark_kms.cli`.
The CLI's principal, for the access policy and the audit log, is the OS user.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable

from spark_kms.erasure import (
    DEFAULT_DELETION_DAYS,
    MAX_DELETION_DAYS,
    MIN_DELETION_DAYS,
    display_time,
)
from spark_kms.keyservice import KeyService
from spark_kms.rotation import RotationReport
from spark_kms.settings import KmsSettings

__all__ = ["EXIT_DECLINED", "add_lifecycle_commands", "cli_service", "erase_partition"]

EXIT_DECLINED = 3

SettingsLoader = Callable[[argparse.Namespace], KmsSettings]


def cli_service(settings: KmsSettings, application_id: str | None = None) -> KeyService:
    """Return a key service whose principal is the OS user running the command."""
    return KeyService(settings, principal=getpass.getuser(), application_id=application_id)


def add_lifecycle_commands(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    load_settings: SettingsLoader,
) -> None:
    """Add rotate, set-rotation-period, rekey, schedule-deletion, cancel-deletion and purge-due."""
    rotate = commands.add_parser(
        "rotate",
        help="give a table's master keys a new version and rewrap its KEK records "
        "(data files are not touched)",
    )
    target = rotate.add_mutually_exclusive_group(required=True)
    target.add_argument("table", nargs="?", help="table to rotate now")
    target.add_argument(
        "--due",
        action="store_true",
        help="rotate every table whose rotation period has passed (for a scheduler)",
    )
    rotate.set_defaults(func=lambda args: _rotate(args, load_settings(args)))

    period = commands.add_parser(
        "set-rotation-period", help="set how often a table's master keys rotate by themselves"
    )
    period.add_argument("table")
    period.add_argument("days", type=int, help="period in days, 1 to 3650; 0 turns it off")
    period.set_defaults(func=lambda args: _set_rotation_period(args, load_settings(args)))

    rekey = commands.add_parser(
        "rekey",
        help="rewrite a table's files with new DEKs under new KEKs, as a Spark job "
        "(after a suspected KEK or DEK leak)",
    )
    rekey.add_argument("table")
    rekey.add_argument(
        "--master", help="Spark master URL (default: Spark's own, local[*] outside spark-submit)"
    )
    rekey.set_defaults(func=lambda args: _rekey(args, load_settings(args)))

    schedule = commands.add_parser(
        "schedule-deletion",
        help="crypto-erase a table after a waiting period; reads and writes stop now",
    )
    schedule.add_argument("table")
    schedule.add_argument(
        "--days",
        type=int,
        default=DEFAULT_DELETION_DAYS,
        help=f"waiting period in days, {MIN_DELETION_DAYS} to {MAX_DELETION_DAYS} "
        f"(default {DEFAULT_DELETION_DAYS})",
    )
    schedule.set_defaults(func=lambda args: _schedule_deletion(args, load_settings(args)))

    cancel = commands.add_parser("cancel-deletion", help="cancel a table's scheduled deletion")
    cancel.add_argument("table")
    cancel.set_defaults(func=lambda args: _cancel_deletion(args, load_settings(args)))

    purge = commands.add_parser(
        "purge-due", help="crypto-erase every table whose scheduled deletion is due"
    )
    purge.set_defaults(func=lambda args: _purge_due(load_settings(args)))


def _print_rotation(report: RotationReport) -> None:
    resumed = " (finished an interrupted rotation)" if report.resumed else ""
    print(
        f"rotated table '{report.table}'{resumed}: table master key now version "
        f"{report.table_key_version}, {report.master_keys_rotated} master key(s) given a new "
        f"version, {report.records_rewrapped} of {report.records_total} KEK record(s) rewrapped, "
        f"{report.destroyed_objects} old key object(s) destroyed, {report.hsm_operations} HSM "
        f"call(s), {report.seconds:.3f} s"
    )


def _rotate(args: argparse.Namespace, settings: KmsSettings) -> int:
    service = cli_service(settings)
    if not args.due:
        _print_rotation(service.rotate_table(args.table))
        return 0
    reports = service.rotate_due()
    for report in reports:
        _print_rotation(report)
    if not reports:
        print("no table is due for rotation")
    return 0


def _set_rotation_period(args: argparse.Namespace, settings: KmsSettings) -> int:
    service = cli_service(settings)
    service.set_rotation_period(args.table, args.days)
    status = service.status(args.table)
    if args.days == 0:
        print(f"table '{args.table}': automatic rotation is off")
    else:
        print(
            f"table '{args.table}': rotation period {args.days} day(s), next rotation due "
            f"{display_time(status.rotation_due_at or '')}"
        )
    return 0


def _schedule_deletion(args: argparse.Namespace, settings: KmsSettings) -> int:
    schedule = cli_service(settings).schedule_deletion(args.table, days=args.days)
    print(
        f"table '{args.table}' is scheduled for deletion on {display_time(schedule.due_at)}; "
        f"reads and writes are rejected until then. To keep the table, run "
        f"'spark-kms cancel-deletion {args.table}'"
    )
    return 0


def _cancel_deletion(args: argparse.Namespace, settings: KmsSettings) -> int:
    cli_service(settings).cancel_deletion(args.table)
    print(f"deletion of table '{args.table}' cancelled; the table can be read and written again")
    return 0


def _purge_due(settings: KmsSettings) -> int:
    reports = cli_service(settings).purge_due()
    for report in reports:
        print(
            f"erased table '{report.table}' (deletion due): destroyed {report.destroyed_objects} "
            f"master key object(s), {report.remaining_objects} remain"
        )
    if not reports:
        print("no table deletion is due")
    return 0


def erase_partition(args: argparse.Namespace, service: KeyService) -> int:
    """Run ``spark-kms erase TABLE --partition COLUMN=VALUE``, with a confirmation."""
    if not args.yes:
        if not sys.stdin.isatty():
            print("erase needs confirmation: run it in a terminal or pass --yes", file=sys.stderr)
            return EXIT_DECLINED
        print(
            f"This destroys the master key of partition {args.partition} of table "
            f"'{args.table}'. Its files become unreadable forever; the other partitions stay."
        )
        answer = input(f"Type the partition '{args.partition}' to confirm: ")
        if answer.strip() != args.partition:
            print("erase cancelled", file=sys.stderr)
            return EXIT_DECLINED
    report = service.erase_partition(args.table, args.partition)
    print(
        f"erased partition {report.partition} of table '{report.table}': destroyed "
        f"{report.destroyed_objects} master key object(s), {report.remaining_objects} remain "
        f"(checked with a new session), {report.seconds:.3f} s"
    )
    return 0


def _rekey(args: argparse.Namespace, settings: KmsSettings) -> int:
    from pyspark.sql import SparkSession

    from spark_kms.rekey import rekey_table
    from spark_kms.spark import configure

    # Spark's Python workers must run this interpreter, which has spark_kms.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    created = SparkSession.getActiveSession() is None
    builder = SparkSession.builder.appName(f"spark-kms rekey {args.table}")
    if args.master:
        builder = builder.master(args.master)
    spark = builder.config("spark.ui.showConsoleProgress", "false").getOrCreate()
    try:
        configure(spark, settings)
        service = cli_service(settings, spark.sparkContext.applicationId)

        def progress(done: int, total: int) -> None:
            print(f"rekey {args.table}: {done}/{total} file(s) rewritten", flush=True)

        report = rekey_table(spark, args.table, service=service, progress=progress)
    finally:
        if created:
            spark.stop()
    print(
        f"rekeyed table '{report.table}': {report.files} file(s) and {report.rows} row(s) "
        f"rewritten with new DEKs under {len(report.new_kek_ids)} new KEK(s), "
        f"{len(report.removed_kek_ids)} old KEK record(s) removed"
        + (f", {report.skipped_files} file(s) of erased partitions left as they are" if report.skipped_files else "")
        + f", {report.seconds:.1f} s"
    )
    return 0
