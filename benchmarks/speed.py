"""How fast is CAPNET next to the bare visual encoder it adapts? (issue 7, speed part)

Run:  python -m benchmarks.speed [--quick | --smoke] [--device cpu|cuda] [--out DIR]

Methodology (a reviewer should be able to check every step):
* Weights are random (``model.weights=random``): speed depends on the architecture only.
  Models are the shipped recipes (configs/model/clip_*.yaml: class-specific soft prompts,
  text graph, 3-layer residual GCN, DB-focal loss, template ensembling, the recipe's PEFT).
* Baseline = the *same* backbone object with the *same* PEFT module (same hooks, same
  trainable tensors) + a linear head on unit-norm image features, the same loss and the same
  optimiser recipe (benchmarks/_speed_models.py). CAPNET minus baseline = text branch + head.
* Both run in ONE process on the same inputs; candidates are interleaved round by round,
  warm-up calls are excluded, and we report the median of >= 5 repeats (3 with --quick) and
  ratios as the median of per-round (paired) ratios (benchmarks/_timing.py).
* Training step = zero_grad + autocast forward + float32 loss + backward + optimiser step.
  The text branch (C prompts through the text tower, GCN) runs once per step; its
  forward+backward and the image branch's are also timed alone to report its share.
* Inference = eval mode under no_grad: CAPNET's class embeddings are cached, so the text
  branch does not run per batch. TTE uses capnet.models.tte.tte_logits on (B, V, 3, H, W).
* Throughput: images/s for inference and training, per variant (GPU: bf16 autocast,
  channels_last, torch.compile, each on/off); CPU runs fp32 only unless --variants says so.
* Offline backbone: seconds per image of VGG19 features, model only and end to end
  (JPEG decode + transform + model, capnet.features.cache.compute_features).
* Class-count scaling (``--sections scale``, issue 24; benchmarks/_speed_scale.py): step time
  and peak memory of CAPNET (exact vs budgeted text branch) and the bare encoder, one fresh
  subprocess per row; ``--merge`` keeps the other sections (and other backbones' scale rows)
  of an existing results file, so one file can hold rows run at different image sizes.
* The machine (CPU, threads, load average before/after, GPU, torch, git commit) is recorded:
  numbers taken while other processes compete for the CPU are not comparable.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import _speed_sections as sections
from benchmarks._speed_report import render_markdown
from benchmarks._timing import CpuShare, load_average, machine_info

REPO = Path(__file__).resolve().parents[1]
FULL_ARCHS = ("clip_vit_b16.openai", "clip_rn50.openai")
TINY_ARCHS = ("clip_tiny_vit.random", "clip_tiny_rn.random")
GPU_VARIANTS = ("fp32", "fp32+cl", "fp32+compile", "bf16", "bf16+cl", "bf16+compile", "bf16+cl+compile")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Command-line options; presets (--quick, --smoke) fill what is not given explicitly."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a few minutes on 2 CPU cores (small inputs, 3 repeats)")
    mode.add_argument("--smoke", action="store_true", help="seconds: tiny random CLIPs, 1 repeat (CI proves it runs)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for speed_*.json/.md (default: benchmarks/results for a full run; the git-ignored "
                        "runs/benchmarks for --quick / --smoke, so a trial never touches the committed results)")
    p.add_argument("--archs", nargs="+", help=f"backbones (default {' '.join(FULL_ARCHS)})")
    p.add_argument("--classes", nargs="+", type=int, help="class counts for the scaling study (default 20 80 1000)")
    p.add_argument("--batch-size", type=int, help="images per step (default CPU 8, GPU 64)")
    p.add_argument("--image-size", type=int, help="override the input side (default: the backbone's, 224)")
    p.add_argument("--repeats", type=int, help="timed repeats per candidate (default 5; quick 3)")
    p.add_argument("--warmup", type=int, help="untimed calls per candidate first (default 2; quick 1)")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), help="autocast for sections 1, 2, 5 (default: bf16 on GPU, none on CPU)")
    p.add_argument("--variants", nargs="+", help=f"throughput variants (GPU default: {' '.join(GPU_VARIANTS)}; CPU: fp32)")
    p.add_argument("--sections", nargs="+", default=list(sections.DEFAULT_SECTIONS), choices=list(sections.SECTIONS))
    p.add_argument("--merge", action="store_true", help="update an existing results file: keep the sections not run "
                   "(and scale rows of other backbones / sizes / class counts)")
    p.add_argument("--text-limit", type=int, help="measure CAPNET only up to this many classes, extrapolate "
                   "the text branch linearly above it (default: all; quick on CPU: 80)")
    p.add_argument("--demo-times", type=Path, help="JSON of `capnet demo` timings to merge into the results")
    return p.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("speed: --device cuda asked for but torch.cuda.is_available() is False")
    return device


def settings_from(args: argparse.Namespace, device: torch.device) -> sections.Settings:
    """Merge explicit flags over the preset of the chosen mode and device."""
    gpu = device.type == "cuda"
    if args.smoke:
        preset = dict(archs=TINY_ARCHS, classes=(4, 12), batch=2, image_size=None, repeats=1, warmup=1,
                      tte_batch=2, full_text_limit=None, offline_images=0)
    elif args.quick:
        preset = dict(archs=FULL_ARCHS, classes=(20, 80, 1000), batch=16 if gpu else 4, image_size=None if gpu else 96,
                      repeats=3, warmup=1, tte_batch=8 if gpu else 2, full_text_limit=None if gpu else 80,
                      offline_images=64 if gpu else 64)
    else:
        preset = dict(archs=FULL_ARCHS, classes=(20, 80, 1000), batch=64 if gpu else 8, image_size=None,
                      repeats=5, warmup=2, tte_batch=32 if gpu else 4, full_text_limit=None,
                      offline_images=256)
    explicit = dict(archs=args.archs, classes=args.classes, batch=args.batch_size, image_size=args.image_size,
                    repeats=args.repeats, warmup=args.warmup, full_text_limit=args.text_limit)
    preset.update({k: tuple(v) if isinstance(v, list) else v for k, v in explicit.items() if v is not None})
    variants = tuple(args.variants) if args.variants else (GPU_VARIANTS if gpu else ("fp32",))
    amp = args.amp or ("bf16" if gpu else "none")
    return sections.Settings(device=device, amp=amp, variants=variants, **preset)


def merge_demo_times(path: Optional[Path]) -> Dict[str, Any]:
    """Timings of `capnet demo` written by the lead's tooling, when a file is given and exists."""
    if path is None:
        return {"note": "not measured here: pass --demo-times FILE.json (any JSON object) to merge demo timings"}
    if not path.is_file():
        return {"note": f"--demo-times {path} does not exist; nothing merged"}
    return {"source": str(path), "times": json.loads(path.read_text())}


def _scale_key(row: Dict[str, Any]) -> tuple:
    return row["arch"], row["classes"], row["mode"], row["image_size"], row["batch"], row["amp"]


def _replaced(note: str, ran: Sequence[str]) -> bool:
    """Whether an old note's run is wholly replaced by this run: all its sections were rerun and
    none is ``scale`` (scale rows of other sizes survive a merge, so their notes do too). A note
    without the "(run of sections [...])" prefix is the first run's, of the default sections."""
    import ast

    if note.startswith("(run of sections "):
        sections_of = ast.literal_eval(note[len("(run of sections "):note.index("]") + 1])
    else:
        sections_of = list(sections.DEFAULT_SECTIONS)
    return "scale" not in sections_of and set(sections_of) <= set(ran)


def merge_results(old: Dict[str, Any], new: Dict[str, Any], ran: Sequence[str]) -> Dict[str, Any]:
    """``new`` over ``old``: sections not run now are kept (with their machine/settings under
    ``previous_runs``); scale rows are merged by (backbone, classes, mode, size, batch, amp)."""
    out = {**old, **{k: v for k, v in new.items() if k not in sections.SECTIONS}}
    out["previous_runs"] = old.get("previous_runs", []) + [{k: old.get(k) for k in ("machine", "settings", "wall_time_s")}]
    kept = [n for n in old.get("notes", []) if not _replaced(n, ran)]
    out["notes"] = kept + [f"(run of sections {list(ran)}) {n}" for n in new.get("notes", [])]
    for name in ran:
        if name == "scale":
            rows = {_scale_key(r): r for r in old.get("scale") or []}
            rows.update({_scale_key(r): r for r in new.get("scale") or []})
            out["scale"] = list(rows.values())
        else:
            out[name] = new.get(name)
    return out


RESULTS = REPO / "benchmarks" / "results"  # committed numbers
SCRATCH = REPO / "runs" / "benchmarks"  # trial runs (git-ignored)


def output_dir(args: argparse.Namespace) -> Path:
    """--out, else the committed results folder for a full run and a scratch folder for the presets."""
    if args.out is not None:
        return args.out
    return SCRATCH if args.quick or args.smoke else RESULTS


def output_stem(args: argparse.Namespace, device: torch.device) -> str:
    """speed_cpu / speed_gpu, with _quick or _smoke so a trial never overwrites final numbers."""
    stem = "speed_gpu" if device.type == "cuda" else "speed_cpu"
    return stem + ("_smoke" if args.smoke else "_quick" if args.quick else "")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the chosen sections, write JSON + markdown under --out, print the markdown."""
    args = parse_args(argv)
    device = resolve_device(args.device)
    settings = settings_from(args, device)
    torch.manual_seed(0)
    started = time.perf_counter()
    results: Dict[str, Any] = {"machine": machine_info(device, REPO), "settings": settings.describe(), "notes": []}
    if device.type != "cuda":
        results["notes"].append("GPU parts skipped: no CUDA device (torch.cuda.is_available() is False or --device cpu)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for name in args.sections:
            print(f"[speed] section {name} ...", file=sys.stderr, flush=True)
            with CpuShare() as share:
                results[name] = sections.SECTIONS[name](settings, results["notes"])
            results["machine"].setdefault("cpu_share_by_section", {})[name] = share.share
            if device.type == "cpu" and share.share is not None and share.share < 0.8 and name != "scale":
                results["notes"].append(
                    f"section {name}: this process used only {share.share:.0%} of its {torch.get_num_threads()} threads' "
                    "CPU time: other processes competed for the cores (or the work did not use every thread)")
    results["demo"] = merge_demo_times(args.demo_times)
    results["machine"]["load_average_end"] = load_average()
    results["wall_time_s"] = round(time.perf_counter() - started, 1)
    args.out = output_dir(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = output_stem(args, device)
    if args.merge and (args.out / f"{stem}.json").is_file():
        results = merge_results(json.loads((args.out / f"{stem}.json").read_text()), results, args.sections)
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str))
    markdown = render_markdown(results)
    (args.out / f"{stem}.md").write_text(markdown)
    print(markdown)
    print(f"[speed] wrote {args.out / stem}.json/.md in {results['wall_time_s']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
