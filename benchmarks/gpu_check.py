"""One short GPU check of CAPNET's training and inference speed next to the bare encoder.

Run:  python -m benchmarks.gpu_check                 # one H100: <= 8 minutes (--budget-s 420)
      python -m benchmarks.gpu_check --quick         # seconds on CPU: tiny random CLIPs (CI runs it)

What it measures (a reviewer can check every step):
* The shipped recipes with random full-size towers (no download): ViT-B/16 + AdaptFormer
  (configs/model/clip_vit_b16.yaml) and RN50 + BitFit (clip_rn50.yaml), 80 COCO class names.
* CAPNET vs its bare twin (the same backbone object and PEFT module + a linear head, same loss
  and optimiser: benchmarks/_speed_models.py), so the ratio is CAPNET's text branch + head.
* A training step (zero_grad, autocast forward, float32 loss, backward, optimiser step) and
  inference (eval, no_grad, class embeddings cached) at each batch size, under each variant:
  bf16 autocast eager and bf16 + ``torch.compile`` (compilation happens in the untimed warm-up).
* images/s from the median of interleaved repeats (benchmarks/_timing.py), the paired ratio
  CAPNET / bare, and peak memory (``torch.cuda.max_memory_allocated`` over one call after a reset).
* Every row is written to JSON + markdown as soon as it is measured, and rows that would start
  after ``--budget-s`` are skipped with a note, so a session cut short still leaves results.
  A failing row (out of memory, a compiler error) is recorded with its error, not fatal.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks._speed_models import batch, build_pair, train_step
from benchmarks._timing import machine_info, md_table, measure, paired_ratio, summarize, synchronize
from capnet.runtime.precision import autocast

REPO = Path(__file__).resolve().parents[1]
FULL = {"archs": ("clip_vit_b16.openai", "clip_rn50.openai"), "batches": (64, 256), "variants": ("bf16", "bf16+compile"),
        "repeats": 5, "warmup": 2}
QUICK = {"archs": ("clip_tiny_vit.random", "clip_tiny_rn.random"), "batches": (2,), "variants": ("fp32",),
         "repeats": 2, "warmup": 1}
NUM_CLASSES = 80  # COCO-LT


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny random CLIPs, batch 2, fp32: seconds on a CPU")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--archs", nargs="+", help="backbones (default ViT-B/16 and RN50, each with its recipe's PEFT)")
    p.add_argument("--batches", nargs="+", type=int, help="batch sizes (default 64 256)")
    p.add_argument("--variants", nargs="+", help="fp32 | bf16 | fp16, optionally +compile (default bf16 bf16+compile)")
    p.add_argument("--repeats", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--budget-s", type=float, default=420.0, help="start no new row after this many seconds")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    return p.parse_args(argv)


def _amp(variant: str) -> str:
    parts = set(variant.split("+"))
    unknown = parts - {"fp32", "bf16", "fp16", "compile"}
    if unknown:
        raise SystemExit(f"gpu_check: unknown variant part(s) {sorted(unknown)} in {variant!r}")
    return "bf16" if "bf16" in parts else "fp16" if "fp16" in parts else "none"


def _peak_bytes(fn: Callable[[], Any], device: torch.device) -> Optional[int]:
    """Peak allocated memory of one call (CUDA only; None on CPU)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def _infer(model: torch.nn.Module, images: torch.Tensor, amp: str) -> Callable[[], None]:
    def call() -> None:
        with torch.no_grad(), autocast(images.device, amp):
            model(images)
    return call


def measure_row(pair: Any, size: int, batch_size: int, variant: str, s: Dict[str, Any],
                device: torch.device) -> Dict[str, Any]:
    """Train-step and inference images/s, CAPNET / bare ratios and peak memory for one setting."""
    amp = _amp(variant)
    compiled = "compile" in variant
    capnet = torch.compile(pair.capnet) if compiled else pair.capnet
    bare = torch.compile(pair.bare) if compiled else pair.bare
    images, targets = batch(batch_size, NUM_CLASSES, size, device)
    pair.capnet.train()
    pair.bare.train()
    steps = {"capnet": train_step(capnet, pair.optimizers["capnet"], pair.loss, images, targets, amp),
             "bare": train_step(bare, pair.optimizers["bare"], pair.loss, images, targets, amp)}
    train = measure(steps, s["repeats"], s["warmup"], device)
    train_mem = {k: _peak_bytes(fn, device) for k, fn in steps.items()}
    pair.capnet.eval()
    pair.bare.eval()
    calls = {"capnet": _infer(capnet, images, amp), "bare": _infer(bare, images, amp)}
    infer = measure(calls, s["repeats"], s["warmup"], device)
    infer_mem = {k: _peak_bytes(fn, device) for k, fn in calls.items()}
    rate = {f"{kind}_{k}": batch_size / summarize(t[k])["median_s"]
            for kind, t in (("train", train), ("infer", infer)) for k in ("capnet", "bare")}
    return {"images_per_s": rate,
            "ratio": {"train_step": paired_ratio(train["capnet"], train["bare"]),
                      "inference": paired_ratio(infer["capnet"], infer["bare"])},
            "peak_memory_bytes": {"train": train_mem, "infer": infer_mem},
            "times": {"train": {k: summarize(v) for k, v in train.items()},
                      "infer": {k: summarize(v) for k, v in infer.items()}}}


def _gib(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def render_markdown(results: Dict[str, Any]) -> str:
    m = results["machine"]
    head = [f"# GPU check ({results['mode']})", "",
            f"Device: {m.get('gpu') or m.get('cpu')}; torch {m.get('torch')}; commit {m.get('git_commit')}; "
            f"random-weight towers, {NUM_CLASSES} classes; median of {results['settings']['repeats']} repeats.", ""]
    rows = []
    for r in results["rows"]:
        if "error" in r or "skipped" in r:
            rows.append([r["arch"], r["peft"], r["batch"], r["variant"], r.get("error") or r.get("skipped")] + [""] * 7)
            continue
        ips, ratio, mem = r["images_per_s"], r["ratio"], r["peak_memory_bytes"]
        rows.append([r["arch"], r["peft"], r["batch"], r["variant"], f"{ips['train_capnet']:.1f}", f"{ips['train_bare']:.1f}",
                     f"{ratio['train_step']['median_of_paired']:.2f}", f"{ips['infer_capnet']:.1f}",
                     f"{ips['infer_bare']:.1f}", f"{ratio['inference']['median_of_paired']:.2f}",
                     _gib(mem["train"]["capnet"]), _gib(mem["infer"]["capnet"])])
    table = md_table(["backbone", "PEFT", "batch", "variant", "train img/s CAPNET", "train img/s bare",
                      "train time ratio", "infer img/s CAPNET", "infer img/s bare", "infer time ratio",
                      "peak GiB train", "peak GiB infer"], rows)
    notes = [f"- {n}" for n in results["notes"]]
    return "\n".join(head + [table, ""] + (["Notes:"] + notes if notes else [])) + "\n"


def _write(results: Dict[str, Any], out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str))
    (out / f"{stem}.md").write_text(render_markdown(results))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    preset = dict(QUICK if args.quick else FULL)
    preset.update({k: v for k, v in (("archs", args.archs), ("batches", args.batches), ("variants", args.variants),
                                      ("repeats", args.repeats), ("warmup", args.warmup)) if v})
    stem = f"gpu_check{'_quick' if args.quick else ''}_{device.type}"
    results: Dict[str, Any] = {"mode": "quick" if args.quick else "full", "machine": machine_info(device, REPO),
                               "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in preset.items()},
                               "rows": [], "notes": []}
    if device.type != "cuda":
        results["notes"].append("no CUDA device: peak memory not measured; CPU numbers only prove the script runs")
    torch.manual_seed(0)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for arch in preset["archs"]:
            pair = build_pair(arch, NUM_CLASSES, device, None, None)
            peft, size = pair.cfg.model.peft.method, pair.capnet.backbone.spec.image_size
            for batch_size in preset["batches"]:
                for variant in preset["variants"]:
                    row: Dict[str, Any] = {"arch": arch, "peft": peft, "image_size": size, "batch": batch_size,
                                           "variant": variant}
                    if time.perf_counter() - start > args.budget_s:
                        row["skipped"] = f"over the {args.budget_s:.0f} s budget"
                    else:
                        print(f"[gpu_check] {arch} {peft} batch {batch_size} {variant} ...", file=sys.stderr, flush=True)
                        try:
                            row.update(measure_row(pair, size, batch_size, variant, preset, device))
                        except Exception as err:  # noqa: BLE001 - OOM or a compiler failure: record, go on
                            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
                            results["notes"].append(f"{arch} batch {batch_size} {variant} failed: {row['error']}")
                        row["elapsed_s"] = round(time.perf_counter() - start, 1)
                    results["rows"].append(row)
                    _write(results, args.out, stem)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            del pair
    results["seconds"] = round(time.perf_counter() - start, 1)
    _write(results, args.out, stem)
    print(render_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
