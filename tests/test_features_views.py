"""Image views: one decode per image for every test-time view, seeded cached augmentations."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from capnet.config import load_config
from capnet.features.cache import cache_key, feature_key_parts
from capnet.features.views import AugmentedViews, eval_views, single_view
from capnet.models.build import build_model
from capnet.plans import feature_plan


def _key(model, transform) -> str:
    """The feature-cache key of ``transform``'s features from ``model``'s backbone."""
    return cache_key(feature_key_parts(model.backbone, transform, model.cached_depth()))


def image() -> Image.Image:
    im = Image.new("RGB", (50, 40), (10, 200, 30))
    im.putpixel((3, 5), (255, 0, 0))
    return im


@pytest.mark.parametrize("views, n", [("single", 1), ("flip", 2), ("ten_crop", 10)])
def test_view_sets_stack_every_view_of_one_decoded_image(views: str, n: int) -> None:
    cfg = load_config([], ["model.backbone=clip_tiny_vit.random", "model.prompts.n_ctx=4",
                           "model.gcn.hidden=8", f"tte.views={views}"])
    model = build_model(cfg, ["cat", "dog"], None)
    plan = feature_plan(cfg, model, torch.device("cpu"))
    stack = eval_views(model, plan)(image())
    assert stack.shape[0] == n
    eval_tf = model.backbone.transform(train=False)
    if views != "ten_crop":  # single / flip reuse the backbone's own eval transform
        assert torch.equal(stack[0], eval_tf(image()))
    if views == "flip":
        assert torch.equal(stack[1], eval_tf(image()).flip(-1))  # mirrored after the crop, as exported graphs do
    assert torch.equal(single_view(model)(image())[0], eval_tf(image()))
    # rebuilt, the same view set is the same feature-cache entry; another view set is another one
    assert _key(model, eval_views(model, plan)) == _key(model, eval_views(model, plan))
    if views != "single":
        assert _key(model, eval_views(model, plan)) != _key(model, single_view(model))


def test_augmented_views_depend_on_the_image_and_seed_only() -> None:
    from torchvision import transforms as T

    tf = T.Compose([T.RandomResizedCrop(16, scale=(0.3, 1.0)), T.ToTensor()])
    aug = AugmentedViews(tf, k=3, seed=7)
    torch.manual_seed(0)
    first = aug(image())
    state = torch.get_rng_state()
    torch.manual_seed(123)  # another global RNG state: same draws
    again = aug(image())
    assert torch.equal(first, again) and first.shape == (3, 3, 16, 16)
    assert not torch.equal(first[0], first[1])  # k distinct draws
    assert not torch.equal(AugmentedViews(tf, k=3, seed=8)(image()), first)
    torch.manual_seed(0)
    aug(image())
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is untouched
    # the same settings are the same feature-cache entry; another k or seed is another entry
    model = build_model(load_config([], ["model.backbone=clip_tiny_vit.random", "model.prompts.n_ctx=4",
                                         "model.gcn.hidden=8"]), ["cat", "dog"], None)
    assert _key(model, aug) == _key(model, AugmentedViews(tf, k=3, seed=7))
    assert len({_key(model, a) for a in (aug, AugmentedViews(tf, k=2, seed=7), AugmentedViews(tf, k=3, seed=8))}) == 3
