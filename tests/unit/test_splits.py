"""Grouping of a table's files into read tasks."""

from __future__ import annotations

from spark_kms.splits import ReadSplitSettings, group_files

MIB = 1024 * 1024
TWO_CORES = ReadSplitSettings(min_partitions=2)


def test_group_files_no_files() -> None:
    assert group_files({}, TWO_CORES) == []


def test_group_files_one_file() -> None:
    assert group_files({"a.parquet": 10 * MIB}, TWO_CORES) == [["a.parquet"]]


def test_group_files_equal_files_one_group_per_core() -> None:
    sizes = {f"part-{index}.parquet": 8 * MIB for index in range(8)}
    groups = group_files(sizes, TWO_CORES)
    assert len(groups) == 2
    assert [len(group) for group in groups] == [4, 4]
    assert sorted(name for group in groups for name in group) == sorted(sizes)


def test_group_files_many_small_files() -> None:
    # 800 files of 100 KiB weigh 800 x 4.1 MiB with the open cost: about
    # 26 splits of 128 MiB, raised to 26 (already a multiple of 2).
    sizes = {f"part-{index:04d}.parquet": 100 * 1024 for index in range(800)}
    groups = group_files(sizes, TWO_CORES)
    assert len(groups) == 26
    assert min(len(group) for group in groups) >= 30
    assert max(len(group) for group in groups) <= 31
    assert sum(len(group) for group in groups) == 800


def test_group_files_large_files_one_per_group() -> None:
    sizes = {f"part-{index}.parquet": 200 * MIB for index in range(3)}
    groups = group_files(sizes, TWO_CORES)
    assert groups == [["part-0.parquet"], ["part-1.parquet"], ["part-2.parquet"]]


def test_group_files_balances_uneven_sizes() -> None:
    sizes = {"big.parquet": 60 * MIB, "mid.parquet": 30 * MIB, "s1.parquet": 25 * MIB}
    sizes |= {"s2.parquet": 5 * MIB}
    groups = group_files(sizes, TWO_CORES)
    assert groups == [["big.parquet"], ["mid.parquet", "s1.parquet", "s2.parquet"]]


def test_group_files_never_more_groups_than_files() -> None:
    settings = ReadSplitSettings(min_partitions=16)
    groups = group_files({"a.parquet": 1, "b.parquet": 1, "c.parquet": 1}, settings)
    assert len(groups) == 3


def test_split_settings_round_trip() -> None:
    settings = ReadSplitSettings(
        max_partition_bytes=64 * MIB, open_cost_bytes=MIB, min_partitions=6
    )
    assert ReadSplitSettings.from_properties(settings.to_properties()) == settings


def test_split_settings_missing_keys_take_defaults() -> None:
    assert ReadSplitSettings.from_properties({}) == ReadSplitSettings()


def test_split_settings_without_jvm_take_defaults() -> None:
    assert ReadSplitSettings.from_session(object()) == ReadSplitSettings()
