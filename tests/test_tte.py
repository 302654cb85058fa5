"""Test-time ensembling: view counts and shapes, logit-space averaging, one text pass."""
import pytest
import torch
from PIL import Image

from capnet.config import TTEConfig
from capnet.models.heads import LinearProbe
from capnet.models.tte import build_view_transform, num_views, tte_logits, view_transform
from test_capnet import make
from toy_backbone import ToyBackbone


def pil(w=48, h=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


@pytest.mark.parametrize("views,count", [("single", 1), ("flip", 2), ("five_crop", 5), ("ten_crop", 10)])
def test_view_counts_and_shape(views, count):
    t = view_transform(views, image_size=32, resize_scale=1.25, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear")
    out = t(pil())
    assert out.shape == (count, 3, 32, 32) and num_views(views) == count
    if views == "flip":
        assert torch.allclose(out[1], out[0].flip(-1))
    if views == "ten_crop":
        assert torch.allclose(out[6], out[0].flip(-1))  # the mirror's top-right = mirrored top-left
    if views == "single":
        assert torch.allclose(out[0], ToyBackbone().transform(train=False)(pil()), atol=1e-6)


def test_build_from_config():
    spec = ToyBackbone().spec
    assert build_view_transform(TTEConfig(views="five_crop"), spec)(pil()).shape == (5, 3, 32, 32)


@pytest.mark.parametrize("v", [1, 2, 5, 10])
def test_tte_equals_mean_of_per_view_logits(v):
    model = make(peft=True, ensemble=True).eval()
    views = torch.randn(3, v, 3, 32, 32, generator=torch.Generator().manual_seed(v))
    with torch.no_grad():
        one_by_one = torch.stack([model(views[:, i]) for i in range(v)], dim=1).mean(dim=1)
    model.train()  # no cache: count the text passes of tte_logits itself
    calls = model.backbone.text_calls
    out = tte_logits(model, views)
    assert model.backbone.text_calls == calls + 1
    assert out.shape == (3, 5)
    assert torch.allclose(out, one_by_one, atol=1e-5)


def test_tte_with_linear_probe():
    model = LinearProbe(ToyBackbone(), 4)
    views = torch.randn(2, 5, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(tte_logits(model, views), torch.stack([model(views[:, i]) for i in range(5)]).mean(0), atol=1e-6)
