"""spark_kms: encrypted Parquet tables for Apache Spark, master keys in a PKCS#11 HSM.

Call :func:`configure` once per Spark session, then write and read with
``format("kms_parquet")``.
"""

from __future__ import annotations

from spark_kms.errors import (
    AccessDeniedError,
    AmbiguousKeyError,
    CommitError,
    ConfigurationError,
    HsmUnavailableError,
    IntegrityError,
    InvalidOptionError,
    KeyNotFoundError,
    SparkKmsError,
    TableErasedError,
    TableNotFoundError,
    TableStateError,
)
from spark_kms.keyservice import KeyService
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
    "SparkKmsError",
    "TableErasedError",
    "TableNotFoundError",
    "TableStateError",
    "configure",
    "erase_table",
    "read_table",
    "typed_errors",
    "write_table",
]

__version__ = "0.1.0"
