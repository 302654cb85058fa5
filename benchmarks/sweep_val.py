"""Validation-only sweep: choose recipe settings without ever scoring the test split.

    python benchmarks/sweep_val.py --config configs/demo.yaml --seeds 0 1 \
        --variant "avg:model.backbone_options.pooling=avg" --variant "max:model.backbone_options.pooling=max"

Each variant (name:override[,override...]) is trained per seed with the engine's own loop and
model selection; the script prints the best validation mAP (overall/head/medium/tail) averaged
over seeds. Used to pick the offline demo recipe (docs/results.md says which choices it made).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from capnet.config import load_config


def run_variant(config: List[str], overrides: List[str], seed: int, cache: Path) -> Dict[str, float]:
    """Fit one seed; return the selected epoch's validation metrics."""
    from capnet.engine.loaders import make_loaders
    from capnet.engine.runs import prepare_dataset
    from capnet.engine.seed import seed_everything
    from capnet.engine.train import fit
    from capnet.losses import build_loss
    from capnet.models.build import build_model

    cfg = load_config(config, overrides + [f"train.seed={seed}"])
    seed_everything(seed)
    ds = prepare_dataset(cfg.data)
    model = build_model(cfg, ds.classes, ds.splits["train"].labels)
    if hasattr(model, "ensemble_templates"):
        model.ensemble_templates = False
    loss = build_loss(cfg.loss.name, cfg.loss.options, ds.class_freq("train"), len(ds.splits["train"]))
    loaders = make_loaders(ds, model, cfg, cache_dir=cache, device=torch.device("cpu"), splits=("train", "val"))
    with tempfile.TemporaryDirectory() as tmp:
        res = fit(model, loss, loaders["train"], loaders["val"], cfg, Path(tmp), groups=ds.groups(),
                  class_names=ds.classes)
    best = max(res.history, key=lambda h: h["val_mAP"])
    return {k: best[f"val_{k}"] for k in ("mAP", "head", "medium", "tail")} | {"epoch": best["epoch"]}


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", required=True)
    p.add_argument("--variant", action="append", required=True, help="name:key=value[,key=value...]")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from capnet.engine.runs import default_cache_dir

    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    out = {}
    for spec in args.variant:
        name, _, rest = spec.partition(":")
        overrides = [o for o in rest.split(",") if o]
        rows = [run_variant(args.config, overrides, s, cache) for s in args.seeds]
        mean = {k: float(np.mean([r[k] for r in rows])) for k in ("mAP", "head", "medium", "tail")}
        out[name] = {"overrides": overrides, "mean": mean, "per_seed": rows}
        print(f"{name:28s} val mAP {mean['mAP']:.2f}  head {mean['head']:.2f}  medium {mean['medium']:.2f}  "
              f"tail {mean['tail']:.2f}   epochs {[r['epoch'] for r in rows]}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
