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
    "PartitionErasedError",
    "PartitionNotFoundError",
    "PartitionsErasedWarning",
    "SparkKmsError",
    "TableErasedError",
    "TableNotFoundError",
    "TablePendingDeletionError",
    "TableStateError",
]


class SparkKmsError(Exception):
    """Root of every error raised by spark_kms."""

    _arguments: tuple[str, ...] = ()

    def __reduce__(self) -> str | tuple[object, ...]:
        # Errors whose constructor takes more than the message pickle with the
        # constructor's arguments, so they survive a trip between processes.
        if self._arguments:
            return (type(self), self._arguments)
        return super().__reduce__()


class ConfigurationError(SparkKmsError):
    """A setting (Spark conf, PKCS#11 module, token, PIN source) is missing or invalid."""


class InvalidOptionError(ConfigurationError):
    """A writer or reader option (``kms.*``) or a command argument is missing or invalid."""


class HsmUnavailableError(SparkKmsError):
    """The HSM could not be reached, or it rejected the login or a mechanism."""


class KeyNotFoundError(SparkKmsError):
    """No key object or KEK record matches the requested label or id."""


class AmbiguousKeyError(SparkKmsError):
    """More than one key object in the token matches a label that must be unique."""


class AccessDeniedError(SparkKmsError):
    """The policy does not allow this principal this operation on this table."""

    principal = ""
    table = ""
    operation = ""

    def __init__(self, principal: str, table: str, operation: str, policy_file: str) -> None:
        self.principal = principal
        self.table = table
        self.operation = operation
        self._arguments = (principal, table, operation, policy_file)
        super().__init__(
            f"access denied: principal '{principal}' may not perform '{operation}' on table "
            f"'{table}' because no rule in the access policy {policy_file} allows it; ask an "
            "administrator to add a rule"
        )


class TableNotFoundError(SparkKmsError):
    """No spark_kms table is registered under this name or stored at this path."""


class PartitionNotFoundError(TableNotFoundError):
    """The table has no partition with this column value."""


class TableStateError(SparkKmsError):
    """The table exists but its state does not allow the operation."""


class TableErasedError(TableStateError):
    """The table was crypto-erased: its master key is destroyed and its data unreadable."""

    def __init__(self, table: str, detail: str = "") -> None:
        self.table = table
        self._arguments = (table, detail)
        message = (
            f"table '{table}' was crypto-erased: its master key no longer exists, "
            "so its files cannot be decrypted and no new data can be written to it"
        )
        if detail:
            message = f"{message} ({detail})"
        super().__init__(message)


class TablePendingDeletionError(TableStateError):
    """The table is scheduled for deletion, so reads and writes are rejected until it is cancelled."""

    table = ""
    deletion_due_at = ""

    def __init__(self, table: str, deletion_due_at: str) -> None:
        self.table = table
        self.deletion_due_at = deletion_due_at
        self._arguments = (table, deletion_due_at)
        super().__init__(
            f"table '{table}' is scheduled for deletion on {deletion_due_at}, so it cannot be "
            f"read or written; to keep it, run 'spark-kms cancel-deletion {table}'"
        )


class PartitionErasedError(TableStateError):
    """A partition of the table was crypto-erased: its master key is destroyed."""

    table = ""
    partition = ""

    def __init__(self, table: str, partition: str, detail: str = "") -> None:
        self.table = table
        self.partition = partition
        self._arguments = (table, partition, detail)
        message = (
            f"partition {partition} of table '{table}' was crypto-erased: its master key no "
            "longer exists, so its files cannot be decrypted and no new data can be written to it"
        )
        if detail:
            message = f"{message} ({detail})"
        super().__init__(message)


class IntegrityError(SparkKmsError):
    """A file or key record failed an authenticity or format check."""


class CommitError(SparkKmsError):
    """A write job could not be committed; nothing of it became visible."""


class PartitionsErasedWarning(UserWarning):
    """A read skipped the files of crypto-erased partitions and returned the other partitions."""
