"""The core budget is per local rank under torchrun; the DDP timeout reaches the process group."""
from __future__ import annotations

import datetime

from capnet.config import load_config
from capnet.runtime import distributed, resources


def test_budget_divides_the_cores_between_local_ranks(monkeypatch):
    monkeypatch.setattr(resources, "usable_cores", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    alone = resources.budget()
    assert alone == resources.budget(cores=16)  # outside torchrun: the whole machine
    for ranks in (2, 4, 16):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
        plan = resources.budget()
        assert ranks * (plan.workers + plan.threads) <= 16, ranks  # the ranks together fit the machine
        assert plan == resources.budget(cores=16 // ranks), ranks  # each plans for its share
        assert plan.threads >= 1 and plan.threads <= alone.threads
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")  # more ranks than cores: still one thread each
    assert resources.budget().threads == 1 and resources.budget().workers == 0


def test_dist_timeout_is_a_config_key_passed_to_the_process_group(monkeypatch):
    cfg = load_config([], ["train.dist_timeout_s=90"])
    assert cfg.train.dist_timeout_s == 90.0 and load_config([], []).train.dist_timeout_s == 1800.0
    seen = {}
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    info = distributed.init_distributed("cpu", cfg.train.dist_timeout_s)
    assert info.rank == 1 and seen["timeout"] == datetime.timedelta(seconds=90) and seen["backend"] == "gloo"
