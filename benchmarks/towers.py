"""Offline image towers compared on validation: a scikit-learn probe per tower, and ms per image.

    python benchmarks/towers.py                      # every tower in TOWERS -> results/towers.{json,md}
    python benchmarks/towers.py --only lite0_224_whole_avg vgg19_128_crop_avg

For each tower (backbone, resolution, eval resize, pooling, precision) the features of all
bundled images are extracted through the engine's own path (dataset files, JPEG decode,
transform, DataLoader with the machine's worker/thread budget, tower, ``compute_features``) with
no cache, timed end to end. Then a linear probe (``capnet.train.probe``: standardised features,
L2 logistic regression, C chosen on validation) is fitted on train and scored on validation
only: the bundled split's validation carve-out, and the mean over the validation carve-outs of
a 5-fold re-split of all images. Test is never scored here; the demo's tower is chosen from this
table (docs/offline_backbone.md).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "voc_real_lt"
# name -> (backbone, options, extraction precision)
TOWERS: Dict[str, tuple] = {
    "vgg19_128_crop_avg": ("vgg19_minilm.offline", {"image_size": 128, "resize": "crop"}, "auto"),
    "vgg19_224_crop_avg": ("vgg19_minilm.offline", {"image_size": 224, "resize": "crop"}, "auto"),
    "lite0_224_whole_avg": ("efficientnet_lite0_minilm.offline", {"image_size": 224, "resize": "whole"}, "auto"),
    "lite0_224_whole_avg_fp32": ("efficientnet_lite0_minilm.offline", {"image_size": 224, "resize": "whole"}, "none"),
    "lite0_224_crop_avg": ("efficientnet_lite0_minilm.offline", {"image_size": 224, "resize": "crop"}, "auto"),
    "lite0_224_whole_avgmax": ("efficientnet_lite0_minilm.offline", {"image_size": 224, "resize": "whole", "pooling": "avgmax"}, "auto"),
    "lite2_224_whole_avg": ("efficientnet_lite2_minilm.offline", {"image_size": 224, "resize": "whole"}, "auto"),
    "lite2_224_crop_avg": ("efficientnet_lite2_minilm.offline", {"image_size": 224, "resize": "crop"}, "auto"),
    "lite2_224_whole_avgmax": ("efficientnet_lite2_minilm.offline", {"image_size": 224, "resize": "whole", "pooling": "avgmax"}, "auto"),
    "lite2_260_whole_avg": ("efficientnet_lite2_minilm.offline", {"image_size": 260, "resize": "whole"}, "auto"),
}


def extract(name: str) -> Dict[str, Any]:
    """Features of every bundled image (train then test order) and the end-to-end ms per image."""
    import torch

    import capnet.models.backbones  # noqa: F401  (fills BACKBONES)
    from capnet.config import load_config
    from capnet.data import load_dataset
    from capnet.features.cache import compute_features
    from capnet.runtime.resources import apply_budget
    from capnet.runtime.precision import resolve_amp
    from capnet.registry import BACKBONES

    backbone_name, options, amp = TOWERS[name]
    cfg = load_config([], [f"train.extract_amp={amp}"])
    plan = apply_budget(cfg.data.num_workers, cfg.train.threads, cfg.train.keep_freed_memory)
    ds = load_dataset("folder", DATA)
    paths = ds.splits["train"].image_paths + ds.splits["test"].image_paths
    backbone = BACKBONES.build(backbone_name, **options).eval()
    device = torch.device("cpu")
    precision = resolve_amp(cfg.train.extract_amp, device)
    tic = time.perf_counter()
    feats = compute_features(backbone, paths, backbone.transform(train=False), backbone.num_image_stages,
                             batch_size=64, num_workers=plan.workers, device=device, progress=False, amp=precision)
    seconds = time.perf_counter() - tic
    return {"features": feats.numpy(), "ms_per_image": 1000.0 * seconds / len(paths), "precision": precision,
            "workers": plan.workers, "threads": plan.threads, "dim": int(feats.shape[1])}


def probe_val(features: np.ndarray, folds: int = 5) -> Dict[str, float]:
    """Validation mAP of the C-selected probe: the bundled split, and the mean over re-split folds."""
    from capnet.data import load_dataset
    from capnet.train.probe import select_and_fit
    from capnet.metrics import average_precision

    base = load_dataset("folder", DATA)
    ids = base.splits["train"].image_ids + base.splits["test"].image_ids
    row = {i: k for k, i in enumerate(ids)}

    def val_map(ds) -> tuple:
        x = {s: features[[row[i] for i in ds.splits[s].image_ids]] for s in ("train", "val")}
        fit = select_and_fit((x["train"], ds.splits["train"].labels), (x["val"], ds.splits["val"].labels), refit=False)
        return float(np.nanmean(average_precision(fit.decision(x["val"]), ds.splits["val"].labels)) * 100), fit.C

    fixed, c_fixed = val_map(base.with_val_split(0.15, 0))
    per_fold = [val_map(base.kfold(folds, k, 0).with_val_split(0.15, 0))[0] for k in range(folds)]
    return {"val_fixed": fixed, "C_fixed": c_fixed, "val_folds_mean": float(np.mean(per_fold)),
            "val_folds_se": float(np.std(per_fold, ddof=1) / np.sqrt(folds)), "val_folds": per_fold}


def markdown(rows: Dict[str, Dict[str, Any]], meta: Dict[str, Any]) -> str:
    """The comparison table."""
    lines = ["# Offline image towers on validation", "",
             f"Generated by `python benchmarks/towers.py` on {meta['machine']}. Probe: standardised features, "
             "L2 logistic regression (scikit-learn), C chosen on validation. Validation only: the bundled split's "
             "carve-out (15% of train) and the mean ± s.e. over the carve-outs of a 5-fold re-split of all 3,426 images. "
             "ms/img: the whole extraction of all images through the engine (decode, transform, loader, tower), no cache.", "",
             "| tower | features | precision | val mAP, bundled split | val mAP, 5 re-splits | ms/img |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['dim']} | {r['precision']} | {r['val_fixed']:.2f} | "
                     f"{r['val_folds_mean']:.2f} ± {r['val_folds_se']:.2f} | {r['ms_per_image']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", default=list(TOWERS), choices=list(TOWERS))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "towers.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else {}
    import os

    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    for name in args.only:
        got = extract(name)
        feats = got.pop("features")
        rows[name] = {**got, **probe_val(feats)}
        print(f"{name:28s} val {rows[name]['val_fixed']:.2f} (bundled) {rows[name]['val_folds_mean']:.2f} (5 folds)"
              f"  {rows[name]['ms_per_image']:.1f} ms/img ({got['precision']})", flush=True)
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        (out / "towers.md").write_text(markdown({k: rows[k] for k in TOWERS if k in rows}, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
