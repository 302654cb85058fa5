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
