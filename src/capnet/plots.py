"""Run plots: per-class AP against training frequency, group bars, training curves (PNG)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: runs write PNGs, never open windows
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

GROUP_COLORS = {"head": "#1f77b4", "medium": "#ff7f0e", "tail": "#d62728"}


def _save(fig: "plt.Figure", path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ap_vs_frequency(
    per_class: Mapping[str, Optional[float]],
    class_freq: Sequence[int],
    class_names: Sequence[str],
    group_of: Mapping[str, str],
    path: Path,
) -> Path:
    """Scatter of test AP per class against its number of training images (log x)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, freq in zip(class_names, class_freq):
        ap = per_class.get(name)
        if ap is None:
            continue
        group = group_of.get(name, "head")
        ax.scatter(max(int(freq), 1), ap, color=GROUP_COLORS.get(group, "gray"), s=30)
        ax.annotate(name, (max(int(freq), 1), ap), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for group, color in GROUP_COLORS.items():
        ax.scatter([], [], color=color, label=group)
    ax.set_xscale("log")
    ax.set_xlabel("training images per class (log)")
    ax.set_ylabel("test AP (%)")
    ax.set_ylim(0, 102)
    ax.axvline(20, color="gray", lw=0.8, ls=":")
    ax.axvline(100, color="gray", lw=0.8, ls=":")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Per-class AP vs training frequency")
    return _save(fig, path)


def plot_group_bars(results: Mapping[str, Mapping[str, float]], path: Path,
                    errors: Optional[Mapping[str, Mapping[str, float]]] = None) -> Path:
    """Grouped bars of mAP / head / medium / tail for one or more runs (name -> metrics)."""
    keys = ["mAP", "head", "medium", "tail"]
    names = list(results)
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names) + 4), 4.2))
    x = np.arange(len(keys))
    for i, name in enumerate(names):
        vals = [float(results[name].get(k, np.nan)) for k in keys]
        err = [float(errors[name].get(k, 0.0)) for k in keys] if errors else None
        ax.bar(x + i * width - 0.4 + width / 2, vals, width, yerr=err, label=name, capsize=2)
    ax.set_xticks(x)
    ax.set_xticklabels(["total", "head", "medium", "tail"])
    ax.set_ylabel("mAP (%)")
    ax.set_ylim(0, 100)
    if len(names) > 1:
        ax.legend(fontsize=7, ncol=2)
    ax.set_title("mAP by class group")
    return _save(fig, path)


def plot_training_curves(history: List[Dict[str, float]], path: Path) -> Path:
    """Training loss and validation mAP per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, ax1 = plt.subplots(figsize=(6.5, 4))
    ax1.plot(epochs, [h.get("train_loss", np.nan) for h in history], "o-", color="#1f77b4", label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss", color="#1f77b4")
    vals = [h.get("val_mAP") for h in history]
    if any(v is not None and not np.isnan(v) for v in vals):
        ax2 = ax1.twinx()
        ax2.plot(epochs, [np.nan if v is None else v for v in vals], "s-", color="#d62728", label="val mAP")
        ax2.set_ylabel("val mAP (%)", color="#d62728")
    ax1.set_title("Training curves")
    return _save(fig, path)
