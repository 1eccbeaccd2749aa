"""Spark integration: :func:`configure` and the typed-error helpers.

``configure(spark)`` is the one call a job or notebook makes. It reads the
``spark.kms.*`` settings, logs in to the HSM once on the driver (so a wrong
module, token or PIN fails here with a typed error), and registers the
``kms_parquet`` data source bound to those settings. If the session was
launched with the JVM bridge (:func:`spark_kms.session_config`), it also lets
Spark's own Parquet writer and reader, and Delta Lake, encrypt with the same
keys (:mod:`spark_kms.native`).

Spark runs data source code in separate Python workers and reports their
errors as its own exception types. :func:`typed_errors` turns such an error
back into the spark_kms error it carries.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from spark_kms import bridge
from spark_kms import errors as _errors
from spark_kms.datasource import data_source_class
from spark_kms.errors import ConfigurationError, SparkKmsError
from spark_kms.keyservice import EraseReport, KeyService
from spark_kms.settings import PREFIX, KmsSettings
from spark_kms.splits import ReadSplitSettings

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = ["configure", "erase_table", "read_table", "typed_errors", "write_table"]

log = logging.getLogger(__name__)

_CONFIGURED: dict[str, KeyService] = {}
_ERROR_PATTERN = re.compile(r"spark_kms\.errors\.(\w+): (.+)")


def _settings_from_spark(spark: SparkSession) -> KmsSettings:
    properties = {k: v for k, v in spark.sparkContext.getConf().getAll() if k.startswith(PREFIX)}
    runtime = spark.conf.getAll if hasattr(spark.conf, "getAll") else None
    if runtime is not None:
        properties.update({k: v for k, v in runtime.items() if k.startswith(PREFIX)})
    if not properties:
        return KmsSettings.from_environment()
    return KmsSettings.from_properties(properties)


def configure(spark: SparkSession, settings: KmsSettings | None = None) -> KeyService:
    """Enable spark_kms in ``spark`` and return the driver's key service.

    :param settings: by default read from the session's ``spark.kms.*``
        properties, or from the file named by ``SPARK_KMS_CONF``.
    :raises ConfigurationError: if a setting is missing or invalid.
    :raises HsmUnavailableError: if the token is missing, the PIN is wrong or a
        required mechanism is not offered.
    """
    settings = settings or _settings_from_spark(spark)
    # The Spark user is the principal of the access policy and the audit log.
    principal = spark.sparkContext.sparkUser()
    application_id = spark.sparkContext.applicationId
    service = KeyService(settings, principal=principal, application_id=application_id)
    # Log in now: configuration errors surface here, typed, and not in a job.
    service.hsm  # noqa: B018

    # The file scan settings are read once here: changing them later in the
    # session does not resize kms_parquet's read tasks until configure runs again.
    spark.dataSource.register(
        data_source_class(
            settings,
            principal=principal,
            application_id=application_id,
            read_splits=ReadSplitSettings.from_session(spark),
        )
    )
    _CONFIGURED[spark.sparkContext.applicationId] = service
    bridge.enable(spark)
    log.info(
        "spark_kms configured for application %s with token %s",
        spark.sparkContext.applicationId,
        settings.token_label,
    )
    return service


def _service_of(spark: SparkSession) -> KeyService:
    service = _CONFIGURED.get(spark.sparkContext.applicationId)
    if service is None:
        raise ConfigurationError(
            "spark_kms is not configured for this session; call spark_kms.configure(spark) first"
        )
    return service


def erase_table(spark_or_service: SparkSession | KeyService, table: str) -> EraseReport:
    """Crypto-erase ``table``; see :meth:`KeyService.erase_table`.

    Given a Spark session, also unloads the table's KEKs from it.
    """
    if isinstance(spark_or_service, KeyService):
        return spark_or_service.erase_table(table)
    report = _service_of(spark_or_service).erase_table(table)
    # Key ids are "<table>.<group>.k<job id>"; table names contain no '.'.
    loaded = bridge.loaded_kek_ids(spark_or_service)
    bridge.unload_keys(spark_or_service, [k for k in loaded if k.startswith(f"{table}.")])
    return report


@contextmanager
def typed_errors() -> Iterator[None]:
    """Re-raise a spark_kms error that Spark reports inside its own exception.

    The original Spark exception is kept as ``__cause__``.
    """
    try:
        yield
    except SparkKmsError:
        raise
    except Exception as error:
        typed = _typed_from_text(str(error))
        if typed is None:
            raise
        raise typed from error


def _typed_from_text(text: str) -> SparkKmsError | None:
    matches = _ERROR_PATTERN.findall(text)
    if not matches:
        return None
    name, message = matches[-1]
    cls = getattr(_errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SparkKmsError)):
        return None
    error = SparkKmsError.__new__(cls)
    Exception.__init__(error, message.strip())
    if isinstance(error, _errors.TableErasedError):
        table = re.search(r"table '([^']+)'", message)
        error.table = table.group(1) if table else ""
    _restore_fields(error, message)
    return error


# The fields of lifecycle errors, as their messages state them.
_FIELD_PATTERNS: dict[type[SparkKmsError], re.Pattern[str]] = {
    _errors.AccessDeniedError: re.compile(
        r"principal '(?P<principal>[^']*)' may not perform '(?P<operation>[^']*)' on table "
        r"'(?P<table>[^']*)'"
    ),
    _errors.TablePendingDeletionError: re.compile(
        r"table '(?P<table>[^']*)' is scheduled for deletion on (?P<deletion_due_at>.+?), so"
    ),
    _errors.PartitionErasedError: re.compile(
        r"partition (?P<partition>\S+) of table '(?P<table>[^']*)' was crypto-erased"
    ),
}


def _restore_fields(error: SparkKmsError, message: str) -> None:
    pattern = _FIELD_PATTERNS.get(type(error))
    found = pattern.search(message) if pattern is not None else None
    if found is not None:
        for name, value in found.groupdict().items():
            setattr(error, name, value)


def _activate_in_this_thread(spark: SparkSession) -> None:
    # Spark 4.2 finds a registered Python data source through the JVM thread's
    # active session, which a new Python thread (so a new py4j thread) lacks:
    # without this, jobs started from other driver threads fail with
    # DATA_SOURCE_NOT_FOUND for kms_parquet.
    jvm = spark.sparkContext._jvm
    if jvm is not None:
        jvm.org.apache.spark.sql.SparkSession.setActiveSession(spark._jsparkSession)


def write_table(
    df: DataFrame,
    path: str,
    *,
    table: str,
    column_keys: str | None = None,
    mode: str = "append",
    partition_by: str | None = None,
) -> None:
    """Write ``df`` to the encrypted table at ``path``, raising typed errors.

    :param mode: ``append`` or ``overwrite``.
    :param partition_by: the ``kms.partition_by`` column: one master key per value.
    """
    writer = df.write.format("kms_parquet").option("kms.table", table).mode(mode)
    if column_keys:
        writer = writer.option("kms.column_keys", column_keys)
    if partition_by:
        writer = writer.option("kms.partition_by", partition_by)
    _activate_in_this_thread(df.sparkSession)
    with typed_errors():
        writer.save(path)


def read_table(spark: SparkSession, path: str) -> DataFrame:
    """Read the encrypted table at ``path``, raising typed errors.

    Spark reads lazily: wrap the actions in :func:`typed_errors` too. When
    partitions of the table were crypto-erased, the result contains the other
    partitions and a :class:`~spark_kms.errors.PartitionsErasedWarning` names
    the erased ones.
    """
    _activate_in_this_thread(spark)
    with typed_errors():
        df = spark.read.format("kms_parquet").load(path)
    service = _CONFIGURED.get(spark.sparkContext.applicationId)
    erased = service.erased_partitions(path) if service is not None else []
    if erased:
        message = (
            f"the table at {path} has crypto-erased partition(s) {', '.join(erased)}; "
            "reads return the other partitions only"
        )
        log.warning("%s", message)
        warnings.warn(message, _errors.PartitionsErasedWarning, stacklevel=2)
    return df
