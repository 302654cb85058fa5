"""Validation-only sweep: choose recipe settings without ever scoring a test split.

    python benchmarks/sweep_val.py --config configs/demo.yaml --folds 5 --seeds 0 1 \
        --variant "base:" --variant "no_gcn:model.gcn.enabled=false" --json benchmarks/results/sweeps/x.json

Each variant (``name:key=value[,key=value...]``) is fitted with the engine's own selection
(``capnet.experiment.fit_and_select``: the probe's C, or the epoch of gradient training) on
every (split, seed): the bundled split (``--fixed``) and/or each fold of a ``--folds``-fold
re-split of all its images, validation carved from each train part. Only validation mAP is
read; the test parts are never scored. Printed: the mean over (split, seed) of the selected
validation mAP (overall / head / medium / tail) and its standard error, and for every variant
after the first its paired difference from the first on the same (split, seed): mean ± 95%
t-interval half-width (the folds share images, so the unpaired standard errors overstate how
well two variants are told apart).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: make `benchmarks` importable
KEYS = ("mAP", "head", "medium", "tail")


def splits(folds: int, fixed: bool) -> List[List[str]]:
    """Config overrides of each split: the bundled one, then fold k of the re-split."""
    out = [[]] if fixed else []
    return out + [[f"data.resplit_folds={folds}", f"data.resplit_fold={k}"] for k in range(folds)]


def run_variant(config: List[str], overrides: List[str], seed: int, cache: Path) -> Dict[str, float]:
    """Fit and select one (split, seed); return the selection's validation metrics."""
    import torch

    from capnet.config import load_config
    from capnet.experiment import fit_and_select, prepare_dataset
    from capnet.plans import feature_plan, tune_process
    from capnet.runtime.seed import seed_everything
    from capnet.models.build import build_model

    cfg = tune_process(load_config(config, overrides + [f"train.seed={seed}", "train.refit=false"]))
    seed_everything(seed)
    ds = prepare_dataset(cfg.data)
    model = build_model(cfg, ds.classes, ds.splits["train"].labels)
    with tempfile.TemporaryDirectory() as tmp:
        _, record = fit_and_select(model, ds, cfg, Path(tmp), feature_plan(cfg, model, torch.device("cpu"), cache))
    if not record:  # nothing to fit (zero-shot): score validation as it stands
        record = {"val": frozen_val_metrics(model, ds, cfg, cache)}
    val = record.get("val") or {"mAP": record.get("val_mAP")}
    return {k: val.get(k) for k in KEYS} | {"epoch": record.get("selected_epoch"),
                                            "C": record.get("probe", {}).get("C")}


def frozen_val_metrics(model, ds, cfg, cache: Path) -> Dict[str, float]:
    """Validation mAP of a model with nothing to fit, test-time templates and views as configured."""
    import torch

    from capnet.evaluation.scores import split_scores
    from capnet.plans import feature_plan
    from capnet.metrics import map_report

    model.set_test_time(cfg.tte.templates)
    logits, targets = split_scores(model, ds.splits["val"], feature_plan(cfg, model, torch.device("cpu"), cache))
    report = map_report(logits, targets, ds.groups(), list(ds.classes))
    return {k: report[k] for k in KEYS}


def summarize(rows: List[Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    """Mean and standard error over (split, seed) of each validation metric."""
    out = {}
    for k in KEYS:
        v = np.array([r[k] for r in rows if r.get(k) is not None], dtype=float)
        out[k] = {"mean": float(v.mean()) if v.size else float("nan"),
                  "se": float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0}
    return out


def paired_difference(rows: List[Dict[str, float]], base: List[Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    """Per metric: mean of (variant - base) over matching (split, seed) runs and its 95% t half-width."""
    from benchmarks.ablation import t_interval  # the ablation's paired interval, the same formula

    out = {}
    for k in KEYS:
        t = t_interval([r[k] - b[k] for r, b in zip(rows, base) if r.get(k) is not None and b.get(k) is not None])
        out[k] = {"mean": t["mean"], "ci95": t["half"]}
    return out

def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", required=True)
    p.add_argument("--variant", action="append", required=True, help="name:key=value[,key=value...]")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--folds", type=int, default=5, help="K-fold re-split of all images (0: none)")
    p.add_argument("--fixed", action="store_true", help="also use the bundled train/test split")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from capnet.experiment import default_cache_dir

    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    out = {}
    for spec in args.variant:
        name, _, rest = spec.partition(":")
        overrides = [o for o in rest.split(",") if o]
        rows = [run_variant(args.config, split + overrides, seed, cache)
                for split in splits(args.folds, args.fixed) for seed in args.seeds]
        stats = summarize(rows)
        out[name] = {"overrides": overrides, "val": stats, "runs": rows}
        first = next(iter(out))
        if name != first:
            out[name]["vs_" + first] = diff = paired_difference(rows, out[first]["runs"])
        print(f"{name:28s} val mAP {stats['mAP']['mean']:.2f} ± {stats['mAP']['se']:.2f}  "
              + "  ".join(f"{k} {stats[k]['mean']:.2f}" for k in KEYS[1:])
              + f"   epochs/C {[r['epoch'] or r['C'] for r in rows]}"
              + ("" if name == first else f"   vs {first}: total {diff['mAP']['mean']:+.2f} ± {diff['mAP']['ci95']:.2f}, "
                 f"tail {diff['tail']['mean']:+.2f} ± {diff['tail']['ci95']:.2f}"), flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"config": args.config, "folds": args.folds, "fixed": args.fixed,
                                                   "seeds": args.seeds, "variants": out}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
