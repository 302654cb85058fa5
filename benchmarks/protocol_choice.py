"""Which training protocol, and do class-aware re-weighting, template TTE and cached augmentation help?

    python benchmarks/protocol_choice.py                          # the measurement in docs/results.md
    python benchmarks/protocol_choice.py --quick --json /tmp/q.json   # smoke test: tiny, seconds to minutes

Nested and sealed. The outer split (``--outer fixed``: the bundled train/test split of the base
config; ``--outer cv``: fold k of a 5-fold re-split of all images, as benchmarks/_protocol.py)
gives an outer-train part; its outer test part is never read. Inside the outer-train part,
``--rep-seeds`` repetitions of an ``--inner-folds``-fold stratified split give, per inner fold,
an inner-train part (everything a row may fit or choose on) and an inner held-out part that
scores every row once. Rows (each a config on the base ``--config``, default configs/demo.yaml):

* ``last``  (a): fit on all of inner-train, fixed schedule (``train.epochs``), score the last epoch;
* ``val``   (b): the epoch chosen on a validation part of inner-train (``data.val_fraction`` of the base);
* ``refit`` (c): (b)'s chosen number of epochs, then a fit on all of inner-train for that many;
* ``db_cw0`` / ``db_cw05``: the DB loss (configs/experiments/db_loss*.yaml) with class-aware
  re-weighting ``class_weight_power`` 0 / 0.5, under (a);
* ``tpl_on`` / ``tpl_off``: configs/capnet.yaml (soft prompts on: the only rows where
  ``tte.templates`` acts) trained once under (a), scored with template TTE on / off;
* ``aug``: the base with ``train.augment_views`` cached augmented views per image (the frozen
  tower's train transform), under (a), against ``last`` (the eval view only).

Intervals (benchmarks/_stats.py): per inner fold the held-out mAP; paired differences over the
J = repetitions x folds x training seeds with the fold as the unit (Nadeau-Bengio corrected t,
and the plain paired t); and per (repetition, seed) the held-out scores pooled over the folds
(every outer-train image scored once), paired bootstrap over images. Each fit is cached as
``<runs>/<outer>/<row>/<fold>.npz`` keyed by its config hash, so an interrupted run continues.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: make `benchmarks` importable

from benchmarks import _stats as S  # noqa: E402

EXP = REPO / "configs" / "experiments"
KEYS = ("mAP", "head", "medium", "tail")
LAST = ["data.val_fraction=0.0", "train.select=last", "train.refit=false"]
# row -> (label, base config (None: --config), experiment files, overrides, protocol)
ROWS: Dict[str, Tuple[str, Optional[str], List[str], List[str], str]] = {
    "last": ("(a) last epoch of the fixed schedule, all inner-train images", None, [], [], "last"),
    "val": ("(b) epoch chosen on a validation part of inner-train", None, [], [], "val"),
    "refit": ("(c) (b)'s epoch count, refit on all inner-train images", None, [], [], "refit"),
    "db_cw0": ("DB loss, class-aware re-weighting off (q = 0)", None, ["db_loss.yaml"], [], "last"),
    "db_cw05": ("DB loss, class-aware re-weighting q = 0.5", None, ["db_loss_cw.yaml"], [], "last"),
    "tpl_on": ("configs/capnet.yaml (prompts on), template TTE on", "configs/capnet.yaml", [], [], "last"),
    "tpl_off": ("configs/capnet.yaml (prompts on), template TTE off (same fit)", "configs/capnet.yaml", [],
                ["tte.templates=false"], "last"),
    "aug": ("(a) + cached augmented training views", None, ["augmented_views.yaml"], ["train.augment_views={aug}"],
            "last"),
}
# (row a, row b, question): the difference a - b
COMPARISONS = [
    ("val", "last", "epoch on validation vs last epoch on all"),
    ("refit", "last", "refit vs last epoch on all"),
    ("refit", "val", "refit vs epoch on validation"),
    ("db_cw05", "db_cw0", "class-aware re-weighting (q 0.5 vs 0)"),
    ("tpl_on", "tpl_off", "template TTE (on vs off)"),
    ("aug", "last", "cached augmented views vs the eval view only"),
]


def outer_train(base: Path, outer: str, overrides: Sequence[str]):
    """(dataset whose train is the outer-train part, the sealed outer-test ids). ``outer``: fixed | cv<k>."""
    from capnet.config import load_config
    from capnet.experiment import prepare_dataset

    split = [] if outer == "fixed" else [f"data.resplit_folds=5", f"data.resplit_fold={int(outer[2:])}",
                                         "data.resplit_seed=0"]
    cfg = load_config([base], list(overrides) + split + ["data.val_fraction=0.0", "train.select=last"])
    ds = prepare_dataset(cfg.data)
    return ds, list(ds.splits["test"].image_ids)


def inner_split(ds: Any, folds: int, fold: int, seed: int):
    """``ds`` with train = inner-train, test = inner held-out, both from ds's train only (groups frozen)."""
    from capnet.data.stratify import kfold_split

    train = ds.splits["train"]
    rest, held = kfold_split(train.labels, folds, fold, seed)
    frozen = {g: [ds.classes[i] for i in idx] for g, idx in ds.groups().items()}
    return dataclasses.replace(ds, splits={"train": train.subset(np.sort(rest)), "test": train.subset(np.sort(held))},
                               class_groups=frozen)


def row_config(base: Path, row: str, overrides: Sequence[str], aug: int, epochs: Optional[int] = None):
    from capnet.config import load_config

    _, own_base, exps, extra, proto = ROWS[row]
    files = [REPO / own_base if own_base else base] + [EXP / e for e in exps]
    sets = list(overrides) + [e.format(aug=aug) for e in extra] + (["train.select=val", "train.refit=false"]
                                                                   if proto == "val" else LAST)
    if epochs is not None:
        sets.append(f"train.epochs={epochs}")
    return load_config(files, sets)


def fit_and_score(cfg: Any, ds: Any, cache: Path, score_cfgs: Sequence[Any]) -> Tuple[List[np.ndarray], Dict]:
    """Fit one row on ds's train (its own val part when the row selects on val); held-out logits
    under each of ``score_cfgs`` (same weights, e.g. template TTE on / off)."""
    import tempfile

    import torch

    from capnet.evaluation.scores import split_scores
    from capnet.experiment import fit_and_select
    from capnet.models.build import build_model
    from capnet.plans import feature_plan, tune_process
    from capnet.runtime.seed import seed_everything

    cfg = tune_process(cfg)
    ds = ds.with_val_split(cfg.data.val_fraction, cfg.data.val_seed)
    seed_everything(cfg.train.seed)
    model = build_model(cfg, ds.classes, ds.splits["train"].labels)
    with tempfile.TemporaryDirectory() as tmp:
        _, record = fit_and_select(model, ds, cfg, Path(tmp), feature_plan(cfg, model, torch.device("cpu"), cache))
    out = []
    for sc in score_cfgs:
        sc = tune_process(sc)
        model.set_test_time(sc.tte.templates)
        logits, _ = split_scores(model, ds.splits["test"], feature_plan(sc, model, torch.device("cpu"), cache))
        out.append(logits)
    return out, {"selected_epoch": record.get("selected_epoch"), "val_mAP": record.get("val_mAP"),
                 "n_fit": len(ds.splits["train"]), "n_val": len(ds.splits["val"]) if "val" in ds.splits else 0}


def _load(path: Path, key: str) -> Optional[Dict[str, Any]]:
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        if str(z["key"]) != key:
            return None
        return {"logits": z["logits"], "meta": json.loads(str(z["meta"]))}


def _save(path: Path, key: str, logits: np.ndarray, meta: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, key=key, logits=logits, meta=json.dumps(meta))
    os.replace(tmp, path)


def run_fold(base: Path, ds: Any, fold_name: str, rows: Sequence[str], overrides: Sequence[str], aug: int,
             runs: Path, cache: Path, log=print) -> Dict[str, Dict[str, Any]]:
    """Every row on one inner fold: {row: {logits, meta}} (cached per row and fold)."""
    from capnet.config import config_hash

    ids = ",".join(ds.splits["test"].image_ids)
    out: Dict[str, Dict[str, Any]] = {}
    order = [r for r in ("last", "val", "refit", "db_cw0", "db_cw05", "tpl_on", "tpl_off", "aug") if r in rows]
    for row in order:
        if row in out:
            continue
        epochs = None
        if row == "refit":
            epochs = max(1, int(out["val"]["meta"]["selected_epoch"]))
        cfg = row_config(base, row, overrides, aug, epochs)
        twin = {"tpl_on": "tpl_off", "tpl_off": "tpl_on"}.get(row)
        names = [row] + ([twin] if twin in rows else [])
        cfgs = [cfg] + ([row_config(base, twin, overrides, aug)] if twin in rows else [])
        keys = [config_hash(c) + "|" + ids for c in cfgs]
        saved = [_load(runs / n / f"{fold_name}.npz", k) for n, k in zip(names, keys)]
        if all(s is not None for s in saved):
            out.update(dict(zip(names, saved)))
            continue
        tic = time.time()
        logits, meta = fit_and_score(cfg, ds, cache, cfgs)
        meta["seconds"] = round(time.time() - tic, 2)
        for n, k, lg in zip(names, keys, logits):
            _save(runs / n / f"{fold_name}.npz", k, lg, meta)
            out[n] = {"logits": lg, "meta": meta}
        log(f"[{fold_name}] {'+'.join(names):16s} epoch {meta['selected_epoch']}  {meta['seconds']:.1f} s", flush=True)
    return out


def fold_metrics(logits: np.ndarray, ds: Any) -> Dict[str, float]:
    from capnet.metrics import map_report

    report = map_report(logits, ds.splits["test"].labels, ds.groups(), list(ds.classes))
    return {k: float(report[k]) for k in KEYS}


def analyse(folds: List[Dict[str, Any]], rows: Sequence[str], groups: Dict[str, np.ndarray], n_boot: int) -> Dict:
    """Per row: mean ± std over folds; per comparison: NB-corrected and plain t over folds, pooled bootstrap."""
    from benchmarks.ablation import t_interval

    res: Dict[str, Any] = {"rows": {}, "comparisons": {}}
    n_train = float(np.mean([f["n_train"] for f in folds]))
    n_test = float(np.mean([f["n_test"] for f in folds]))
    for r in rows:
        per = [f["metrics"][r] for f in folds]
        res["rows"][r] = {"label": ROWS[r][0], **{k: {"mean": float(np.nanmean([p[k] for p in per])),
                                                      "std": float(np.nanstd([p[k] for p in per], ddof=1))}
                                                  for k in KEYS},
                          "selected_epochs": [f["meta"][r].get("selected_epoch") for f in folds]}
    # pooled out-of-fold scores: one (N, C) array per (repetition, seed), rows sorted by image id
    pools: Dict[Tuple[int, int], Dict[str, Any]] = {}
    for f in folds:
        p = pools.setdefault((f["rep"], f["seed"]), {"ids": [], "targets": [], **{r: [] for r in rows}})
        p["ids"] += f["ids"]
        p["targets"].append(f["targets"])
        for r in rows:
            p[r].append(f["logits"][r])
    pooled = {}
    for key, p in pools.items():
        order = np.argsort(np.asarray(p["ids"]), kind="stable")
        pooled[key] = {"ids": [p["ids"][i] for i in order], "targets": np.concatenate(p["targets"])[order],
                       **{r: np.concatenate(p[r])[order] for r in rows}}
    ref = next(iter(pooled.values()))
    if any(v["ids"] != ref["ids"] for v in pooled.values()):
        raise RuntimeError("pooled held-out parts differ between repetitions")
    for a, b, question in COMPARISONS:
        if a not in rows or b not in rows:
            continue
        entry: Dict[str, Any] = {"question": question}
        for k in KEYS:
            d = [f["metrics"][a][k] - f["metrics"][b][k] for f in folds]
            nb, plain = S.nb_corrected_t(d, n_train, n_test), t_interval(d)
            cls = None if k == "mAP" else groups[k]
            boot = S.paired_bootstrap([v[a] for v in pooled.values()], [v[b] for v in pooled.values()],
                                      ref["targets"], classes=cls, n_boot=n_boot)
            entry[k] = {"folds_nb": nb, "folds_plain": plain, "pooled_bootstrap": boot,
                        "fold_diffs": [float(x) for x in d]}
        res["comparisons"][f"{a}-{b}"] = entry
    res["n_train"], res["n_test"], res["n_folds"] = n_train, n_test, len(folds)
    # wall seconds of every fit as recorded when it ran (a fit scored twice, tpl_on/off, counted once)
    res["fit_seconds"] = float(sum(f["meta"][r].get("seconds", 0.0) for f in folds for r in rows if r != "tpl_off"))
    return res


def markdown(result: Dict[str, Any]) -> str:
    """The generated section of docs/results.md (kept by benchmarks/ablation.py's renderer)."""
    m = result["meta"]
    lines = ["## Which training protocol, and what helps under it (nested, sealed)", "",
             "*Generated by `benchmarks/protocol_choice.py` into docs/results_protocol.md (docstring: the design); "
             "`python benchmarks/ablation.py --render` keeps it in docs/results.md.*", "",
             f"Command: `{m['command']}` on {m['machine']} (load average {m['load']}); {m['minutes']:.1f} min wall for this invocation; "
             f"the {m['n_folds']} x {len(result['rows'])} fits took {result['fit_seconds'] / 60:.1f} min in all when they ran "
             "(each fit is cached and reused). "
             f"Outer split(s) {m['outer']} (their test parts never read); inside each outer-train part "
             f"{m['inner_folds']}-fold stratified inner splits x repetition seeds {m['rep_seeds']} x training seeds "
             f"{m['seeds']} = {m['n_folds']} inner folds (held-out {m['n_test']:.0f}, inner-train {m['n_train']:.0f} "
             f"images on average); {m['n_boot']} bootstrap resamples; augmented views: {m['aug']}.", "",
             "Held-out mAP (%) mean ± std over the inner folds:", "",
             "| row | mAP | head | medium | tail | chosen epochs |", "| --- | --- | --- | --- | --- | --- |"]
    for r, v in result["rows"].items():
        ep = sorted({e for e in v["selected_epochs"] if e is not None})
        lines.append(f"| `{r}`: {v['label']} | " + " | ".join(f"{v[k]['mean']:.2f} ± {v[k]['std']:.2f}" for k in KEYS)
                     + f" | {ep[0] if len(ep) == 1 else (f'{ep[0]}-{ep[-1]}' if ep else '-')} |")
    lines += ["", "Paired differences (row a − row b), 95% intervals: folds = the inner fold as the unit, "
              "Nadeau-Bengio corrected t (plain paired t in brackets); pooled = out-of-fold held-out scores pooled "
              "per repetition, paired bootstrap over images. ▲/▼: the interval excludes 0.", "",
              "| a − b | question | total: folds NB (plain) | total: pooled | tail: folds NB (plain) | tail: pooled |",
              "| --- | --- | --- | --- | --- | --- |"]

    def cell_t(e):
        nb, pl = e["folds_nb"], e["folds_plain"]
        mark = S.resolved(nb["lo"], nb["hi"])
        sym = " ▲" if mark == "above 0" else " ▼" if mark == "below 0" else ""
        return f"{nb['mean']:+.2f} [{nb['lo']:+.2f}, {nb['hi']:+.2f}]{sym} (±{pl['half']:.2f})"

    def cell_b(e):
        b = e["pooled_bootstrap"]
        mark = S.resolved(b["lo"], b["hi"])
        sym = " ▲" if mark == "above 0" else " ▼" if mark == "below 0" else ""
        return f"{b['mean']:+.2f} [{b['lo']:+.2f}, {b['hi']:+.2f}]{sym}"

    for name, e in result["comparisons"].items():
        lines.append(f"| `{name}` | {e['question']} | {cell_t(e['mAP'])} | {cell_b(e['mAP'])} | "
                     f"{cell_t(e['tail'])} | {cell_b(e['tail'])} |")
    lines += ["", "Verdicts (total mAP; 'shown' needs both intervals on the same side of 0):", ""]
    lines += [f"- `{name}` ({e['question']}): {verdict(e['mAP'])}" for name, e in result["comparisons"].items()]
    lines += ["", f"**Protocol for the paper configs: {choose_protocol(result['comparisons'])}**"]
    return "\n".join(lines) + "\n"


def verdict(entry: Dict[str, Any]) -> str:
    """'a better', 'b better' when the fold-unit NB interval and the pooled bootstrap agree, else 'not shown'."""
    nb, boot = entry["folds_nb"], entry["pooled_bootstrap"]
    marks = {S.resolved(nb["lo"], nb["hi"]), S.resolved(boot["lo"], boot["hi"])}
    if marks == {"above 0"}:
        return "a better (shown)"
    if marks == {"below 0"}:
        return "b better (shown)"
    return "not shown either way"


def choose_protocol(comparisons: Dict[str, Any]) -> str:
    """The protocol shown better than both others; otherwise the stated rule: DB's (a)."""
    wins = {"last": [("val-last", "b"), ("refit-last", "b")], "val": [("val-last", "a"), ("refit-val", "b")],
            "refit": [("refit-last", "a"), ("refit-val", "a")]}
    for proto, needs in wins.items():
        if all(c in comparisons and verdict(comparisons[c]["mAP"]).startswith(side) for c, side in needs):
            return f"`{proto}` (shown better than both others on held-out images)"
    return ("`last` (configs/protocol/published.yaml): the measurement does not separate the three protocols, so "
            "the stated rule applies: the relatives' practice, DB's fixed schedule on all training images, last epoch")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"), help="the base recipe (rows a-c, DB, aug)")
    p.add_argument("--outer", nargs="+", default=["fixed"], help="fixed and/or cv0..cv4 (fold k of a 5-fold re-split)")
    p.add_argument("--inner-folds", type=int, default=5)
    p.add_argument("--rep-seeds", type=int, nargs="+", default=[0, 1], help="seeds of the inner k-fold repetitions")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--aug", type=int, default=4, help="train.augment_views of the `aug` row")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--set", action="append", default=[], dest="overrides", help="extra key=value for every row")
    p.add_argument("--runs-dir", default=str(REPO / "runs" / "protocol_choice"))
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "protocol_choice.json"))
    p.add_argument("--doc", default=str(REPO / "docs" / "results_protocol.md"),
                   help="the generated section (benchmarks/ablation.py --render appends it to docs/results.md)")
    p.add_argument("--quick", action="store_true", help="smoke test: 300 images per split, 2 inner folds, 2 epochs")
    args = p.parse_args(argv)
    if "refit" in args.rows and "val" not in args.rows:
        p.error("the refit row needs the val row (it refits for val's chosen epoch)")
    if args.quick:
        args.overrides += ["data.subset=300", "train.epochs=2"]
        args.inner_folds, args.rep_seeds, args.aug, args.n_boot = 2, [0], 1, 100
    from capnet.experiment import default_cache_dir

    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    base, runs = Path(args.config), Path(args.runs_dir) / ("quick" if args.quick else "full")
    start = time.time()
    load = os.getloadavg()
    results = {}
    for outer in args.outer:
        ds, sealed = outer_train(base, outer, args.overrides)
        folds = []
        for rep in args.rep_seeds:
            for k in range(args.inner_folds):
                inner = inner_split(ds, args.inner_folds, k, rep)
                seen = set(inner.splits["train"].image_ids) | set(inner.splits["test"].image_ids)
                if seen & set(sealed):
                    raise RuntimeError(f"{outer}: outer-test ids reached the inner folds")
                for seed in args.seeds:
                    name = f"r{rep}f{k}s{seed}"
                    got = run_fold(base, inner, name, args.rows, args.overrides + [f"train.seed={seed}"], args.aug,
                                   runs / outer, cache)
                    folds.append({"rep": rep, "seed": seed, "ids": list(inner.splits["test"].image_ids),
                                  "targets": inner.splits["test"].labels,
                                  "n_train": len(inner.splits["train"]), "n_test": len(inner.splits["test"]),
                                  "logits": {r: got[r]["logits"] for r in args.rows},
                                  "meta": {r: got[r]["meta"] for r in args.rows},
                                  "metrics": {r: fold_metrics(got[r]["logits"], inner) for r in args.rows}})
        results[outer] = analyse(folds, args.rows, ds.groups(), args.n_boot)
        results[outer]["sealed_outer_test_images"] = len(sealed)
    first = results[args.outer[0]]
    meta = {"command": "python benchmarks/protocol_choice.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": f"{_cpu()}, {os.cpu_count()} cores", "load": ", ".join(f"{x:.2f}" for x in load),
            "minutes": (time.time() - start) / 60, "outer": args.outer, "inner_folds": args.inner_folds,
            "rep_seeds": args.rep_seeds, "seeds": args.seeds, "n_boot": args.n_boot, "aug": args.aug,
            "config": str(base.relative_to(REPO)) if base.is_relative_to(REPO) else str(base),
            "overrides": args.overrides, "n_folds": first["n_folds"], "n_train": first["n_train"],
            "n_test": first["n_test"]}
    out = {"meta": meta, **first, "outer_splits": results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    if not args.quick:
        Path(args.doc).write_text(markdown(out))
    print(markdown(out))
    print(f"wrote {args.json}" + ("" if args.quick else f" and {args.doc}"))
    return 0


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
