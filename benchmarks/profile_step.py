"""Where a ViT-B/16 + AdaptFormer training step spends its CPU time: capnet vs LIFT (torch.profiler).

    python -m benchmarks.profile_step --peers DIR            # capnet (as built) vs LIFT's own code
    python -m benchmarks.profile_step --peers DIR --torch-mha  # capnet with torch's own MHA (the "before")

One warm-up step each, then one profiled step each (same batch, weights, loss, SGD, bf16 autocast
where native), top operators by self CPU time side by side; ``--out`` writes the table as markdown.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _peer_models as pm  # noqa: E402
from benchmarks.peer_speed import FULL, NUM_CLASSES, QUICK, _peer  # noqa: E402
from benchmarks._speed_models import batch, build_pair, train_step  # noqa: E402
from capnet.models.backbones.attention import ContiguousMultiheadAttention  # noqa: E402
from capnet.runtime.precision import native_bf16  # noqa: E402


def torch_mha(model: nn.Module) -> int:
    """Undo capnet's attention re-classing (models/backbones/attention.py): torch's MHA again."""
    n = 0
    for m in model.modules():
        if type(m) is ContiguousMultiheadAttention:
            m.__class__ = nn.MultiheadAttention
            n += 1
    return n


def profile(step: Callable[[], None]) -> Dict[str, Dict[str, float]]:
    """Self CPU seconds and calls per operator of one call of ``step`` (after one warm-up call)."""
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return {e.key: {"self_s": e.self_cpu_time_total / 1e6, "total_s": e.cpu_time_total / 1e6, "calls": e.count}
            for e in prof.key_averages()}


def table(stats: Dict[str, Dict[str, Dict[str, float]]], top: int) -> str:
    """Markdown: the ``top`` operators by self CPU time of any column, seconds (calls)."""
    names = list(stats)
    keys = sorted({k for s in stats.values() for k in s}, key=lambda k: -max(s.get(k, {}).get("self_s", 0) for s in stats.values()))
    lines = ["| operator | " + " | ".join(f"{n} self s (calls)" for n in names) + " |", "|---|" + "---|" * len(names)]
    for k in keys[:top]:
        cells = [f"{s[k]['self_s']:.2f} ({s[k]['calls']})" if k in s else "-" for s in stats.values()]
        lines.append(f"| `{k}` | " + " | ".join(cells) + " |")
    totals = [f"{sum(v['self_s'] for v in s.values()):.2f}" for s in stats.values()]
    lines.append("| **all operators** | " + " | ".join(totals) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", type=Path, default=None, help="LIFT/ + LMPT/ checkouts (default: the reference layout)")
    p.add_argument("--torch-mha", action="store_true", help="profile capnet with torch's own attention module")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    amp = "bf16" if native_bf16(device) else "none"
    sizes = QUICK if args.quick else FULL
    peers = pm.load_peers(args.peers) if args.peers else None
    pair = build_pair(sizes["vit"], NUM_CLASSES, device, None, None)
    if args.torch_mha:
        torch_mha(pair.capnet)
    images, targets = batch(sizes["train_batch"], NUM_CLASSES, pair.capnet.backbone.spec.image_size, device)
    pair.bare.train()
    capnet = train_step(pair.bare, pair.optimizers["bare"], pair.loss, images, targets, amp)
    peer, _, label = _peer("LIFT", sizes["vit"], "adaptformer", "train", pair, peers, images, targets, amp)
    name = "capnet (torch MHA)" if args.torch_mha else "capnet"
    stats = {name: profile(capnet), ("LIFT" if peers else "reference"): profile(peer)}
    text = (f"{sizes['vit']} + AdaptFormer train step, batch {images.shape[0]}, amp {amp}, {args.threads} threads; "
            f"peer: {label}\n\n" + table(stats, args.top) + "\n")
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
