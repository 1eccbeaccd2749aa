"""Settings parsing, PIN sources and the reprs that must not show secrets."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from spark_kms.errors import ConfigurationError, InvalidOptionError
from spark_kms.hsm import read_pin
from spark_kms.jobkeys import JobKeys
from spark_kms.settings import KmsSettings, load_properties_file

BASE = {
    "spark.kms.hsm.module": "/usr/lib/softhsm/libsofthsm2.so",
    "spark.kms.hsm.token": "spark-kms",
    "spark.kms.hsm.pin.file": "/tmp/pin",
    "spark.kms.registry": "/tmp/registry",
    "spark.kms.audit.log": "/tmp/audit.log",
}


def test_settings_from_properties() -> None:
    settings = KmsSettings.from_properties({**BASE, "spark.app.name": "x"})
    assert settings.module_path == "/usr/lib/softhsm/libsofthsm2.so"
    assert settings.pin_file == "/tmp/pin"
    assert settings.pin_env is None


def test_settings_round_trip_properties() -> None:
    settings = KmsSettings.from_properties(BASE)
    assert KmsSettings.from_properties(settings.to_properties()) == settings


def test_settings_missing_key() -> None:
    properties = dict(BASE)
    del properties["spark.kms.hsm.token"]
    with pytest.raises(ConfigurationError, match="missing spark_kms setting.*spark.kms.hsm.token"):
        KmsSettings.from_properties(properties)


def test_settings_unknown_key() -> None:
    with pytest.raises(ConfigurationError, match="unknown spark_kms setting.*spark.kms.hsm.pin"):
        KmsSettings.from_properties({**BASE, "spark.kms.hsm.pin": "1234"})


def test_settings_two_pin_sources() -> None:
    with pytest.raises(ConfigurationError, match="exactly one PIN source"):
        KmsSettings.from_properties({**BASE, "spark.kms.hsm.pin.env": "PIN"})


def test_properties_file_formats(tmp_path: Path) -> None:
    file = tmp_path / "kms.conf"
    file.write_text("# comment\nspark.kms.hsm.token spark-kms\nspark.kms.registry=/r\n\n")
    assert load_properties_file(file) == {"spark.kms.hsm.token": "spark-kms", "spark.kms.registry": "/r"}


def test_properties_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read properties file"):
        load_properties_file(tmp_path / "absent.conf")


def test_pin_file_must_be_private(tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    pin.write_text("123456\n")
    pin.chmod(0o644)
    with pytest.raises(ConfigurationError, match="readable by group or others.*chmod 600"):
        read_pin(pin_file=str(pin), pin_env=None)


def test_pin_file_read(tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    pin.write_text("123456\n")
    pin.chmod(0o600)
    assert read_pin(pin_file=str(pin), pin_env=None) == "123456"


def test_pin_env_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPARK_KMS_TEST_PIN", raising=False)
    with pytest.raises(ConfigurationError, match="environment variable SPARK_KMS_TEST_PIN is empty or not set"):
        read_pin(pin_file=None, pin_env="SPARK_KMS_TEST_PIN")


def test_job_keys_repr_shows_ids_only() -> None:
    kek = os.urandom(32)
    keys = JobKeys({"t.table.k1": kek})
    for text in (repr(keys), str(keys), repr([keys]), f"{keys}"):
        assert "t.table.k1" in text
        assert kek.hex() not in text
        assert repr(kek) not in text


def test_job_keys_pickle_round_trip() -> None:
    kek = os.urandom(32)
    keys = pickle.loads(pickle.dumps(JobKeys({"t.table.k1": kek})))
    assert keys.kek("t.table.k1") == kek


def test_job_keys_reject_bad_id() -> None:
    with pytest.raises(InvalidOptionError, match="invalid key id"):
        JobKeys({"t:table": bytes(32)})
