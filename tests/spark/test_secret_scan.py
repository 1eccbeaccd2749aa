"""No PIN, KEK, DEK or wrapped key in anything a user or operator sees, at DEBUG logging.

A notebook run by nbclient writes, reads, filters, explains, prints reprs,
fails in several ways (tampered file, bad option, changed KEK record, erased
table) and prints the audit log. ipykernel copies the kernel's stderr into
the outputs. The outputs, the driver's stderr (where the JVM and its Python
workers log), the Spark event log and the audit log are then scanned for the
PIN and SO PIN, every KEK and wrapped KEK of the tables and every DEK of their
files, raw, in hex and in base64.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from spark_kms.keyservice import KeyService
from spark_kms.settings import KmsSettings
from tests.helpers.independent_kms import read_with_independent_client
from tests.helpers.secrets import find_secrets
from tests.helpers.tables import data_files

SETUP = """
import json, os, sys, traceback
os.environ['PYSPARK_PYTHON'] = sys.executable
os.environ['SPARK_KMS_LOG_LEVEL'] = 'DEBUG'
# The JVM and its Python workers inherit file descriptor 2: keep their logs.
os.dup2(os.open('driver-stderr.log', os.O_WRONLY | os.O_CREAT | os.O_APPEND), 2)
from pyspark.sql import SparkSession, functions as F
import spark_kms
spark = (
    SparkSession.builder.master('local[2]')
    .config('spark.ui.enabled', 'false')
    .config('spark.sql.shuffle.partitions', '2')
    .config('spark.eventLog.enabled', 'true')
    .config('spark.eventLog.dir', 'file://' + os.path.abspath('events'))
    .getOrCreate()
)
service = spark_kms.configure(spark)
print(repr(service), repr(service.hsm), str(service))
"""

WRITE = """
source = spark.range(0, 600, numPartitions=3).selectExpr(
    'id', "concat('N', id, 'XY') AS tailnum", 'CAST(id % 50 AS INT) AS flight'
)
for name in ('kept', 'gone', 'victim'):
    spark_kms.write_table(source, name, table=TABLES[name], column_keys='pii: tailnum, flight')
print(sorted(os.listdir('kept')))
"""

READ = """
back = spark_kms.read_table(spark, 'kept')
back.show(5)
back.filter('flight = 7').explain(mode='extended')
back.filter('flight = 7').explain(mode='formatted')
back.createOrReplaceTempView('flights')
spark.sql('SELECT flight, count(*) FROM flights GROUP BY flight').explain(True)
print(back.filter('flight = 7').count(), back.count())
print(back.toPandas().head(3))
"""

REPRS = """
from spark_kms.keyring import KeyringStore
meta, store = service.open_table_for_read('kept')
keys = service.unwrap_keks(meta, store, store.list_kek_ids())
print(meta)
print(repr(keys), str(keys), keys.key_ids)
for kek_id in keys.key_ids:
    print(repr(store.get_kek_record(kek_id)))
print(store.list_commit_records())
print(spark_kms.configure.__doc__[:10])
"""

FAILURES = """
def show_failure(action):
    try:
        with spark_kms.typed_errors():
            action()
    except Exception as error:
        print(type(error).__name__, error)
        print(traceback.format_exc())

victim_file = sorted(f for f in os.listdir('victim') if f.endswith('.parquet'))[0]
data = bytearray(open(os.path.join('victim', victim_file), 'rb').read())
data[len(data) // 2] ^= 0xFF
open(os.path.join('victim', victim_file), 'wb').write(bytes(data))
show_failure(lambda: spark_kms.read_table(spark, 'victim').collect())

record_name = sorted(os.listdir('victim/_spark_kms/keks'))[0]
record_path = os.path.join('victim/_spark_kms/keks', record_name)
record = json.load(open(record_path))
record['wrapped_kek'] = record['wrapped_kek'][:-6] + 'AAAA' + record['wrapped_kek'][-2:]
json.dump(record, open(record_path, 'w'))
show_failure(lambda: spark_kms.read_table(spark, 'victim').collect())
show_failure(lambda: spark_kms.write_table(source, 'kept', table=TABLES['kept'], column_keys='pii: nope'))
show_failure(lambda: spark_kms.write_table(source, 'kept', table='bad:name'))
"""

ERASE = """
spark_kms.erase_table(spark, TABLES['gone'])
show_failure(lambda: spark_kms.read_table(spark, 'gone').collect())
show_failure(lambda: spark_kms.write_table(source, 'gone', table=TABLES['gone']))
"""

FINISH = """
print(open(service.settings.audit_log).read())
spark.stop()
"""


def wrapped_keks(location: Path) -> list[bytes]:
    return [
        base64.b64decode(json.loads(path.read_text())["wrapped_kek"])
        for path in sorted((location / "_spark_kms" / "keks").iterdir())
    ]


def test_no_secret_anywhere(
    kms_settings: KmsSettings,
    key_service: KeyService,
    make_table_name,  # type: ignore[no-untyped-def]
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    properties = tmp_path / "kms.conf"
    properties.write_text("".join(f"{k} {v}\n" for k, v in kms_settings.to_properties().items()))
    monkeypatch.setenv("SPARK_KMS_CONF", str(properties))
    (tmp_path / "events").mkdir()
    tables = {name: make_table_name(f"_{name}") for name in ("kept", "gone", "victim")}
    cells = [f"TABLES = {tables!r}\n{SETUP}", WRITE, READ, REPRS, FAILURES, ERASE, FINISH]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )

    secrets: list[bytes] = []
    with client.setup_kernel():
        for index, cell in enumerate(notebook.cells):
            if "erase_table" in cell.source:
                # The erased table's keys, taken before the notebook destroys them.
                gone = tmp_path / "gone"
                meta, store = key_service.open_table_for_read(str(gone))
                keys = key_service.unwrap_keks(meta, store, store.list_kek_ids())
                keks = {kek_id: keys.kek(kek_id) for kek_id in keys.key_ids}
                secrets += list(keks.values()) + wrapped_keks(gone)
                for file in data_files(gone):
                    secrets += [
                        dek
                        for _id, _wrapped, dek in read_with_independent_client(str(file), keks)[1]
                    ]
            client.execute_cell(cell, index)

    kept = tmp_path / "kept"
    meta, store = key_service.open_table_for_read(str(kept))
    keys = key_service.unwrap_keks(meta, store, store.list_kek_ids())
    keks = {kek_id: keys.kek(kek_id) for kek_id in keys.key_ids}
    secrets += list(keks.values()) + wrapped_keks(kept)
    for file in data_files(kept):
        secrets += [dek for _id, _wrapped, dek in read_with_independent_client(str(file), keks)[1]]
    assert kms_settings.pin_file is not None
    pin_file = Path(kms_settings.pin_file)
    secrets.append(pin_file.read_text().strip().encode())
    so_pin = pin_file.parent / "so-pin"
    if so_pin.exists():
        secrets.append(so_pin.read_text().strip().encode())
    # Two KEKs and two wrapped KEKs per table, and a footer and a column DEK per file.
    assert len(secrets) >= 2 * (4 + 3 * 2) + 1

    outputs = json.dumps([cell.get("outputs", []) for cell in notebook.cells])
    # The scan sees what it must: plans, failures, reprs, the workers' logs and the audit log.
    assert "== Physical Plan ==" in outputs
    assert "IntegrityError" in outputs
    assert "TableErasedError" in outputs
    assert "InvalidOptionError" in outputs
    assert "JobKeys(key_ids=" in outputs
    driver_log = (tmp_path / "driver-stderr.log").read_bytes()
    assert b"spark_kms.datasource: committed job" in driver_log
    assert b"spark_kms.keyservice" in driver_log
    assert '\\"operation\\": \\"unwrap_kek\\"' in outputs
    event_logs = [p for p in (tmp_path / "events").rglob("*") if p.is_file()]
    assert any(p.name.startswith("events_") for p in event_logs)

    assert find_secrets(outputs, secrets) == []
    assert find_secrets(driver_log, secrets) == []
    for path in event_logs:
        assert find_secrets(path.read_bytes(), secrets) == [], path
    assert find_secrets(Path(kms_settings.audit_log).read_bytes(), secrets) == []
