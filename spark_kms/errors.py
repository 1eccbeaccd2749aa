"""Exception tree of spark_kms.

Every error the library raises on purpose derives from :class:`SparkKmsError`.
The subclasses are grouped by what the caller does next: fix a configuration,
fix an option, look up the right key, wait for the HSM, ask for access, or stop
using a table that was erased. Messages name the value that is wrong and never
contain a PIN, a key or a wrapped key.
"""

from __future__ import annotations

__all__ = [
    "AccessDeniedError",
    "AmbiguousKeyError",
    "CommitError",
    "ConfigurationError",
    "HsmUnavailableError",
    "IntegrityError",
    "InvalidOptionError",
    "KeyNotFoundError",
    "SparkKmsError",
    "TableErasedError",
    "TableNotFoundError",
    "TableStateError",
]


class SparkKmsError(Exception):
    """Root of every error raised by spark_kms."""


class ConfigurationError(SparkKmsError):
    """A setting (Spark conf, PKCS#11 module, token, PIN source) is missing or invalid."""


class InvalidOptionError(ConfigurationError):
    """A writer or reader option (``kms.*``) is missing or invalid."""


class HsmUnavailableError(SparkKmsError):
    """The HSM could not be reached, or it rejected the login or a mechanism."""


class KeyNotFoundError(SparkKmsError):
    """No key object or KEK record matches the requested label or id."""


class AmbiguousKeyError(SparkKmsError):
    """More than one key object in the token matches a label that must be unique."""


class AccessDeniedError(SparkKmsError):
    """The policy does not allow this principal this operation on this table."""


class TableNotFoundError(SparkKmsError):
    """No spark_kms table is registered under this name or stored at this path."""


class TableStateError(SparkKmsError):
    """The table exists but its state does not allow the operation."""


class TableErasedError(TableStateError):
    """The table was crypto-erased: its master key is destroyed and its data unreadable."""

    def __init__(self, table: str, detail: str = "") -> None:
        self.table = table
        message = (
            f"table '{table}' was crypto-erased: its master key no longer exists, "
            "so its files cannot be decrypted and no new data can be written to it"
        )
        if detail:
            message = f"{message} ({detail})"
        super().__init__(message)


class IntegrityError(SparkKmsError):
    """A file or key record failed an authenticity or format check."""


class CommitError(SparkKmsError):
    """A write job could not be committed; nothing of it became visible."""
