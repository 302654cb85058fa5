"""The core budget is per local rank under torchrun; the DDP timeout reaches the process group."""
from __future__ import annotations

import datetime

from capnet.config import load_config
from capnet.runtime import distributed, resources


def test_budget_divides_the_cores_between_local_ranks(monkeypatch):
    monkeypatch.setattr(resources, "usable_cores", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resources.budget() == resources.Budget(workers=4, threads=12)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resources.rank_cores() == 4 and resources.budget() == resources.Budget(workers=1, threads=3)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")  # more ranks than cores: still one thread each
    assert resources.budget() == resources.Budget(workers=0, threads=1)


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
