"""HSM access against the project's SoftHSM2 token."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from pkcs11 import Attribute

from spark_kms.errors import (
    AmbiguousKeyError,
    ConfigurationError,
    HsmUnavailableError,
    IntegrityError,
    KeyNotFoundError,
)
from spark_kms.hsm import Hsm
from spark_kms.settings import KmsSettings
from tests.helpers.hsm_lookups import count_lookups


def _open(settings: KmsSettings, **changes: str) -> Hsm:
    settings = replace(settings, **changes)
    return Hsm(
        module_path=settings.module_path,
        token_label=settings.token_label,
        pin_file=settings.pin_file,
        pin_env=settings.pin_env,
        softhsm2_conf=settings.softhsm2_conf,
    )


@pytest.fixture(scope="module")
def hsm(base_settings: KmsSettings):  # type: ignore[no-untyped-def]
    connection = _open(base_settings)
    yield connection
    connection.close()


@pytest.fixture
def label(hsm: Hsm):  # type: ignore[no-untyped-def]
    name = f"test/hsm/{uuid.uuid4().hex}"
    yield name
    hsm.destroy_keys(name)


def test_master_key_not_extractable(hsm: Hsm, label: str) -> None:
    hsm.generate_master_key(label)
    with hsm.session() as session:
        key = hsm._find_key_in(session, label)
        assert key[Attribute.SENSITIVE] is True
        assert key[Attribute.EXTRACTABLE] is False
        assert key[Attribute.TOKEN] is True
        assert key[Attribute.VALUE_LEN] == 32


def test_encrypt_decrypt_in_token(hsm: Hsm, label: str) -> None:
    hsm.generate_master_key(label)
    sealed = hsm.encrypt(label, b"k" * 32, b"aad")
    assert len(sealed) == 12 + 32 + 16
    assert b"k" * 32 not in sealed
    assert hsm.decrypt(label, sealed, b"aad") == b"k" * 32


def test_decrypt_rejects_other_aad(hsm: Hsm, label: str) -> None:
    hsm.generate_master_key(label)
    sealed = hsm.encrypt(label, b"k" * 32, b"aad")
    with pytest.raises(IntegrityError, match="failed authentication"):
        hsm.decrypt(label, sealed, b"other")


def test_batch_looks_label_up_once(hsm: Hsm, label: str, monkeypatch: pytest.MonkeyPatch) -> None:
    hsm.generate_master_key(label)
    lookups = count_lookups(monkeypatch)
    encrypts, decrypts = hsm.stats.encrypt, hsm.stats.decrypt
    with hsm.batch() as batch:
        first = batch.encrypt(label, b"1" * 32, b"aad")
        second = batch.encrypt(label, b"2" * 32, b"aad")
        assert batch.decrypt(label, first, b"aad") == b"1" * 32
        assert batch.decrypt(label, second, b"aad") == b"2" * 32
        with pytest.raises(IntegrityError, match="failed authentication"):
            batch.decrypt(label, first, b"other")

    assert lookups == [label]
    assert hsm.stats.encrypt - encrypts == 2
    assert hsm.stats.decrypt - decrypts == 3


def test_batch_missing_key(hsm: Hsm) -> None:
    with hsm.batch() as batch, pytest.raises(KeyNotFoundError, match="no key labelled 'test/absent'"):
        batch.encrypt("test/absent", b"k" * 32, b"aad")


def test_batch_key_destroyed_meanwhile(hsm: Hsm, label: str) -> None:
    hsm.generate_master_key(label)
    with hsm.batch() as batch:
        sealed = batch.encrypt(label, b"k" * 32, b"aad")
        # Another session destroys the key that the batch has found already.
        assert hsm.destroy_keys(label) == 1
        with pytest.raises(KeyNotFoundError, match=f"no key labelled '{label}'"):
            batch.decrypt(label, sealed, b"aad")
        with pytest.raises(KeyNotFoundError, match=f"no key labelled '{label}'"):
            batch.encrypt(label, b"k" * 32, b"aad")


def test_batch_unusable_after_block(hsm: Hsm, label: str) -> None:
    hsm.generate_master_key(label)
    with hsm.batch() as batch:
        batch.encrypt(label, b"k" * 32, b"aad")
    with pytest.raises(RuntimeError, match="only inside its 'with' block"):
        batch.encrypt(label, b"k" * 32, b"aad")


def test_batch_after_reinitialization(hsm: Hsm, label: str) -> None:
    hsm.generate_master_key(label)
    with hsm.batch() as batch:
        batch.encrypt(label, b"k" * 32, b"aad")
        # Counting in a fresh session re-initializes the module, which ends the batch's session.
        assert hsm.count_keys(label, fresh_session=True) == 1
        with pytest.raises(HsmUnavailableError, match="re-initialized during a batch"):
            batch.encrypt(label, b"k" * 32, b"aad")
    assert hsm.decrypt(label, hsm.encrypt(label, b"k" * 32, b"aad"), b"aad") == b"k" * 32


def test_find_missing_key(hsm: Hsm) -> None:
    with pytest.raises(KeyNotFoundError, match="no key labelled 'test/absent'"):
        hsm.find_key("test/absent")


def test_generate_twice_is_ambiguous(hsm: Hsm, label: str) -> None:
    hsm.generate_master_key(label)
    with pytest.raises(AmbiguousKeyError, match="already exists"):
        hsm.generate_master_key(label)


def test_find_duplicate_label_is_ambiguous(hsm: Hsm, label: str) -> None:
    from pkcs11 import KeyType

    hsm.generate_master_key(label)
    with hsm.session() as session:
        session.generate_key(KeyType.AES, 256, label=label, store=True)
    with pytest.raises(AmbiguousKeyError, match="2 keys are labelled"):
        hsm.find_key(label)


def test_destroy_confirmed_by_fresh_session(hsm: Hsm, label: str) -> None:
    hsm.generate_master_key(label)
    assert hsm.count_keys(label, fresh_session=True) == 1
    assert hsm.destroy_keys(label) == 1
    assert hsm.count_keys(label, fresh_session=True) == 0


def test_threads_share_one_connection(hsm: Hsm, label: str) -> None:
    hsm.generate_master_key(label)
    failures: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(25):
                secret = os.urandom(32)
                assert hsm.decrypt(label, hsm.encrypt(label, secret, b"a"), b"a") == secret
        except BaseException as error:  # noqa: BLE001 (collected for the assert below)
            failures.append(error)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_wrong_module_path(base_settings: KmsSettings) -> None:
    with pytest.raises(ConfigurationError, match="PKCS#11 module /nonexistent/libpkcs11.so does not exist"):
        _open(base_settings, module_path="/nonexistent/libpkcs11.so")


def test_wrong_pin(base_settings: KmsSettings, tmp_path: Path) -> None:
    # A PKCS#11 login belongs to the whole process, and this test process is
    # logged in already, so the wrong PIN is tried in a new process.
    pin = tmp_path / "pin"
    pin.write_text("000000\n")
    pin.chmod(0o600)
    script = (
        "from spark_kms.hsm import Hsm\n"
        "from spark_kms.errors import HsmUnavailableError\n"
        "try:\n"
        f"    Hsm(module_path={base_settings.module_path!r}, token_label={base_settings.token_label!r},"
        f" pin_file={str(pin)!r}, softhsm2_conf={base_settings.softhsm2_conf!r})\n"
        "except HsmUnavailableError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "PIN is incorrect" in result.stdout
    assert "000000" not in result.stdout + result.stderr


def test_missing_token(base_settings: KmsSettings) -> None:
    with pytest.raises(HsmUnavailableError, match="no token labelled 'no-such-token'"):
        _open(base_settings, token_label="no-such-token")


def test_repr_names_module_and_token(hsm: Hsm) -> None:
    assert repr(hsm) == f"Hsm(module_path={hsm.module_path!r}, token_label={hsm.token_label!r})"
