"""Config: merge order, validation with actionable messages, selector sections, shipped configs."""
from __future__ import annotations

from pathlib import Path

import pytest

from capnet.config import Config, ConfigError, load_config, parse_override, save_config
from capnet.registry import Registry

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))
EXPERIMENTS = sorted((REPO / "configs" / "experiments").glob("*.yaml"))


def test_defaults_are_valid_and_frozen() -> None:
    cfg = load_config()
    assert isinstance(cfg, Config)
    with pytest.raises(Exception):
        cfg.train.epochs = 3  # type: ignore[misc]


def test_merge_order_files_then_overrides(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("train: {epochs: 3, seed: 1}\nmodel: {gcn: {layers: 2}}\n")
    b.write_text("base: [a.yaml]\ntrain: {epochs: 4}\n")
    cfg = load_config([b], ["train.seed=7"])
    assert (cfg.train.epochs, cfg.train.seed, cfg.model.gcn.layers) == (4, 7, 2)


def test_unknown_key_names_the_closest_valid_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.gcm.*did you mean 'gcn'"):
        load_config([], ["model.gcm.layers=3"])


@pytest.mark.parametrize("override, match", [
    ("train.epochs=many", "expected an integer"),
    ("train.amp=fp8", "not one of none, auto, bf16, fp16"),
    ("model.prompts.enabled=3", "expected true/false"),
    ("data.val_fraction=1.5", "must be in"),
    ("model.templates=['no placeholder']", "placeholder"),
])
def test_bad_values_are_clear(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config([], [override])


def test_missing_and_malformed_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config([tmp_path / "nope.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config([bad])
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("train.epochs")


def test_changing_the_selector_drops_the_old_options() -> None:
    """PEFT/loss options belong to their method/loss: switching must not leak them."""
    vgg = REPO / "configs" / "model" / "offline_vgg19_minilm.yaml"
    cfg = load_config([vgg], ["model.peft.method=lora"])
    assert cfg.model.peft.options == {}
    cfg = load_config([vgg], ["model.peft.options.reduction=8"])
    assert cfg.model.peft.options == {"stages": [4], "reduction": 8}
    voc = load_config([REPO / "configs" / "voc_lt_rn50.yaml"], ["loss.name=bce"])
    assert voc.loss.name == "bce" and voc.loss.options == {}


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config([REPO / "configs" / "demo.yaml"], ["train.epochs=2"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config([tmp_path / "config.yaml"]) == cfg


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_resolves(path: Path) -> None:
    cfg = load_config([path])
    assert cfg.model.kind in ("capnet", "linear_probe", "zeroshot")


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_composes_with_every_recipe(path: Path) -> None:
    for base in ("demo.yaml", "voc_lt_vit_b16.yaml", "coco_lt_rn50.yaml"):
        load_config([REPO / "configs" / base, path])


def test_registry_errors_list_choices() -> None:
    reg = Registry("thing")
    reg.register("alpha")(lambda: 1)
    with pytest.raises(KeyError, match="already registered"):
        reg.register("alpha")(lambda: 2)
    with pytest.raises(KeyError, match="Did you mean 'alpha'.*Available: alpha"):
        reg.get("alpah")
    assert reg.names("al*") == ["alpha"] and reg.build("alpha") == 1
