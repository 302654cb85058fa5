"""How far an exported run's scores are from ``capnet predict``'s, on a run's whole test split.

    python benchmarks/export_parity.py                   # trains the demo recipe first (~1 min)
    python benchmarks/export_parity.py --run runs/demo   # an existing run

The export graph is float32. A run whose frozen prefix was extracted in float32
(``train.extract_amp=none``) is reproduced within 1e-4 (``tests/test_serving_export.py``); a run
extracted in bf16 (the default on CPUs with native bf16, as the demo is on such a machine) is
scored by ``predict`` with that bf16 prefix, so the export differs by the tower's bf16 rounding.
This measures by how much, on every image of the run's test split: absolute score differences,
label decisions (at the run's thresholds) that flip, and test mAP from each path. Both paths
decode and resize each image themselves. Writes ``results/export_parity.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.export_latency import train_demo  # noqa: E402


def _matrix(rows: List[Dict[str, Any]], classes: List[str]) -> np.ndarray:
    return np.array([[row["scores"][c] for c in classes] for row in rows], dtype=np.float64)


def measure_parity(run_dir: Path, work: Path) -> Dict[str, Any]:
    """Scores of ``capnet predict`` and of the ONNX export on the run's test split, compared."""
    import torch

    from capnet.metrics import map_report
    from capnet.runtime.precision import resolve_amp
    from capnet.serving.export import export_run
    from capnet.serving.exported import load_exported
    from capnet.serving.run import load_eval_dataset, load_run, predict_images

    run = load_run(run_dir, device="cpu")
    split = load_eval_dataset(run.cfg.data, "test").splits["test"]
    paths = [Path(p) for p in split.image_paths]
    export_run(run, "onnx", work / "m.onnx", run_dir=run_dir)
    exported = load_exported(work / "m.onnx", threads=torch.get_num_threads())
    eager = _matrix(list(predict_images(run, paths)), run.classes)
    onnx = _matrix(list(exported.predict(paths)), run.classes)
    diff = np.abs(eager - onnx)
    thresholds = np.asarray(run.thresholds, dtype=np.float64)
    flips = (eager >= thresholds) != (onnx >= thresholds)
    groups = {g: np.array([run.classes.index(c) for c in names]) for g, names in (run.class_groups or {}).items()}
    maps = {name: {k: round(float(v), 3) for k, v in map_report(s, split.labels, groups, run.classes).items()
                   if k in ("mAP", "head", "medium", "tail")} for name, s in (("predict", eager), ("onnx", onnx))}
    return {
        "run": str(run_dir), "images": len(paths), "classes": len(run.classes),
        "extraction_precision": str(resolve_amp(run.cfg.train.extract_amp, torch.device("cpu"))),
        "abs_score_diff": {"max": float(diff.max()), "mean": float(diff.mean()),
                           "p99": float(np.quantile(diff, 0.99))},
        "label_decisions": {"total": int(flips.size), "flipped": int(flips.sum()),
                            "images_with_a_flip": int(flips.any(axis=1).sum())},
        "test_mAP": maps,
    }


def markdown(r: Dict[str, Any]) -> str:
    d, f, m = r["abs_score_diff"], r["label_decisions"], r["test_mAP"]
    return "\n".join([
        "# Export parity (benchmarks/export_parity.py)", "",
        f"Run: {r['run_label']}, prefix extracted in `{r['extraction_precision']}`; {r['images']} test images x "
        f"{r['classes']} classes, `capnet predict` (eager) against the ONNX export under onnxruntime.", "",
        "| measure | value |", "| --- | --- |",
        f"| max abs score difference | {d['max']:.2e} |",
        f"| mean abs score difference | {d['mean']:.2e} |",
        f"| 99th percentile | {d['p99']:.2e} |",
        f"| label decisions flipped (run thresholds) | {f['flipped']} of {f['total']:,} "
        f"({f['images_with_a_flip']} images) |",
        f"| test mAP, predict / ONNX | {m['predict']['mAP']} / {m['onnx']['mAP']} |",
        f"| tail mAP, predict / ONNX | {m['predict'].get('tail')} / {m['onnx'].get('tail')} |", ""])


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, help="run directory (default: train the demo recipe in a temp dir)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)

    from benchmarks._timing import machine_info
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.run) if args.run else train_demo(Path(tmp) / "demo")
        result = measure_parity(run_dir, Path(tmp))
    result["run_label"] = args.run or "the demo recipe (configs/demo.yaml), trained by this script"
    result["machine"] = machine_info(torch.device("cpu"), REPO)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "export_parity.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "export_parity.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
