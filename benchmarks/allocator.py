"""glibc's default allocator vs freed memory kept in the heap, for the demo's image tower.

    python benchmarks/allocator.py [--batch 64] [--images 384] [--rounds 3]

The setting (capnet.runtime.resources.keep_freed_memory) only acts on memory freed after it is
made, so each candidate runs in its own fresh process; candidates alternate round by round and
the median is reported with the page faults per image (the cost the setting removes). Weights
are the real EfficientNet-Lite0 (``offline`` extra), bf16 autocast where the CPU has it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
from capnet.runtime.resources import keep_freed_memory
from capnet.runtime.precision import native_bf16
keep = sys.argv[1] == "1"
applied = keep_freed_memory() if keep else False
from capnet.models.backbones.efficientnet_lite import build_efficientnet_lite_visual
batch, images = int(sys.argv[2]), int(sys.argv[3])
tower, _ = build_efficientnet_lite_visual("lite0")
x = torch.randn(batch, 3, 224, 224)
dtype = torch.bfloat16 if native_bf16(torch.device("cpu")) else torch.float32
with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype == torch.bfloat16):
    tower(x)
    faults, tic, done = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter(), 0
    while done < images:
        tower(x)
        done += batch
    seconds = time.perf_counter() - tic
print(json.dumps({"applied": applied, "ms_per_image": 1000 * seconds / done, "precision": str(dtype),
                  "faults_per_image": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / done}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--images", type=int, default=384)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    runs = {"glibc default": [], "keep freed": []}
    for _ in range(args.rounds):
        for name, flag in (("glibc default", "0"), ("keep freed", "1")):
            out = subprocess.run([sys.executable, "-c", CHILD, flag, str(args.batch), str(args.images)],
                                 check=True, capture_output=True, text=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    print(f"EfficientNet-Lite0 @224, batch {args.batch}, {args.images} images x {args.rounds} rounds, "
          f"{runs['keep freed'][0]['precision']}")
    print("| allocator | ms/img (median) | page faults / img |\n| --- | --- | --- |")
    for name, rows in runs.items():
        print(f"| {name} | {statistics.median(r['ms_per_image'] for r in rows):.1f} | "
              f"{statistics.median(r['faults_per_image'] for r in rows):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
