"""Many threads minting and unwrapping KEKs at once through one key service."""

from __future__ import annotations

import threading
from pathlib import Path

from spark_kms.hsm import Hsm
from spark_kms.keyservice import KeyService

THREADS = 8
ROUNDS = 25


def test_threads_mint_and_unwrap(key_service: KeyService, table_name: str, tmp_path: Path) -> None:
    meta, store = key_service.open_table_for_write(table_name, str(tmp_path / "t"))
    errors: list[str] = []
    minted: dict[str, bytes] = {}
    lock = threading.Lock()
    barrier = threading.Barrier(THREADS)

    def work(number: int) -> None:
        barrier.wait()
        try:
            for round_number in range(ROUNDS):
                keys = key_service.mint_keks(
                    meta, store, ["table"], job_id=f"t{number}r{round_number}"
                )
                kek_id = keys.kek_ids["table"]
                unwrapped = key_service.unwrap_keks(meta, store, [kek_id])
                with lock:
                    minted[kek_id] = keys.keys.kek(kek_id)
                if unwrapped.kek(kek_id) != keys.keys.kek(kek_id):
                    errors.append(f"{kek_id}: unwrapped KEK differs from the minted one")
        except Exception as error:  # noqa: BLE001 (reported to the test)
            errors.append(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=work, args=(number,)) for number in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)

    assert errors == []
    assert len(minted) == THREADS * ROUNDS
    assert store.list_kek_ids() == sorted(minted)
    again = key_service.unwrap_keks(meta, store, sorted(minted))
    assert all(again.kek(kek_id) == kek for kek_id, kek in minted.items())


def test_threads_with_separate_connections(
    key_service: KeyService, table_name: str, tmp_path: Path
) -> None:
    # Several Hsm objects (as several key services in one driver) share the module.
    meta, store = key_service.open_table_for_write(table_name, str(tmp_path / "t"))
    settings = key_service.settings
    errors: list[str] = []

    def work() -> None:
        hsm = Hsm(
            module_path=settings.module_path,
            token_label=settings.token_label,
            pin_file=settings.pin_file,
            pin_env=settings.pin_env,
        )
        try:
            for _ in range(ROUNDS):
                blob = hsm.encrypt(meta.master_key_label, b"k" * 32, b"aad")
                if hsm.decrypt(meta.master_key_label, blob, b"aad") != b"k" * 32:
                    errors.append("decrypt returned other bytes")
        except Exception as error:  # noqa: BLE001 (reported to the test)
            errors.append(f"{type(error).__name__}: {error}")
        finally:
            hsm.close()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)

    assert errors == []
    assert key_service.hsm.count_keys(meta.master_key_label) == 1
