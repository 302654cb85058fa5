"""capnet side by side with the peers' own code (LIFT, LMPT) on identical work (issue 31).

    python -m benchmarks.peer_speed --peers /path/to/peers   # DIR holding LIFT/ and LMPT/ checkouts
    python -m benchmarks.peer_speed                          # peer column: the reference layout (_peer_models.py)
    python -m benchmarks.peer_speed --quick [--peers DIR]    # tiny random CLIPs, seconds, temp dir unless --out

Every row builds capnet and its peer on the same random full-size weights (``clip_vit_b16.openai`` /
``clip_rn50.openai`` architectures, QuickGELU, ``model.weights=random``), the same batch (32 train /
64 inference, 224 px, 20 VOC classes), the same PEFT modules (capnet's cosine head reads the 512-d
projection, LIFT's the 768-d token: 56,364 vs 61,464 trainable scalars on ViT-B/16), the same loss and
the same SGD on both sides; bf16
autocast where the CPU computes it natively (``capnet.runtime.precision``). Steps of capnet and the
peer alternate in one process (``_timing.measure``), warm-up excluded; medians and per-round paired
ratios (capnet / peer) go to ``peer_speed_cpu.{json,md}`` with the command, CPU, torch, threads and
load average.
"""
from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

if __package__ in (None, ""):  # `python benchmarks/peer_speed.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _peer_models as pm  # noqa: E402
from benchmarks._speed_models import REPO, batch, build_pair, capnet_step, train_step, trainable_count  # noqa: E402
from benchmarks._timing import CpuShare, load_average, machine_info, md_table, measure, paired_ratio, summarize, unstable  # noqa: E402
from capnet.models.backbones.specs import CLIP_ARCHS  # noqa: E402
from capnet.runtime.precision import autocast, native_bf16  # noqa: E402

FULL = {"vit": "clip_vit_b16.openai", "rn50": "clip_rn50.openai", "train_batch": 32, "infer_batch": 64}
QUICK = {"vit": "clip_tiny_vit.random", "rn50": "clip_tiny_rn.random", "train_batch": 2, "infer_batch": 4}
NUM_CLASSES, N_CTX = 20, 16  # VOC names; LMPT's train.sh: 16 class-specific contexts
PROMPT_RECIPE = ["model.prompts.n_ctx=16", "model.prompts.init=null", "model.prompts.class_specific=true",
                 "model.gcn.enabled=false", "model.graph.source=none", "tte.templates=false",
                 "model.learn_logit_scale=false"]  # capnet as CoOp-CSC: what LMPT trains
# row -> (arch key, capnet variant, peer, train or infer)
ROWS: Dict[str, Tuple[str, str, str, str]] = {  # in the order a run measures them (each row saved at once)
    "vit_adaptformer_train": ("vit", "adaptformer", "LIFT", "train"),
    "vit_adaptformer_inference": ("vit", "adaptformer", "LIFT", "infer"),
    "vit_prompt_train": ("vit", "prompts", "LMPT", "train"),
    "vit_recipe_train": ("vit", "recipe", "LIFT", "train"),
    "vit_recipe_inference": ("vit", "recipe", "LIFT", "infer"),
    "rn50_prompt_train": ("rn50", "prompts", "LMPT", "train"),
    "rn50_prompt_inference": ("rn50", "prompts", "LMPT", "infer"),
}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """The command line (module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", type=Path, default=None, help="directory holding LIFT/ and LMPT/ checkouts")
    p.add_argument("--quick", action="store_true", help="tiny random CLIPs, 1 repeat (a smoke test)")
    p.add_argument("--out", type=Path, default=None, help="output dir (default benchmarks/results; --quick: a temp dir)")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds per row (default 3; quick 1)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch threads (the issue's 2 cores)")
    p.add_argument("--amp", choices=("auto", "bf16", "none"), default="auto")
    p.add_argument("--render", type=Path, default=None, help="re-render the .md next to this results JSON, run nothing")
    return p.parse_args(argv)


def _free() -> None:
    """Drop the last row's models before building the next."""
    gc.collect()


def _sgd(params: Sequence[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The peers' optimiser (both use SGD with momentum and weight decay)."""
    return torch.optim.SGD(list(params), lr=1e-3, momentum=0.9, weight_decay=5e-4)


def _peer_step(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], loss_fn: torch.nn.Module,
               images: torch.Tensor, targets: torch.Tensor, amp: str) -> Callable[[], None]:
    """A peer's step as their train loops run it: zero_grad, autocast forward, loss, backward, SGD."""
    return train_step(model, _sgd(params), loss_fn, images, targets, amp)


def _infer(model: Callable[[torch.Tensor], Any], images: torch.Tensor, amp: str) -> Callable[[], None]:
    """An inference call: no grad, autocast."""
    def go() -> None:
        with torch.no_grad(), autocast(images.device, amp):
            model(images)
    return go


def _cached_step(capnet: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: torch.nn.Module,
                 images: torch.Tensor, targets: torch.Tensor, amp: str) -> Callable[[], None]:
    """capnet's step on cached image features (frozen image tower: the feature cache's training step).

    The image features are computed once, outside the timed step, so this row is the cost per step
    from the second epoch on; the first epoch also pays one image-tower forward per image."""
    from capnet.models.heads import StepInputs

    with torch.no_grad(), autocast(images.device, amp):
        feats = capnet.image_features(images).float()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(images.device, amp):
            emb = capnet.step_class_embeddings(StepInputs(targets))
            logits = capnet.logits_from_image_features(feats, emb)
        loss_fn(logits.float(), targets).backward()
        optimizer.step()

    return step


def _peer(name: str, arch: str, variant: str, kind: str, pair: Any, peers: Optional[pm.Peers],
          images: torch.Tensor, targets: torch.Tensor, amp: str) -> Tuple[Callable[[], None], int, str]:
    """(case, trainable scalars, label) of the peer column: their code on capnet's weights, or the reference."""
    cfg = CLIP_ARCHS[arch].model_config()
    bottleneck = getattr(pair.capnet.peft, "bottleneck", None)
    if peers is not None:
        clip_model = pm.openai_clip(peers, cfg, pair.capnet.backbone.state_dict())
        if name == "LIFT":
            model = pm.lift_model(peers, clip_model, NUM_CLASSES, bottleneck)
            params, label = pm.lift_parameters(model), "LIFT PeftModelFromCLIP (AdaptFormer + CosineClassifier)"
        else:
            model = pm.lmpt_model(peers, clip_model, pair.classes.names, N_CTX)
            params, label = list(model.prompt_learner.parameters()), "LMPT CustomCLIP (CoOp-CSC, 16 ctx)"
    else:
        from capnet.models.build import build_backbone

        backbone = build_backbone(arch, "random", {})
        if name == "LIFT":
            model, label = pm.ReferenceViT(backbone.visual, NUM_CLASSES, bottleneck), "reference ViT + adapters + cosine head"
        else:
            model, label = pm.ReferencePrompts(backbone, pair.classes.names, N_CTX), "reference CoOp-CSC prompts, full 77 tokens"
        params = model.trainable()
    if kind == "infer":
        model.eval()
        return _infer(model, images, amp), pm.count(params), label
    return _peer_step(model, params, pair.loss, images, targets, amp), pm.count(params), label


def _capnet(variant: str, kind: str, pair: Any, images: torch.Tensor, targets: torch.Tensor, amp: str
            ) -> Tuple[Dict[str, Callable[[], None]], int]:
    """capnet's case(s) and trainable scalars: the bare twin (AdaptFormer + head) or the CAPNET model."""
    model = pair.bare if variant == "adaptformer" else pair.capnet
    optimizer = _sgd(p for p in model.parameters() if p.requires_grad)  # the peers' optimiser, not the recipe's Adam
    if kind == "infer":
        model.eval()
        return {"capnet": _infer(model, images, amp)}, trainable_count(model)
    model.train()
    if variant == "adaptformer":
        return {"capnet": train_step(model, optimizer, pair.loss, images, targets, amp)}, trainable_count(model)
    cases = {"capnet": capnet_step(model, optimizer, pair.loss, images, targets, amp)}
    if variant == "prompts":
        cases["capnet_feature_cache"] = _cached_step(model, optimizer, pair.loss, images, targets, amp)
    return cases, trainable_count(model)


def run_row(row: str, sizes: Dict[str, Any], peers: Optional[pm.Peers], amp: str, repeats: int, warmup: int,
            device: torch.device) -> Dict[str, Any]:
    """Build capnet and its peer for ``row``, time them interleaved, return the JSON-ready row."""
    key, variant, peer_name, kind = ROWS[row]
    arch = sizes[key]
    extra = PROMPT_RECIPE if variant == "prompts" else []
    pair = build_pair(arch, NUM_CLASSES, device, "none" if variant == "prompts" else None, None, extra)
    size = pair.capnet.backbone.spec.image_size
    images, targets = batch(sizes["infer_batch" if kind == "infer" else "train_batch"], NUM_CLASSES, size, device)
    cases, capnet_params = _capnet(variant, kind, pair, images, targets, amp)
    peer_case, peer_params, label = _peer(peer_name, arch, variant, kind, pair, peers, images, targets, amp)
    cases["peer"] = peer_case
    with CpuShare() as share:
        times = measure(cases, repeats, warmup, device)
    out: Dict[str, Any] = {
        "row": row, "arch": arch, "kind": kind, "capnet": variant, "peer": peer_name if peers else "reference",
        "peer_model": label, "batch": images.shape[0], "image_size": size, "classes": NUM_CLASSES, "amp": amp,
        "trainable": {"capnet": capnet_params, "peer": peer_params},
        "times": {k: summarize(v) for k, v in times.items()},
        "ratio": {k: paired_ratio(v, times["peer"]) for k, v in times.items() if k != "peer"},
        "cpu_share": share.share, "unstable": unstable(times),
    }
    if kind == "infer":
        out["images_per_s"] = {k: images.shape[0] / summarize(v)["median_s"] for k, v in times.items()}
    del pair, cases
    _free()
    return out


def render(results: Dict[str, Any]) -> str:
    """The markdown summary of a run."""
    m = results["machine"]
    lines = [f"# capnet vs the peers' own code ({results['peer_source']})", "",
             f"`{results['command']}`", "",
             f"CPU {m['cpu']} ({m['cpu_cores_logical']} logical cores), torch {m['torch']}, {m['torch_threads']} threads, "
             f"amp {results['amp']}; load average {m['load_average_start']} at start, {results['load_average_end']} at end; "
             f"{results['repeats']} interleaved rounds per row after {results['warmup']} warm-up; git {m['git_commit']}.", ""]
    rows = []
    for r in results["rows"]:
        for case, ratio in r["ratio"].items():
            t = r["times"]
            speed = (f"{r['images_per_s'][case]:.2f} vs {r['images_per_s']['peer']:.2f} img/s" if r["kind"] == "infer"
                     else f"{t[case]['median_s']:.2f} s vs {t['peer']['median_s']:.2f} s")
            rows.append([r["row"] + ("" if case == "capnet" else f" ({case})"), r["peer"], r["batch"], speed,
                         f"**{ratio['median_of_paired']:.2f}x**", f"{ratio['of_minimums']:.2f}x",
                         f"{r['trainable']['capnet']:,} / {r['trainable']['peer']:,}",
                         "-" if r["cpu_share"] is None else f"{r['cpu_share']:.2f}"])
    lines.append(md_table(["row", "peer", "batch", "capnet vs peer (median)", "capnet / peer (paired median)",
                           "of minimums", "trainable capnet / peer", "CPU share"], rows))
    notes = [f"{r['row']}: unstable {', '.join(r['unstable'])}" for r in results["rows"] if r["unstable"]]
    shares = [r["cpu_share"] for r in results["rows"] if r["cpu_share"] is not None]
    if shares and min(shares) < 0.5:
        notes.insert(0, f"the machine was shared: this process got {min(shares):.2f}-{max(shares):.2f} of its "
                        f"{m['torch_threads']} threads' CPU time, so absolute times are inflated about "
                        f"{1 / max(shares):.0f}-{1 / min(shares):.0f}x and ratios are noisy (paired per round, "
                        "capnet and the peer alternating); rerun on a quiet machine before quoting them")
    if notes:
        lines += ["", "Notes: " + "; ".join(notes)]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the rows, write ``peer_speed_cpu[_quick].{json,md}``; 0 on success."""
    args = parse_args(argv)
    if args.render:
        results = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(render(results))
        return 0
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, list(argv if argv is not None else sys.argv[1:]))
    finally:
        torch.set_num_threads(threads)  # an in-process caller (the test) keeps its own setting


def _run(args: argparse.Namespace, argv: List[str]) -> int:
    device = torch.device("cpu")
    amp = ("bf16" if native_bf16(device) else "none") if args.amp == "auto" else args.amp
    sizes = QUICK if args.quick else FULL
    repeats = args.repeats or (1 if args.quick else 3)
    peers = pm.load_peers(args.peers) if args.peers else None
    out = args.out or (Path(tempfile.mkdtemp(prefix="peer_speed_")) if args.quick else REPO / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Any] = {
        # the peers' folder is this machine's path: recorded as PEERS_DIR
        "command": "python -m benchmarks.peer_speed " + " ".join(
            "PEERS_DIR" if args.peers and a == str(args.peers) else shlex.quote(a) for a in argv),
        "machine": machine_info(device, REPO), "amp": amp, "repeats": repeats, "warmup": args.warmup,
        "peer_source": "peers' code from PEERS_DIR" if peers else "reference layout (no --peers)",
        "peer_commits": _commits(args.peers) if peers else None, "rows": [],
    }
    stem = "peer_speed_cpu" + ("_quick" if args.quick else "")
    started = time.time()
    for row in args.rows:
        print(f"peer_speed: {row} ...", flush=True)
        results["rows"].append(run_row(row, sizes, peers, amp, repeats, args.warmup, device))
        results["load_average_end"] = load_average()
        results["wall_s"] = round(time.time() - started, 1)
        (out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str))  # every row as soon as it is measured
        (out / f"{stem}.md").write_text(render(results))
    print(render(results))
    print(f"peer_speed: wrote {out / stem}.json and .md")
    return 0


def _commits(root: Path) -> Dict[str, Optional[str]]:
    """The peers' HEAD commits: ``git rev-parse`` in a clone, else a ``COMMIT`` file (an archive), else None."""
    import subprocess

    found: Dict[str, Optional[str]] = {}
    for name in ("LIFT", "LMPT"):
        where, commit = Path(root) / name, None
        try:
            res = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
            commit = res.stdout.strip() if res.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            pass
        if commit is None and (where / "COMMIT").is_file():
            commit = (where / "COMMIT").read_text().strip() or None
        found[name] = commit
    return found


if __name__ == "__main__":
    raise SystemExit(main())
