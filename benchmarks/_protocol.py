"""The sealed protocol of benchmarks/ablation.py: every choice inside the outer-train part.

Outer splits: ``fixed`` (the bundled train/test split) and ``cv`` (``r`` repetitions of a K-fold
re-split of all images, iterative stratification, ``data.resplit_*``). Inside one outer split:

1. ``data.val_fraction`` / ``data.val_seed`` carve an inner validation part out of the outer-train
   part (``capnet.experiment.prepare_dataset``); the outer test part takes no part in any choice.
2. The text bridge (tau, WordNet glosses) is chosen by zero-shot mAP on inner validation
   (:func:`choose_bridge`; text side only: the image features do not depend on it).
3. Every row (CAPNET candidates and baselines) is trained on inner-train with its own choices
   (epoch, C, learning rate, steps) made on inner validation (``train.refit=false``: every row
   sees the same images), then scored once on the outer test part under the same views.
4. "CAPNET (recipe)" is the candidate with the best inner-validation mAP in that split.

Every run directory records the ids it was fitted on (train), chose on (val) and scored (test)
(``capnet.run_files``); ``fold.json`` adds the bridge and recipe choices and the ids
they saw. A finished run or split is reused when its config hash matches, so an interrupted
protocol continues where it stopped.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EXP = REPO / "configs" / "experiments"
KEYS = ("mAP", "head", "medium", "tail")

# CAPNET candidates: configs/capnet.yaml (every component) + one experiment file. The recipe is chosen among them on
# inner validation; each one's outer-test score is also its ablation row.
CANDIDATES: List[Tuple[str, str, Optional[str]]] = [
    ("full", "CAPNET, all components (prompts, residual, text graph + GCN, BCE)", None),
    ("no_prompts", "- soft prompts (fixed template classifier)", "no_prompts.yaml"),
    ("no_residual", "- class residual (the prompt classifier alone)", "no_residual.yaml"),
    ("no_gcn", "- text graph and GCN", "no_gcn.yaml"),
    ("db_loss", "DB loss (re-balanced weighting) instead of BCE", "db_loss.yaml"),
]
# Baselines from the CLIP-adaptation literature, fitted on the same cached features, same views.
BASELINES: List[Tuple[str, str, Optional[str]]] = [
    ("zeroshot", "Zero-shot (text bridge, no training)", "zeroshot.yaml"),
    ("linear_probe", "Linear probe (scikit-learn, C on inner val)", "linear_probe.yaml"),
    ("zs_linear_probe", "ZS-LP (zero-shot-initialised probe, lr / decay / steps on inner val)", "zs_linear_probe.yaml"),
    ("clap", "CLAP (class-adaptive pull to zero-shot, lr / steps on inner val)", "clap.yaml"),
]
RECIPE = "recipe"
# The text bridge's settings tried on inner validation; the first is the backbone's default.
BRIDGES: List[Dict[str, Any]] = [{"bridge_tau": t, "bridge_glosses": g} for g in (True, False) for t in (0.05, 0.03, 0.08)]
COMMON = ["train.refit=false"]  # every row is fitted on inner-train only: the same images for every row


def outer_splits(protocol: str, folds: int, fold_seeds: Sequence[int]) -> Dict[str, List[str]]:
    """Outer split name -> config overrides."""
    if protocol == "fixed":
        return {"fixed": []}
    return {f"s{s}f{k}": [f"data.resplit_folds={folds}", f"data.resplit_fold={k}", f"data.resplit_seed={s}"]
            for s in fold_seeds for k in range(folds)}


def row_config(base: Path, exp: Optional[str], overrides: Sequence[str]):
    from capnet.config import load_config

    return load_config([base] + ([EXP / exp] if exp else []), list(overrides))


def _bridge_overrides(bridge: Dict[str, Any]) -> List[str]:
    return [f"model.backbone_options.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in bridge.items()]


class BridgeScorer:
    """Zero-shot class embeddings of every bridge setting (built once), scored on given image features."""

    def __init__(self, base: Path, overrides: Sequence[str]) -> None:
        self.base, self.overrides = base, list(overrides)
        self._emb: Dict[int, Any] = {}
        self._model: Any = None

    def default_model(self, cfg: Any, classes: Sequence[str]) -> Any:
        """The default zero-shot model (its image tower reads the feature cache)."""
        if self._model is None:
            from capnet.models.build import build_model

            self._model = build_model(cfg, classes)
        return self._model

    def embeddings(self, i: int, classes: Sequence[str]):
        if i not in self._emb:
            from capnet.models.build import build_model

            cfg = row_config(self.base, "zeroshot.yaml", self.overrides + _bridge_overrides(BRIDGES[i]))
            self._emb[i] = build_model(cfg, classes).text_features.detach().clone()
        return self._emb[i]


def bridge_settings(cfg: Any) -> List[Dict[str, Any]]:
    """The bridge settings to choose among: BRIDGES on a text-bridge tower, else only its own."""
    return BRIDGES if cfg.model.backbone_options.get("text_bridge") else [{}]


def choose_bridge(scorer: BridgeScorer, ds: Any, cfg: Any, cache: Path) -> Dict[str, Any]:
    """Zero-shot mAP on inner validation (test-time views) of every bridge setting; the best wins
    (ties: the earlier, i.e. the default). Image features come from the default model: the bridge
    is text-side only, so they are the same for every setting. Towers without a bridge (CLIP):
    nothing to choose, the inner-val zero-shot mAP is still recorded."""
    import torch
    import torch.nn.functional as F

    from capnet.features.views import eval_views, split_features
    from capnet.metrics import average_precision
    from capnet.plans import feature_plan, tune_process

    cfg = tune_process(cfg)
    model = scorer.default_model(cfg, ds.classes)
    val = ds.splits["val"]
    plan = feature_plan(cfg, model, torch.device("cpu"), cache)
    feats = split_features(model, val.image_paths, eval_views(model, plan), plan)
    f = F.normalize(feats.float(), dim=-1)  # (M, V, D)
    settings = bridge_settings(cfg)
    scores = []
    for i in range(len(settings)):
        emb = model.text_features if len(settings) == 1 else scorer.embeddings(i, ds.classes)
        logits = (f @ F.normalize(emb.float(), dim=-1).T).mean(dim=1).numpy()
        scores.append(float(np.nanmean(average_precision(logits, val.labels)) * 100.0))
    best = int(max(range(len(scores)), key=lambda i: (round(scores[i], 6), -i)))
    return {"chosen": settings[best], "default": best == 0, "val_mAP": scores,
            "overrides": [] if best == 0 else _bridge_overrides(settings[best]), "seen_ids": list(val.image_ids)}


def run_row(cfg: Any, out: Path, cache: Path) -> Dict[str, Any]:
    """Train one row unless a finished run of the same config exists; its metrics."""
    from capnet.experiment import finished_run, train_run

    done = finished_run(out, cfg)
    if done is not None and (out / "test_scores.npz").is_file():
        return done
    return train_run(cfg, out, cache_dir=cache)


def run_split(name: str, split_overrides: Sequence[str], base: Path, extra: Sequence[str], runs_dir: Path,
              cache: Path, scorer: BridgeScorer, rows: Sequence[str], log=print) -> Dict[str, Any]:
    """One outer split: bridge choice, every row, the recipe choice; writes and returns fold.json."""
    from capnet.config import config_hash
    from capnet.run_files import read_split_ids
    from capnet.experiment import prepare_dataset

    out = runs_dir / name
    common = list(split_overrides) + COMMON + list(extra)
    probe_cfg = row_config(base, "zeroshot.yaml", common)
    key = config_hash(row_config(base, None, common)) + "|" + ",".join(rows)
    record_path = out / "fold.json"
    if record_path.is_file():
        try:
            saved = json.loads(record_path.read_text())
            if saved.get("key") == key:
                return saved
        except ValueError:
            pass
    t0 = time.time()
    ds = prepare_dataset(probe_cfg.data)
    bridge = choose_bridge(scorer, ds, probe_cfg, cache)
    log(f"[{name}] bridge {bridge['chosen']} (inner-val zero-shot mAP "
        + ", ".join(f"{v:.2f}" for v in bridge["val_mAP"]) + ")")
    results: Dict[str, Any] = {}
    for key_, label, exp in BASELINES + CANDIDATES:  # the fast baselines first
        if key_ not in rows:
            continue
        cfg = row_config(base, exp, common + bridge["overrides"])
        m = run_row(cfg, out / key_, cache)
        ids = read_split_ids(out / key_)
        results[key_] = {k: m.get(k) for k in KEYS} | {
            "val_mAP": m.get("val_mAP"), "selected_epoch": m.get("selected_epoch"),
            "probe": m.get("probe"), "seconds": m.get("seconds"), "per_class": m.get("per_class"),
            "candidate": key_ in {c for c, _, _ in CANDIDATES},
            "fit_ids": ids.get("train", []), "choice_ids": ids.get("val", []), "test_ids": ids.get("test", [])}
        log(f"[{name}] {key_:16s} inner-val {m.get('val_mAP') if m.get('val_mAP') is None else round(m['val_mAP'], 2)}"
            f"  test mAP {m['mAP']:.2f} tail {m['tail']:.2f}  ({m.get('seconds', 0):.0f} s)")
    cands = [c for c, _, _ in CANDIDATES if c in results and results[c]["val_mAP"] is not None]
    recipe = max(cands, key=lambda c: (results[c]["val_mAP"], -cands.index(c))) if cands else None
    seen = sorted({i for c in cands for i in results[c]["choice_ids"]})
    record = {"key": key, "name": name, "overrides": list(split_overrides), "bridge": bridge,
              "recipe": {"chosen": recipe, "val_mAP": {c: results[c]["val_mAP"] for c in cands}, "seen_ids": seen},
              "rows": results, "outer_test_ids": list(ds.splits["test"].image_ids),
              "n_train": len(ds.splits["train"]) + len(ds.splits["val"]), "n_test": len(ds.splits["test"]),
              "minutes": (time.time() - t0) / 60}
    out.mkdir(parents=True, exist_ok=True)
    from capnet.fileio import atomic_write_bytes

    atomic_write_bytes(json.dumps(record).encode(), record_path)
    log(f"[{name}] recipe = {recipe} ({record['minutes']:.1f} min)")
    return record


def leaked_ids(record: Dict[str, Any]) -> List[str]:
    """Outer-test ids that reached any choice or fit of a split (must be empty)."""
    test = set(record["outer_test_ids"])
    seen = set(record["bridge"]["seen_ids"]) | set(record["recipe"]["seen_ids"])
    for r in record["rows"].values():
        seen |= set(r["fit_ids"]) | set(r["choice_ids"])
        if set(r["test_ids"]) != test:
            return sorted(set(r["test_ids"]) ^ test) or ["<test ids differ>"]
    return sorted(seen & test)


def split_scores_of(runs_dir: Path, name: str, row: str):
    """(ids, logits, targets) of one row's outer-test scores."""
    from capnet.run_files import read_test_scores

    return read_test_scores(runs_dir / name / row)
