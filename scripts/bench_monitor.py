"""Memory, CPU and machine-load measurements for ``scripts/bench.py``.

In Spark's local mode the driver and the executor share one JVM, and the
executor's Python workers are processes forked under that JVM. The
:class:`ProcessSampler` therefore reports the peak RSS of this Python process
(the driver's Python side), the peak RSS of the JVM (driver and executor), and
the summed PSS of the Python workers (the executor's Python side). PSS splits
pages shared between forked workers among them, so the sum does not count a
shared page twice.

The measurements run in this process and take CPU from the benchmark, so
they sample rarely: the load once per ``LoadMonitor.interval`` and the
workers' memory once per ``ProcessSampler.interval``.
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
    """Measures the memory of the JVM and of the Python workers while a step runs.

    The JVM's and this process's peak RSS come from the kernel's high-water
    mark (``VmHWM``), reset before each step by writing 5 to
    ``/proc/<pid>/clear_refs``, so they need no sampling. The Python workers
    are forked and share pages, so their PSS is summed instead, sampled every
    ``interval`` seconds (a peak between two samples is missed). For each step
    label it keeps the highest value over all the times the step ran, and for
    the Python workers also the highest growth above the value at the start
    of the step (Spark keeps idle workers from one step to the next).

    :param interval: seconds between samples of the Python workers' PSS.
    """

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.peaks: dict[str, dict[str, int]] = {}
        self._label: str | None = None
        self._step = 0
        self._start_pss = 0
        self._high_pss = 0
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
        """Attribute the memory used inside the block to ``label``."""
        for process in [self._driver, *self._jvms()]:
            _reset_peak_rss(process)
        pss = self._workers_pss()
        with self._lock:
            self._label = label
            self._step += 1
            self._start_pss = pss
            self._high_pss = pss
        try:
            yield
        finally:
            self._sample()
            with self._lock:
                self._label = None
                figures = {
                    "jvm_peak_rss": sum(_peak_rss(process) for process in self._jvms()),
                    "driver_peak_rss": _peak_rss(self._driver),
                    "python_workers_pss": self._high_pss,
                    "python_workers_pss_growth": self._high_pss - self._start_pss,
                }
                peak = self.peaks.setdefault(label, {})
                for name, value in figures.items():
                    peak[name] = max(peak.get(name, 0), value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        with self._lock:
            if self._label is None:
                return
            step = self._step
        pss = self._workers_pss()
        with self._lock:
            # The step may have ended while the figures were read.
            if self._label is not None and self._step == step:
                self._high_pss = max(self._high_pss, pss)

    def _jvms(self) -> list[psutil.Process]:
        return [child for child in _descendants(self._driver) if _name(child) == "java"]

    def _workers_pss(self) -> int:
        total = 0
        for child in _descendants(self._driver):
            if not _name(child).startswith("python"):
                continue
            try:
                total += child.memory_full_info().pss
            except psutil.Error:
                # A worker that exits between listing and reading is skipped.
                continue
        return total


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return ""


def _reset_peak_rss(process: psutil.Process) -> None:
    # Linux resets VmHWM to the current RSS on "5" (see proc(5), clear_refs).
    try:
        with open(f"/proc/{process.pid}/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def _peak_rss(process: psutil.Process) -> int:
    try:
        with open(f"/proc/{process.pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


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

    def __init__(self, interval: float = 2.0) -> None:
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
