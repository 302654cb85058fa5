"""The evaluation protocol: k-fold re-splits, the scikit-learn probe, refit on train + val,
epoch seeds, the thread/worker budget and native-bf16 detection."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from capnet.config import load_config
from capnet.data import load_dataset
from capnet.runtime import precision, resources
from capnet.evaluation.probe import fit_logistic, select_and_fit
from capnet.experiment import prepare_dataset, train_run
from capnet.runtime.seed import EpochSampler, epoch_seed
from capnet.errors import DataError

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "data" / "voc_real_lt"


def test_kfold_resplits_partition_all_images_and_keep_the_groups():
    ds = load_dataset("folder", BUNDLED)
    all_ids = set(ds.splits["train"].image_ids) | set(ds.splits["test"].image_ids)
    tests = []
    for k in range(5):
        fold = ds.kfold(5, k, seed=0)
        train, test = set(fold.splits["train"].image_ids), set(fold.splits["test"].image_ids)
        assert not train & test and train | test == all_ids
        assert {g: list(v) for g, v in fold.groups().items()} == {g: list(v) for g, v in ds.groups().items()}
        assert (fold.splits["test"].labels.sum(0) >= 1).all()  # every class appears in every test fold
        tests.append(test)
    assert set().union(*tests) == all_ids and sum(len(t) for t in tests) == len(all_ids)
    assert ds.kfold(5, 2, seed=0).splits["test"].image_ids == ds.kfold(5, 2, seed=0).splits["test"].image_ids
    with pytest.raises(DataError, match="fold 5 of 5"):
        ds.kfold(5, 5)


def test_resplit_is_a_config_option():
    cfg = load_config([REPO / "configs" / "capnet.yaml"], ["data.resplit_folds=5", "data.resplit_fold=3"])
    ds = prepare_dataset(cfg.data)
    assert set(ds.splits) == {"train", "val", "test"} and abs(len(ds.splits["test"]) - 3426 / 5) < 5


def test_probe_equals_scikit_learn_and_selects_C_on_val():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6)) * [1, 10, 0.1, 1, 1, 1] + 3
    score = x[:, :3] @ [1.0, 0.1, 10.0] + rng.normal(size=120)
    y = (score > np.median(score))[:, None].astype(float)
    y = np.concatenate([y, 1 - y], axis=1)
    fit = fit_logistic(x, y, C=0.1)
    z = StandardScaler().fit_transform(x)
    for c in range(2):
        ref = LogisticRegression(C=0.1, max_iter=5000, tol=1e-8).fit(z, y[:, c]).decision_function(StandardScaler().fit(x).transform(x))
        np.testing.assert_allclose(fit.decision(x)[:, c], ref, atol=1e-4)
    chosen = select_and_fit((x[:80], y[:80]), (x[80:], y[80:]), Cs=(1e-4, 1.0), refit=False)
    assert set(chosen.val_map) == {1e-4, 1.0} and chosen.C == max(chosen.val_map, key=chosen.val_map.get)


@pytest.fixture(scope="module")
def probe_runs(small_real, tmp_path_factory):
    """The linear-probe model kind through train_run, with and without refit (tiny CLIP, no cache)."""
    base = [f"data.root={small_real}", "model.kind=linear_probe", "model.backbone=clip_tiny_rn.random",
            "model.peft.method=none", "tte.views=single", "tte.templates=false", "data.num_workers=0",
            "data.val_fraction=0.25"]
    out = {}
    for refit in (False, True):
        cfg = load_config([REPO / "configs" / "capnet.yaml"], base + [f"train.refit={str(refit).lower()}"])
        out[refit] = train_run(cfg, tmp_path_factory.mktemp("probe") / "run")
    return out


def test_probe_run_records_its_selection(probe_runs):
    for refit, metrics in probe_runs.items():
        assert metrics["probe"]["refit"] is refit and metrics["probe"]["C"] in metrics["probe"]["val_mAP_by_C"]
        assert 0 <= metrics["mAP"] <= 100


def test_refit_retrains_on_train_and_val_for_the_selected_epochs(small_real, tmp_path):
    sets = [f"data.root={small_real}", "model.backbone=clip_tiny_vit.random", "model.peft.method=none",
            "model.prompts.n_ctx=4", "model.gcn.hidden=16", "train.epochs=3", "data.batch_size=16",
            "data.num_workers=0", "data.val_fraction=0.25", "tte.views=single", "train.refit=true"]
    cfg = load_config([REPO / "configs" / "capnet.yaml"], sets)
    metrics = train_run(cfg, tmp_path / "run")
    epochs = metrics["selected_epoch"]
    refit_log = (tmp_path / "run" / "refit" / "log.csv").read_text().splitlines()
    assert len(refit_log) == 1 + epochs  # header + one row per selected epoch
    ds = prepare_dataset(cfg.data)
    steps = -(-(len(ds.splits["train"]) + len(ds.splits["val"])) // 16)  # train + val, batch 16
    last = json.loads(open(tmp_path / "run" / "refit" / "log.csv").read().splitlines()[-1].split(",")[0])
    assert last == epochs and steps == 3
    assert "refit" in (tmp_path / "run" / "report.md").read_text()


def test_epoch_seeds_do_not_replay_other_seeds():
    perms = set()
    for s in range(3):
        for e in range(3):
            sampler = EpochSampler(50, seed=s)
            sampler.set_epoch(e)
            perms.add(tuple(sampler))
    assert len(perms) == 9  # seed s, epoch e never equals seed s+1, epoch e-1 (as seed + epoch did)
    assert len({epoch_seed(s, e) for s in range(20) for e in range(20)}) == 400


def test_sharded_epoch_sampler_covers_the_epoch_like_distributed_sampler():
    shards = []
    for rank in range(3):
        sampler = EpochSampler(10, seed=1, rank=rank, world_size=3)
        sampler.set_epoch(4)
        shards.append(list(sampler))
    assert all(len(s) == 4 for s in shards)  # 10 padded to 12
    whole = EpochSampler(10, seed=1)
    whole.set_epoch(4)
    order = list(whole)
    assert sorted(set().union(*map(set, shards))) == list(range(10))
    assert [shards[r][i] for i in range(4) for r in range(3)][:10] == order


def test_budget_splits_cores_between_decoding_and_torch(monkeypatch):
    previous = resources.budget(cores=1)
    for cores in range(1, 65):
        plan = resources.budget(cores=cores)
        assert plan.workers + plan.threads == cores, cores  # every core used, none oversubscribed
        assert plan.threads >= 1 and plan.threads > plan.workers, cores  # torch gets most of them
        assert (plan.workers == 0) == (cores < 4), cores  # small machines decode in the main process
        assert plan.workers >= previous.workers, cores  # more cores never means fewer decoders
        previous = plan
    assert resources.budget(cores=16, workers=0, threads=3) == resources.Budget(workers=0, threads=3)  # explicit wins
    assert resources.budget(cores=16, workers=2).workers == 2


def test_native_bf16_is_detected_from_cpu_flags(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    assert not precision.native_bf16(cpu)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert precision.native_bf16(cpu)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"fp", "asimd", "bf16"}))
    monkeypatch.setattr(precision.platform, "machine", lambda: "aarch64")
    assert precision.native_bf16(cpu)
    cfg = load_config([], ["train.extract_amp=auto"])
    assert precision.resolve_amp(cfg.train.extract_amp, cpu) == "bf16"
    assert precision.resolve_amp(load_config([], ["train.extract_amp=none"]).train.extract_amp, cpu) == "none"


def test_keep_freed_memory_applies_on_glibc_and_is_a_noop_elsewhere(monkeypatch):
    import platform

    assert resources.keep_freed_memory() == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
    monkeypatch.setattr(resources.platform, "system", lambda: "Darwin")
    assert resources.keep_freed_memory() is False


def test_the_console_script_is_the_process_entry_point() -> None:
    """`capnet` and `python -m capnet` run entry_point (gc tuned for the process), not bare main."""
    import subprocess
    import sys
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="capnet")
    assert script.value == "capnet.cli:entry_point"
    code = ("import gc, sys, runpy; sys.argv = ['capnet']\n"
            "try:\n    runpy.run_module('capnet', run_name='__main__')\n"
            "except SystemExit as e:\n    print(e.code, gc.get_threshold()[0], gc.get_freeze_count() > 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[-3:] == ["2", "100000", "True"]  # no command: help, exit 2
