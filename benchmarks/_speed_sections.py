"""The measured sections of benchmarks/speed.py; each returns plain JSON-ready data.

train      CAPNET vs bare-encoder training step for every class count, with the text-branch
           (prompts + text tower + GCN) and image-branch forward+backward timed alone, and the
           eval-time text cost uncached (once per evaluation) and cached (per batch).
inference  CAPNET vs bare-encoder inference (eval, cached class embeddings) and TTE views.
throughput images/s for inference and training per variant (amp / channels_last / compile).
offline    ms/img of the offline towers (the demo's EfficientNet-Lite0 and VGG19), model only and on
           the demo's own path, fp32 vs bf16, and the decode-worker / torch-thread grid.
"""
from __future__ import annotations

import dataclasses
import gc
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from benchmarks._speed_models import REPO, batch, branch_steps, build_pair, capnet_step, train_step, trainable_count
from benchmarks._timing import measure, paired_ratio, summarize, unstable
from capnet.runtime.precision import autocast
from capnet.models.tte import tte_logits

TRAIN_TARGET, INFER_TARGET = 1.10, 1.05  # issue 7: CAPNET / bare encoder
TTE_VIEWS = (("flip", 2), ("five_crop", 5), ("ten_crop", 10))


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a run depends on (recorded in the results)."""

    device: torch.device
    amp: str  # autocast of the train / inference / class sections
    variants: Tuple[str, ...]  # throughput variants, e.g. "bf16+cl+compile"
    archs: Tuple[str, ...]
    classes: Tuple[int, ...]  # class counts of the scaling study; the first one is used elsewhere
    batch: int
    image_size: Optional[int]  # None: the backbone's own input size
    repeats: int
    warmup: int
    tte_batch: int  # images per TTE call (each carries up to 10 views)
    full_text_limit: Optional[int]  # build/time CAPNET only up to this many classes (None: all)
    offline_images: int  # images timed end to end per offline tower (0: section skipped)

    def describe(self) -> Dict[str, Any]:
        """JSON-ready copy."""
        out = dataclasses.asdict(self)
        out["device"] = str(self.device)
        return out


def _free() -> None:
    """Drop freed models before building the next one (peak memory, fair timings)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _timed(s: Settings, cases: Dict[str, Callable[[], Any]], notes: List[str], label: str,
           warmup: Optional[int] = None) -> Dict[str, List[float]]:
    """``measure`` with the run's repeats, noting cases whose repeats disagree by > 1.5x."""
    times = measure(cases, s.repeats, s.warmup if warmup is None else warmup, s.device)
    noisy = unstable(times)
    if noisy:
        notes.append(f"unstable timings ({label}): " + ", ".join(noisy))
    return times


def _medians(times: Dict[str, List[float]]) -> Dict[str, Dict[str, Any]]:
    return {name: summarize(ts) for name, ts in times.items()}


def _eval_text_cases(capnet: torch.nn.Module) -> Dict[str, Callable[[], None]]:
    """Eval-time class embeddings: recomputed (once per evaluation) vs served from the cache."""

    def uncached() -> None:
        capnet.eval()  # clears the caches of CAPNET and its PromptLearner
        with torch.no_grad():
            capnet.class_embeddings()

    def cached() -> None:
        with torch.no_grad():
            capnet.class_embeddings()

    return {"eval_text_uncached": uncached, "eval_text_cached": cached}


def _train_row(s: Settings, arch: str, num_classes: int, notes: List[str]) -> Dict[str, Any]:
    """One (arch, C) cell: training-step ratio, branch shares, eval text costs."""
    pair = build_pair(arch, num_classes, s.device, None, s.image_size)
    size = pair.capnet.backbone.spec.image_size
    images, targets = batch(s.batch, num_classes, size, s.device)
    pair.capnet.train()
    pair.bare.train()
    cases = {
        # As the training loop runs it: class embeddings under autocast, then the logits. ``pair.capnet(images)``
        # alone would compute them inside the float32 logits block, i.e. the text tower in float32 (issue 24).
        "capnet_step": capnet_step(pair.capnet, pair.optimizers["capnet"], pair.loss, images, targets, s.amp),
        "bare_step": train_step(pair.bare, pair.optimizers["bare"], pair.loss, images, targets, s.amp),
        **branch_steps(pair.capnet, images, s.amp),
    }
    label = f"train {arch} C={num_classes}"
    times = _timed(s, cases, notes, label)
    times.update(_timed(s, _eval_text_cases(pair.capnet), notes, label, warmup=max(1, s.warmup)))
    stats = _medians(times)
    ratio = paired_ratio(times["capnet_step"], times["bare_step"])
    text, image, step = (stats[k]["median_s"] for k in ("text_branch", "image_branch", "capnet_step"))
    row = {
        "arch": arch, "classes": num_classes, "image_size": size, "batch": s.batch, "amp": s.amp,
        "peft": pair.cfg.model.peft.method, "class_specific_prompts": pair.cfg.model.prompts.class_specific,
        "trainable": {"capnet": trainable_count(pair.capnet), "bare": trainable_count(pair.bare)},
        "times": stats, "step_ratio": ratio, "target": TRAIN_TARGET,
        "meets_target": ratio["median_of_paired"] <= TRAIN_TARGET,
        "text_share_of_step": text / step, "text_vs_image": text / image, "measured": True,
    }
    del pair, cases
    _free()
    return row


def _extrapolated_row(measured: Dict[str, Any], num_classes: int) -> Dict[str, Any]:
    """Linear-in-C estimate of the text branch from a measured row (the text tower runs C sequences)."""
    factor = num_classes / measured["classes"]
    med = {k: v["median_s"] for k, v in measured["times"].items()}
    text, image = med["text_branch"] * factor, med["image_branch"]
    step = med["capnet_step"] - med["text_branch"] + text
    return {
        "arch": measured["arch"], "classes": num_classes, "image_size": measured["image_size"], "batch": measured["batch"],
        "measured": False, "extrapolated_from": measured["classes"],
        "estimate_s": {"text_branch": text, "image_branch": image, "capnet_step": step, "bare_step": med["bare_step"],
                       "eval_text_uncached": med["eval_text_uncached"] * factor},
        "step_ratio": {"median_of_paired": step / med["bare_step"], "of_medians": step / med["bare_step"]},
        "text_share_of_step": text / step, "text_vs_image": text / image, "target": TRAIN_TARGET,
        "meets_target": step / med["bare_step"] <= TRAIN_TARGET,
    }


def run_train(s: Settings, notes: List[str]) -> List[Dict[str, Any]]:
    """Sections 1 and 5: training-step ratio and text-branch share for every arch and class count."""
    rows: List[Dict[str, Any]] = []
    for arch in s.archs:
        last: Optional[Dict[str, Any]] = None
        for num_classes in s.classes:
            if s.full_text_limit is not None and num_classes > s.full_text_limit and last is not None:
                rows.append(_extrapolated_row(last, num_classes))
                notes.append(f"{arch}, {num_classes} classes: NOT measured (quick mode limit {s.full_text_limit}); "
                             f"text-branch time extrapolated linearly from {last['classes']} classes")
                continue
            last = _train_row(s, arch, num_classes, notes)
            rows.append(last)
    return rows


def _tte_cases(capnet: torch.nn.Module, views: torch.Tensor, amp: str) -> Dict[str, Callable[[], None]]:
    """tte_logits on the first k views, k = 1 (single), 2, 5, 10."""
    def case(k: int) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), autocast(views.device, amp):
                tte_logits(capnet, views[:, :k])
        return run

    return {"single": case(1), **{name: case(k) for name, k in TTE_VIEWS}}


def _infer_cases(pair: Any, images: torch.Tensor, amp: str) -> Dict[str, Callable[[], None]]:
    def case(model: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad(), autocast(images.device, amp):
                model(images)
        return run

    return {"capnet": case(pair.capnet), "bare": case(pair.bare)}


def run_inference(s: Settings, notes: List[str]) -> List[Dict[str, Any]]:
    """Section 2: inference ratio (cached class embeddings) and TTE cost per view."""
    rows = []
    for arch in s.archs:
        pair = build_pair(arch, s.classes[0], s.device, None, s.image_size)
        size = pair.capnet.backbone.spec.image_size
        pair.capnet.eval()
        pair.bare.eval()
        images, _ = batch(s.batch, s.classes[0], size, s.device)
        times = _timed(s, _infer_cases(pair, images, s.amp), notes, f"inference {arch}")
        views = batch(s.tte_batch * 10, 1, size, s.device, seed=1)[0].view(s.tte_batch, 10, 3, size, size)
        tte = _timed(s, _tte_cases(pair.capnet, views, s.amp), notes, f"TTE {arch}")
        single = summarize(tte["single"])["median_s"]
        per_view = {name: summarize(tte[name])["median_s"] / (k * single) for name, k in TTE_VIEWS}
        ratio = paired_ratio(times["capnet"], times["bare"])
        rows.append({
            "arch": arch, "classes": s.classes[0], "image_size": size, "batch": s.batch, "amp": s.amp,
            "times": _medians(times), "ratio": ratio, "target": INFER_TARGET,
            "meets_target": ratio["median_of_paired"] <= INFER_TARGET,
            "tte": {"batch": s.tte_batch, "times": _medians(tte), "time_per_view_vs_single": per_view},
        })
        del pair, views
        _free()
    return rows


def _variant_flags(variant: str) -> Tuple[str, bool, bool]:
    """'bf16+cl+compile' -> (amp 'bf16', channels_last True, compile True)."""
    parts = set(variant.split("+"))
    unknown = parts - {"fp32", "bf16", "fp16", "cl", "compile"}
    if unknown:
        raise SystemExit(f"speed: unknown variant part(s) {sorted(unknown)} in {variant!r}")
    amp = "bf16" if "bf16" in parts else "fp16" if "fp16" in parts else "none"
    return amp, "cl" in parts, "compile" in parts


def _variant_row(s: Settings, pair: Any, variant: str, notes: List[str]) -> Dict[str, Any]:
    """images/s for inference and a training step of CAPNET under one variant."""
    amp, channels_last, compiled = _variant_flags(variant)
    size = pair.capnet.backbone.spec.image_size
    images, targets = batch(s.batch, s.classes[0], size, s.device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    pair.capnet.to(memory_format=fmt)
    images = images.contiguous(memory_format=fmt)
    model = torch.compile(pair.capnet) if compiled else pair.capnet
    try:
        pair.capnet.eval()
        label = f"throughput {variant}"
        infer = _timed(s, {"infer": lambda: _no_grad_call(model, images, amp)}, notes, label)
        pair.capnet.train()
        step = train_step(model, pair.optimizers["capnet"], pair.loss, images, targets, amp)
        train = _timed(s, {"train": step}, notes, label)
    finally:
        pair.capnet.to(memory_format=torch.contiguous_format)
    infer_s, train_s = summarize(infer["infer"]), summarize(train["train"])
    return {"variant": variant, "image_size": size, "batch": s.batch,
            "infer_images_per_s": s.batch / infer_s["median_s"], "train_images_per_s": s.batch / train_s["median_s"],
            "times": {"infer": infer_s, "train_step": train_s}}


def _no_grad_call(model: torch.nn.Module, images: torch.Tensor, amp: str) -> None:
    with torch.no_grad(), autocast(images.device, amp):
        model(images)


def run_throughput(s: Settings, notes: List[str]) -> List[Dict[str, Any]]:
    """Section 3: images/s per arch and variant; a failing variant is recorded, not fatal."""
    rows = []
    for arch in s.archs:
        pair = build_pair(arch, s.classes[0], s.device, None, s.image_size)
        for variant in s.variants:
            try:
                row = _variant_row(s, pair, variant, notes)
            except Exception as err:  # noqa: BLE001 -- e.g. torch.compile without a toolchain: record it
                row = {"variant": variant, "error": f"{type(err).__name__}: {str(err)[:300]}"}
                notes.append(f"throughput {arch} {variant} failed: {row['error']}")
            rows.append({"arch": arch, **row})
        del pair
        _free()
    return rows


# The offline towers timed in section 4: name -> (backbone, options). The first is the demo's.
OFFLINE_TOWERS = {
    "efficientnet_lite0@224": ("efficientnet_lite0_minilm.offline", {"image_size": 224, "resize": "whole"}),
    "vgg19@128": ("vgg19_minilm.offline", {"image_size": 128, "resize": "crop"}),
}
BUDGET_GRID = ((0, 2), (1, 1), (1, 2), (2, 1), (2, 2))  # (decode workers, torch threads) on 2 cores


def _offline_row(s: Settings, name: str, paths: list, precision: str, workers: int, threads: int,
                 notes: List[str]) -> Dict[str, Any]:
    """ms/img of one tower: model only (a ready batch) and the demo's path (files -> features),
    with the allocator setting every capnet run makes (src/capnet/runtime/resources.py ``keep_freed_memory``)."""
    from capnet.features.cache import compute_features
    from capnet.runtime.resources import keep_freed_memory
    from capnet.registry import BACKBONES

    backbone_name, options = OFFLINE_TOWERS[name]
    backbone = BACKBONES.build(backbone_name, **options).to(s.device).eval()
    images = batch(min(len(paths), 64), 1, backbone.spec.image_size, s.device)[0]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    allocator = "keep freed" if keep_freed_memory() else "glibc default"
    try:
        def model_only() -> None:
            with torch.inference_mode(), autocast(s.device, precision):
                backbone.encode_image(images)

        def end_to_end() -> None:
            compute_features(backbone, paths, backbone.transform(False), backbone.num_image_stages, batch_size=64,
                             num_workers=workers, device=s.device, progress=False, amp=precision)

        times = _timed(s, {"model_only": model_only, "end_to_end": end_to_end}, notes,
                       f"offline {name} {precision} w{workers}t{threads}", warmup=1)
    finally:
        torch.set_num_threads(before)
    per = {"model_only": len(images), "end_to_end": len(paths)}
    return {"tower": name, "precision": precision, "workers": workers, "threads": threads, "images": len(paths),
            "allocator": allocator,
            **{f"{k}_ms_per_image": 1000 * summarize(v)["median_s"] / per[k] for k, v in times.items()}}


def run_offline(s: Settings, notes: List[str]) -> List[Dict[str, Any]]:
    """Section 4: ms/img of the offline towers on the path the demo runs (files, decode, transform,
    DataLoader, tower, compute_features), fp32 vs bf16 where the CPU has it natively, and the
    decode-worker / torch-thread grid for the demo's tower."""
    from capnet.runtime.resources import budget
    from capnet.runtime.precision import native_bf16

    if s.offline_images < 1:
        notes.append("offline towers not timed in this mode")
        return []
    paths = sorted((REPO / "data" / "voc_real_lt" / "images").glob("*.jpg"))[: s.offline_images]
    plan = budget()
    precisions = ["none"] + (["bf16"] if native_bf16(s.device) else [])
    if len(precisions) == 1:
        notes.append("bf16 not timed: this device has no native bf16")
    rows = []
    for name in OFFLINE_TOWERS:
        for precision in precisions:
            rows.append(_offline_row(s, name, paths, precision, plan.workers, plan.threads, notes))
            _free()
    demo = next(iter(OFFLINE_TOWERS))
    for workers, threads in BUDGET_GRID:
        if (workers, threads) != (plan.workers, plan.threads):
            rows.append({**_offline_row(s, demo, paths, precisions[-1], workers, threads, notes), "grid": True})
            _free()
    return rows


def run_scale(s: Settings, notes: List[str]) -> List[Dict[str, Any]]:
    """Section 6 (issue 24): step time and peak memory vs class count, exact vs budgeted, one subprocess per row."""
    from benchmarks._speed_scale import run_scale as scale

    return scale(s, notes)


SECTIONS: Dict[str, Callable[[Settings, List[str]], Any]] = {
    "train": run_train,
    "inference": run_inference,
    "throughput": run_throughput,
    "offline": run_offline,
    "scale": run_scale,
}
DEFAULT_SECTIONS = ("train", "inference", "throughput", "offline")  # scale: ask for it (--sections scale)
