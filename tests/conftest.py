"""Shared fixtures: the project's SoftHSM2 token, settings, a key service and Spark.

Tests use the token that `make bootstrap` initialized (its properties file is
`.state/spark-kms.conf`, or the file named by SPARK_KMS_CONF), each test
session with its own registry folder and audit log, and table names made
unique per test, so that runs never see each other's tables.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from spark_kms.keyservice import KeyService
from spark_kms.settings import KmsSettings

ROOT = Path(__file__).resolve().parent.parent
PROPERTIES = Path(os.environ.get("SPARK_KMS_CONF", ROOT / ".state" / "spark-kms.conf"))

# Spark's Python workers must run this interpreter (it has pyarrow and spark_kms),
# and spark_kms logs at DEBUG in them so that the secret scans see every record.
os.environ["PYSPARK_PYTHON"] = sys.executable
os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ["SPARK_KMS_LOG_LEVEL"] = "DEBUG"


@pytest.fixture(scope="session")
def base_settings() -> KmsSettings:
    """Settings of the bootstrap's token, as written to .state/spark-kms.conf."""
    if not PROPERTIES.exists():
        pytest.fail(f"{PROPERTIES} is missing: run 'make bootstrap' first")
    return KmsSettings.from_file(PROPERTIES)


@pytest.fixture(scope="session")
def kms_settings(base_settings: KmsSettings, tmp_path_factory: pytest.TempPathFactory) -> KmsSettings:
    """The token's settings with a registry and audit log of this test session."""
    state = tmp_path_factory.mktemp("kms-state")
    return replace(
        base_settings,
        registry_dir=str(state / "registry"),
        audit_log=str(state / "audit.log"),
    )


@pytest.fixture(scope="session")
def key_service(kms_settings: KmsSettings) -> Iterator[KeyService]:
    service = KeyService(kms_settings)
    yield service
    service.close()


@pytest.fixture
def table_name(request: pytest.FixtureRequest) -> str:
    """A table name unique to this test."""
    stem = "".join(c if c.isalnum() else "_" for c in request.node.name)[:40]
    return f"{stem}_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_table_name(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """A factory of table names unique to this test."""

    def make(suffix: str = "") -> str:
        stem = "".join(c if c.isalnum() else "_" for c in request.node.name)[:30]
        return f"{stem}{suffix}_{uuid.uuid4().hex[:8]}"

    return make


@pytest.fixture(scope="session")
def spark_event_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("spark-events")


@pytest.fixture(scope="session")
def spark(kms_settings: KmsSettings, spark_event_log: Path):  # type: ignore[no-untyped-def]
    """One local Spark session for the test run, UI off, event log on."""
    from pyspark.sql import SparkSession

    import spark_kms

    session = (
        SparkSession.builder.master("local[2]")
        .appName("spark_kms tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.default.parallelism", "4")
        .config("spark.eventLog.enabled", "true")
        .config("spark.eventLog.dir", spark_event_log.as_uri())
        .config("spark.eventLog.compress", "false")
        .config("spark.driver.memory", "2g")
        .config("spark.sql.session.timeZone", "UTC")
        # The JVM bridge and Delta Lake must be on the classpath when the JVM starts.
        .config(map=spark_kms.session_config())
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("WARN")
    spark_kms.configure(session, kms_settings)
    yield session
    session.stop()
