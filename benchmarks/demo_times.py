"""Wall time of `capnet demo`: first run on an empty feature cache, then a repeated run.

    python benchmarks/demo_times.py            # writes benchmarks/results/demo_times.json

Runs the real console command twice in subprocesses with a fresh $CAPNET_CACHE (MiniLM is
extracted anew too, as on a new machine) and records both wall times and the machine.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list, env: dict) -> float:
    """Run ``cmd`` to completion (failing loudly) and return its wall time in seconds."""
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "CAPNET_CACHE": str(Path(tmp) / "cache"), "TQDM_DISABLE": "1"}
        cmd = [sys.executable, "-m", "capnet", "demo", "--out", str(Path(tmp) / "run")]
        first = timed(cmd, env)
        repeated = timed(cmd, env)
        metrics = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
    out = {"first_run_s": first, "repeated_run_s": repeated,
           "test_mAP": {k: metrics[k] for k in ("mAP", "head", "medium", "tail")},
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                      f"load average at end {os.getloadavg()[0]:.1f}"}
    path = REPO / "benchmarks" / "results" / "demo_times.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
