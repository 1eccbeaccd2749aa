"""spark_kms: encrypted Parquet tables for Apache Spark, master keys in a PKCS#11 HSM.

Call :func:`configure` once per Spark session, then write and read with
``format("kms_parquet")``, or with Spark's own Parquet writer and reader and
Delta Lake through :func:`write_parquet`, :func:`read_parquet`,
:func:`write_delta`, :func:`read_delta` and :func:`table_keys`, in a session
launched with :func:`session_config`.
"""

from __future__ import annotations

import logging as _logging
import os as _os
import sys as _sys

from spark_kms.bridge import session_config
from spark_kms.errors import (
    AccessDeniedError,
    AmbiguousKeyError,
    CommitError,
    ConfigurationError,
    HsmUnavailableError,
    IntegrityError,
    InvalidOptionError,
    KeyNotFoundError,
    PartitionErasedError,
    PartitionNotFoundError,
    PartitionsErasedWarning,
    SparkKmsError,
    TableErasedError,
    TableNotFoundError,
    TablePendingDeletionError,
    TableStateError,
)
from spark_kms.keyservice import KeyService
from spark_kms.native import (
    TableKeys,
    read_delta,
    read_parquet,
    release_keys,
    table_keys,
    write_delta,
    write_parquet,
)
from spark_kms.rekey import rekey_table
from spark_kms.settings import KmsSettings
from spark_kms.spark import configure, erase_table, read_table, typed_errors, write_table

__all__ = [
    "AccessDeniedError",
    "AmbiguousKeyError",
    "CommitError",
    "ConfigurationError",
    "HsmUnavailableError",
    "IntegrityError",
    "InvalidOptionError",
    "KeyNotFoundError",
    "KeyService",
    "KmsSettings",
    "PartitionErasedError",
    "PartitionNotFoundError",
    "PartitionsErasedWarning",
    "SparkKmsError",
    "TableErasedError",
    "TableNotFoundError",
    "TableKeys",
    "TablePendingDeletionError",
    "TableStateError",
    "configure",
    "erase_table",
    "read_delta",
    "read_parquet",
    "read_table",
    "rekey_table",
    "release_keys",
    "session_config",
    "table_keys",
    "typed_errors",
    "write_delta",
    "write_parquet",
    "write_table",
]

__version__ = "0.1.0"


def _log_to_stderr_if_requested() -> None:
    # Spark's Python workers configure no logging. SPARK_KMS_LOG_LEVEL (for
    # example DEBUG) sends this package's records to the worker's stderr,
    # which Spark copies into the executor and driver logs.
    level = _os.environ.get("SPARK_KMS_LOG_LEVEL", "").upper()
    if not level:
        return
    logger = _logging.getLogger("spark_kms")
    if not logger.handlers:
        handler = _logging.StreamHandler(_sys.stderr)
        handler.setFormatter(_logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)


_log_to_stderr_if_requested()
