"""Grouping of a table's files into read tasks.

Every Spark task of a Python data source has a fixed cost: scheduling, a
round trip to a Python worker, and the ``gc.collect()`` that PySpark's worker
daemon runs after each task. So a table of many small files is not read one
file per task. The sizing follows Spark's own file scan
(``spark.sql.files.maxPartitionBytes``, ``spark.sql.files.openCostInBytes`` and
the default parallelism), and each file goes to the group with the least data
so far, so that the tasks finish at about the same time.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["ReadSplitSettings", "group_files"]

# Spark's defaults for spark.sql.files.maxPartitionBytes and openCostInBytes.
DEFAULT_MAX_PARTITION_BYTES = 128 * 1024 * 1024
DEFAULT_OPEN_COST_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class ReadSplitSettings:
    """Spark session settings that size the read tasks of a ``kms_parquet`` scan."""

    max_partition_bytes: int = DEFAULT_MAX_PARTITION_BYTES
    open_cost_bytes: int = DEFAULT_OPEN_COST_BYTES
    min_partitions: int = 1

    @classmethod
    def from_session(cls, spark: Any) -> ReadSplitSettings:
        """Read the file scan settings of ``spark``, Spark's defaults where unavailable."""
        try:
            conf = spark._jsparkSession.sessionState().conf()
            min_partitions = conf.filesMinPartitionNum()
            return cls(
                max_partition_bytes=int(conf.filesMaxPartitionBytes()),
                open_cost_bytes=int(conf.filesOpenCostInBytes()),
                min_partitions=int(
                    min_partitions.get()
                    if min_partitions.isDefined()
                    else spark.sparkContext.defaultParallelism
                ),
            )
        except Exception:  # noqa: BLE001 - a session without a JVM (Spark Connect)
            return cls()

    def to_properties(self) -> dict[str, int]:
        """Return the settings as a plain dict, for pickling into the data source class."""
        return {
            "max_partition_bytes": self.max_partition_bytes,
            "open_cost_bytes": self.open_cost_bytes,
            "min_partitions": self.min_partitions,
        }

    @classmethod
    def from_properties(cls, properties: dict[str, int]) -> ReadSplitSettings:
        """Build the settings from :meth:`to_properties` output; missing keys take defaults."""
        return cls(
            max_partition_bytes=max(
                1, int(properties.get("max_partition_bytes", DEFAULT_MAX_PARTITION_BYTES))
            ),
            open_cost_bytes=max(0, int(properties.get("open_cost_bytes", DEFAULT_OPEN_COST_BYTES))),
            min_partitions=max(1, int(properties.get("min_partitions", 1))),
        )


def group_files(sizes: dict[str, int], settings: ReadSplitSettings) -> list[list[str]]:
    """Group files into read tasks; return the groups, each a list of file names.

    A file's weight is its size plus the open cost. The number of groups is
    what Spark's file scan would make for files it cannot split: the total
    weight over the split size, which is at most ``max_partition_bytes``. It is
    raised to a multiple of ``min_partitions``, so that no core idles in the
    last wave, but never above the number of files.
    """
    if not sizes:
        return []
    weights = {name: size + settings.open_cost_bytes for name, size in sizes.items()}
    total = sum(weights.values())
    per_core = total / settings.min_partitions
    split_bytes = min(settings.max_partition_bytes, max(settings.open_cost_bytes, per_core))
    count = math.ceil(total / max(split_bytes, 1))
    count = math.ceil(count / settings.min_partitions) * settings.min_partitions
    count = max(1, min(count, len(sizes)))

    # Largest file first, each into the group with the least weight so far.
    heap: list[tuple[int, int]] = [(0, index) for index in range(count)]
    groups: list[list[str]] = [[] for _ in range(count)]
    for name in sorted(weights, key=lambda key: (-weights[key], key)):
        weight, index = heapq.heappop(heap)
        groups[index].append(name)
        heapq.heappush(heap, (weight + weights[name], index))
    return [sorted(group) for group in groups if group]
