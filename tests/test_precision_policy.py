"""One precision policy for scores: a run's images score the same in eval (cache) and predict."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from capnet.cli import main
from capnet.data import load_image
from capnet.evaluation.scores import split_scores
from capnet.plans import feature_plan
from capnet.experiment import prepare_dataset
from capnet.serving.run import load_run, predict_images

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("extract_amp", ["bf16", "none"])
def test_predict_scores_what_eval_scored_from_the_cache(small_real: Path, tmp_path: Path, extract_amp: str) -> None:
    """Cached bf16 features and predict's fresh ones are the same numbers (same rounding, float32 head)."""
    cache = tmp_path / "cache"
    sets = ["model.backbone_options.image_size=64", "train.epochs=2", "data.num_workers=0",
            "data.val_fraction=0.25", f"train.extract_amp={extract_amp}", f"data.root={small_real}"]
    args = [a for s in sets for a in ("--set", s)]
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(REPO / "configs" / "capnet.yaml"), "--out", str(run_dir),
                 "--cache-dir", str(cache), *args]) == 0
    run = load_run(run_dir, device="cpu")
    test = prepare_dataset(run.cfg.data).splits["test"]
    run.model.set_test_time(run.cfg.tte.templates)
    logits, _ = split_scores(run.model, test, feature_plan(run.cfg, run.model, run.device, cache))
    rows = list(predict_images(run, test.image_paths, batch_size=4))
    got = np.array([[r["scores"][c] for c in run.classes] for r in rows])
    # Batch composition moves float32 conv outputs by rounding-level amounts, which can flip a float16 rounding:
    # 5e-5 allows that; the old float32 predict differs from a bf16 cache by more (asserted below).
    want = 1 / (1 + np.exp(-logits.astype(np.float64)))
    np.testing.assert_allclose(got, want, atol=5e-5)
    if extract_amp == "bf16":  # the old predict (float32 tower, no rounding) is what this guards against
        import torch

        from capnet.features.views import eval_views

        views = torch.stack([eval_views(run.model, feature_plan(run.cfg, run.model, run.device))(load_image(p)) for p in test.image_paths])
        with torch.inference_mode():
            fp32 = run.model(views.flatten(0, 1)).float().view(*views.shape[:2], -1).mean(dim=1)
        assert np.abs(torch.sigmoid(fp32.double()).numpy() - want).max() > 5e-5
