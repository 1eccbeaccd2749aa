"""Parquet Modular Encryption on executors, with the job's in-memory KEKs.

pyarrow's ``CryptoFactory`` generates fresh random DEKs every time it builds
file encryption properties; this module builds them once per file. DEKs are
wrapped directly by the KEKs (``double_wrapping=False``), with parquet-mr's
local-wrap format, so the footer key material names the KEK id as the
"master key identifier" and parquet-mr can read the files with the JVM bridge.

This module never imports the HSM access: executors hold no HSM credentials.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pe

from spark_kms.errors import IntegrityError, InvalidOptionError
from spark_kms.jobkeys import JobKeys
from spark_kms.localwrap import unwrap_key_locally, wrap_key_locally

__all__ = [
    "ENCRYPTION_ALGORITHM",
    "EncryptionPlan",
    "JobKmsClient",
    "is_encrypted_file",
    "leaf_paths",
    "open_encrypted_dataset",
    "open_encrypted_writer",
    "match_column_paths",
    "resolve_column_paths",
    "write_encrypted_file",
]

ENCRYPTION_ALGORITHM = "AES_GCM_V1"
DEK_BITS = 256
PARQUET_ENCRYPTED_MAGIC = b"PARE"

# A row group is written once this many rows or Arrow bytes are buffered.
# Spark hands a task Arrow batches of spark.sql.execution.arrow.maxRecordsPerBatch
# rows (10,000 by default). One row group per batch makes files larger and
# reads slower, because pyarrow 26 unwraps a DEK several times for every
# encrypted column chunk it reads. 1 Mi rows is pyarrow's default maximum row
# group length. 128 MiB is parquet-mr's default row group size
# (parquet.block.size), which Spark's own writer uses. Here it also bounds the
# Arrow data a task holds in memory.
ROW_GROUP_MAX_ROWS = 1024 * 1024
ROW_GROUP_MAX_BYTES = 128 * 1024 * 1024


class JobKmsClient(pe.KmsClient):  # type: ignore[misc]
    """A pyarrow KMS client that wraps DEKs with the job's KEKs, in memory.

    The "master key identifier" pyarrow passes is the KEK id.
    """

    def __init__(self, keys: JobKeys) -> None:
        super().__init__()
        self._keys = keys

    def __repr__(self) -> str:
        return f"JobKmsClient(key_ids={self._keys.key_ids!r})"

    def wrap_key(self, key_bytes: bytes, master_key_identifier: str) -> str:
        """Wrap a DEK with the KEK ``master_key_identifier``."""
        return wrap_key_locally(
            key_bytes, self._keys.kek(master_key_identifier), master_key_identifier
        )

    def unwrap_key(self, wrapped_key: str | bytes, master_key_identifier: str) -> bytes:
        """Unwrap a DEK with the KEK ``master_key_identifier``."""
        if isinstance(wrapped_key, bytes):
            wrapped_key = wrapped_key.decode("ascii", errors="replace")
        return unwrap_key_locally(
            wrapped_key, self._keys.kek(master_key_identifier), master_key_identifier
        )


def _crypto_factory(keys: JobKeys) -> pe.CryptoFactory:
    return pe.CryptoFactory(lambda _config: JobKmsClient(keys))


def _connection(job_id: str) -> pe.KmsConnectionConfig:
    # A distinct instance id per job keeps pyarrow's client cache from mixing jobs.
    return pe.KmsConnectionConfig(kms_instance_id=f"spark_kms-{job_id}")


class EncryptionPlan:
    """Which KEK encrypts the footer and which encrypts each column of a job.

    :param job_id: the write job's id.
    :param footer_kek_id: KEK id for the footer and every column not under a column key.
    :param column_keys: KEK id to Parquet leaf column paths. It must cover every
        leaf, because PME leaves a column that no key lists in plaintext; an
        empty mapping encrypts every column with the footer KEK.
    :param keys: the job's KEKs.
    """

    def __init__(
        self,
        *,
        job_id: str,
        footer_kek_id: str,
        column_keys: Mapping[str, Sequence[str]],
        keys: JobKeys,
    ) -> None:
        self.job_id = job_id
        self.footer_kek_id = footer_kek_id
        self.column_keys = {k: list(v) for k, v in column_keys.items()}
        self.keys = keys

    def __repr__(self) -> str:
        return (
            f"EncryptionPlan(job_id={self.job_id!r}, footer_kek_id={self.footer_kek_id!r}, "
            f"column_keys={self.column_keys!r})"
        )

    def file_encryption_properties(self) -> Any:
        """Return encryption properties with fresh DEKs, for one file."""
        uniform = not self.column_keys
        config = pe.EncryptionConfiguration(
            footer_key=self.footer_kek_id,
            column_keys=None if uniform else self.column_keys,
            uniform_encryption=uniform,
            encryption_algorithm=ENCRYPTION_ALGORITHM,
            plaintext_footer=False,
            double_wrapping=False,
            internal_key_material=True,
            data_key_length_bits=DEK_BITS,
            cache_lifetime=timedelta(minutes=10),
        )
        return _crypto_factory(self.keys).file_encryption_properties(
            _connection(self.job_id), config
        )


def write_encrypted_file(
    batches: Iterable[pa.RecordBatch],
    path: str,
    *,
    plan: EncryptionPlan,
    filesystem: Any,
    schema: pa.Schema | None = None,
) -> tuple[int, pa.Schema | None]:
    """Write ``batches`` to one encrypted Parquet file with fresh DEKs.

    The file is created only when there is at least one batch (or ``schema``
    is given). Batches are buffered into row groups of at most
    ``ROW_GROUP_MAX_ROWS`` rows and ``ROW_GROUP_MAX_BYTES`` Arrow bytes (a
    single larger batch is split by rows only).

    :returns: the number of rows written and the file's Arrow schema (``None``
        when no file was written).
    """
    writer: pq.ParquetWriter | None = None
    rows = 0
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    pending_bytes = 0
    try:
        for batch in batches:
            if writer is None:
                writer = open_encrypted_writer(path, schema or batch.schema, plan, filesystem)
            if not batch.num_rows:
                continue
            if pending and (
                pending_rows + batch.num_rows > ROW_GROUP_MAX_ROWS
                or pending_bytes + batch.nbytes > ROW_GROUP_MAX_BYTES
            ):
                _write_row_group(writer, pending)
                pending, pending_rows, pending_bytes = [], 0, 0
            pending.append(batch)
            pending_rows += batch.num_rows
            pending_bytes += batch.nbytes
            rows += batch.num_rows
        if writer is None and schema is not None:
            writer = open_encrypted_writer(path, schema, plan, filesystem)
        if pending:
            assert writer is not None
            _write_row_group(writer, pending)
    finally:
        if writer is not None:
            writer.close()
    return rows, (writer.schema if writer is not None else None)


def _write_row_group(writer: pq.ParquetWriter, batches: list[pa.RecordBatch]) -> None:
    writer.write_table(pa.Table.from_batches(batches), row_group_size=ROW_GROUP_MAX_ROWS)


def open_encrypted_writer(
    path: str, schema: pa.Schema, plan: EncryptionPlan, filesystem: Any
) -> pq.ParquetWriter:
    """Open a Parquet writer at ``path`` that encrypts with fresh DEKs under ``plan``."""
    return pq.ParquetWriter(
        path,
        schema,
        filesystem=filesystem,
        compression="snappy",
        encryption_properties=plan.file_encryption_properties(),
        # Statistics stay inside the encrypted footer and column metadata.
        write_statistics=True,
    )


def open_encrypted_dataset(
    paths: Sequence[str],
    *,
    keys: JobKeys,
    filesystem: Any,
    job_id: str,
    schema: pa.Schema | None = None,
) -> ds.Dataset:
    """Open encrypted Parquet files as a pyarrow dataset that decrypts with ``keys``."""
    decryption = ds.ParquetDecryptionConfig(
        _crypto_factory(keys),
        _connection(job_id),
        pe.DecryptionConfiguration(cache_lifetime=timedelta(minutes=10)),
    )
    scan_options = ds.ParquetFragmentScanOptions(decryption_config=decryption)
    file_format = ds.ParquetFileFormat(default_fragment_scan_options=scan_options)
    return ds.dataset(list(paths), schema=schema, format=file_format, filesystem=filesystem)


def is_encrypted_file(filesystem: Any, path: str) -> bool:
    """Tell whether the file begins and ends with ``PARE`` (encrypted footer mode)."""
    with filesystem.open_input_file(path) as handle:
        size = handle.size()
        if size < 2 * len(PARQUET_ENCRYPTED_MAGIC):
            return False
        head = handle.read_at(4, 0)
        tail = handle.read_at(4, size - 4)
    return bool(head == PARQUET_ENCRYPTED_MAGIC and tail == PARQUET_ENCRYPTED_MAGIC)


def leaf_paths(schema: pa.Schema) -> list[str]:
    """Return the Parquet leaf column paths of ``schema`` (``a.b``, ``l.list.element``)."""
    buffer = io.BytesIO()
    pq.write_table(schema.empty_table(), buffer)
    buffer.seek(0)
    parquet_schema = pq.ParquetFile(buffer).schema
    return [parquet_schema.column(i).path for i in range(len(parquet_schema))]


def resolve_column_paths(schema: pa.Schema, columns: Iterable[str]) -> dict[str, list[str]]:
    """Map each requested column to the Parquet leaf paths it covers.

    A top-level column name covers every leaf below it, so a struct, list or
    map column under a column key has all of its leaves encrypted. A full leaf
    path is accepted too.

    :raises InvalidOptionError: naming the column and listing valid paths, if a
        column does not exist or its name contains ``.`` (ambiguous in Parquet
        column paths).
    """
    return match_column_paths(leaf_paths(schema), set(schema.names), columns)


def match_column_paths(
    leaves: Sequence[str], top_level: set[str], columns: Iterable[str]
) -> dict[str, list[str]]:
    """Map each column to the leaf paths in ``leaves`` that it covers.

    :param leaves: the Parquet leaf paths of the schema.
    :param top_level: the schema's top-level column names.
    :raises InvalidOptionError: as :func:`resolve_column_paths` describes.
    """
    resolved: dict[str, list[str]] = {}
    for column in columns:
        if column in top_level and "." in column:
            raise InvalidOptionError(
                f"column {column!r} contains '.', which Parquet column paths use as a separator, "
                "so it cannot be put under a column key; rename the column"
            )
        if column in top_level:
            covered = [p for p in leaves if p == column or p.startswith(column + ".")]
        else:
            covered = [p for p in leaves if p == column]
        if not covered:
            raise InvalidOptionError(
                f"column {column!r} in kms.column_keys does not exist; valid columns and leaf paths: "
                + ", ".join(sorted(top_level | set(leaves)))
            )
        resolved[column] = covered
    return resolved


# Words of pyarrow's errors about a file's key metadata, whose text then quotes
# the metadata and with it the wrapped DEK.
_KEY_MATERIAL_ERROR = re.compile(r"key metadata|key material|wrapped(dek|kek)", re.IGNORECASE)


def check_readable(error: BaseException, path: str) -> IntegrityError:
    """Return an :class:`IntegrityError` naming ``path`` for a failed decryption."""
    detail = str(error)
    if _KEY_MATERIAL_ERROR.search(detail):
        detail = "the key metadata of the file is invalid (its text is left out: it contains wrapped keys)"
    return IntegrityError(
        f"cannot decrypt {path}: {type(error).__name__}: {detail}; the file is damaged, was "
        "changed, or was written under keys this table does not hold"
    )
