"""The paper's ablation on the bundled real VOC-LT images, under two protocols; writes docs/results.md.

    python benchmarks/ablation.py                                   # every row, both protocols, seeds 0 1 2
    python benchmarks/ablation.py --protocols fixed --seeds 0 --rows linear_probe full   # a quick look

Each row is ``configs/demo.yaml`` plus one experiment file of ``configs/experiments/`` (overrides
only), trained by ``capnet.experiment.train_run``: choices on validation, test scored once.
Protocols: ``fixed`` = the bundled train/test split; ``cv`` = a 5-fold re-split of all 3,426
images (``data.resplit_folds``; iterative stratification; each fold's validation carved from its
train part). Every (row, split, seed) is one run directory under ``--runs-dir``; a finished run
is reused only when its recorded config hash matches (``finished_run``). Reported: each row's
mean ± std over (split, seed), and the paired difference to the fair linear probe and to the row
before it, with a 95% t-interval over the (split, seed) pairs. Outputs: results/ablation.json,
docs/results.md (+ docs/img/ablation_groups.png).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EXP = REPO / "configs" / "experiments"
KEYS = ("mAP", "head", "medium", "tail")
PROBE = "linear_probe"
FULL = "full"

# (row key, label, experiment file or None for the recipe itself). The recipe was chosen on
# validation (configs/model/offline_efficientnet_lite0.yaml); every other CAPNET row takes one
# component out of it ("-") or adds one the recipe left out ("+"), so each row's paired
# difference to "full" is that component's contribution.
ROWS = [
    ("zeroshot", "Zero-shot (text bridge, no training)", "zeroshot.yaml"),
    (PROBE, "Linear probe (scikit-learn, C chosen on val, refit on train + val)", "linear_probe.yaml"),
    (FULL, "Full CAPNET (the recipe chosen on validation)", None),
    ("no_prompts", "- soft prompts (fixed template classifier)", "no_prompts.yaml"),
    ("no_residual", "- class residual (the prompt classifier alone)", "no_residual.yaml"),
    ("no_gcn", "- text graph and GCN", "no_gcn.yaml"),
    ("cooc_graph", "co-occurrence graph instead of the text graph", "cooccurrence_graph.yaml"),
    ("no_tte", "- test-time ensembling", "no_tte.yaml"),
    ("db_loss", "+ DB loss (re-balanced weighting)", "db_loss.yaml"),
    ("db_loss_cw", "+ DB loss + class-aware re-weighting", "db_loss_cw.yaml"),
    ("db_focal", "+ DB-focal as published (NTR, focal, q = 0.5)", "db_focal_published.yaml"),
    ("peft", "+ PEFT (conv adapter before the head conv)", "peft_adapter.yaml"),
    ("db_focal_baseline", "Baseline: DB-loss fine-tune, no prompts / graph", "db_focal_finetune.yaml"),
]
# A row's paired contrast: full CAPNET for the leave-one-out / add-one rows.
PREVIOUS = {k: FULL for k, _, _ in ROWS if k not in ("zeroshot", PROBE, FULL)}


def protocol_splits(protocol: str, folds: int) -> Dict[str, List[str]]:
    """Split name -> config overrides."""
    if protocol == "fixed":
        return {"fixed": []}
    return {f"fold{k}": [f"data.resplit_folds={folds}", f"data.resplit_fold={k}"] for k in range(folds)}


def run_row(base: Path, exp: Optional[str], overrides: List[str], out: Path, cache: Path) -> Dict[str, Any]:
    """Train one (row, split, seed) unless a finished run of the same config exists; return its metrics."""
    from capnet.config import load_config
    from capnet.experiment import finished_run, train_run

    cfg = load_config([base] + ([EXP / exp] if exp else []), overrides)
    done = finished_run(out, cfg)
    return done if done is not None else train_run(cfg, out, cache_dir=cache)


def t_interval(diffs: Sequence[float]) -> Dict[str, float]:
    """Mean and 95% t-interval half-width of paired differences."""
    from scipy import stats

    d = np.asarray([x for x in diffs if x is not None and not math.isnan(x)], dtype=float)
    if d.size < 2:
        return {"mean": float(d.mean()) if d.size else float("nan"), "half": float("nan"), "n": int(d.size)}
    half = float(stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
    return {"mean": float(d.mean()), "half": half, "n": int(d.size)}


def summarize(runs: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """Mean and sample std over the runs of each group mAP (nan-safe)."""
    out: Dict[str, Dict[str, float]] = {"mean": {}, "std": {}}
    for k in KEYS:
        v = np.array([m[k] for m in runs.values()], dtype=float)
        v = v[~np.isnan(v)]
        out["mean"][k] = float(v.mean()) if v.size else float("nan")
        out["std"][k] = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return out


def paired(a: Dict[str, Dict[str, Any]], b: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """Row a minus row b on the (split, seed) runs they share, per group."""
    common = sorted(set(a) & set(b))
    return {k: t_interval([a[r][k] - b[r][k] for r in common]) for k in KEYS}


def sklearn_reference(base: Path, overrides: List[str], cache: Path) -> Dict[str, float]:
    """Plain scikit-learn next to the probe row: LogisticRegression(C=0.01) per class on
    StandardScaler features of the same cached tower, fitted on the full train split."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from capnet.config import load_config
    from capnet.data import load_dataset
    from capnet.runtime.resources import runtime_config
    from capnet.features.views import single_view, split_features
    from capnet.metrics import map_report
    from capnet.models.build import build_model

    cfg = runtime_config(load_config([base, EXP / "linear_probe.yaml"], overrides))
    ds = load_dataset(cfg.data.reader, cfg.data.root)
    model = build_model(cfg, ds.classes)
    x = {s: split_features(model, ds.splits[s].image_paths, single_view(model), cfg, torch.device("cpu"), cache)[:, 0].numpy()
         for s in ("train", "test")}
    scaler = StandardScaler().fit(x["train"])
    y = ds.splits["train"].labels
    scores = np.stack([LogisticRegression(C=0.01, max_iter=5000).fit(scaler.transform(x["train"]), y[:, c])
                       .decision_function(scaler.transform(x["test"])) for c in range(y.shape[1])], axis=1)
    report = map_report(scores, ds.splits["test"].labels, ds.groups(), ds.classes)
    return {k: report[k] for k in KEYS}


def _fmt(s: Dict[str, float]) -> str:
    return "n/a" if math.isnan(s["mean"]) else f"{s['mean']:+.2f} ± {s['half']:.2f}"


def markdown(results: Dict[str, Any], meta: Dict[str, Any]) -> str:
    """docs/results.md: tables per protocol, paired intervals, the goal check, then the notes."""
    lines = ["# Results", "", "*Generated by `benchmarks/ablation.py`; edit docs/results_notes.md for the prose.*", "",
             f"Command: `{meta['command']}` on {meta['machine']} ({meta['minutes']:.0f} min of runs). "
             f"Seeds {meta['seeds']}. Every row is `configs/demo.yaml` plus one file of `configs/experiments/`; "
             "all choices were made on validation, test was scored once per run.", ""]
    for proto, res in results.items():
        n = res["runs_per_row"]
        title = {"fixed": "the bundled split (1,026 test images)",
                 "cv": "5-fold re-split of all 3,426 images"}[proto]
        lines += [f"## Protocol `{proto}`: {title}, {n} runs per row", "",
                  "Test mAP (%), mean ± std over (split, seed). Δ: paired difference on the same (split, seed), mean ± "
                  "95% t-interval half-width; the contrast of every other row is full CAPNET (so a '-' row's Δ is minus "
                  "that component's contribution).", "",
                  "| row | total mAP | head | medium | tail | Δ total vs probe | Δ tail vs probe | Δ total vs full | Δ tail vs full |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for key, label, _ in ROWS:
            if key not in res["rows"]:
                continue
            r = res["rows"][key]
            cells = " | ".join(f"{r['mean'][k]:.2f} ± {r['std'][k]:.2f}" for k in KEYS)
            vp, vs = r.get("vs_probe"), r.get("vs_previous")
            extra = [(_fmt(vp["mAP"]) if vp else "-"), (_fmt(vp["tail"]) if vp else "-"),
                     (_fmt(vs["mAP"]) if vs else "-"), (_fmt(vs["tail"]) if vs else "-")]
            lines.append(f"| {label} | {cells} | " + " | ".join(extra) + " |")
        if res.get("sklearn_reference"):
            ref = res["sklearn_reference"]
            lines += ["", "Side by side on the same cached features (bundled split): plain scikit-learn "
                      "`LogisticRegression(C=0.01)` on standardised features fitted on the full train split gives "
                      + ", ".join(f"{k} {ref[k]:.2f}" for k in KEYS) + "."]
        lines += [""]
    lines += goal_check(results) + ["![group mAP by row](img/ablation_groups.png)", ""] + open_vocab() + demo_times()
    notes = REPO / "docs" / "results_notes.md"
    if notes.is_file():
        lines += [notes.read_text()]
    return "\n".join(lines)


def goal_check(results: Dict[str, Any]) -> List[str]:
    """The acceptance criterion, computed: full CAPNET vs the fair probe, total and tail."""
    out = ["## The goal, checked", "",
           "Goal: full CAPNET >= the fair linear probe in total mAP and in tail mAP (aim: +3 tail).", ""]
    for proto, res in results.items():
        full = res["rows"].get(FULL, {}).get("vs_probe")
        if not full:
            continue
        verdict = []
        for k in ("mAP", "tail"):
            d = full[k]
            state = ("met, interval above 0" if d["mean"] - d["half"] > 0 else "met on the mean" if d["mean"] >= 0
                     else "not met")
            verdict.append(f"{'total' if k == 'mAP' else 'tail'} {_fmt(d)} ({state})")
        out.append(f"- `{proto}`: " + "; ".join(verdict))
    return out + [""]


def demo_times() -> List[str]:
    """The measured `capnet demo` wall times, if benchmarks/demo_times.py has run."""
    path = REPO / "benchmarks" / "results" / "demo_times.json"
    if not path.is_file():
        return []
    t = json.loads(path.read_text())
    return ["## `capnet demo` wall time", "",
            f"First run (empty cache, fresh process): {t['first_run_s']:.0f} s; repeated run: {t['repeated_run_s']:.0f} s "
            f"({t['machine']}; `python benchmarks/demo_times.py`).", ""]


def open_vocab() -> List[str]:
    """Held-out classes added by name, if benchmarks/open_vocab.py has run (its own table)."""
    path = REPO / "benchmarks" / "results" / "open_vocab.json"
    if not path.is_file():
        return []
    r = json.loads(path.read_text())
    held = " and ".join(r["held_out"])
    return ["## Open-vocabulary classes, measured", "",
            f"{held} removed from the classes and every label of the demo recipe, then scored by name as added "
            f"classes (`capnet predict --add-classes`, docs/open_vocab.md); test AP (%), mean ± std over "
            f"{len(r['seeds'])} seeds, next to the same recipe trained with their labels and to zero-shot. The lower "
            "table is the 14 trained classes' test mAP with the added rows kept apart or re-run through the GCN "
            f"on the enlarged graph. Command: `{r['command']}`. Threshold of an added class: {r['threshold_policy']}.",
            "", r["table"], ""]


def plot(results: Dict[str, Any], path: Path) -> None:
    """Grouped bars (cv protocol when present) with std over runs as error bars."""
    from capnet.plots import plot_group_bars

    res = results.get("cv") or next(iter(results.values()))
    order = [k for k, _, _ in ROWS if k in res["rows"]]
    plot_group_bars({k: res["rows"][k]["mean"] for k in order}, path, errors={k: res["rows"][k]["std"] for k in order})


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default=str(REPO / "configs" / "demo.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--protocols", nargs="+", default=["fixed", "cv"], choices=["fixed", "cv"])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--rows", nargs="+", default=[k for k, _, _ in ROWS])
    p.add_argument("--runs-dir", default=str(REPO / "runs" / "ablation"))
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--set", action="append", default=[], dest="overrides", help="extra key=value for every run")
    p.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "ablation.json"))
    p.add_argument("--doc", default=str(REPO / "docs" / "results.md"))
    p.add_argument("--render", action="store_true",
                   help="no runs: rewrite --doc from the results already in --json (after editing the notes)")
    args = p.parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.json).read_text())
        Path(args.doc).write_text(markdown(saved["protocols"], saved["meta"]))
        print(f"wrote {args.doc} from {args.json}")
        return 0
    from capnet.experiment import default_cache_dir

    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    results: Dict[str, Any] = {}
    seconds = 0.0
    for proto in args.protocols:
        rows: Dict[str, Any] = {}
        for key, label, exp in ROWS:
            if key not in args.rows:
                continue
            runs = {}
            for split, split_sets in protocol_splits(proto, args.folds).items():
                for seed in args.seeds:
                    out = Path(args.runs_dir) / proto / key / split / f"seed{seed}"
                    m = run_row(Path(args.base), exp, split_sets + [f"train.seed={seed}"] + args.overrides, out, cache)
                    seconds += float(m.get("seconds", 0.0))
                    runs[f"{split}/seed{seed}"] = {k: m[k] for k in KEYS} | {"per_class": m.get("per_class", {})}
            rows[key] = {"label": label, "experiment": exp, **summarize(runs), "runs": runs}
            print(f"[{proto}] {label:60s} " + "  ".join(f"{k} {rows[key]['mean'][k]:.2f}" for k in KEYS), flush=True)
        for key in rows:
            if PROBE in rows and key != PROBE:
                rows[key]["vs_probe"] = paired(rows[key]["runs"], rows[PROBE]["runs"])
            if PREVIOUS.get(key) in rows:
                rows[key]["vs_previous"] = paired(rows[key]["runs"], rows[PREVIOUS[key]]["runs"])
        results[proto] = {"rows": rows, "runs_per_row": len(protocol_splits(proto, args.folds)) * len(args.seeds)}
        if proto == "fixed" and PROBE in rows:
            results[proto]["sklearn_reference"] = sklearn_reference(Path(args.base), args.overrides, cache)
    import os

    meta = {"seeds": args.seeds, "minutes": seconds / 60, "folds": args.folds,
            "command": "python benchmarks/ablation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "protocols": results}, indent=2))
    doc = Path(args.doc)
    (doc.parent / "img").mkdir(parents=True, exist_ok=True)
    plot(results, doc.parent / "img" / "ablation_groups.png")
    doc.write_text(markdown(results, meta))
    print(f"wrote {args.json} and {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
