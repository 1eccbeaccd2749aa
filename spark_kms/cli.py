"""The ``spark-kms`` command line: key lifecycle of spark_kms tables.

Settings come from ``--conf-file`` or the file named by ``SPARK_KMS_CONF``
(``spark.kms.*`` properties). Exit codes: 0 success, 1 a spark_kms error,
2 a usage error, 3 the operator declined a confirmation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict

from spark_kms.audit import AuditLog, parse_time, verify_chain
from spark_kms.cli_lifecycle import add_lifecycle_commands, cli_service, erase_partition
from spark_kms.errors import SparkKmsError
from spark_kms.keylabels import versions_in_scope
from spark_kms.keyservice import KeyService
from spark_kms.settings import KmsSettings

__all__ = ["main"]

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DECLINED = 3


def _settings(args: argparse.Namespace) -> KmsSettings:
    if args.conf_file:
        return KmsSettings.from_file(args.conf_file)
    return KmsSettings.from_environment()


def _cmd_init(args: argparse.Namespace) -> int:
    settings = _settings(args)
    service = KeyService(settings)
    service.hsm  # noqa: B018 (logs in and checks the mechanisms)
    os.makedirs(settings.registry_dir, exist_ok=True)
    audit_folder = os.path.dirname(settings.audit_log)
    if audit_folder:
        os.makedirs(audit_folder, exist_ok=True)
    print(
        f"token '{settings.token_label}' in {settings.module_path}: login and AES-GCM check passed"
    )
    print(f"registry: {settings.registry_dir}")
    print(f"audit log: {settings.audit_log}")
    return 0


def _cmd_keys_list(args: argparse.Namespace) -> int:
    service = KeyService(_settings(args))
    labels = service.hsm.list_key_labels("spark_kms/")
    entries = service.list_tables()
    if args.json:
        print(json.dumps({"tables": [asdict(e) for e in entries], "key_labels": labels}, indent=2))
        return 0
    print(f"{'TABLE':<24} {'STATE':<16} {'MASTER KEYS IN TOKEN':<22} LOCATION")
    for entry in entries:
        prefix = f"spark_kms/{entry.table}/{entry.table_id}/"
        versions = [label.rsplit("/", 1)[-1] for label in versions_in_scope(labels, prefix)]
        partitions = sum(1 for label in labels if label.startswith(f"{prefix}p/"))
        keys = ",".join(versions) or "-"
        if partitions:
            keys += f" +{partitions} partition"
        print(f"{entry.table:<24} {entry.state:<16} {keys:<22} {entry.location}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    status = KeyService(_settings(args)).status(args.table)
    if args.json:
        print(json.dumps(asdict(status), indent=2))
        return 0
    for key, value in asdict(status).items():
        if key != "partitions":
            print(f"{key:<20} {value}")
    for partition in status.partitions:
        print(
            f"{'partition':<20} {partition['partition']} {partition['state']} "
            f"(master key v{partition['master_key_version']})"
        )
    return 0


def _cmd_erase(args: argparse.Namespace) -> int:
    service = cli_service(_settings(args))
    if args.partition:
        return erase_partition(args, service)
    status = service.status(args.table)
    if not args.yes:
        if not sys.stdin.isatty():
            print("erase needs confirmation: run it in a terminal or pass --yes", file=sys.stderr)
            return EXIT_DECLINED
        print(
            f"This destroys the master key of table '{args.table}' ({status.data_files} data file(s) at "
            f"{status.location}). Its data becomes unreadable forever."
        )
        answer = input(f"Type the table name '{args.table}' to confirm: ")
        if answer.strip() != args.table:
            print("erase cancelled", file=sys.stderr)
            return EXIT_DECLINED
    report = service.erase_table(args.table)
    print(
        f"erased table '{report.table}': destroyed {report.destroyed_objects} master key object(s), "
        f"{report.remaining_objects} remain (checked with a new session), {report.seconds:.3f} s"
    )
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from spark_kms.verify import format_report, verify_table

    report = verify_table(
        KeyService(_settings(args)), args.table, repair=args.repair, older_than=args.older_than
    )
    for line in format_report(report):
        print(line)
    return 0 if report.ok else EXIT_ERROR


def _cmd_audit(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.verify:
        problems = verify_chain(settings.audit_log)
        for problem in problems:
            print(problem)
        print("audit log intact" if not problems else f"{len(problems)} problem(s) found")
        return 0 if not problems else EXIT_ERROR
    try:
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
    except ValueError as error:
        print(f"spark-kms audit: invalid time: {error}; use ISO 8601, e.g. 2026-12-01 or "
              "2026-12-01T08:00:00+00:00", file=sys.stderr)
        return EXIT_USAGE
    records = AuditLog(settings.audit_log).select(
        table=args.table, operation=args.operation, since=since, until=until
    )
    for record in records:
        print(json.dumps(record, sort_keys=True))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spark-kms", description="Key lifecycle of spark_kms tables."
    )
    parser.add_argument(
        "--conf-file", help="properties file with spark.kms.* settings (default: $SPARK_KMS_CONF)"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    init = commands.add_parser(
        "init", help="check the HSM settings and create the registry and audit folders"
    )
    init.set_defaults(func=_cmd_init)

    keys = commands.add_parser("keys", help="master keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    keys_list = keys_commands.add_parser(
        "list", help="list tables and their master keys in the token"
    )
    keys_list.add_argument("--json", action="store_true", help="print JSON")
    keys_list.set_defaults(func=_cmd_keys_list)

    status = commands.add_parser("status", help="show the state of a table")
    status.add_argument("table")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=_cmd_status)

    erase = commands.add_parser(
        "erase", help="crypto-erase a table, or one partition, by destroying its master keys"
    )
    erase.add_argument("table")
    erase.add_argument(
        "--partition",
        metavar="COLUMN=VALUE",
        help="erase only this partition value of a table written with kms.partition_by",
    )
    erase.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    erase.set_defaults(func=_cmd_erase)

    add_lifecycle_commands(commands, _settings)

    verify = commands.add_parser(
        "verify", help="check that every file of a table is encrypted and decrypts"
    )
    verify.add_argument("table")
    verify.add_argument(
        "--repair",
        action="store_true",
        help="remove the staged files of jobs that never committed, finish committed ones",
    )
    verify.add_argument(
        "--older-than",
        type=float,
        default=24 * 3600,
        metavar="SECONDS",
        help="with --repair, only staging folders untouched this long (default: 86400)",
    )
    verify.set_defaults(func=_cmd_verify)

    audit = commands.add_parser("audit", help="print or verify the audit log")
    audit.add_argument("--table", help="only records of this table")
    audit.add_argument(
        "--operation", help="only records of this operation (wrap_kek, unwrap_kek, erase, ...)"
    )
    audit.add_argument(
        "--since", help="only records at or after this ISO 8601 time (UTC if no zone), e.g. 2026-12-01"
    )
    audit.add_argument("--until", help="only records before this ISO 8601 time (UTC if no zone)")
    audit.add_argument(
        "--verify", action="store_true", help="check the hash chain instead of printing"
    )
    audit.set_defaults(func=_cmd_audit)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``spark-kms`` command line and return its exit code."""
    args = _parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except SparkKmsError as error:
        print(f"spark-kms: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_DECLINED
    return code


if __name__ == "__main__":
    sys.exit(main())
