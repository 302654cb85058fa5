"""Feature cache at NUS-WIDE size: write, SIGKILL mid-way, resume, read with bounded memory.

A fake tower stands in for decoding + the image tower: row i is a hash of i (float16), so the
benchmark measures the cache itself -- in-place writes, filled-state marks, the resume after a
kill, crc verification on open, and reading every row through ``FeatureDataset`` + ``build_loader``
-- and can check every row read back against the value it must have. Each phase runs in its
own subprocess; the read phase reports its peak resident size (``VmHWM``: ``ru_maxrss`` would include
the parent's peak, which Linux keeps across fork + exec).

    python -m benchmarks.feature_cache_scale                       # 270,000 x 512 fp16 (264 MiB)
    python -m benchmarks.feature_cache_scale --rows 20000 --dim 64 --out /tmp/x   # what the test runs

Results: ``benchmarks/results/feature_cache_scale.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
KEY = "feature-cache-scale-benchmark"


def fake_rows(rows: np.ndarray, dim: int) -> np.ndarray:
    """The stand-in tower: float16 values in [-0.5, 0.5) hashed from each row number."""
    h = (rows.astype(np.uint64)[:, None] * np.uint64(2654435761) + np.arange(dim, dtype=np.uint64) * np.uint64(40503))
    h ^= h >> np.uint64(13)
    return ((h % np.uint64(65521)).astype(np.float32) / 65521.0 - 0.5).astype(np.float16)


def _ids(n: int) -> List[str]:
    return [f"nus-wide/images/{i:06d}.jpg" for i in range(n)]


def _peak_rss_mib() -> float:
    from benchmarks._timing import rss_mib

    return rss_mib(peak=True)


def torch_import_rss_mib() -> float:
    """Peak resident set of a fresh interpreter that only imports torch: the floor of any reader."""
    code = "import torch; from benchmarks._timing import rss_mib; print(rss_mib(peak=True))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return round(float(out), 1)


def _open(args: argparse.Namespace, prepare: bool = True):
    from capnet.features.cache import FeatureCache

    cache = FeatureCache(args.workdir, flush_every_s=args.flush_every_s)
    return cache, cache.open(KEY, _ids(args.rows), prepare=prepare)


def phase_fill(args: argparse.Namespace) -> Dict[str, Any]:
    """Fill the missing rows (printing progress after each batch); what was computed."""
    from capnet.features.cache import fill_missing

    tic = time.perf_counter()
    cache, entry = _open(args)
    opened = time.perf_counter() - tic
    before = int(entry.filled.sum())
    computed = 0

    def produce(rows: np.ndarray) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        nonlocal computed
        for i in range(0, len(rows), args.batch):
            batch = rows[i:i + args.batch]
            time.sleep(args.tower_ms / 1000.0)
            yield batch, fake_rows(batch, args.dim)
            computed += len(batch)
            print(f"written {before + computed}", flush=True)

    tic = time.perf_counter()
    entry = fill_missing(cache, entry, produce)
    return {"filled_before": before, "computed": computed, "open_and_verify_s": round(opened, 3),
            "fill_s": round(time.perf_counter() - tic, 3), "complete": bool(entry.filled.all())}


def phase_read(args: argparse.Namespace) -> Dict[str, Any]:
    """Every row through FeatureDataset + build_loader (in order, then shuffled), checked; peak RSS."""
    import torch

    from capnet.features.loaders import FeatureDataset, build_loader

    baseline = _peak_rss_mib()
    tic = time.perf_counter()
    _, entry = _open(args, prepare=True)
    rows = entry.rows()
    entry.close()
    opened = time.perf_counter() - tic
    # multi-hot labels (5% positive), written so their pages are resident as real labels would be
    targets = (np.random.default_rng(0).random((args.rows, args.classes), dtype=np.float32) < 0.05).astype(np.float32)
    out: Dict[str, Any] = {"baseline_rss_mib": round(baseline, 1), "open_and_verify_s": round(opened, 3),
                           "labels_mib": round(targets.nbytes / 2**20, 1)}
    for name, train in (("sequential", False), ("shuffled", True)):
        loader = build_loader(FeatureDataset(rows, targets, depth=1), args.read_batch, train, 0, 0,
                              torch.device("cpu"))
        seen, wrong, tic = 0, 0, time.perf_counter()
        for x, _, idx in loader:
            wrong += int((x.numpy() != fake_rows(idx.numpy(), args.dim).astype(np.float32)).any(axis=1).sum())
            seen += len(idx)
        out[name] = {"rows": seen, "rows_wrong": wrong, "seconds": round(time.perf_counter() - tic, 2)}
    out["peak_rss_mib"] = round(_peak_rss_mib(), 1)
    return out


def _child(args: argparse.Namespace, phase: str, extra: Optional[List[str]] = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "benchmarks.feature_cache_scale", "--phase", phase, "--rows", str(args.rows),
           "--dim", str(args.dim), "--batch", str(args.batch), "--tower-ms", str(args.tower_ms),
           "--flush-every-s", str(args.flush_every_s), "--workdir", str(args.workdir),
           "--read-batch", str(args.read_batch), "--classes", str(args.classes)] + (extra or [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> Dict[str, Any]:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark phase failed (exit {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Write until ``kill_fraction`` of the rows are reported, SIGKILL, resume, read."""
    from capnet.features.store import RowFile

    array_mib = args.rows * args.dim * 2 / 2**20
    tic = time.perf_counter()
    proc = _child(args, "fill")
    reported = 0
    for line in proc.stdout:  # type: ignore[union-attr]
        if line.startswith("written "):
            reported = int(line.split()[1])
            if reported >= args.kill_fraction * args.rows:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait()
    killed_s = time.perf_counter() - tic
    from capnet.features.cache import FeatureCache

    stem = FeatureCache(args.workdir).stem(KEY, _ids(args.rows))
    marked = int(RowFile.open(stem, KEY, _ids(args.rows), verify=False).filled.sum())
    resumed = _result(_child(args, "fill"))
    read = _result(_child(args, "read"))
    return {
        "rows": args.rows, "dim": args.dim, "dtype": "float16", "array_mib": round(array_mib, 1),
        "array_file_bytes": os.path.getsize(stem.with_name(stem.name + ".npy")),
        "interrupted": {"signal": "SIGKILL", "exit_code": proc.returncode, "rows_reported_written": reported,
                        "rows_marked_filled": marked, "seconds_until_kill": round(killed_s, 2)},
        "resume": resumed,
        "resume_computed_only_missing": resumed["filled_before"] == marked and resumed["computed"] == args.rows - marked,
        "read": read,
        "read_peak_over_array": round(read["peak_rss_mib"] / array_mib, 3),
        "read_growth_over_array": round((read["peak_rss_mib"] - read["baseline_rss_mib"]) / array_mib, 3),
        "read_growth_without_labels_over_array": round((read["peak_rss_mib"] - read["baseline_rss_mib"] - read["labels_mib"])
                                                       / array_mib, 3),
        "torch_import_rss_mib": torch_import_rss_mib(),
        "settings": {"batch": args.batch, "tower_ms_per_batch": args.tower_ms, "flush_every_s": args.flush_every_s,
                     "read_batch": args.read_batch, "classes": args.classes, "kill_fraction": args.kill_fraction},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "processor": platform.processor()},
        "command": "python -m benchmarks.feature_cache_scale " + " ".join(args.argv),
    }


def _markdown(r: Dict[str, Any]) -> str:
    i, res, rd = r["interrupted"], r["resume"], r["read"]
    return "\n".join([
        "# Feature cache at scale (benchmarks/feature_cache_scale.py)", "",
        f"`{r['command']}` on {r['machine']['platform']}, {r['machine']['cpus']} CPUs (shared).", "",
        f"A {r['rows']:,} x {r['dim']} float16 array ({r['array_mib']} MiB; file {r['array_file_bytes']:,} bytes) "
        "filled by a fake tower (row i = a hash of i, no decoding).", "",
        "| step | result |", "| --- | --- |",
        f"| write, SIGKILL after {i['rows_reported_written']:,} rows reported | {i['rows_marked_filled']:,} rows marked "
        f"filled on disk ({i['seconds_until_kill']} s) |",
        f"| resume | {res['filled_before']:,} rows found filled, {res['computed']:,} computed "
        f"(= rows - filled: {r['resume_computed_only_missing']}); open + crc check {res['open_and_verify_s']} s, "
        f"fill {res['fill_s']} s |",
        f"| read, in order | {rd['sequential']['rows']:,} rows, {rd['sequential']['rows_wrong']} wrong, "
        f"{rd['sequential']['seconds']} s |",
        f"| read, shuffled | {rd['shuffled']['rows']:,} rows, {rd['shuffled']['rows_wrong']} wrong, "
        f"{rd['shuffled']['seconds']} s |",
        f"| reader peak RSS | {rd['peak_rss_mib']} MiB = {r['read_peak_over_array']} x the array "
        f"(process after imports: {rd['baseline_rss_mib']} MiB) |",
        f"| reader growth over its imports | {round(rd['peak_rss_mib'] - rd['baseline_rss_mib'], 1)} MiB = "
        f"{r['read_growth_over_array']} x the array (of which {rd['labels_mib']} MiB are the float32 labels, "
        f"{r['settings']['classes']} classes, made by this benchmark after the baseline) |",
        f"| reader growth without the labels | {r['read_growth_without_labels_over_array']} x the array |", "",
        f"A fresh `python -c \"import torch\"` peaks at {r['torch_import_rss_mib']} MiB here, so the reader's "
        "absolute peak is dominated by the interpreter; the growth lines are what reading the cache adds.", ""])


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=270_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=1024, help="rows per fake-tower batch")
    p.add_argument("--tower-ms", type=float, default=20.0, help="sleep per fake-tower batch")
    p.add_argument("--flush-every-s", type=float, default=1.0)
    p.add_argument("--kill-fraction", type=float, default=0.5)
    p.add_argument("--read-batch", type=int, default=256)
    p.add_argument("--classes", type=int, default=81, help="target columns in the reader (NUS-WIDE: 81)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--name", default="feature_cache_scale")
    p.add_argument("--phase", choices=["fill", "read"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = argv
    if args.phase is not None:
        print(json.dumps(phase_fill(args) if args.phase == "fill" else phase_read(args)), flush=True)
        return 0
    with tempfile.TemporaryDirectory(prefix="capnet-cache-scale-") as tmp:
        args.workdir = args.workdir or Path(tmp)
        result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
