"""The paper's ablation and the literature's strongest baselines under a sealed protocol; writes docs/results.md.

    python benchmarks/ablation.py --runs-dir /tmp/ablation_runs       # both protocols, every row (docs/results.md)
    python benchmarks/ablation.py --runs-dir /tmp/ablation_runs \
        --cv-rows zeroshot linear_probe zs_linear_probe clap full no_prompts   # fewer cv candidates, when time is short
    python benchmarks/ablation.py --render     # rewrite docs/results.md from results/ablation.json (after editing the notes)

Primary protocol ``cv``: ``--fold-seeds`` (default 0 1) repetitions of a ``--folds``-fold (5)
re-split of ALL bundled images (iterative stratification), 10 outer folds. Secondary ``fixed``:
the bundled train/test split. In every outer split every choice (text-bridge tau and glosses,
each row's epoch / C / learning rate / steps, and which CAPNET candidate is "the recipe") is made
on an inner validation part carved from the outer-train part; the outer test part is scored once.
Every row, baselines included, is scored with the same test-time views (flip; CAPNET rows add the
template classifier, the only rows with a learned text side). The machinery is in
``benchmarks/_protocol.py``, the intervals in ``benchmarks/_stats.py``:

* paired differences with the outer fold as the unit, Nadeau-Bengio corrected resampled t
  (variance factor 1/J + n_test/n_train, J - 1 degrees of freedom);
* per repetition, out-of-fold test scores pooled over the K folds (every image scored exactly
  once), paired bootstrap over images (``--n-boot`` resamples, default 2,000), total and tail mAP.

Every (split, row) is a run directory under ``--runs-dir`` with ``split_ids.json`` and
``test_scores.npz``; every split a ``fold.json`` with its choices and the ids they saw. Finished
runs and splits are reused (config hash), so an interrupted run continues. Outputs:
benchmarks/results/ablation.json, docs/results.md (+ docs/img/ablation_groups.png).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: make `benchmarks` importable

from benchmarks import _protocol as P  # noqa: E402
from benchmarks import _stats as S  # noqa: E402

KEYS = P.KEYS
FULL, RECIPE = "full", P.RECIPE
LABELS = {k: label for k, label, _ in P.CANDIDATES + P.BASELINES} | {RECIPE: "**CAPNET (recipe: best candidate on inner val)**"}
BASELINE_KEYS = [k for k, _, _ in P.BASELINES]
CANDIDATE_KEYS = [k for k, _, _ in P.CANDIDATES]


def t_interval(diffs: Sequence[float]) -> Dict[str, float]:
    """Mean and plain 95% t half-width of paired differences (benchmarks/sweep_val.py uses it)."""
    from scipy import stats

    d = np.asarray([x for x in diffs if x is not None and not math.isnan(x)], dtype=float)
    if d.size < 2:
        return {"mean": float(d.mean()) if d.size else float("nan"), "half": float("nan"), "n": int(d.size)}
    half = float(stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
    return {"mean": float(d.mean()), "half": half, "n": int(d.size)}


# ----------------------------------------------------------------------------------- aggregation
def split_metrics(records: Dict[str, Any], row: str) -> Dict[str, Dict[str, float]]:
    """split -> {mAP, head, medium, tail} of ``row`` (the recipe: its chosen candidate's)."""
    out = {}
    for name, rec in records.items():
        key = rec["recipe"]["chosen"] if row == RECIPE else row
        if key in rec["rows"]:
            out[name] = {k: rec["rows"][key][k] for k in KEYS}
    return out


def pooled_scores(records: Dict[str, Any], runs_dir: Path, row: str, protocol: str, fold_seeds: Sequence[int]):
    """Per repetition, (ids, logits, targets) of ``row`` pooled over its outer folds, ids sorted."""
    reps = [[n for n in records if n.startswith(f"s{s}f")] for s in fold_seeds] if protocol == "cv" else [list(records)]
    out = []
    for names in reps:
        ids, logits, targets = [], [], []
        for n in names:
            key = records[n]["recipe"]["chosen"] if row == RECIPE else row
            i, lg, t = P.split_scores_of(runs_dir, n, key)
            ids += i
            logits.append(lg)
            targets.append(t)
        order = np.argsort(np.asarray(ids))
        out.append((list(np.asarray(ids)[order]), np.concatenate(logits)[order], np.concatenate(targets)[order]))
    return out


def analyse(records: Dict[str, Any], runs_dir: Path, protocol: str, fold_seeds: Sequence[int], groups: Dict[str, Any],
            n_boot: int) -> Dict[str, Any]:
    """Rows (mean ± std over outer splits), fold-unit NB intervals and pooled bootstrap intervals."""
    rows = [RECIPE] + [k for k in CANDIDATE_KEYS + BASELINE_KEYS if all(k in r["rows"] for r in records.values())]
    per_split = {r: split_metrics(records, r) for r in rows}
    n_train = float(np.mean([r["n_train"] for r in records.values()]))
    n_test = float(np.mean([r["n_test"] for r in records.values()]))
    out: Dict[str, Any] = {"rows": {}, "splits": sorted(records), "n_train": n_train, "n_test": n_test}
    pooled = {r: pooled_scores(records, runs_dir, r, protocol, fold_seeds) for r in rows}
    ref_ids = pooled[RECIPE][0][0]
    targets = pooled[RECIPE][0][2]
    for r in rows:
        for ids, _, _ in pooled[r]:
            if ids != ref_ids:
                raise RuntimeError(f"{r}: pooled out-of-fold ids differ from the recipe's: the folds are not the same")
    draws = S.bootstrap_draws(len(ref_ids), n_boot, seed=0)
    ap_draws = {r: S.class_ap_draws([lg for _, lg, _ in pooled[r]], targets, draws) for r in rows}
    ap_point = {r: S.point_ap([lg for _, lg, _ in pooled[r]], targets) for r in rows}
    tail = np.asarray(groups["tail"])

    def contrast(a: str, b: str) -> Dict[str, Any]:
        res: Dict[str, Any] = {}
        for k, classes in (("mAP", None), ("tail", tail)):
            common = sorted(set(per_split[a]) & set(per_split[b]))
            diffs = [per_split[a][s][k] - per_split[b][s][k] for s in common]
            res[k] = {"folds": S.nb_corrected_t(diffs, n_train, n_test) if protocol == "cv" else None,
                      "pooled": S.difference_interval(ap_draws[a], ap_draws[b], ap_point[a], ap_point[b], classes)}
        return res

    def mean_std(v: np.ndarray):
        v = v[~np.isnan(v)]
        return (float(v.mean()) if v.size else float("nan")), (float(v.std(ddof=1)) if v.size > 1 else 0.0)

    for r in rows:
        vals = {k: mean_std(np.array([m[k] for m in per_split[r].values()], dtype=float)) for k in KEYS}
        row = {"label": LABELS[r], "mean": {k: v[0] for k, v in vals.items()}, "std": {k: v[1] for k, v in vals.items()},
               "per_split": per_split[r],
               "pooled": {k: float(np.mean(S._group_mean(ap_point[r], None if k == "mAP" else np.asarray(groups[k]))))
                          for k in KEYS}}
        if r in BASELINE_KEYS:
            row["recipe_minus_this"] = contrast(RECIPE, r)
        if r in CANDIDATE_KEYS and r != FULL:
            row["this_minus_full"] = contrast(r, FULL)
        if r == FULL:
            row["recipe_minus_this"] = contrast(RECIPE, FULL)
        out["rows"][r] = row
    out["choices"] = {n: {"bridge": rec["bridge"]["chosen"], "bridge_val_mAP": rec["bridge"]["val_mAP"],
                          "recipe": rec["recipe"]["chosen"], "candidate_val_mAP": rec["recipe"]["val_mAP"],
                          "leaked_ids": len(P.leaked_ids(rec)), "minutes": rec.get("minutes")}
                      for n, rec in sorted(records.items())}
    return out


# --------------------------------------------------------------------------------------- markdown
def _iv(d: Optional[Dict[str, float]]) -> str:
    if not d or d.get("mean") is None or math.isnan(d["mean"]):
        return "-"
    lo, hi = d.get("lo", float("nan")), d.get("hi", float("nan"))
    if math.isnan(lo):
        return f"{d['mean']:+.2f}"
    mark = {"above 0": " ▲", "below 0": " ▼"}.get(S.resolved(lo, hi), "")
    return f"{d['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}]{mark}"


def _bridge(b: Dict[str, Any]) -> str:
    if not b:
        return "no bridge (tower's own text side)"
    return f"tau {b['bridge_tau']}, {'glosses' if b['bridge_glosses'] else 'names only'}"


def table(res: Dict[str, Any], protocol: str) -> List[str]:
    fold_unit = protocol == "cv"
    head = "| row | total mAP | head | medium | tail | pooled total | pooled tail | Δ total (folds, NB) | Δ tail (folds, NB) | Δ total (pooled bootstrap) | Δ tail (pooled bootstrap) |"
    if not fold_unit:
        head = "| row | total mAP | head | medium | tail | Δ total (bootstrap over test images) | Δ tail (bootstrap over test images) |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r, row in res["rows"].items():
        cells = " | ".join(f"{row['mean'][k]:.2f} ± {row['std'][k]:.2f}" if fold_unit else f"{row['mean'][k]:.2f}"
                           for k in KEYS)
        c = row.get("recipe_minus_this") or row.get("this_minus_full")
        if fold_unit:
            extra = [f"{row['pooled']['mAP']:.2f}", f"{row['pooled']['tail']:.2f}"]
            extra += [_iv(c[k]["folds"]) if c else "-" for k in ("mAP", "tail")]
            extra += [_iv(c[k]["pooled"]) if c else "-" for k in ("mAP", "tail")]
        else:
            extra = [_iv(c[k]["pooled"]) if c else "-" for k in ("mAP", "tail")]
        lines.append(f"| {row['label']} | {cells} | " + " | ".join(extra) + " |")
    return lines


def verdicts(res: Dict[str, Any], protocol: str) -> List[str]:
    """Resolved / not resolved, per baseline and per component (an interval that crosses 0 is not resolved)."""
    kind = "pooled"
    lines = []
    for r, row in res["rows"].items():
        if "recipe_minus_this" in row:
            c, what = row["recipe_minus_this"], f"CAPNET (recipe) − {row['label']}"
        elif "this_minus_full" in row:
            c, what = row["this_minus_full"], f"{row['label']} (row − full)"
        else:
            continue
        parts = []
        for k, name in (("mAP", "total"), ("tail", "tail")):
            iv = c[k][kind]
            state = S.resolved(iv["lo"], iv["hi"])
            nb = c[k]["folds"]
            nb_state = f"; folds (NB) {S.resolved(nb['lo'], nb['hi'])}" if nb else ""
            parts.append(f"{name} {iv['mean']:+.2f}: {state}{nb_state}")
        lines.append(f"- {what}: " + "; ".join(parts))
    return lines


def goal_check(results: Dict[str, Any]) -> List[str]:
    out = ["## The goal, checked", "",
           "Goal: CAPNET (recipe) >= the strongest baseline in total and tail mAP, with the pooled-bootstrap "
           "interval above 0. The strongest baseline is the one with the highest mean total mAP over the outer folds.", ""]
    for proto, res in results.items():
        base = [r for r in BASELINE_KEYS if r in res["rows"]]
        if not base:
            continue
        best = max(base, key=lambda r: res["rows"][r]["mean"]["mAP"])
        c = res["rows"][best]["recipe_minus_this"]
        parts = []
        for k, name in (("mAP", "total"), ("tail", "tail")):
            iv = c[k]["pooled"]
            state = S.resolved(iv["lo"], iv["hi"])
            word = "met (interval above 0)" if state == "above 0" else f"NOT met ({state})"
            nb = c[k]["folds"]
            extra = f"; fold-unit NB {_iv(nb)} ({S.resolved(nb['lo'], nb['hi'])})" if nb else ""
            parts.append(f"{name} {_iv(iv)} → {word}{extra}")
        out.append(f"- `{proto}`: strongest baseline = {LABELS[best]}. " + "; ".join(parts))
    return out + [""]


def choices_table(res: Dict[str, Any]) -> List[str]:
    lines = ["| outer split | bridge chosen (zero-shot inner val) | recipe chosen | inner-val mAP of the candidates | outer-test ids in any choice | minutes |",
             "| --- | --- | --- | --- | --- | --- |"]
    for n, c in res["choices"].items():
        vals = ", ".join(f"{k} {v:.2f}" for k, v in c["candidate_val_mAP"].items())
        lines.append(f"| {n} | {_bridge(c['bridge'])} | {c['recipe']} | {vals} | {c['leaked_ids']} | {c['minutes'] or 0:.1f} |")
    return lines


def markdown(results: Dict[str, Any], meta: Dict[str, Any]) -> str:
    lines = ["# Results", "",
             "*Generated by `benchmarks/ablation.py` (docstring: the protocol); edit docs/results_notes.md for the prose, "
             "then `python benchmarks/ablation.py --render`.*", "",
             f"Command: `{meta['command']}` on {meta['machine']}; {meta['minutes']:.0f} min wall. Fold seeds "
             f"{meta['fold_seeds']}, {meta['folds']} folds, training seed 0, {meta['n_boot']} bootstrap resamples.", "",
             "**Views, every row**: flip (the image and its mirror, logits averaged). CAPNET rows also average their "
             "prompt classifier with the fixed template classifier (`tte.templates`); the baselines have no learned "
             "text side at test time (zero-shot's classifier is the template one; ZS-LP and CLAP start from it).", "",
             "Intervals are 95%: `[lo, hi]`, ▲ above 0, ▼ below 0, no mark: not resolved (crosses 0). Baseline rows: "
             "Δ = CAPNET (recipe) − that row; CAPNET candidate rows: Δ = that row − full CAPNET (a '-' row's Δ is minus "
             "that component's contribution); the full row: recipe − full.", ""]
    titles = {"cv": "Protocol `cv` (primary): outer 5-fold re-splits of all 3,426 images x {r} fold seeds = {j} outer folds",
              "fixed": "Protocol `fixed` (secondary): the bundled split (1,026 test images), choices on its train part only"}
    for proto in ("cv", "fixed"):
        if proto not in results:
            continue
        res = results[proto]
        lines += [f"## {titles[proto].format(r=len(meta['fold_seeds']), j=len(res['splits']))}", ""]
        cands = [k for k in CANDIDATE_KEYS if k in res["rows"]]
        lines += ["CAPNET candidates in this protocol (the recipe is chosen among them in each split): "
                  + ", ".join(f"`{k}`" for k in cands) + ".", ""]
        if proto == "cv":
            lines += [f"Test mAP (%) mean ± std over the {len(res['splits'])} outer folds; 'pooled': mAP of the "
                      "out-of-fold scores pooled over the 5 folds of a repetition (mean of the repetitions). "
                      f"Δ (folds, NB): Nadeau-Bengio corrected t over the outer folds (n_train {res['n_train']:.0f}, "
                      f"n_test {res['n_test']:.0f}). Δ (pooled bootstrap): images resampled, the same draw for both rows "
                      "and both repetitions.", ""]
        else:
            lines += ["Test mAP (%) of one split; Δ: paired bootstrap over the 1,026 test images.", ""]
        lines += table(res, proto) + ["", "Resolved or not (pooled bootstrap interval):", ""] + verdicts(res, proto) + [""]
        lines += ["Choices per outer split (every one made on inner validation; the last columns count the outer-test "
                  "ids that reached any choice or fit — must be 0):", ""] + choices_table(res) + [""]
        if proto == "fixed":
            c = next(iter(res["choices"].values()))
            lines += [f"**Inner-validation winner on the fixed split: `{c['recipe']}`** "
                      f"(bridge {_bridge(c['bridge'])}). The default `capnet demo` recipe is this candidate: "
                      "configs/demo.yaml = configs/capnet.yaml + its experiment file.", ""]
    lines += goal_check(results) + ["![group mAP by row](img/ablation_groups.png)", ""] + open_vocab() + demo_times()
    notes = REPO / "docs" / "results_notes.md"
    if notes.is_file():
        lines += [notes.read_text()]
    protocol = REPO / "docs" / "results_protocol.md"  # generated by benchmarks/protocol_choice.py
    if protocol.is_file():
        lines += [protocol.read_text()]
    return "\n".join(lines)


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
            f"on the enlarged graph. Command: `{r['command']}`. Threshold of an added class: {r['threshold_policy']}. "
            "(Not part of the sealed protocol: bundled split, recipe of that time.)",
            "", r["table"], ""]


def plot(results: Dict[str, Any], path: Path) -> None:
    """Grouped bars (cv protocol when present) with std over outer folds as error bars."""
    from capnet.plots import plot_group_bars

    res = results.get("cv") or next(iter(results.values()))
    order = list(res["rows"])
    plot_group_bars({k: res["rows"][k]["mean"] for k in order}, path, errors={k: res["rows"][k]["std"] for k in order})


# ------------------------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default=str(REPO / "configs" / "capnet.yaml"))
    p.add_argument("--protocols", nargs="+", default=["fixed", "cv"], choices=["fixed", "cv"])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--fold-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--rows", nargs="+", default=CANDIDATE_KEYS + BASELINE_KEYS,
                   help="rows to run (CAPNET candidates and baselines); the recipe is chosen among the candidates given")
    p.add_argument("--cv-rows", nargs="+", default=None,
                   help="rows of the cv protocol when they differ from --rows (a smaller candidate set to fit a time budget)")
    p.add_argument("--runs-dir", default=str(REPO / "runs" / "ablation"))
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--n-boot", type=int, default=2000)
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
    if FULL not in args.rows or (args.cv_rows and FULL not in args.cv_rows):
        p.error("--rows / --cv-rows must include 'full' (the contrast of every candidate row)")
    from capnet.config import load_config
    from capnet.data import load_dataset
    from capnet.experiment import default_cache_dir

    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    runs_dir = Path(args.runs_dir)
    base = Path(args.base)
    start = time.time()
    base_cfg = load_config([base], args.overrides)
    groups = load_dataset(base_cfg.data.reader, base_cfg.data.root, split_dir=base_cfg.data.split_dir).groups()
    scorer = P.BridgeScorer(base, args.overrides)
    results: Dict[str, Any] = {}
    for proto in args.protocols:
        rows = args.cv_rows if proto == "cv" and args.cv_rows else args.rows
        records = {name: P.run_split(name, ov, base, args.overrides, runs_dir / proto, cache, scorer, rows)
                   for name, ov in P.outer_splits(proto, args.folds, args.fold_seeds).items()}
        leaks = {n: P.leaked_ids(r) for n, r in records.items()}
        if any(leaks.values()):
            raise RuntimeError(f"outer-test ids reached a choice: {({n: v[:5] for n, v in leaks.items() if v})}")
        results[proto] = analyse(records, runs_dir / proto, proto, args.fold_seeds, groups, args.n_boot)
        print(f"[{proto}] analysed {len(records)} outer splits", flush=True)
    meta = {"fold_seeds": args.fold_seeds, "folds": args.folds, "n_boot": args.n_boot,
            "rows": {"fixed": args.rows, "cv": args.cv_rows or args.rows},
            "minutes": (time.time() - start) / 60,
            "command": "python benchmarks/ablation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "protocols": results}, indent=1))
    doc = Path(args.doc)
    (doc.parent / "img").mkdir(parents=True, exist_ok=True)
    plot(results, doc.parent / "img" / "ablation_groups.png")
    doc.write_text(markdown(results, meta))
    print(f"wrote {args.json} and {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
