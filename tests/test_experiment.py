"""Run-lifecycle helpers."""
from __future__ import annotations

from capnet.config import load_config


def test_finished_run_matches_the_resolved_config_only(tmp_path) -> None:
    import json

    from capnet.config import config_hash
    from capnet.experiment import finished_run

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
