"""Run report: metrics.json, report.md and the PNG plots of one evaluated run."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from capnet import plots


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def summary_table(metrics: Mapping[str, Any], title: str = "test") -> str:
    """A small markdown table of total / head / medium / tail mAP."""
    head = "| split | mAP | head | medium | tail |\n| --- | --- | --- | --- | --- |\n"
    row = f"| {title} | " + " | ".join(_fmt(metrics.get(k)) for k in ("mAP", "head", "medium", "tail")) + " |\n"
    return head + row


def write_report(
    run_dir: Path,
    metrics: Mapping[str, Any],
    class_names: Sequence[str],
    class_freq: Sequence[int],
    groups: Mapping[str, Sequence[int]],
    history: List[Dict[str, float]],
    header: Mapping[str, Any],
) -> Path:
    """Write report.md and its plots into ``run_dir``; returns the report path."""
    run_dir = Path(run_dir)
    group_of = {class_names[i]: g for g, idx in groups.items() for i in idx}
    pngs = {
        "ap_vs_frequency.png": plots.plot_ap_vs_frequency(
            metrics["per_class"], class_freq, class_names, group_of, run_dir / "ap_vs_frequency.png"),
        "group_map.png": plots.plot_group_bars({"test": metrics}, run_dir / "group_map.png"),
    }
    if history:
        pngs["training_curves.png"] = plots.plot_training_curves(history, run_dir / "training_curves.png")

    lines = [f"# capnet run report: {header.get('name', run_dir.name)}", ""]
    for key, value in header.items():
        lines.append(f"- **{key}**: {value}")
    lines += ["", "## Test mAP (%)", "", summary_table(metrics), ""]
    if metrics.get("excluded"):
        lines.append(f"Classes without a test positive (excluded from the means): {', '.join(metrics['excluded'])}")
        lines.append("")
    lines += ["## Per class", "", "| class | group | train images (after the val carve-out) | AP (%) | threshold |", "| --- | --- | --- | --- | --- |"]
    thresholds = metrics.get("thresholds", {})
    order = np.argsort(-np.asarray(class_freq))
    for i in order:
        name = class_names[i]
        thr = thresholds.get(name)
        lines.append(f"| {name} | {group_of.get(name, '?')} | {int(class_freq[i])} | "
                     f"{_fmt(metrics['per_class'].get(name))} | {'n/a' if thr is None else f'{thr:.3f}'} |")
    if "f1" in metrics:
        f1 = metrics["f1"]
        lines += ["", "## F1 on test at the per-class thresholds (chosen on validation; 0.5 without a validation part)", "",
                  f"CF1 {_fmt(f1.get('CF1'))}, OF1 {_fmt(f1.get('OF1'))} (CP {_fmt(f1.get('CP'))}, "
                  f"CR {_fmt(f1.get('CR'))}, OP {_fmt(f1.get('OP'))}, OR {_fmt(f1.get('OR'))})"]
    if history:
        lines += ["", "## Training", "", "| epoch | train loss | val mAP |", "| --- | --- | --- |"]
        for h in history:
            lines.append(f"| {h['epoch']} | {_fmt(h.get('train_loss'))} | {_fmt(h.get('val_mAP'))} |")
    lines += [""] + [f"![{name}]({name})" for name in pngs] + [""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def append_time_breakdown(report: Path, breakdown: Mapping[str, float]) -> None:
    """Add the run's "where the time went" table to report.md."""
    lines = ["", "## Where the time went (wall seconds)", "", "| phase | seconds |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in breakdown.items()]
    with open(report, "a") as fh:
        fh.write("\n".join(lines) + "\n")
