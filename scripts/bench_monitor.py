"""Memory and machine-load sampling for ``scripts/bench.py``.

In Spark's local mode the driver and the executor share one JVM, and the
executor's Python workers are processes forked under that JVM. The
:class:`ProcessSampler` therefore reports three figures: the RSS of this
Python process (the driver's Python side), the RSS of the JVM (driver and
executor), and the summed PSS of the Python workers (the executor's Python
side). PSS splits pages shared between forked workers among them, so the sum
does not count a shared page twice.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil

__all__ = ["LoadMonitor", "ProcessSampler", "cpu_seconds", "jvm_heap_peak", "reset_jvm_heap_peak"]


def _descendants(root: psutil.Process) -> list[psutil.Process]:
    try:
        return root.children(recursive=True)
    except psutil.Error:
        return []


class ProcessSampler:
    """Samples memory every ``interval`` seconds while a measured step runs.

    For each step label it keeps, over all the times the step ran, the
    highest value of each figure and its highest growth above the value at
    the start of the step (``<figure>_growth``). Spark keeps Python workers
    and JVM memory from one step to the next, so the growth is what a step
    adds and the peak is what the whole session holds.

    :param interval: seconds between samples.
    """

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peaks: dict[str, dict[str, int]] = {}
        self._label: str | None = None
        self._step = 0
        self._start: dict[str, int] = {}
        self._high: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._driver = psutil.Process(os.getpid())
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def start(self) -> None:
        """Start sampling in a daemon thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling and wait for the thread."""
        self._stop.set()
        self._thread.join()

    @contextmanager
    def measure(self, label: str) -> Iterator[None]:
        """Attribute the samples taken inside the block to ``label``."""
        figures = self._figures()
        with self._lock:
            self._label = label
            self._step += 1
            self._start = figures
            self._high = dict(figures)
        try:
            yield
        finally:
            self._sample()
            with self._lock:
                self._label = None
                peak = self.peaks.setdefault(label, {})
                for name, value in self._high.items():
                    growth = value - self._start[name]
                    peak[name] = max(peak.get(name, 0), value)
                    peak[f"{name}_growth"] = max(peak.get(f"{name}_growth", 0), growth)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        with self._lock:
            if self._label is None:
                return
            step = self._step
        figures = self._figures()
        with self._lock:
            # The step may have ended while the figures were read.
            if self._label is None or self._step != step:
                return
            for name, value in figures.items():
                self._high[name] = max(self._high.get(name, 0), value)

    def _figures(self) -> dict[str, int]:
        jvm_rss = 0
        workers_pss = 0
        for child in _descendants(self._driver):
            try:
                name = child.name()
                if name == "java":
                    jvm_rss += child.memory_info().rss
                elif name.startswith("python"):
                    workers_pss += child.memory_full_info().pss
            except psutil.Error:
                # A worker that exits between listing and reading is skipped.
                continue
        return {
            "driver_python_rss": self._driver.memory_info().rss,
            "jvm_rss": jvm_rss,
            "python_workers_pss": workers_pss,
        }


def cpu_seconds() -> dict[str, float]:
    """Return the CPU seconds (user + system) used so far by this process, the JVM and the Python workers.

    A Python worker that exits is counted through its parent's ``children``
    times once the parent reaps it; the JVM's are left out, so no time is
    counted twice.
    """
    driver = psutil.Process(os.getpid())
    own = driver.cpu_times()
    totals = {"driver_python": own.user + own.system, "jvm": 0.0, "python_workers": 0.0}
    for child in _descendants(driver):
        try:
            name = child.name()
            times = child.cpu_times()
        except psutil.Error:
            continue
        if name == "java":
            totals["jvm"] += times.user + times.system
        elif name.startswith("python"):
            totals["python_workers"] += (
                times.user + times.system + times.children_user + times.children_system
            )
    return totals


def reset_jvm_heap_peak(spark: Any) -> None:
    """Reset the peak usage of every JVM heap memory pool."""
    for pool in _heap_pools(spark):
        pool.resetPeakUsage()


def jvm_heap_peak(spark: Any) -> int:
    """Return the sum of the JVM heap pools' peak usage since the last reset, in bytes.

    The pools may peak at different moments, so the sum is an upper bound of
    the heap's peak.
    """
    return int(sum(pool.getPeakUsage().getUsed() for pool in _heap_pools(spark)))


def _heap_pools(spark: Any) -> list[Any]:
    jvm = spark.sparkContext._jvm
    pools = jvm.java.lang.management.ManagementFactory.getMemoryPoolMXBeans()
    heap = jvm.java.lang.management.MemoryType.HEAP
    return [pool for pool in pools if pool.getType() == heap]


class LoadMonitor:
    """Measures how much CPU processes outside this benchmark use while it runs.

    Every ``interval`` seconds it reads the CPU times of every process and
    splits their growth into this process tree and the others. A process that
    starts and exits between two samples is missed, so ``other_cores`` is a
    lower bound.
    """

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._root = os.getpid()
        self._times: dict[int, float] = {}
        self._own_seconds = 0.0
        self._other_seconds = 0.0
        self._load: list[float] = []
        self._started = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-monitor", daemon=True)

    def start(self) -> None:
        """Take the first sample and start sampling in a daemon thread."""
        self._started = time.monotonic()
        self._sample()
        self._thread.start()

    def stop(self) -> dict[str, float]:
        """Stop sampling and return the averages over the measured time."""
        self._stop.set()
        self._thread.join()
        self._sample()
        wall = max(time.monotonic() - self._started, 1e-9)
        return {
            "wall_seconds": round(wall, 1),
            "benchmark_cores": round(self._own_seconds / wall, 2),
            "other_cores": round(self._other_seconds / wall, 2),
            "load_average_1min_mean": round(sum(self._load) / max(len(self._load), 1), 2),
            "load_average_1min_max": round(max(self._load, default=0.0), 2),
        }

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        own = {self._root} | {p.pid for p in _descendants(psutil.Process(self._root))}
        current: dict[int, float] = {}
        for process in psutil.process_iter(["cpu_times"]):
            times = process.info["cpu_times"]
            if times is None:
                continue
            current[process.pid] = times.user + times.system
        first = not self._times
        for pid, seconds in current.items():
            if first:
                continue
            # A process first seen now started after the previous sample.
            grown = max(seconds - self._times.get(pid, 0.0), 0.0)
            if pid in own:
                self._own_seconds += grown
            else:
                self._other_seconds += grown
        self._times = current
        self._load.append(os.getloadavg()[0])
