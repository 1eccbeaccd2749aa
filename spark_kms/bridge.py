"""Driver side of the JVM bridge: Spark's own Parquet path with spark_kms keys.

The JVM half (``jvm/src``, built into ``build/jars/spark-kms-bridge.jar``)
implements parquet-mr's ``KmsClient`` with the local-wrap format of
:mod:`spark_kms.localwrap`, a crypto factory that encrypts every Parquet file of
a spark_kms table and rejects writes without keys, a check rule for Spark's
file writer, and a Delta Lake log store that keeps predicates out of
``_delta_log``. This module launches and feeds it:

- :func:`session_config` returns the properties a Spark session must be
  launched with (jars, session extensions, Delta's catalog and the log store);
- :func:`enable` switches the crypto factory on in a session;
- :func:`load_keys` and :func:`write_keys` put KEKs and the write settings into
  the session's SQL configuration, which Spark copies into the Hadoop
  configuration of every job and ships to the executors. The KEKs travel under
  ``kms.bridge.keks.secret``, a name Spark's default ``spark.redaction.regex``
  matches, so plans, the event log and the UI show it redacted.

Nothing here talks to the HSM: callers unwrap or mint the KEKs with the key
service first.
"""

from __future__ import annotations

import base64
import logging
import os
import sys
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spark_kms.errors import ConfigurationError
from spark_kms.jobkeys import JobKeys
from spark_kms.parquet_crypto import match_column_paths

if TYPE_CHECKING:
    from pyspark.sql import SparkSession
    from pyspark.sql.types import StructType

__all__ = [
    "CRYPTO_FACTORY_CLASS",
    "KEKS",
    "column_key_paths",
    "enable",
    "is_enabled",
    "jar_paths",
    "load_keys",
    "loaded_kek_ids",
    "session_config",
    "unload_keys",
    "write_keys",
]

log = logging.getLogger(__name__)

# Classes of the bridge jar and of Delta Lake.
CRYPTO_FACTORY_CLASS = "spark_kms.bridge.KmsCryptoFactory"
SESSION_EXTENSION_CLASS = "spark_kms.bridge.KmsSessionExtension"
LOG_STORE_CLASS = "spark_kms.bridge.KmsLogStore"
DELTA_SESSION_EXTENSION_CLASS = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG_CLASS = "org.apache.spark.sql.delta.catalog.DeltaCatalog"

BRIDGE_JAR = "spark-kms-bridge.jar"
JARS_ENV = "SPARK_KMS_JARS"
_ROOT = Path(__file__).resolve().parent.parent

# Session properties. The kms.bridge.* names must match BridgeSettings.java;
# none starts with "spark", so Spark does not also copy them into job properties.
CRYPTO_FACTORY = "parquet.crypto.factory.class"
KEKS = "kms.bridge.keks.secret"
WRITE_TABLE_ID = "kms.bridge.write.table.id"
DELTA_LOG_KEY = "kms.bridge.delta.log.key"
FOOTER_KEY = "parquet.encryption.footer.key"
COLUMN_KEYS = "parquet.encryption.column.keys"
KMS_INSTANCE_ID = "parquet.encryption.kms.instance.id"
OUTPUT_TIMESTAMP_TYPE = "spark.sql.parquet.outputTimestampType"
_WRITE_PROPERTIES = (WRITE_TABLE_ID, FOOTER_KEY, COLUMN_KEYS, DELTA_LOG_KEY, OUTPUT_TIMESTAMP_TYPE)

# Serializes changes of the key properties; a session's SQL configuration is
# shared by all threads that use the session.
_LOCK = threading.RLock()
# py4j logs every command it sends and every reply at DEBUG, with their arguments.
_PY4J_LOGGERS = ("py4j.clientserver", "py4j.java_gateway")


def jar_paths(*, delta: bool = True) -> list[str]:
    """Return the jars to put on Spark's classpath: the bridge and, if ``delta``, Delta Lake's.

    ``SPARK_KMS_JARS`` (comma-separated paths) replaces the default list, which
    is where ``make bootstrap`` puts the jars of this checkout:
    ``build/jars/spark-kms-bridge.jar`` and ``.state/jars/*.jar``.

    :raises ConfigurationError: if a jar is missing.
    """
    configured = os.environ.get(JARS_ENV)
    if configured:
        paths = [p.strip() for p in configured.split(",") if p.strip()]
    else:
        paths = [str(_ROOT / "build" / "jars" / BRIDGE_JAR)]
        if delta:
            delta_jars = sorted(str(p) for p in (_ROOT / ".state" / "jars").glob("*.jar"))
            paths += delta_jars or [str(_ROOT / ".state" / "jars" / "delta-spark_*.jar")]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ConfigurationError(
            f"the spark_kms JVM jars are missing: {', '.join(missing)}; run 'make bootstrap', "
            f"or set {JARS_ENV} to the paths of the bridge jar and Delta Lake's jars"
        )
    return paths


def session_config(*, delta: bool = True) -> dict[str, str]:
    """Return the properties a Spark session must be launched with to use the JVM bridge.

    They must be set before the session's JVM starts: pass them to
    ``SparkSession.builder.config(map=...)``, or write them to
    ``spark-defaults.conf`` (:func:`main` prints them in that format). With
    ``delta`` (the default) they also enable Delta Lake.

    :raises ConfigurationError: if a jar is missing.
    """
    extensions = [SESSION_EXTENSION_CLASS]
    config = {
        "spark.jars": ",".join(jar_paths(delta=delta)),
        # Sessions that never call spark_kms.configure still reject plaintext
        # writes into spark_kms tables.
        f"spark.hadoop.{CRYPTO_FACTORY}": CRYPTO_FACTORY_CLASS,
    }
    if delta:
        extensions.insert(0, DELTA_SESSION_EXTENSION_CLASS)
        config["spark.sql.catalog.spark_catalog"] = DELTA_CATALOG_CLASS
        config["spark.delta.logStore.class"] = LOG_STORE_CLASS
    config["spark.sql.extensions"] = ",".join(extensions)
    return config


def _class_loads(spark: SparkSession, name: str) -> bool:
    from py4j.protocol import Py4JJavaError

    try:
        spark._jvm.org.apache.spark.util.Utils.classForName(name, True, False)  # type: ignore[union-attr]
    except Py4JJavaError:
        return False
    return True


def enable(spark: SparkSession) -> bool:
    """Switch the bridge's crypto factory on in ``spark``, if the bridge jar is loaded.

    :returns: whether the bridge is enabled. Without the jar on the classpath
        only ``kms_parquet`` encrypts, and a warning names how to launch the
        session with :func:`session_config`.
    """
    if not _class_loads(spark, CRYPTO_FACTORY_CLASS):
        log.warning(
            "the spark_kms JVM bridge is not on the classpath of application %s, so Spark's "
            "Parquet writer and Delta Lake cannot encrypt; launch the session with "
            "spark_kms.session_config()",
            spark.sparkContext.applicationId,
        )
        return False
    spark.conf.set(CRYPTO_FACTORY, CRYPTO_FACTORY_CLASS)
    extensions = spark.sparkContext.getConf().get("spark.sql.extensions", "") or ""
    if SESSION_EXTENSION_CLASS not in extensions:
        log.warning(
            "spark.sql.extensions lacks %s, so a mode('overwrite') or non-Parquet write of "
            "Spark's own writer into a spark_kms table is not rejected; launch the session "
            "with spark_kms.session_config()",
            SESSION_EXTENSION_CLASS,
        )
    log.info("spark_kms JVM bridge enabled for application %s", spark.sparkContext.applicationId)
    return True


def is_enabled(spark: SparkSession) -> bool:
    """Tell whether :func:`enable` switched the bridge on in ``spark``."""
    return spark.conf.get(CRYPTO_FACTORY, None) == CRYPTO_FACTORY_CLASS


def delta_log_store_enabled(spark: SparkSession) -> bool:
    """Tell whether Delta Lake writes its log through the bridge's log store."""
    return spark.sparkContext.getConf().get("spark.delta.logStore.class", "") == LOG_STORE_CLASS


# Keys in the session -----------------------------------------------------------


@contextmanager
def _py4j_silenced() -> Iterator[None]:
    """Drop py4j's log records inside the block, which would show the KEKs it carries.

    Records of other threads that use py4j meanwhile are dropped too.
    """
    with _LOCK:
        loggers = [logging.getLogger(name) for name in _PY4J_LOGGERS]
        states = [logger.disabled for logger in loggers]
        for logger in loggers:
            logger.disabled = True
        try:
            yield
        finally:
            for logger, state in zip(loggers, states, strict=True):
                logger.disabled = state


def _loaded(spark: SparkSession) -> dict[str, bytes]:
    with _py4j_silenced():
        text = spark.conf.get(KEKS, None) or ""
    keks: dict[str, bytes] = {}
    for entry in text.split(","):
        if entry:
            kek_id, _, encoded = entry.partition(":")
            keks[kek_id] = base64.b64decode(encoded)
    return keks


def _store(spark: SparkSession, keks: Mapping[str, bytes]) -> None:
    if keks:
        with _py4j_silenced():
            spark.conf.set(
                KEKS,
                ",".join(
                    f"{k}:{base64.b64encode(v).decode('ascii')}" for k, v in sorted(keks.items())
                ),
            )
        # parquet-mr caches one KMS client per instance id; a new id makes the
        # next job build a client with the new set of KEKs.
        spark.conf.set(KMS_INSTANCE_ID, f"spark_kms-{uuid.uuid4().hex[:16]}")
    else:
        spark.conf.unset(KEKS)
        spark.conf.unset(KMS_INSTANCE_ID)
    # Drop the driver JVM's cached clients, and so the KEKs they hold. In local
    # mode the executors share that JVM; a cluster's executors drop theirs when
    # parquet-mr's cache lifetime (10 minutes by default) ends.
    spark._jvm.org.apache.parquet.crypto.keytools.KeyToolkit.removeCacheEntriesForAllTokens()  # type: ignore[union-attr]


def loaded_kek_ids(spark: SparkSession) -> list[str]:
    """Return the ids of the KEKs loaded in ``spark``, sorted."""
    with _LOCK:
        return sorted(_loaded(spark))


def load_keys(spark: SparkSession, keys: JobKeys) -> None:
    """Add ``keys`` to the KEKs that Spark's Parquet reader and writer in ``spark`` may use."""
    if not len(keys):
        return
    with _LOCK:
        keks = _loaded(spark)
        keks.update({kek_id: keys.kek(kek_id) for kek_id in keys.key_ids})
        _store(spark, keks)
    log.debug("loaded %d KEK(s) into the Spark session: %s", len(keys), ", ".join(keys.key_ids))


def unload_keys(spark: SparkSession, kek_ids: Iterable[str] | None = None) -> int:
    """Remove the KEKs ``kek_ids`` (default: all) from ``spark``; return how many were loaded."""
    with _LOCK:
        keks = _loaded(spark)
        dropped = set(keks) if kek_ids is None else set(kek_ids) & set(keks)
        if dropped:
            _store(spark, {k: v for k, v in keks.items() if k not in dropped})
    if dropped:
        log.debug("unloaded %d KEK(s) from the Spark session", len(dropped))
    return len(dropped)


@contextmanager
def write_keys(
    spark: SparkSession,
    *,
    table: str,
    table_id: str,
    footer_kek_id: str,
    column_keys: Mapping[str, Sequence[str]],
    delta_log_kek_id: str | None = None,
) -> Iterator[None]:
    """Configure Spark's Parquet writer in ``spark`` to encrypt for one table inside the block.

    The KEKs themselves must be loaded with :func:`load_keys`.

    :param column_keys: KEK id to the Parquet leaf paths it encrypts; the
        footer KEK encrypts every other column.
    :param delta_log_kek_id: KEK that encrypts Delta's checkpoints.
    :raises ConfigurationError: if another write block is active in ``spark``,
        because the write settings are one per session.
    """
    properties = {
        WRITE_TABLE_ID: table_id,
        FOOTER_KEY: footer_kek_id,
        COLUMN_KEYS: ";".join(f"{k}:{','.join(paths)}" for k, paths in column_keys.items()),
        DELTA_LOG_KEY: delta_log_kek_id or "",
        # Spark's default, INT96, reads back through pyarrow (the kms_parquet
        # path) as nanoseconds, which the kms_parquet reader rejects.
        OUTPUT_TIMESTAMP_TYPE: "TIMESTAMP_MICROS",
    }
    with _LOCK:
        if spark.conf.get(WRITE_TABLE_ID, None):
            raise ConfigurationError(
                f"another spark_kms write is active in this Spark session, so table '{table}' "
                "cannot be written now; write one table at a time per session"
            )
        previous = {name: spark.conf.get(name, None) for name in _WRITE_PROPERTIES}
        for name, value in properties.items():
            if value:
                spark.conf.set(name, value)
            else:
                spark.conf.unset(name)
    try:
        yield
    finally:
        with _LOCK:
            for name, old in previous.items():
                if old is None:
                    spark.conf.unset(name)
                else:
                    spark.conf.set(name, old)


# Column keys -------------------------------------------------------------------


def parquet_leaf_paths(spark: SparkSession, schema: StructType) -> list[str]:
    """Return the leaf column paths Spark's Parquet writer in ``spark`` gives ``schema``.

    Uses Spark's own schema converter, so a list column ``l`` is
    ``l.list.element`` (or the legacy form when
    ``spark.sql.parquet.writeLegacyFormat`` is on).
    """
    jvm: Any = spark._jvm
    session: Any = spark._jsparkSession
    java_schema = session.parseDataType(schema.json())
    converter = (
        jvm.org.apache.spark.sql.execution.datasources.parquet.SparkToParquetSchemaConverter(
            session.sessionState().conf()
        )
    )
    return [".".join(path) for path in converter.convert(java_schema).getPaths()]


def column_key_paths(
    spark: SparkSession, schema: StructType, groups: Mapping[str, Sequence[str]]
) -> dict[str, list[str]]:
    """Map each key group to the Parquet leaf paths of its columns.

    A top-level column name covers every leaf below it; a full leaf path is
    accepted too.

    :raises InvalidOptionError: if a column does not exist, or a top-level name
        contains ``.``, which Parquet column paths use as their separator.
    """
    leaves = parquet_leaf_paths(spark, schema)
    top_level = set(schema.fieldNames())
    return {
        group: [
            path
            for paths in match_column_paths(leaves, top_level, columns).values()
            for path in paths
        ]
        for group, columns in groups.items()
    }


def main() -> int:
    """Print :func:`session_config` as ``spark-defaults.conf`` lines; return the exit code.

    ``make bootstrap`` appends them to ``.state/spark-kms.conf``.
    """
    try:
        config = session_config()
    except ConfigurationError as error:
        print(f"spark_kms.bridge: {error}", file=sys.stderr)
        return 1
    for key, value in config.items():
        print(f"{key:<44} {value}")
    return 0
