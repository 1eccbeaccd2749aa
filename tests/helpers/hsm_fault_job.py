"""Key service steps against a faulty copy of the SoftHSM2 token, in a process of its own.

python-pkcs11 loads one PKCS#11 module per process and SoftHSM2 reads
SOFTHSM2_CONF once, so each fault runs here: ``python -m
tests.helpers.hsm_fault_job SCENARIO PROPERTIES TOKEN_DIR LOCATION TABLE``.
The last line of the output is a JSON object with the outcome of each step:
``"ok"`` or ``"<error type>: <message>"``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from spark_kms.keyservice import KeyService
from spark_kms.settings import KmsSettings


def outcome(step: Callable[[], Any]) -> str:
    try:
        step()
    except Exception as error:  # noqa: BLE001 (the test asserts on the type)
        return f"{type(error).__module__}.{type(error).__name__}: {error}"
    return "ok"


def set_immutable(folder: str, on: bool) -> None:
    # Root ignores file modes, but not the immutable attribute.
    subprocess.run(["chattr", "-R", "+i" if on else "-i", folder], check=True)


def main(scenario: str, properties: str, token_dir: str, location: str, table: str) -> None:
    settings = KmsSettings.from_file(properties)
    results: dict[str, Any] = {}
    service = KeyService(settings)

    if scenario == "start":
        # The login and the mechanism check run when the HSM is first used.
        results["open"] = outcome(lambda: service.hsm)
        results["write"] = outcome(lambda: service.open_table_for_write(table, location))

    elif scenario == "unreachable":
        meta, store = service.open_table_for_write(table, location)
        minted = service.mint_keks(meta, store, ["table"])
        shutil.rmtree(token_dir)
        results["mint"] = outcome(lambda: service.mint_keks(meta, store, ["table"]))
        results["unwrap"] = outcome(
            lambda: service.unwrap_keks(meta, store, list(minted.kek_ids.values()))
        )
        results["create"] = outcome(
            lambda: service.open_table_for_write(f"{table}_2", f"{location}_2")
        )
        results["erase"] = outcome(lambda: service.erase_table(table))
        results["kek_records"] = store.list_kek_ids()

    elif scenario == "read_only_erase":
        meta, store = service.open_table_for_write(table, location)
        service.mint_keks(meta, store, ["table"])
        set_immutable(token_dir, True)
        try:
            results["first_erase"] = outcome(lambda: service.erase_table(table))
            results["present_after_failure"] = service.hsm.count_keys(
                meta.master_key_label, fresh_session=True
            )
        finally:
            set_immutable(token_dir, False)
        report: list[Any] = []
        results["second_erase"] = outcome(lambda: report.append(service.erase_table(table)))
        if report:
            results["destroyed"] = report[0].destroyed_objects
            results["remaining"] = report[0].remaining_objects
        results["master_key_label"] = meta.master_key_label

    elif scenario == "spark_unreachable":
        from pyspark.sql import SparkSession

        import spark_kms
        from spark_kms.keyring import KeyringStore

        spark = (
            SparkSession.builder.master("local[1]")
            .config("spark.ui.enabled", "false")
            .getOrCreate()
        )
        spark_kms.configure(spark, settings)
        df = spark.range(0, 20, numPartitions=2).selectExpr("id", "concat('N', id) AS tailnum")
        spark_kms.write_table(df, location, table=table)
        store = KeyringStore(location)
        before = (store.list_data_files(), [r.job_id for r in store.list_commit_records()])
        shutil.rmtree(token_dir)
        results["write"] = outcome(lambda: spark_kms.write_table(df, location, table=table))
        def read() -> None:
            with spark_kms.typed_errors():
                spark_kms.read_table(spark, location).collect()

        results["read"] = outcome(read)
        after = (store.list_data_files(), [r.job_id for r in store.list_commit_records()])
        results["unchanged"] = before == after
        results["files"] = len(after[0])
        spark.stop()

    elif scenario == "count":
        results["count"] = service.hsm.count_keys(table, fresh_session=True)

    service.close()
    print(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:6])
