"""Open-vocabulary classes (models/open_vocab.py) and held-out classes (data.exclude_classes)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from capnet.cli import main
from capnet.config import config_from_dict
from capnet.errors import CapnetError, DataError
from capnet.models import build_model
from capnet.models.build import extend_model
from capnet.models.open_vocab import extend_classes, text_graph_fn

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("toy_random")  # cfg() builds toy.random by name
OLD = ["dog", "cat", "car", "person"]
NEW = "potted plant"


def cfg(**model):
    base = {"backbone": "toy.random", "prompts": {"n_ctx": 4}, "gcn": {"hidden": 16}, "graph": {"topk": 2},
            "class_residual": True, **model}
    tte = base.pop("tte", {})
    return config_from_dict({"model": base, "tte": tte})


def feats(n=5, dim=32):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(0))


def trained(c, names, seed=0):
    """A model of ``c`` over ``names`` with non-trivial 'trained' tensors (GCN, residual, prompts)."""
    m = build_model(c, names)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.trainable_state_dict().values():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    m.ensemble_templates = c.tte.templates and m.prompt_learner is not None
    return m.eval()


def copy_shared(src, dst, rows):
    """Copy class-independent tensors of ``src`` into ``dst``; per-class ones (residual) for ``rows``."""
    s = src.trainable_state_dict()
    with torch.no_grad():
        for k, p in dst.trainable_state_dict().items():
            p.copy_(s[k] if s[k].shape == p.shape else s[k][:rows])


@pytest.mark.parametrize("model", [
    {"prompts": {"n_ctx": 4, "class_specific": False}},
    {"prompts": {"n_ctx": 4, "class_specific": False}, "tte": {"templates": True}},
    {"prompts": {"enabled": False}},
], ids=["shared-prompts", "shared-prompts+templates", "no-prompts"])
def test_an_added_class_equals_the_same_class_trained_next_to_the_others(model):
    """Same weights, same text path: adding NEW to a model over OLD reproduces the NEW column of a
    model over OLD + [NEW] whose NEW residual is zero (graph rebuilt over all names)."""
    c = cfg(**model)
    full = trained(c, OLD + [NEW])
    with torch.no_grad():
        full.class_residual[-1].zero_()
    part = build_model(c, OLD).eval()
    copy_shared(full, part, len(OLD))
    part.ensemble_templates = full.ensemble_templates
    ext = extend_model(c.model, part, OLD, [NEW])
    x = feats()
    want, got = full.logits_from_image_features(x), ext.logits_from_image_features(x)
    assert got.shape == (5, len(OLD) + 1) and ext.added == [NEW]
    torch.testing.assert_close(got[:, -1], want[:, -1], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # old classifiers: unchanged, bit for bit
        assert torch.equal(ext.class_embeddings()[:-1], part.class_embeddings())
    torch.testing.assert_close(got[:, :-1], part.logits_from_image_features(x))


def test_class_specific_prompts_use_the_template_path_and_keep_old_scores():
    c = cfg(prompts={"n_ctx": 4, "class_specific": True}, tte={"templates": True})
    m = trained(c, OLD)
    x = feats()
    before = m.logits_from_image_features(x)
    ext = extend_model(c.model, m, OLD, ["zebra", "giraffe"])
    out = ext.logits_from_image_features(x)
    assert out.shape == (5, 6) and torch.isfinite(out).all()
    with torch.no_grad():
        assert torch.equal(ext.class_embeddings()[:4], m.class_embeddings())
    torch.testing.assert_close(out[:, :4], before)
    refreshed = extend_model(c.model, m, OLD, ["zebra", "giraffe"], keep_old=False).logits_from_image_features(x)
    torch.testing.assert_close(refreshed[:, 4:], out[:, 4:])  # new rows do not depend on the old-row policy
    assert not torch.allclose(refreshed[:, :4], before)  # the rebuilt graph moves old rows through the GCN


def test_zeroshot_added_class_equals_the_zeroshot_class():
    c = config_from_dict({"model": {"kind": "zeroshot", "backbone": "toy.random"}})
    full, part = build_model(c, OLD + [NEW]), build_model(c, OLD)
    x = feats()
    torch.testing.assert_close(extend_model(c.model, part, OLD, [NEW]).logits_from_image_features(x),
                               full.logits_from_image_features(x))


def test_forward_on_images_goes_through_the_base_image_branch():
    c = cfg()
    m = trained(c, OLD)
    ext = extend_model(c.model, m, OLD, ["zebra"])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ext(images)[:, :4], m(images))


@pytest.mark.parametrize("names, message", [
    (["zebra", "Zebra"], "given twice"), (["Dog"], "already a trained class"), ([" "], "empty"),
    ([], "no class names"), (["pottedplant"], "already a trained class"),
])
def test_bad_names_are_one_line_errors(names, message):
    c = cfg()
    m = build_model(c, OLD[:3] + ["potted plant"]).eval()
    with pytest.raises(CapnetError, match=message) as err:
        extend_model(c.model, m, OLD[:3] + ["potted plant"], names)
    assert "\n" not in str(err.value)


def test_unaligned_towers_without_a_bridge_are_refused():
    c = cfg(backbone_options={"image_dim": 24}, proj_dim=12)
    m = build_model(c, OLD).eval()
    with pytest.raises(CapnetError, match=r"toy\.random: cannot add classes: .*not aligned.*no text bridge") as err:
        extend_classes(m, OLD, ["zebra"], graph=text_graph_fn(2, None, 0.2))
    assert "\n" not in str(err.value)


def test_exclude_classes_removes_the_class_and_its_labels(small_real: Path):
    from capnet.config import load_config
    from capnet.experiment import prepare_dataset

    base = load_config([REPO / "configs" / "capnet.yaml"], [f"data.root={small_real}", "data.val_fraction=0.25"])
    held = load_config([REPO / "configs" / "capnet.yaml"], [f"data.root={small_real}", "data.val_fraction=0.25",
                                                          "data.exclude_classes=[horse]"])
    full, ds = prepare_dataset(base.data), prepare_dataset(held.data)
    assert ds.classes == ["cat", "dog", "person"]
    keep = [full.classes.index(c) for c in ds.classes]
    for split in ("train", "val", "test"):
        assert ds.splits[split].image_ids == full.splits[split].image_ids  # same images, same splits
        np.testing.assert_array_equal(ds.splits[split].labels, full.splits[split].labels[:, keep])
    assert (ds.splits["train"].labels.sum(1) == 0).any()  # horse-only images stay, as negatives
    assert all("horse" not in names for names in (ds.class_groups or {}).values())
    bad = load_config([REPO / "configs" / "capnet.yaml"], [f"data.root={small_real}", "data.exclude_classes=[zebra]"])
    with pytest.raises(DataError, match=r"unknown classes \['zebra'\]"):
        prepare_dataset(bad.data)


TINY = ["model.backbone=clip_tiny_vit.random", "model.gcn.hidden=32", "model.prompts.n_ctx=4", "train.epochs=1",
        "data.batch_size=16", "data.num_workers=0", "model.backbone_options.image_size=32",
        "data.val_fraction=0.25", "tte.views=single", "train.refit=false"]


def test_predict_cli_adds_classes_to_a_run_trained_without_them(small_real: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture):
    out = tmp_path / "run"
    sets = [a for s in TINY + [f"data.root={small_real}", "data.exclude_classes=[horse]"] for a in ("--set", s)]
    assert main(["train", "--config", str(REPO / "configs" / "capnet.yaml"), "--out", str(out), "--no-cache", *sets]) == 0
    assert set(json.loads((out / "metrics.json").read_text())["per_class"]) == {"cat", "dog", "person"}
    capsys.readouterr()
    images = sorted((small_real / "images").iterdir())[:2]
    assert main(["predict", "--run", str(out), "--add-classes", "horse, zebra", *map(str, images)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert list(row["scores"]) == ["cat", "dog", "person", "horse", "zebra"]
        assert row["open_vocab"]["classes"] == ["horse", "zebra"]
        assert "median" in row["open_vocab"]["threshold_policy"]
    assert main(["predict", "--run", str(out), "--add-classes", "cat", str(images[0])]) == 1
    err = capsys.readouterr().err.strip()
    assert "already a trained class" in err and "\n" not in err
