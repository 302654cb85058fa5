"""Open-vocabulary classes on the bundled real VOC-LT images: held-out classes scored by name.

    CAPNET_CACHE=/tmp/ovcache python benchmarks/open_vocab.py --seeds 0 1 2

Per seed, two demo-recipe runs (``configs/demo.yaml``, offline EfficientNet-Lite0 + MiniLM +
ImageNet text bridge): ``full`` trained on all 16 classes, and ``held`` trained with
``data.exclude_classes=[sheep, cow]`` (same images and splits, those two labels removed). The held
run then scores sheep and cow as added classes (``LoadedRun.with_classes``) on the test split;
their test AP is set next to the full run's and to zero-shot's (``configs/experiments/zeroshot.yaml``,
no training). Also measured: the old classes' test mAP under the two old-row policies of
``extend_classes`` (kept, or re-run through the GCN on the enlarged graph), new-class AP with the
new classes isolated in the graph, and F1 at the open-vocabulary threshold policy. Writes
benchmarks/results/open_vocab.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HELD = ["sheep", "cow"]


def _train(name: str, runs_dir: Path, overrides: Sequence[str], extra: Sequence[Path] = ()) -> Path:
    """Train (or reuse, when its config hash matches) one run of the demo recipe."""
    from capnet.config import load_config
    from capnet.experiment import default_cache_dir, finished_run, train_run

    cfg = load_config([REPO / "configs" / "demo.yaml", *extra], list(overrides))
    run_dir = runs_dir / name
    if finished_run(run_dir, cfg) is None:
        print(f"training {name} ...", file=sys.stderr, flush=True)
        train_run(cfg, run_dir, cache_dir=default_cache_dir())
    return run_dir


def _f1(probs: np.ndarray, target: np.ndarray, thr: float) -> float:
    """F1 (%) of one class at ``probs >= thr`` (capnet.metrics.f1_report)."""
    from capnet.metrics import f1_report

    return float(f1_report(probs[:, None], target[:, None], thr)["f1"][0])


def _best_f1(probs: np.ndarray, target: np.ndarray) -> float:
    """F1 (%) at the threshold best on these very labels: an upper bound, never a policy."""
    from capnet.metrics import best_thresholds

    return _f1(probs, target, float(best_thresholds(probs[:, None], target[:, None])[0]))


def _score(run: Any, ds: Any) -> Dict[str, Any]:
    """Test logits of ``run`` on the columns of ``ds`` it knows: per-class AP, probabilities, targets."""
    from capnet.data.class_match import match_classes
    from capnet.experiment import default_cache_dir
    from capnet.evaluation.scores import split_scores
    from capnet.plans import feature_plan
    from capnet.metrics import average_precision

    match = match_classes(run.classes, ds.classes, None, where=str(ds.root))
    run.model.set_test_time(run.cfg.tte.templates)
    logits, targets = split_scores(run.model, ds.splits["test"], feature_plan(run.cfg, run.model, run.device, default_cache_dir()))
    logits, targets = logits[:, match.run_index], targets[:, match.data_index]
    names = [run.classes[i] for i in match.run_index]
    ap = average_precision(logits, targets) * 100.0
    probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    thr = {c: float(run.thresholds[i]) for c, i in zip(names, match.run_index)}
    return {"ap": dict(zip(names, map(float, ap))), "probs": dict(zip(names, probs.T)),
            "targets": dict(zip(names, targets.T)), "thr": thr}


def _old_map(scored: Dict[str, Any], old: List[str]) -> float:
    return float(np.mean([scored["ap"][c] for c in old]))


def seed_result(seed: int, runs_dir: Path, ds: Any) -> Dict[str, Any]:
    """Every number of one seed (module docstring)."""
    from capnet.serving.run import load_run
    from capnet.models.open_vocab import extend_classes

    full = load_run(_train(f"full_s{seed}", runs_dir, [f"train.seed={seed}"]), device="cpu")
    held_dir = _train(f"held_s{seed}", runs_dir, [f"train.seed={seed}", f"data.exclude_classes=[{','.join(HELD)}]"])
    held = load_run(held_dir, device="cpu")
    old = list(held.classes)
    variants = {"kept": held.with_classes(HELD), "refreshed": held.with_classes(HELD, keep_old=False)}
    isolated = extend_classes(held.model, old, HELD, templates=held.cfg.model.templates, graph=None)
    variants["isolated"] = type(held)(**{**held.__dict__, "model": isolated.eval(), "classes": old + HELD,
                                         "thresholds": variants["kept"].thresholds, "added_classes": HELD})
    s_full, s_held = _score(full, ds), _score(held, ds)
    scored = {k: _score(v, ds) for k, v in variants.items()}
    ov = scored["kept"]
    out: Dict[str, Any] = {
        "seed": seed,
        "ap_full": {c: s_full["ap"][c] for c in HELD},
        "ap_open_vocab": {c: ov["ap"][c] for c in HELD},
        "ap_open_vocab_isolated": {c: scored["isolated"]["ap"][c] for c in HELD},
        "ap_open_vocab_refreshed": {c: scored["refreshed"]["ap"][c] for c in HELD},
        "old_classes_map": {"full_run": _old_map(s_full, old), "held_run": _old_map(s_held, old),
                            "held_run+added(kept)": _old_map(ov, old),
                            "held_run+added(refreshed)": _old_map(scored["refreshed"], old)},
        "added_threshold": float(variants["kept"].thresholds[-1]),
        "f1_open_vocab_at_policy": {c: _f1(ov["probs"][c], ov["targets"][c], ov["thr"][c]) for c in HELD},
        "f1_open_vocab_best_on_test": {c: _best_f1(ov["probs"][c], ov["targets"][c]) for c in HELD},
        "f1_full_at_val_threshold": {c: _f1(s_full["probs"][c], s_full["targets"][c], s_full["thr"][c]) for c in HELD},
        "test_positives": {c: int(ov["targets"][c].sum()) for c in HELD},
    }
    return out


def _mean(rows: List[Dict[str, Any]], key: str, c: str) -> str:
    vals = np.array([r[key][c] for r in rows])
    return f"{vals.mean():.1f}" + (f" ± {vals.std(ddof=1):.1f}" if len(vals) > 1 else "")


def markdown(result: Dict[str, Any]) -> str:
    """The table of docs/open_vocab.md."""
    rows, zs = result["seeds"], result["zeroshot_ap"]
    lines = ["| class | test positives | trained with it (full run) | open-vocabulary (held out, added by name) | zero-shot |",
             "|---|---|---|---|---|"]
    for c in HELD:
        lines.append(f"| {c} | {rows[0]['test_positives'][c]} | {_mean(rows, 'ap_full', c)} | "
                     f"{_mean(rows, 'ap_open_vocab', c)} | {zs[c]:.1f} |")
    lines += ["", "| old-class policy (14 trained classes, test mAP) | " + " | ".join(rows[0]["old_classes_map"]) + " |",
              "|---|" + "---|" * len(rows[0]["old_classes_map"]),
              "| mean over seeds | " + " | ".join(_mean(rows, "old_classes_map", k) for k in rows[0]["old_classes_map"]) + " |"]
    return "\n".join(lines)


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--runs-dir", type=Path, default=Path("/tmp/capnet_open_vocab_runs"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "open_vocab.json")
    args = parser.parse_args(argv)
    from capnet.config import load_config
    from capnet.serving.run import load_eval_dataset, load_run

    cfg = load_config([REPO / "configs" / "demo.yaml"])
    ds = load_eval_dataset(cfg.data, "test")
    zs_run = load_run(_train("zeroshot", args.runs_dir, [], [REPO / "configs" / "experiments" / "zeroshot.yaml"]), device="cpu")
    zs = _score(zs_run, ds)
    rows = [seed_result(s, args.runs_dir, ds) for s in args.seeds]
    result = {
        "command": "CAPNET_CACHE=/tmp/ovcache python benchmarks/open_vocab.py --seeds " + " ".join(map(str, args.seeds)),
        "held_out": HELD, "recipe": "configs/demo.yaml (offline EfficientNet-Lite0 + MiniLM + ImageNet text bridge)",
        "threshold_policy": "median of the trained classes' validation-chosen thresholds",
        "zeroshot_ap": {c: zs["ap"][c] for c in HELD}, "seeds": rows,
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
    }
    result["table"] = markdown(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(result["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
