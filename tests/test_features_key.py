"""The feature-cache key is the same in every process (capnet#23 item 6: no object addresses)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from capnet.features.cache import stable_repr

SRC = Path(__file__).resolve().parents[1] / "src"
SCRIPT = """
import json, sys
import capnet.models.backbones
from capnet.features.cache import cache_key, feature_key_parts
from capnet.features.views import AugmentedViews
from capnet.registry import BACKBONES

b = BACKBONES.build(sys.argv[1])
transforms = {"eval": b.transform(train=False), "train": b.transform(train=True),
              "augmented": AugmentedViews(b.transform(train=True), 2)}
print(json.dumps({k: [cache_key(feature_key_parts(b, t, 1)), feature_key_parts(b, t, 1)["transform"]]
                  for k, t in transforms.items()}))
"""


def _keys_in_two_fresh_processes(backbone: str) -> list:
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONHASHSEED": "random"}
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, backbone], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        outs.append(out.strip().splitlines()[-1])
    return outs


def test_stable_repr_strips_addresses_only():
    def _to_rgb(x):
        return x

    assert stable_repr(_to_rgb).startswith("<function test_stable_repr_strips_addresses_only.<locals>._to_rgb>")
    assert " at 0x" in repr(_to_rgb) and "0x" not in stable_repr(_to_rgb)
    assert stable_repr([1, "a"]) == repr([1, "a"])


@pytest.mark.slow  # two fresh processes importing open_clip
@pytest.mark.parametrize("backbone", ["clip_tiny_vit.random", "efficientnet_lite0_minilm.offline"])
def test_key_is_identical_in_two_fresh_processes(backbone):
    first, second = _keys_in_two_fresh_processes(backbone)
    assert first == second
    assert " at 0x" not in first
    if backbone.startswith("clip"):
        assert "<function _to_rgb>" in first  # the function that used to print its address
