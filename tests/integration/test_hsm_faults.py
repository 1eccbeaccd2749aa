"""HSM faults: a wrong PIN, a missing mechanism, a token that goes away, a failing destroy.

Fault-injection double: each test runs against a copy of the project's
SoftHSM2 token folder (same label, PIN and keys), with its own softhsm2.conf,
in a separate process (tests.helpers.hsm_fault_job), so the faults never touch
the real token.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from spark_kms.settings import KmsSettings

ROOT = Path(__file__).resolve().parents[2]
HSM_ERROR = "spark_kms.errors.HsmUnavailableError"


class TokenCopy:
    """A copy of the token folder and the settings that point at it."""

    def __init__(self, base: KmsSettings, folder: Path) -> None:
        assert base.softhsm2_conf and base.pin_file
        conf_lines = Path(base.softhsm2_conf).read_text().splitlines()
        source = next(
            line.split("=", 1)[1].strip()
            for line in conf_lines
            if line.startswith("directories.tokendir")
        )
        self.folder = folder
        self.token_dir = folder / "tokens"
        shutil.copytree(source, self.token_dir)
        self.pin_file = folder / "pin"
        shutil.copyfile(base.pin_file, self.pin_file)
        os.chmod(self.pin_file, 0o600)
        self.conf = folder / "softhsm2.conf"
        self.write_conf()
        self.settings = replace(
            base,
            pin_file=str(self.pin_file),
            softhsm2_conf=str(self.conf),
            registry_dir=str(folder / "registry"),
            audit_log=str(folder / "audit.log"),
        )

    def write_conf(self, *extra: str, token_dir: Path | None = None) -> None:
        lines = [
            f"directories.tokendir = {token_dir or self.token_dir}",
            "objectstore.backend = file",
            "log.level = ERROR",
            "slots.removable = false",
            *extra,
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def run(self, scenario: str, table: str) -> dict[str, object]:
        properties = self.folder / "spark-kms.conf"
        properties.write_text(
            "".join(f"{k} {v}\n" for k, v in self.settings.to_properties().items())
        )
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.helpers.hsm_fault_job",
                scenario,
                str(properties),
                str(self.token_dir),
                str(self.folder / "table"),
                table,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
        result["_output"] = done.stdout + done.stderr
        return result


@pytest.fixture
def token_copy(base_settings: KmsSettings, tmp_path: Path) -> Iterator[TokenCopy]:
    copy = TokenCopy(base_settings, tmp_path)
    yield copy
    subprocess.run(["chattr", "-R", "-i", str(copy.folder)], check=False, capture_output=True)
    shutil.rmtree(copy.token_dir, ignore_errors=True)


def test_wrong_pin_fails_before_any_key(token_copy: TokenCopy, table_name: str) -> None:
    token_copy.pin_file.write_text("0000000000-not-the-pin\n")
    result = token_copy.run("start", table_name)
    assert str(result["open"]).startswith(
        f"{HSM_ERROR}: login to token 'spark-kms' failed: the PIN is incorrect"
    )
    assert str(result["write"]).startswith(HSM_ERROR)
    assert not (token_copy.folder / "table").exists()
    assert not (token_copy.folder / "registry" / f"{table_name}.json").exists()
    assert "0000000000-not-the-pin" not in str(result["_output"])


def test_missing_mechanism_fails_at_start(token_copy: TokenCopy, table_name: str) -> None:
    # SoftHSM2's slots.mechanisms setting lists the mechanisms the token offers.
    token_copy.write_conf("slots.mechanisms = CKM_AES_KEY_GEN,CKM_AES_CBC,CKM_AES_ECB")
    result = token_copy.run("start", table_name)
    assert result["open"] == (
        f"{HSM_ERROR}: token 'spark-kms' does not offer mechanism(s) AES_GCM; "
        "spark_kms needs AES key generation and AES-GCM inside the token"
    )
    assert str(result["write"]).startswith(HSM_ERROR)
    assert not (token_copy.folder / "table").exists()


def test_removed_token_folder_at_start(token_copy: TokenCopy, table_name: str) -> None:
    token_copy.write_conf(token_dir=token_copy.folder / "removed")
    result = token_copy.run("start", table_name)
    assert str(result["open"]).startswith(
        f"{HSM_ERROR}: PKCS#11 module {token_copy.settings.module_path} failed to initialize"
    )
    assert str(token_copy.conf) in str(result["open"])
    assert str(result["write"]).startswith(HSM_ERROR)
    assert not (token_copy.folder / "table").exists()


def test_token_gone_mid_session(token_copy: TokenCopy, table_name: str) -> None:
    result = token_copy.run("unreachable", table_name)
    not_reachable = f"{HSM_ERROR}: token 'spark-kms' is not reachable"
    # Never mistaken for an erased table or a missing key.
    assert str(result["mint"]).startswith(not_reachable)
    assert str(result["unwrap"]).startswith(not_reachable)
    assert str(result["create"]).startswith(HSM_ERROR)
    assert str(result["erase"]).startswith(HSM_ERROR)
    # The record of the job minted before the fault is still there, and no other.
    assert len(result["kek_records"]) == 1  # type: ignore[arg-type]


def test_token_gone_before_spark_write(token_copy: TokenCopy, table_name: str) -> None:
    result = token_copy.run("spark_unreachable", table_name)
    assert str(result["write"]).startswith(HSM_ERROR)
    assert str(result["read"]).startswith(HSM_ERROR)
    # Nothing of the failed write was committed.
    assert result["unchanged"] is True
    assert result["files"] == 2


def test_failed_destroy_reported_and_retried(token_copy: TokenCopy, table_name: str) -> None:
    probe = subprocess.run(["chattr", "+i", str(token_copy.folder)], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"chattr +i is not supported here: {probe.stderr.strip()}")
    subprocess.run(["chattr", "-i", str(token_copy.folder)], check=True)

    result = token_copy.run("read_only_erase", table_name)

    assert str(result["first_erase"]).startswith(HSM_ERROR)
    assert result["present_after_failure"] == 1
    assert result["second_erase"] == "ok"
    assert result["destroyed"] == 1
    assert result["remaining"] == 0
    # A process that never saw the failure confirms the key is gone from the token.
    label = str(result["master_key_label"])
    assert token_copy.run("count", label)["count"] == 0
    outcomes = [
        json.loads(line)["outcome"]
        for line in Path(token_copy.settings.audit_log).read_text().splitlines()
        if json.loads(line)["operation"] == "erase"
    ]
    assert outcomes[0].startswith("failed")
    assert outcomes[-1] == "ok"
