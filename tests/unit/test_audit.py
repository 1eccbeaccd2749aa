"""Audit log: record fields, filters, and the hash chain after tampering."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from spark_kms.audit import AuditLog, parse_time, verify_chain


def _filled_log(path: Path, count: int = 5) -> AuditLog:
    log = AuditLog(str(path), principal="alice", application_id="local-1")
    for number in range(count):
        log.append(
            "wrap_kek",
            table=f"t{number % 2}",
            outcome="ok",
            key_label="spark_kms/t/abc/v1",
            key_version=1,
            kek_ids=[f"t.table.k{number}"],
            partition=None,
        )
    return log


def test_record_fields(tmp_path: Path) -> None:
    log = _filled_log(tmp_path / "audit.log", 1)
    record = next(log.records())
    assert record["principal"] == "alice"
    assert record["application_id"] == "local-1"
    assert record["operation"] == "wrap_kek"
    assert record["table"] == "t0"
    assert record["outcome"] == "ok"
    assert record["key_label"] == "spark_kms/t/abc/v1"
    assert record["key_version"] == 1
    assert record["kek_ids"] == ["t.table.k0"]
    assert "partition" not in record
    assert parse_time(record["time"]).tzinfo is not None


def test_intact_log_verifies(tmp_path: Path) -> None:
    _filled_log(tmp_path / "audit.log")
    assert verify_chain(str(tmp_path / "audit.log")) == []


def test_removed_middle_line_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _filled_log(path)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2] + lines[3:]))
    problems = verify_chain(str(path))
    assert problems[0] == "line 3: hash chain broken (a line before it was removed or edited)"


def test_edited_line_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _filled_log(path)
    lines = path.read_bytes().splitlines(keepends=True)
    record = json.loads(lines[1])
    record["principal"] = "mallory"
    lines[1] = json.dumps(record, sort_keys=True).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    assert verify_chain(str(path)) == [
        "line 3: hash chain broken (a line before it was removed or edited)"
    ]


def test_removed_last_line_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _filled_log(path)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))
    assert verify_chain(str(path)) == [
        "the log has 4 line(s) but 5 were appended: lines were removed from its end"
    ]


def test_edited_last_line_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _filled_log(path)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[-1] = lines[-1].replace(b'"ok"', b'"no"')
    path.write_bytes(b"".join(lines))
    assert verify_chain(str(path)) == [
        "line 5: does not match the hash of the last append (it was edited)"
    ]


def test_log_without_head_gets_one(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _filled_log(path, 3)
    (tmp_path / "audit.log.head").unlink()
    assert verify_chain(str(path)) == []
    AuditLog(str(path)).append("erase", table="t", outcome="ok")
    head = json.loads((tmp_path / "audit.log.head").read_text())
    assert head["lines"] == 4
    assert verify_chain(str(path)) == []


def test_select_filters(tmp_path: Path) -> None:
    log = _filled_log(tmp_path / "audit.log")
    log.append("erase", table="t0", outcome="ok")
    assert [r["kek_ids"] for r in log.select(table="t1")] == [["t.table.k1"], ["t.table.k3"]]
    assert [r["operation"] for r in log.select(operation="erase")] == ["erase"]
    times = [parse_time(r["time"]) for r in log.records()]
    since = list(log.select(since=times[-1]))
    assert len(since) >= 1
    assert all(parse_time(r["time"]) >= times[-1] for r in since)
    assert list(log.select(until=datetime(2000, 1, 1, tzinfo=timezone.utc))) == []
    assert len(list(log.select(since=datetime(2000, 1, 1, tzinfo=timezone.utc)))) == 6


def test_parse_time_without_zone_is_utc() -> None:
    assert parse_time("2026-12-01") == datetime(2026, 12, 1, tzinfo=timezone.utc)
    with pytest.raises(ValueError):
        parse_time("yesterday")


def test_stale_head_after_stopped_append(tmp_path: Path) -> None:
    # A process that stops between its append and its head update leaves the
    # head one line short; the next append must count that line.
    path = tmp_path / "audit.log"
    _filled_log(path, 3)
    stale = (tmp_path / "audit.log.head").read_text()
    AuditLog(str(path)).append("erase", table="t", outcome="ok")
    (tmp_path / "audit.log.head").write_text(stale)
    assert verify_chain(str(path)) == []

    AuditLog(str(path)).append("erase", table="t", outcome="ok")

    head = json.loads((tmp_path / "audit.log.head").read_text())
    assert head["lines"] == 5
    assert head["size"] == path.stat().st_size
    assert verify_chain(str(path)) == []


def test_cut_end_detected_after_append(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _filled_log(path)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-2]))

    AuditLog(str(path)).append("erase", table="t", outcome="ok")

    assert verify_chain(str(path)) == [
        "the log has 4 line(s) but 6 were appended: lines were removed from its end"
    ]
