"""Markdown rendering of the speed results (the JSON next to it holds every raw timing)."""
from __future__ import annotations

import json
from typing import Any, Dict, List

from benchmarks._timing import fmt_ms, fmt_ratio, md_table


def _machine(results: Dict[str, Any]) -> str:
    m = results["machine"]
    gpu = f", GPU {m['gpu']} ({m['gpu_memory_gib']} GiB, CUDA {m['cuda']})" if "gpu" in m else ", no GPU"
    share = {k: round(v, 2) for k, v in m.get("cpu_share_by_section", {}).items() if v is not None}
    return (f"Machine: {m['cpu']}, {m['cpu_cores_logical']} logical cores, torch {m['torch']} with "
            f"{m['torch_threads']} threads{gpu}; load average {m['load_average_start']} at start, "
            f"{m.get('load_average_end')} at end; CPU share of our threads by section {share}; commit {m['git_commit']}; wall time {results.get('wall_time_s')} s.")


def _settings(results: Dict[str, Any]) -> str:
    s = results["settings"]
    return (f"Settings: device {s['device']}, amp {s['amp']}, batch {s['batch']}, image size "
            f"{s['image_size'] or 'backbone default'}, median of {s['repeats']} interleaved repeats after "
            f"{s['warmup']} warm-up call(s); ratios are medians of per-round paired ratios.")


def _ok(row: Dict[str, Any]) -> str:
    return "yes" if row.get("meets_target") else "NO"


def _train(rows: List[Dict[str, Any]]) -> str:
    header = ["backbone", "C", "px", "batch", "PEFT", "trainable CAPNET / bare", "CAPNET step", "bare step",
              "ratio (target <= 1.10)", "ratio of mins", "met", "text+GCN fwd+bwd", "image fwd+bwd", "text share of step",
              "eval text uncached", "eval text cached"]
    body = []
    for r in rows:
        if r["measured"]:
            t = {k: v["median_s"] for k, v in r["times"].items()}
            counts = f"{r['trainable']['capnet']:,} / {r['trainable']['bare']:,}"
            peft = r["peft"]
        else:
            t, counts, peft = r["estimate_s"], f"(extrapolated from C={r['extrapolated_from']})", "-"
        body.append([r["arch"], r["classes"], r["image_size"], r["batch"], peft, counts,
                     fmt_ms(t["capnet_step"]), fmt_ms(t["bare_step"]), fmt_ratio(r["step_ratio"]["median_of_paired"]),
                     fmt_ratio(r["step_ratio"].get("of_minimums")), _ok(r), fmt_ms(t["text_branch"]),
                     fmt_ms(t["image_branch"]), f"{r['text_share_of_step']:.1%}",
                     fmt_ms(t["eval_text_uncached"]), fmt_ms(t.get("eval_text_cached"))])
    return "## 1 + 5. Training step: CAPNET vs bare encoder, by number of classes\n\n" + md_table(header, body)


def _inference(rows: List[Dict[str, Any]]) -> str:
    header = ["backbone", "C", "px", "batch", "CAPNET", "bare", "ratio (target <= 1.05)", "ratio of mins", "met",
              "TTE batch", "flip: time/view vs 1", "five_crop", "ten_crop"]
    body = []
    for r in rows:
        pv = r["tte"]["time_per_view_vs_single"]
        body.append([r["arch"], r["classes"], r["image_size"], r["batch"], fmt_ms(r["times"]["capnet"]["median_s"]),
                     fmt_ms(r["times"]["bare"]["median_s"]), fmt_ratio(r["ratio"]["median_of_paired"]),
                     fmt_ratio(r["ratio"]["of_minimums"]), _ok(r),
                     r["tte"]["batch"], fmt_ratio(pv["flip"]), fmt_ratio(pv["five_crop"]), fmt_ratio(pv["ten_crop"])])
    return ("## 2. Inference (eval, class embeddings cached) and test-time ensembling\n\n" + md_table(header, body)
            + "\n\nTTE columns: time of a k-view call divided by k x the single-view call (1.0 = linear).")


def _throughput(rows: List[Dict[str, Any]]) -> str:
    header = ["backbone", "variant", "px", "batch", "inference images/s", "training images/s"]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["arch"], r["variant"], "-", "-", f"failed: {r['error'][:80]}", "-"])
        else:
            body.append([r["arch"], r["variant"], r["image_size"], r["batch"],
                         f"{r['infer_images_per_s']:.2f}", f"{r['train_images_per_s']:.2f}"])
    return "## 3. Throughput of CAPNET (random-init weights)\n\n" + md_table(header, body)


def _offline_legacy(rows: List[Dict[str, Any]]) -> str:
    """Section 4 as results from before the tower grid recorded it (one VGG19 row per image size)."""
    header = ["image size", "images", "model only s/img", "end to end s/img (decode + transform + model)"]
    body = [[r["image_size"], r["images"], f"{r['model_only_s_per_image']:.4f}", f"{r['end_to_end_s_per_image']:.4f}"]
            for r in rows]
    return "## 4. Offline backbone (vgg19_minilm.offline) feature extraction (earlier format)\n\n" + md_table(header, body)


def _offline(rows: List[Dict[str, Any]]) -> str:
    if rows and "tower" not in rows[0]:
        return _offline_legacy(rows)
    header = ["tower", "precision", "allocator", "decode workers", "torch threads", "images",
              "model only ms/img", "demo path ms/img (files, decode, transform, loader, tower)"]
    body = [[r["tower"], "bf16 autocast" if r["precision"] == "bf16" else "fp32", r.get("allocator", "glibc default"),
             r["workers"], r["threads"],
             r["images"], f"{r['model_only_ms_per_image']:.1f}", f"{r['end_to_end_ms_per_image']:.1f}"]
            for r in rows]
    return ("## 4. Offline towers: feature extraction\n\nRows without a mark use the machine's budget "
            "(capnet.runtime.resources.budget) and the allocator every capnet run sets (freed memory kept in the "
            "heap, capnet.runtime.resources.keep_freed_memory; its effect needs fresh processes: "
            "benchmarks/allocator.py); the last rows vary decode workers and torch threads for the demo's tower.\n\n" + md_table(header, body))


def _mib(value: Any) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _scale(rows: List[Dict[str, Any]]) -> str:
    header = ["backbone", "C", "px", "batch", "amp", "text branch", "CAPNET step", "bare step", "ratio (paired)",
              "target", "met", "peak MiB", "peak above bare MiB", "memory met (<= 1024)", "bank refresh", "build"]
    body = []
    for r in sorted(rows, key=lambda r: (r["arch"], r["image_size"] or 0, r["classes"], r["mode"] != "bare", r["mode"])):
        t = {k: v["median_s"] for k, v in r["times"].items()}
        if r["mode"] == "bare":
            mode = "bare encoder"
        elif r.get("text_budget") is None:
            mode = f"exact ({r['mode']})"
        else:
            mode = f"budget {r['text_budget']} ({r['mode']}{', sparse graph' if r.get('sparse_graph') else ''})"
        met = {True: "yes", False: "NO", None: "-"}
        body.append([r["arch"], r["classes"], r["image_size"], r["batch"], r["amp"], mode, fmt_ms(t.get("capnet_step")),
                     fmt_ms(t.get("bare_step")), fmt_ratio(r.get("ratio", {}).get("median_of_paired")),
                     r.get("ratio_target", "-"), met[r.get("meets_ratio")], _mib(r["peak_mib"]),
                     _mib(r.get("peak_above_bare_mib")), met[r.get("meets_memory")],
                     fmt_ms(r.get("bank_refresh_s")), fmt_ms(r.get("build_s"))])
    return ("## 6. Class-count scaling: exact vs budgeted text branch (issue 24)\n\n"
            "One fresh subprocess per row (peak = VmHWM on CPU, max_memory_allocated on GPU); a CAPNET row times "
            "CAPNET and the bare encoder on the same backbone, interleaved, and its ratio is the median of per-round "
            "ratios. The bare row (largest C) is the memory reference. Bank refresh = one no-grad pass of every class "
            "through the text tower (first budgeted step only, not in the step times).\n\n" + md_table(header, body))


def render_markdown(results: Dict[str, Any]) -> str:
    """The human-readable report: machine, settings, one table per section, notes."""
    parts = ["# capnet speed benchmark", _machine(results), _settings(results)]
    if results.get("previous_runs"):
        parts.append("This file merges runs (`--merge`): the machine and settings lines above are the latest run's; "
                     "sections it did not run are kept from earlier runs, whose machine/settings are in the JSON's "
                     "`previous_runs`.")
    renderers = {"train": _train, "inference": _inference, "throughput": _throughput, "offline": _offline, "scale": _scale}
    for name, render in renderers.items():
        if results.get(name):
            parts.append(render(results[name]))
    demo = results.get("demo", {})
    text = f"From {demo['source']}: `{json.dumps(demo['times'])}`" if "times" in demo else demo.get("note", "-")
    parts.append("## Demo timings\n\n" + text)
    if results.get("notes"):
        parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in results["notes"]))
    return "\n\n".join(parts) + "\n"
