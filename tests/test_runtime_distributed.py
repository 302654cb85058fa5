"""DDP on CPU (gloo, 2 processes): same weights on both ranks, equal to one process with the same
global batch; gathered evaluation returns every sample exactly once, in dataset order."""
from __future__ import annotations

import os
import socket

import numpy as np
import torch
import torch.multiprocessing as mp
from torch import nn

from capnet.train import checkpoint
from capnet.runtime import distributed
from capnet.evaluation.predict import predict_scores
from capnet.features.loaders import build_loader
from capnet.plans import fit_plan
from capnet.train.loop import fit

import pytest

from _toys import CLASS_NAMES, GROUPS, TextToyModel, ToyModel, toy_config, toy_data

CPU = torch.device("cpu")
OPTS = dict(train={"epochs": 2, "select": "val"}, optim={"weight_decay": 0.0}, data={"batch_size": 4, "eval_batch_size": 3})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(run_dir, text=False):
    """Train and score the toy model in this process (DDP-aware: loaders pick their samplers).

    ``text``: the model with a text branch, trained with accumulation (the text gradient is
    averaged by the loop itself, once per optimiser step, outside DDP); ``"budgeted"``: a toy
    CAPNET whose text branch runs 2 of its 4 classes per step (owed gradients, lazy rows)."""
    opts = {**OPTS, "train": {**OPTS["train"], "grad_accum": 2}} if text else OPTS
    cfg = toy_config(**opts)
    torch.manual_seed(0)
    if text == "budgeted":
        from test_train_loop import _budgeted_capnet

        model = _budgeted_capnet(2)
    else:
        model = TextToyModel(dropout=0.0) if text else ToyModel(dropout=0.0)
    per_rank = cfg.data.batch_size // distributed.world_size()
    train = build_loader(toy_data(16, seed=1), per_rank, True, cfg.train.seed, 0, CPU)
    val = build_loader(toy_data(7, seed=2), cfg.data.eval_batch_size, False, cfg.train.seed, 0, CPU)
    result = fit(model, nn.BCEWithLogitsLoss(), train, val, fit_plan(cfg), run_dir, groups=GROUPS, class_names=CLASS_NAMES, device=CPU)
    scores, targets = predict_scores(model, val, CPU)
    return model.trainable_state_dict(), scores, targets, result


def _worker(rank: int, port: int, out_dir: str, text: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    info = distributed.init_distributed("cpu")
    assert info.world_size == 2 and distributed.rank() == rank
    try:
        weights, scores, targets, result = _run(os.path.join(out_dir, "run"), text)
        tensors = {**checkpoint.with_prefix(weights, "model."), "scores": torch.from_numpy(scores),
                   "targets": torch.from_numpy(targets)}
        checkpoint.save_file(tensors, {"history": [r["val_mAP"] for r in result.history]},
                             os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        distributed.cleanup()


@pytest.mark.slow  # two spawned DDP processes
@pytest.mark.parametrize("text", [False, True, "budgeted"], ids=["image-only", "text-branch+accumulation", "budgeted-text"])
def test_ddp_two_processes_match_each_other_and_one_process(tmp_path, text):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), text), nprocs=2, join=True)
    r0, m0 = checkpoint.load_file(tmp_path / "rank0.safetensors")
    r1, m1 = checkpoint.load_file(tmp_path / "rank1.safetensors")
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    assert m0 == m1
    assert (tmp_path / "run" / "best.safetensors").is_file() and (tmp_path / "run" / "log.csv").is_file()
    if text == "budgeted":
        # Equal weights above: the ranks picked the same classes and owed the same gradients. No
        # one-process twin (it ranks negatives by its own max score, not the ranks' mean max), but
        # the budget was in force and training moved the prompts.
        from test_train_loop import _budgeted_capnet

        start = _budgeted_capnet(2)
        assert start.text_budget == 2
        assert not torch.equal(r0["model.text.prompt_learner.ctx"], start.prompt_learner.ctx.detach())
        return

    weights, scores, targets, result = _run(tmp_path / "single", text)  # same global batches, one process
    for k, v in weights.items():
        assert torch.allclose(r0["model." + k], v, atol=1e-6), k
    val = toy_data(7, seed=2)
    np.testing.assert_array_equal(r0["targets"].numpy(), val.tensors[1].numpy())  # 7 rows, each once, in order
    np.testing.assert_allclose(r0["scores"].numpy(), scores, atol=1e-6)
    np.testing.assert_allclose(m0["history"], [r["val_mAP"] for r in result.history], atol=1e-4)
