"""Latency of an exported run: torch eager vs TorchScript vs onnxruntime, on the same inputs.

    python benchmarks/export_latency.py                  # trains the demo recipe first (~1 min)
    python benchmarks/export_latency.py --run runs/demo  # an existing run

The run is exported in both formats (``capnet.serving.export``), then the three graphs score the
same preprocessed batches (float32 RGB in [0, 1], flip TTE folded in as the run tests): torch
eager is the :class:`~capnet.serving.export.ExportGraph` module itself (the fp32 path
``capnet predict`` runs), TorchScript is the traced+frozen file, onnxruntime the ONNX file on the
CPU provider. Same intra-op thread count for all (``--threads``, default: the cores). Calls are
interleaved round by round after warm-up; ms/img is the median call time over the batch size.
Decode and resize are excluded (identical for all three). Writes ``results/export_latency.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._timing import machine_info, md_table, measure, summarize  # noqa: E402


def train_demo(out: Path) -> Path:
    """The demo recipe on the bundled images (the offline default backbone)."""
    subprocess.run([sys.executable, "-m", "capnet", "train", "--config", str(REPO / "configs" / "demo.yaml"),
                    "--out", str(out)], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, help="run directory (default: train the demo recipe in a temp dir)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)

    from capnet.serving.export import build_graph, export_run
    from capnet.serving.exported import load_exported
    from capnet.serving.run import load_run

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.run) if args.run else train_demo(Path(tmp) / "demo")
        run = load_run(run_dir, device="cpu")
        meta = export_run(run, "onnx", Path(tmp) / "m.onnx", run_dir=run_dir)
        export_run(run, "torchscript", Path(tmp) / "m.pt", run_dir=run_dir)
        eager = build_graph(run, meta["tte"])
        ts, ort = load_exported(Path(tmp) / "m.pt"), load_exported(Path(tmp) / "m.onnx", threads=args.threads)
        size = meta["image_size"]
        rows: Dict[str, Dict[str, Dict]] = {}
        for b in args.batch_sizes:
            x = torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(b))
            xn = x.numpy()

            def run_eager():
                with torch.inference_mode():
                    return eager(x)

            cases = {"torch eager": run_eager, "TorchScript": lambda: ts.scores(x), "onnxruntime": lambda: ort.scores(xn)}
            ref = run_eager().numpy()
            diff = {k: float(np.abs(np.asarray(f()) - ref).max()) for k, f in cases.items()}
            times = measure(cases, args.repeats, args.warmup, torch.device("cpu"))
            rows[str(b)] = {k: {**summarize(v), "ms_per_image": summarize(v)["median_s"] * 1e3 / b,
                                "max_abs_diff_vs_eager": diff[k]} for k, v in times.items()}
            print(f"batch {b}: " + ", ".join(f"{k} {r['ms_per_image']:.2f} ms/img" for k, r in rows[str(b)].items()))
    result = {"machine": machine_info(torch.device("cpu"), REPO), "threads": args.threads,
              "backbone": meta["backbone"], "tte": meta["tte"], "image_size": size,
              "run": str(args.run) if args.run else "demo recipe (configs/demo.yaml), trained by this script",
              "batches": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "export_latency.json").write_text(json.dumps(result, indent=1))
    table = md_table(["batch", "graph", "ms/img (median)", "ms/img (min)", "speed-up vs eager", "max |score - eager|"],
                     [[b, k, f"{r['ms_per_image']:.2f}", f"{r['min_s'] * 1e3 / int(b):.2f}",
                       f"{rows[b]['torch eager']['median_s'] / r['median_s']:.2f}x", f"{r['max_abs_diff_vs_eager']:.1e}"]
                      for b in rows for k, r in rows[b].items()])
    m = result["machine"]
    (out / "export_latency.md").write_text(
        f"# Exported-model latency ({meta['backbone']}, {size} px, tte={meta['tte']})\n\n"
        f"`python benchmarks/export_latency.py`; {m['cpu']}, {m['cpu_cores_logical']} logical cores, "
        f"{args.threads} intra-op threads, torch {m['torch']}, commit {m['git_commit']}. Preprocessed float32 "
        f"input (decode and resize excluded); median of {args.repeats} interleaved calls.\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
