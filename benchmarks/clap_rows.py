"""The two CLAP rows of docs/components.md, measured: the authors' recipe against capnet's variant.

    python benchmarks/clap_rows.py      # writes benchmarks/results/clap_rows.json (about 2 min on 2 cores)

Each row is ``capnet train --config configs/capnet.yaml --config configs/experiments/<kind>.yaml
--set train.augment_views=0 --set tte.views=flip`` on the bundled split (data/voc_real_lt, the
offline default, train.seed 0), in a temporary run directory with a fresh feature cache: the eval
view of each training image only (the authors' 20 augmented passes are too slow to extract here),
and the same flip views at test for both rows.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
KINDS = ("clap_authors", "clap")
SET = ("train.augment_views=0", "tte.views=flip")


def main() -> int:
    import os

    import torch

    from benchmarks._timing import machine_info
    from capnet.cli import main as capnet

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CAPNET_CACHE"] = str(Path(tmp) / "cache")
        for kind in KINDS:
            out = Path(tmp) / kind
            argv = ["train", "--config", "configs/capnet.yaml", "--config", f"configs/experiments/{kind}.yaml",
                    *[a for s in SET for a in ("--set", s)], "--out", str(out)]
            if capnet(argv) != 0:
                raise SystemExit(f"capnet {' '.join(argv)} failed")
            metrics = json.loads((out / "metrics.json").read_text())
            rows[kind] = {"command": "capnet " + " ".join(argv[:-1] + [f"runs/{kind}"]),
                          **{k: metrics.get(k) for k in ("mAP", "head", "medium", "tail")},
                          "selection": {k: metrics.get(k) for k in ("probe", "val_mAP")}}
    result = {"rows": rows, "machine": machine_info(torch.device("cpu"), REPO)}
    path = REPO / "benchmarks" / "results" / "clap_rows.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: {m: v[m] for m in ("mAP", "head", "medium", "tail")} for k, v in rows.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
