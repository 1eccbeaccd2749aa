"""Benchmark-only Spark data sources that share kms_parquet's code but encrypt nothing.

They exist so that ``scripts/bench.py`` can split the cost of ``kms_parquet``
into what the Python Data Source path costs and what encryption costs. They
are never part of the ``spark_kms`` package, never touch the key service, the
keyring or the HSM, and write only into their own folders: a table they write
is plain Parquet and is not a spark_kms table.

- ``bench_arrow_parquet`` (plaintext-equivalent): the same writer tasks as
  ``kms_parquet``, that is ``KmsParquetWriter.write`` and
  ``write_encrypted_file`` with a plan that returns no encryption properties.
  It stages and commits by rename like ``kms_parquet``, and its reader scans
  each file with the same pyarrow dataset call and batch size.
- ``bench_arrow_discard``: Spark sends the Arrow batches to the Python worker,
  which drops them. It measures the JVM-to-Python transfer alone.
- ``bench_arrow_ipc``: uncompressed Arrow IPC files, read memory-mapped, so a
  read costs little more than the Python-to-JVM transfer of its batches.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
from pyspark.sql.datasource import (
    DataSource,
    DataSourceArrowWriter,
    DataSourceReader,
    InputPartition,
    WriterCommitMessage,
)
from pyspark.sql.types import StructType

from spark_kms import datasource as kms_datasource
from spark_kms.datasource import KmsCommitMessage, KmsParquetWriter
from spark_kms.jobkeys import JobKeys
from spark_kms.keyring import resolve_location
from spark_kms.parquet_crypto import EncryptionPlan
from spark_kms.splits import ReadSplitSettings, group_files

__all__ = ["ArrowDiscardDataSource", "ArrowIpcDataSource", "ArrowParquetDataSource", "register"]

PLAINTEXT_FORMAT = "bench_arrow_parquet"
DISCARD_FORMAT = "bench_arrow_discard"
IPC_FORMAT = "bench_arrow_ipc"
SCHEMA_FILE = "_bench_schema.json"
# The batch size of KmsParquetReader.read. The reader's options batch_rows and
# use_threads (true or false) change the scan for profiling.
# NOTE: a copy of the literal in KmsParquetReader.read; change both together.
READ_BATCH_ROWS = 65536
STAGING_DIR = "_bench_staging"


def register(spark: Any) -> None:
    """Register the benchmark data sources in ``spark``.

    Spark's Python workers cannot import this file from ``scripts/``, so the
    module is pickled by value.
    """
    import sys

    from pyspark import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # The readers group files into tasks as kms_parquet's reader does.
    _ReadSplits.properties = ReadSplitSettings.from_session(spark).to_properties()
    spark.dataSource.register(ArrowParquetDataSource)
    spark.dataSource.register(ArrowDiscardDataSource)
    spark.dataSource.register(ArrowIpcDataSource)


class _NoEncryptionPlan(EncryptionPlan):
    """An encryption plan whose files get no encryption properties, so pyarrow writes plaintext."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id=job_id, footer_kek_id="none", column_keys={}, keys=JobKeys({}))

    def file_encryption_properties(self) -> Any:
        return None


class ArrowParquetDataSource(DataSource):
    """Plain Parquet through kms_parquet's writer and reader code; benchmark only."""

    @classmethod
    def name(cls) -> str:
        return PLAINTEXT_FORMAT

    def _location(self) -> str:
        filesystem, location = resolve_location(str(self.options["path"]))
        return location

    def schema(self) -> StructType:
        filesystem, location = resolve_location(str(self.options["path"]))
        with filesystem.open_input_stream(f"{location}/{SCHEMA_FILE}") as handle:
            return StructType.fromJson(json.loads(handle.read().decode("utf-8")))

    def writer(self, schema: StructType, overwrite: bool) -> PlaintextWriter:
        location = self._location()
        job_id = uuid.uuid4().hex[:16]
        return PlaintextWriter(
            table="bench",
            location=location,
            staging=f"{location}/{STAGING_DIR}/{job_id}",
            plan=_NoEncryptionPlan(job_id),
            overwrite=overwrite,
            spark_schema=schema.json(),
            properties={},
        )

    def reader(self, schema: StructType) -> PlaintextReader:
        batch_rows = int(self.options.get("batch_rows", READ_BATCH_ROWS))
        use_threads = self.options.get("use_threads", "true") == "true"
        return PlaintextReader(self._location(), schema, batch_rows, use_threads)


class PlaintextWriter(KmsParquetWriter):
    """``KmsParquetWriter`` whose commit moves the staged plain files without a keyring.

    ``write`` is inherited unchanged.
    """

    def commit(self, messages: list[WriterCommitMessage | None]) -> None:
        filesystem, _ = resolve_location(self.location)
        files = [f for m in messages if isinstance(m, KmsCommitMessage) for f in m.files]
        previous = _list_parquet(filesystem, self.location) if self.overwrite else []
        for name in files:
            filesystem.move(f"{self.staging}/{name}", f"{self.location}/{name}")
        for old in previous:
            if old not in files:
                filesystem.delete_file(f"{self.location}/{old}")
        with filesystem.open_output_stream(f"{self.location}/{SCHEMA_FILE}") as handle:
            handle.write(self.spark_schema.encode("utf-8"))
        filesystem.delete_dir(self.staging)

    def abort(self, messages: list[WriterCommitMessage | None]) -> None:
        filesystem, _ = resolve_location(self.location)
        filesystem.delete_dir(self.staging)


class _ReadSplits:
    """The session's file scan settings, pickled with the readers."""

    properties: dict[str, int] = {}


class _FilePartition(InputPartition):
    def __init__(self, paths: list[str]) -> None:
        super().__init__(paths)
        self.paths = paths


def _file_partitions(filesystem: Any, location: str, names: list[str]) -> list[InputPartition]:
    # The same grouping of files into tasks as KmsParquetReader.partitions.
    sizes = {name: int(filesystem.get_file_info(f"{location}/{name}").size) for name in names}
    groups = group_files(sizes, ReadSplitSettings.from_properties(_ReadSplits.properties))
    return [_FilePartition([f"{location}/{name}" for name in group]) for group in groups]


class PlaintextReader(DataSourceReader):
    """Files grouped into tasks and scanned as ``KmsParquetReader.read`` does, minus decryption."""

    def __init__(self, location: str, schema: StructType, batch_rows: int, use_threads: bool) -> None:
        self.location = location
        self.schema = schema
        self.batch_rows = batch_rows
        self.use_threads = use_threads

    def partitions(self) -> Sequence[InputPartition]:
        filesystem, _ = resolve_location(self.location)
        return _file_partitions(filesystem, self.location, _list_parquet(filesystem, self.location))

    def read(self, partition: InputPartition) -> Iterator[pa.RecordBatch]:
        assert isinstance(partition, _FilePartition)
        columns = [f.name for f in self.schema.fields]
        nullable = {f.name: f.nullable for f in self.schema.fields}
        for file_path in partition.paths:
            filesystem, path = resolve_location(file_path)
            dataset = ds.dataset([path], format="parquet", filesystem=filesystem)
            batches = dataset.to_batches(
                columns=columns, batch_size=self.batch_rows, use_threads=self.use_threads
            )
            for batch in batches:
                yield kms_datasource._with_nullability(
                    kms_datasource._timestamps_in_utc(batch), nullable
                )


class ArrowDiscardDataSource(DataSource):
    """A sink whose tasks receive Spark's Arrow batches and drop them; benchmark only."""

    @classmethod
    def name(cls) -> str:
        return DISCARD_FORMAT

    def writer(self, schema: StructType, overwrite: bool) -> DiscardWriter:
        return DiscardWriter()


class DiscardWriter(DataSourceArrowWriter):
    """Counts the rows of every batch and keeps nothing."""

    def write(self, iterator: Iterator[pa.RecordBatch]) -> KmsCommitMessage:
        rows = 0
        for batch in iterator:
            rows += batch.num_rows
        return KmsCommitMessage(files=[], rows=rows)

    def commit(self, messages: list[WriterCommitMessage | None]) -> None:
        pass


class ArrowIpcDataSource(DataSource):
    """Uncompressed Arrow IPC files, one per task; benchmark only."""

    @classmethod
    def name(cls) -> str:
        return IPC_FORMAT

    def schema(self) -> StructType:
        return ArrowParquetDataSource(self.options).schema()

    def writer(self, schema: StructType, overwrite: bool) -> IpcWriter:
        filesystem, location = resolve_location(str(self.options["path"]))
        filesystem.delete_dir_contents(location, missing_dir_ok=True)
        filesystem.create_dir(location, recursive=True)
        return IpcWriter(location, schema.json())

    def reader(self, schema: StructType) -> IpcReader:
        _filesystem, location = resolve_location(str(self.options["path"]))
        return IpcReader(location, schema)


class IpcWriter(DataSourceArrowWriter):
    """Writes each task's rows to one Arrow IPC file in batches of ``READ_BATCH_ROWS``, in place."""

    def __init__(self, location: str, spark_schema: str) -> None:
        self.location = location
        self.spark_schema = spark_schema

    def write(self, iterator: Iterator[pa.RecordBatch]) -> KmsCommitMessage:
        batches = list(iterator)
        if not batches:
            return KmsCommitMessage(files=[], rows=0)
        table = pa.Table.from_batches(batches).combine_chunks()
        name = f"part-{uuid.uuid4().hex}.arrow"
        with pa.ipc.new_file(f"{self.location}/{name}", table.schema) as writer:
            writer.write_table(table, max_chunksize=READ_BATCH_ROWS)
        return KmsCommitMessage(files=[name], rows=table.num_rows)

    def commit(self, messages: list[WriterCommitMessage | None]) -> None:
        with open(f"{self.location}/{SCHEMA_FILE}", "w", encoding="utf-8") as handle:
            handle.write(self.spark_schema)


class IpcReader(DataSourceReader):
    """IPC files grouped into tasks like kms_parquet's; batches go to Spark as they are stored."""

    def __init__(self, location: str, schema: StructType) -> None:
        self.location = location
        self.schema = schema

    def partitions(self) -> Sequence[InputPartition]:
        names = sorted(n for n in os.listdir(self.location) if n.endswith(".arrow"))
        filesystem, _ = resolve_location(self.location)
        return _file_partitions(filesystem, self.location, names)

    def read(self, partition: InputPartition) -> Iterator[pa.RecordBatch]:
        assert isinstance(partition, _FilePartition)
        columns = [f.name for f in self.schema.fields]
        nullable = {f.name: f.nullable for f in self.schema.fields}
        for path in partition.paths:
            with pa.memory_map(path) as source:
                reader = pa.ipc.open_file(source)
                for index in range(reader.num_record_batches):
                    batch = reader.get_batch(index).select(columns)
                    yield kms_datasource._with_nullability(batch, nullable)


def _list_parquet(filesystem: Any, location: str) -> list[str]:
    import pyarrow.fs as pafs

    selector = pafs.FileSelector(location, allow_not_found=True)
    return sorted(
        info.base_name
        for info in filesystem.get_file_info(selector)
        if info.type == pafs.FileType.File and info.base_name.endswith(".parquet")
    )
