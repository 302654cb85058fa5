"""Wall time of `capnet demo` as a newcomer meets it: an empty cache, then repeated runs.

    python benchmarks/demo_times.py [--repeats 3]     # writes benchmarks/results/demo_times.json

Runs the real command (``python -m capnet demo``, the console script's entry point) in fresh
processes with a fresh ``$CAPNET_CACHE`` (MiniLM is extracted anew too, as on a new machine):
once on the empty cache, then ``--repeats`` times on the filled one. Records every wall time,
the median repeated run, the test mAP and the machine (CPU model, cores, load, torch, commit).
The installation itself is not timed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def timed(cmd: list, env: dict) -> float:
    """Run ``cmd`` to completion (failing loudly) and return its wall time in seconds."""
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="repeated runs on the filled cache")
    args = p.parse_args(argv)
    import torch

    from benchmarks._timing import load_average, machine_info

    info = machine_info(torch.device("cpu"), REPO)
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "CAPNET_CACHE": str(Path(tmp) / "cache"), "TQDM_DISABLE": "1"}
        cmd = [sys.executable, "-m", "capnet", "demo", "--out", str(Path(tmp) / "run")]
        first = timed(cmd, env)
        repeated = [timed(cmd, env) for _ in range(args.repeats)]
        metrics = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
        report = (Path(tmp) / "run" / "report.md").read_text()
    info["load_average_end"] = load_average()
    out = {"first_run_s": first, "repeated_run_s": statistics.median(repeated), "repeated_runs_s": repeated,
           "test_mAP": {k: metrics[k] for k in ("mAP", "head", "medium", "tail")},
           "machine": f"{info['cpu']}, {info['cpu_cores_logical']} cores, load average at end {(info['load_average_end'] or ['?'])[0]}",
           "machine_info": info, "breakdown_of_last_run": report[report.find("## Where the time went"):].strip()}
    path = REPO / "benchmarks" / "results" / "demo_times.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if k != "breakdown_of_last_run"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
