"""DDP feature extraction on CPU (gloo, 2 processes): each rank extracts its shard of the missing
images, every rank then reads the same full array, equal to one process; preflight decodes each
image once across the ranks; a part file left by an interrupted DDP fill is merged on reopen."""
from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torchvision import transforms as T

from capnet.data import MultiLabelDataset, Split
from capnet.features.cache import (
    FeatureCache,
    cache_key,
    compute_features,
    feature_key_parts,
)
from capnet.fileio import file_fingerprints
from capnet.models.backbones.base import BackboneSpec
from capnet.runtime import distributed

BUNDLED = Path(__file__).resolve().parents[1] / "data" / "voc_real_lt" / "images"
N_IMAGES = 7  # odd: the two shards differ in size


class CountingBackbone(nn.Module):
    """A fixed two-conv tower; counts the images it sees."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.spec = BackboneSpec(name="stub.ddp", weights_sha256="c" * 64)
        self.visual = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Conv2d(4, 4, 3, stride=2))
        self.images = 0

    def image_prefix(self, images: torch.Tensor, depth: int) -> torch.Tensor:
        self.images += len(images)
        return self.visual[:depth](images)


def transform():
    return T.Compose([T.Resize(16), T.CenterCrop(16), T.ToTensor()])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    import capnet.data.check as check
    from capnet.features.cache import feature_rows
    from capnet.data.check import preflight_images

    decoded = []
    real = check.image_problem
    check.image_problem = lambda p: decoded.append(str(p)) or real(p)
    distributed.init_distributed("cpu", timeout_s=120)
    try:
        root = Path(root)
        images = sorted((root / "img").glob("*.jpg"))
        labels = np.eye(N_IMAGES + 1, 2, dtype=np.float32)
        ds = MultiLabelDataset("toy", root, ["a", "b"], {"train": Split([p.stem for p in images], images, labels)})
        ds, problems = preflight_images(ds, skip_bad_images=True, cache_dir=root / "cache")
        model = CountingBackbone()
        cache = FeatureCache(root / "cache")
        paths = ds.splits["train"].image_paths
        cold = feature_rows(model, paths, transform(), 2, batch_size=2, cache=cache, progress=False)
        computed = model.images
        warm = feature_rows(model, paths, transform(), 2, batch_size=2, cache=cache, progress=False)
        out = {"decoded": decoded, "problems": [str(p) for p, _ in problems], "computed": computed,
               "computed_warm": model.images - computed, "rows": len(cold)}
        (root / f"rank{rank}.json").write_text(json.dumps(out))
        torch.save({"cold": cold[:], "warm": warm[:]}, root / f"rank{rank}.pt")
    finally:
        distributed.cleanup()


@pytest.fixture
def tree(tmp_path):
    for p in sorted(BUNDLED.glob("*.jpg"))[:N_IMAGES]:
        (tmp_path / "img").mkdir(exist_ok=True)
        shutil.copy2(p, tmp_path / "img" / p.name)
    (tmp_path / "img" / "zz_bad.jpg").write_bytes(b"not a jpeg")
    return tmp_path


@pytest.mark.slow  # two spawned DDP processes
def test_two_ranks_shard_extraction_and_preflight(tree):
    mp.spawn(_worker, args=(_free_port(), str(tree)), nprocs=2, join=True)
    r = [json.loads((tree / f"rank{k}.json").read_text()) for k in range(2)]
    f = [torch.load(tree / f"rank{k}.pt", weights_only=True) for k in range(2)]
    images = sorted(str(p) for p in (tree / "img").glob("*.jpg"))
    # preflight: every image decoded exactly once across the ranks; both ranks know the bad one
    decoded = r[0]["decoded"] + r[1]["decoded"]
    assert sorted(decoded) == images and r[0]["decoded"] and r[1]["decoded"]
    assert r[0]["problems"] == r[1]["problems"] == [str(tree / "img" / "zz_bad.jpg")]
    # extraction: rows i % 2 == rank, so 4 + 3 images; nothing recomputed when warm
    assert (r[0]["computed"], r[1]["computed"]) == (4, 3)
    assert r[0]["computed_warm"] == r[1]["computed_warm"] == 0
    good = sorted((tree / "img").glob("2*.jpg"))
    single = compute_features(CountingBackbone(), good, transform(), 2, batch_size=2, progress=False)
    for k in range(2):
        assert torch.equal(f[k]["cold"], single) and torch.equal(f[k]["warm"], single)
    assert not list((tree / "cache").rglob("*.part-*"))  # merged by rank 0 and removed


def test_part_files_left_by_an_interrupted_ddp_fill_are_merged(tmp_path):
    for p in sorted(BUNDLED.glob("*.jpg"))[:4]:
        (tmp_path / "img").mkdir(exist_ok=True)
        shutil.copy2(p, tmp_path / "img" / p.name)
    paths = sorted((tmp_path / "img").glob("*.jpg"))
    model, cache = CountingBackbone(), FeatureCache(tmp_path / "cache")
    reference = compute_features(model, paths, transform(), 1, progress=False)
    key = cache_key(feature_key_parts(model, transform(), 1))
    ids = [json.dumps(fp) for fp in file_fingerprints(paths)]
    entry = cache.open(key, ids)
    part = cache.part(entry, rank=1, rows=np.array([1, 3]))  # rank 1 had written rows 1 and 3
    part.write(np.array([0, 1]), reference[[1, 3]].half().numpy())
    part.checkpoint()
    entry.close()
    model.images = 0
    again = compute_features(model, paths, transform(), 1, cache=cache, progress=False)
    assert model.images == 2 and torch.equal(again, reference)  # rows 0 and 2 only
    assert not list((tmp_path / "cache").rglob("*.part-*"))
