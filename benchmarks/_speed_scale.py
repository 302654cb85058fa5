"""Section ``scale`` of the speed benchmark (issue 24): training step and peak memory vs class count.

Rows: for each backbone, the bare encoder (visual tower + the recipe's PEFT + linear head) and
CAPNET at each class count, in the mode ``model.text_budget`` picks by default (``auto``: exact
up to ``model.text_budget.exact_up_to`` classes, budgeted above) and, up to ``--text-limit`` classes,
forced exact as well. Class names: the shipped VOC/COCO lists, ImageNet's for 1,000, otherwise
synthetic "class i" (``_speed_models.class_set``). Weights are random (speed depends on shapes).

Every row runs in a fresh subprocess (``python -m benchmarks._speed_scale '<row json>'``) so its
peak memory is its own: ``VmHWM`` on CPU (``_timing.rss_mib``; ``ru_maxrss`` would include the parent's) (tracemalloc does not
see torch's allocations), ``torch.cuda.max_memory_allocated`` on GPU. A CAPNET row times the
CAPNET step and the bare step built on the same backbone, interleaved (paired ratios); its
peak is CAPNET's (the bare twin adds only a linear head). The bare row's peak is the reference.
The first budgeted step fills the text bank (all classes, no grad, in chunks): it is timed
alone (``bank_refresh_s``) and excluded from the step times by the warm-up calls.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks._timing import measure, paired_ratio, rss_mib, summarize

REPO = Path(__file__).resolve().parents[1]
# issue 24 targets: CAPNET step / bare step per (backbone, classes), and the peak-memory margin
RATIO_TARGETS = {("clip_rn50.openai", 1000): 1.5, ("clip_rn50.openai", 10000): 2.0, ("clip_vit_b16.openai", 10000): 1.3}
MEMORY_MARGIN_MIB, MEMORY_AT = 1024, 10000


def _peak_mib(device: torch.device) -> float:
    """This process's peak memory so far, MiB (GPU: allocated tensors; CPU: resident set)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return rss_mib(peak=True)


def _bare_row(spec: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    """The bare encoder alone: step time and peak memory (no text tower is ever built)."""
    from benchmarks._speed_models import (
        BareEncoder,
        _optimizer,
        batch,
        class_set,
        model_config,
        train_step,
    )
    from capnet.losses import build_loss
    from capnet.models.peft import apply_peft
    from capnet.registry import BACKBONES

    cfg = model_config(spec["arch"], None, spec["image_size"])
    m = cfg.model
    backbone = BACKBONES.build(m.backbone, weights=m.weights, **m.backbone_options).to(device)
    backbone.requires_grad_(False)
    peft = apply_peft(m.peft.method, backbone.visual, **m.peft.options)
    trainable = {id(p) for p in peft.trainable_parameters()} if peft is not None else set()
    for p in backbone.parameters():
        p.requires_grad_(id(p) in trainable)
    classes = class_set(spec["classes"])
    bare = BareEncoder(backbone, peft, spec["classes"]).train()
    loss = build_loss(cfg.loss.name, cfg.loss.options, classes.class_freq, classes.train_num).to(device)
    images, targets = batch(spec["batch"], spec["classes"], backbone.spec.image_size, device)
    times = measure({"bare_step": train_step(bare, _optimizer(bare, cfg), loss, images, targets, spec["amp"])},
                    spec["repeats"], spec["warmup"], device)
    return {"times": {k: summarize(v) for k, v in times.items()}, "image_size": backbone.spec.image_size}


def _graph_facts(capnet: Any) -> Dict[str, Any]:
    """Edges of the label graph and, budgeted, how many classes the GCN reads for one random subset."""
    from capnet.models.gcn import receptive_field

    if capnet.gcn is None:
        return {}
    adj = capnet.adjacency
    out: Dict[str, Any] = {"nonzeros": int(adj._nnz() if adj.is_sparse else (adj != 0).sum())}
    if getattr(capnet, "text_budget", None) is not None:
        rows = torch.randperm(capnet.num_classes, generator=torch.Generator().manual_seed(0))[: getattr(capnet, "text_budget", None)]
        out["gcn_inputs_for_budget"] = len(receptive_field(adj, rows, len(capnet.gcn.layers))[0])
    return out


# The CLIP paper recipes keep every neighbour (LT-GCN, <= 81 classes: docs/recipes.md); at 10,000
# classes that graph has C^2 edges, so the scale rows keep the sparse top-5 graph they measured.
SCALE_GRAPH = ["model.graph.topk=5", "model.graph.norm=symmetric"]


def _capnet_row(spec: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    """CAPNET (auto or forced-exact text branch) and its bare twin, interleaved."""
    from benchmarks._speed_models import batch, build_pair, capnet_step, train_step
    from capnet.runtime.precision import autocast

    extra = [f"model.text_budget={spec['classes']}"] if spec["mode"] == "exact" else []
    extra += SCALE_GRAPH
    tic = time.perf_counter()
    pair = build_pair(spec["arch"], spec["classes"], device, None, spec["image_size"], extra)
    build_s = time.perf_counter() - tic
    capnet = pair.capnet.train()
    pair.bare.train()
    images, targets = batch(spec["batch"], spec["classes"], capnet.backbone.spec.image_size, device)
    refresh_s = None
    if getattr(capnet, "text_budget", None) is not None:
        tic = time.perf_counter()
        with autocast(device, spec["amp"]):
            capnet.refresh_text_bank()
        refresh_s = time.perf_counter() - tic
    graph = _graph_facts(capnet)
    cases = {"capnet_step": capnet_step(capnet, pair.optimizers["capnet"], pair.loss, images, targets, spec["amp"]),
             "bare_step": train_step(pair.bare, pair.optimizers["bare"], pair.loss, images, targets, spec["amp"])}
    times = measure(cases, spec["repeats"], spec["warmup"], device)
    return {"times": {k: summarize(v) for k, v in times.items()}, "ratio": paired_ratio(times["capnet_step"], times["bare_step"]),
            "text_budget": getattr(capnet, "text_budget", None), "sparse_graph": bool(capnet.adjacency is not None and capnet.adjacency.is_sparse),
            "build_s": build_s, "bank_refresh_s": refresh_s, "graph": graph, "image_size": capnet.backbone.spec.image_size}


def run_row(spec: Dict[str, Any]) -> Dict[str, Any]:
    """One row in this process (the subprocess entry point)."""
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = _bare_row(spec, device) if spec["mode"] == "bare" else _capnet_row(spec, device)
    return {**spec, **out, "peak_mib": _peak_mib(device)}


def _in_subprocess(spec: Dict[str, Any], notes: List[str]) -> Optional[Dict[str, Any]]:
    """``run_row`` in a fresh interpreter; a failure is noted and gives None."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    print(f"[speed] scale row {spec['arch']} C={spec['classes']} {spec['mode']} ...", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, "-m", "benchmarks._speed_scale", json.dumps(spec)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        notes.append(f"scale row {spec} failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _judge(row: Dict[str, Any], bare_peak: Optional[float]) -> Dict[str, Any]:
    """Attach the issue's targets (ratio; memory margin at 10,000 classes) and whether they are met."""
    target = RATIO_TARGETS.get((row["arch"], row["classes"]))
    if target is not None and row["mode"] == "auto":
        row["ratio_target"], row["meets_ratio"] = target, row["ratio"]["median_of_paired"] <= target
    if bare_peak is not None:
        row["peak_above_bare_mib"] = row["peak_mib"] - bare_peak
        if row["classes"] == MEMORY_AT and row["mode"] == "auto":
            row["meets_memory"] = row["peak_above_bare_mib"] <= MEMORY_MARGIN_MIB
    return row


def run_scale(s: Any, notes: List[str]) -> List[Dict[str, Any]]:
    """For each backbone: the bare row, then CAPNET at each class count (auto; exact up to ``full_text_limit``)."""
    from capnet.config import ModelConfig

    base = {"device": str(s.device), "image_size": s.image_size, "batch": s.batch, "amp": s.amp,
            "repeats": s.repeats, "warmup": max(1, s.warmup)}
    exact_up_to = ModelConfig().text_budget.exact_up_to
    rows: List[Dict[str, Any]] = []
    for arch in s.archs:
        bare = _in_subprocess({**base, "arch": arch, "classes": max(s.classes), "mode": "bare"}, notes)
        bare_peak = bare["peak_mib"] if bare else None
        rows += [bare] if bare else []
        for classes in s.classes:
            modes = ["auto"] + (["exact"] if classes > exact_up_to and s.full_text_limit and classes <= s.full_text_limit else [])
            for mode in modes:
                row = _in_subprocess({**base, "arch": arch, "classes": classes, "mode": mode}, notes)
                if row is not None:
                    rows.append(_judge(row, bare_peak))
    return rows


if __name__ == "__main__":
    print(json.dumps(run_row(json.loads(sys.argv[1])), default=str))
