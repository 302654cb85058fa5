"""Run-lifecycle helpers: per-view transforms used for cached test-time views."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from capnet.config import load_config
from capnet.engine.runs import _OneView, view_transforms
from capnet.models.build import build_model


@pytest.mark.parametrize("views, n", [("single", 1), ("flip", 2), ("ten_crop", 10)])
def test_each_view_transform_equals_its_slice_of_the_stack(views: str, n: int) -> None:
    cfg = load_config([], ["model.backbone=clip_tiny_vit.random", "model.prompts.n_ctx=4",
                           "model.gcn.hidden=8", f"tte.views={views}"])
    model = build_model(cfg, ["cat", "dog"], None)
    transforms = view_transforms(model, cfg)
    assert len(transforms) == n
    image = Image.new("RGB", (50, 40), (10, 200, 30))
    image.putpixel((3, 5), (255, 0, 0))
    if n == 1:
        assert not isinstance(transforms[0], _OneView)
        return
    stacked = transforms[0].stack(image)
    for v, t in enumerate(transforms):
        assert torch.equal(t(image), stacked[v])
    assert len({repr(t) for t in transforms}) == n  # distinct feature-cache keys per view


def test_finished_run_matches_the_resolved_config_only(tmp_path) -> None:
    import json

    from capnet.config import config_hash
    from capnet.engine.runs import finished_run

    cfg = load_config([], ["train.seed=3"])
    assert finished_run(tmp_path, cfg) is None  # no metrics.json
    (tmp_path / "metrics.json").write_text('{"mAP": 50.0')  # half-written
    assert finished_run(tmp_path, cfg) is None
    (tmp_path / "metrics.json").write_text(json.dumps({"mAP": 50.0}))  # written before the hash existed
    assert finished_run(tmp_path, cfg) is None
    (tmp_path / "metrics.json").write_text(json.dumps({"mAP": 50.0, "config_sha256": config_hash(cfg)}))
    assert finished_run(tmp_path, cfg)["mAP"] == 50.0
    runtime = load_config([], ["train.seed=3", "train.device=cpu", "data.num_workers=0", "train.log_every=1"])
    assert finished_run(tmp_path, runtime) is not None  # how it ran is not what it computed
    for change in ("train.seed=4", "optim.lr=0.5", "data.root=elsewhere", "loss.name=bce"):
        assert finished_run(tmp_path, load_config([], ["train.seed=3", change])) is None, change
