"""Typed run configuration: YAML files merged in a written order, validated, then frozen.

Merge order (later wins), as in CoOp/Dassl:
  1. the defaults of the dataclasses below
  2. each ``--config`` YAML, in the order given (typically data, then model, then experiment);
     a file may list others under ``base:`` (paths relative to it) that are merged first
  3. ``--set key.path=value`` overrides (values parsed as YAML)
Mappings merge key by key, except that a section whose selector changes (``loss.name``,
``model.peft.method``) is replaced whole: its ``options`` belong to the old selector; likewise
``model.backbone_options`` are dropped when ``model.backbone`` changes without restating them. Then the result is validated (unknown keys are errors naming the closest valid key) and frozen.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union, get_args, get_origin, get_type_hints

import yaml


from capnet.errors import CapnetError


class ConfigError(CapnetError, ValueError):
    """A malformed configuration: the message names the file and key."""


@dataclass(frozen=True)
class DataConfig:
    reader: str = "folder"  # DATASETS registry key: folder | voc | coco | nus_wide
    root: str = "data/voc_real_lt"  # dataset directory (relative paths resolve against the cwd)
    split_dir: Optional[str] = None  # VOC-LT / COCO-LT split-file folder for native layouts
    resplit_folds: int = 0  # 0: the dataset's own train/test; K >= 2: K-fold re-split of train + test (stratified)
    resplit_fold: int = 0  # with resplit_folds: the fold that is the test split
    resplit_seed: int = 0  # with resplit_folds: the seed of the re-split
    val_fraction: float = 0.15  # share of train carved out (stratified) for model selection
    val_seed: int = 0  # seed of that carve-out; fixed so runs compare
    batch_size: int = 32  # images per optimisation step (before accumulation)
    eval_batch_size: int = 64  # images per forward pass at evaluation
    num_workers: Optional[int] = None  # JPEG-decoding DataLoader processes; null: the machine's budget (src/capnet/runtime/resources.py)
    exclude_classes: List[str] = field(default_factory=list)  # classes removed from the class list and all labels (held out for open-vocabulary tests)
    reader_options: Dict[str, Any] = field(default_factory=dict)  # keyword options of the reader, e.g. nus_wide {drop_missing: true}
    subset: Optional[float] = None  # smoke runs: keep the first N (>= 1) or a fraction in (0, 1) of each split, drawn with val_seed
    max_image_pixels: Optional[int] = None  # Pillow's decompression-bomb limit (null: Pillow's default, ~89 MP); larger images are bad images


@dataclass(frozen=True)
class PromptConfig:
    enabled: bool = True  # learnable soft prompts (CoOp); off = fixed hand-written templates
    n_ctx: int = 16  # number of learnable context vectors
    class_specific: bool = False  # one context per class (CSC) instead of shared
    init: Optional[str] = "a photo of a"  # phrase to initialise from; null = random N(0, 0.02)


@dataclass(frozen=True)
class GraphConfig:
    source: str = "text"  # GRAPHS key: text (class-name embeddings) | cooccurrence | none
    topk: Optional[int] = 5  # keep the k strongest neighbours per class (null: no top-k)
    threshold: Optional[float] = None  # keep similarities >= threshold (null: no threshold)
    p: float = 0.2  # ML-GCN re-weighting: off-diagonal mass p, self weight 1 - p
    tau: float = 0.4  # co-occurrence graph binarisation threshold (ML-GCN)
    sparse: Optional[bool] = None  # keep the graph as a sparse matrix; null: above 2000 classes (docs/scale.md)
    chunk: int = 2048  # similarity rows per block when a sparse text graph is built (memory: chunk x C floats)
    norm: str = "symmetric"  # after re-weighting: symmetric ((A + A^T)/2 then D^-1/2 A D^-1/2) | row (LT-GCN: the row-normalised x p matrix as it is)


@dataclass(frozen=True)
class GCNConfig:
    enabled: bool = True  # refine class embeddings by graph convolution
    layers: int = 2  # graph-convolution layers
    hidden: int = 1024  # width of hidden layers
    residual: float = 1.0  # weight of the GCN output added to the prompt embeddings
    dropout: float = 0.0  # dropout between layers
    init: str = "zero_last"  # zero_last (the residual starts at the prompt embeddings) | uniform (LT-GCN / Kipf: U(-1/sqrt(out), 1/sqrt(out)) every layer)


@dataclass(frozen=True)
class PEFTConfig:
    method: str = "none"  # PEFT key: none | adaptformer | lora | vpt_shallow | vpt_deep | bitfit | conv_adapter
    options: Dict[str, Any] = field(default_factory=dict)  # keyword arguments of that method


@dataclass(frozen=True)
class TextBudgetConfig:
    """The budgeted text branch (models/text_bank.py, docs/scale.md); ``model.text_budget=N`` sets ``classes``."""

    classes: Optional[int] = None  # classes through the text tower per training step; null: auto; >= C: exact
    exact_up_to: int = 100  # auto: every class every step up to this many classes (VOC 20, COCO 80, NUS-WIDE 81)
    auto: int = 32  # auto: classes per step above exact_up_to
    hard_fraction: float = 0.5  # share of the non-positive slots given to the top-scored negatives (rest random)
    refresh_every: int = 0  # re-embed every class (no grad, in chunks) every N steps; 0: once per epoch
    defer: bool = True  # carry the gradient of classes outside a step's subset to their next step (false: drop it)


@dataclass(frozen=True)
class ModelConfig:
    kind: str = "capnet"  # MODEL_KINDS key: capnet | linear_probe | zeroshot
    backbone: str = "vgg19_minilm.offline"  # BACKBONES key ("arch.tag")
    weights: Optional[str] = None  # local checkpoint file or directory for the backbone
    backbone_options: Dict[str, Any] = field(default_factory=dict)  # extra backbone kwargs
    proj_dim: int = 512  # shared space width when the towers are not aligned (offline default)
    templates: List[str] = field(default_factory=lambda: ["a photo of a {}."])  # text templates (zero-shot, graph, ensembling)
    logit_scale: float = 20.0  # initial scale of cosine logits (learnable)
    learn_logit_scale: bool = True  # train the scale
    class_residual: bool = False  # per-class residual on the text classifier (LIFT-style), zero-init
    residual_gate: Optional[float] = None  # scale class c's residual by min(1, n_c / this), n_c its training positives; null: 1
    center_features: bool = False  # subtract the training-set mean image feature before the cosine
    text_budget: TextBudgetConfig = field(default_factory=TextBudgetConfig)  # classes per training step (large C)
    text_chunk: int = 1024  # classes per text-tower pass when all classes are embedded without grad (eval, bank refresh)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    gcn: GCNConfig = field(default_factory=GCNConfig)
    peft: PEFTConfig = field(default_factory=PEFTConfig)


@dataclass(frozen=True)
class LossConfig:
    name: str = "db_focal"  # LOSSES key: bce | focal | db_focal
    options: Dict[str, Any] = field(default_factory=dict)  # keyword arguments of that loss


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "sgd"  # sgd | adamw | adam (L2 added to the gradient, as LT-GCN's torch Adam)
    lr: float = 0.002  # base learning rate
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # L2 / decoupled weight decay
    lr_scale: Dict[str, float] = field(default_factory=dict)  # per-group multipliers: prompts, gcn, peft, head
    scheduler: str = "cosine"  # cosine | constant | onecycle (torch OneCycleLR; its rise = warmup_epochs, LT-GCN)
    warmup_epochs: int = 1  # linear warm-up epochs (onecycle: epochs to the peak lr)
    schedule_epochs: Optional[int] = None  # epochs the lr schedule spans (null: train.epochs); LT-GCN's COCO-LT stops at 16 of 120


@dataclass(frozen=True)
class LogConfig:
    tensorboard: bool = False  # scalars per epoch into <run>/tb/ (needs the `log` extra: pip install "capnet[log]")
    wandb: Optional[Dict[str, Any]] = None  # wandb.init keyword arguments, e.g. {project: capnet}; null: off (wandb imported only then)
    test_curve: bool = False  # score test after every epoch into log.csv test_curve_* (for reading beside papers' best-test-epoch numbers; never used for a choice)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20  # passes over train
    seed: int = 0  # seeds python, numpy and torch
    amp: str = "none"  # none | auto (bf16 where the device has it natively) | bf16 | fp16 (autocast; GPU only for fp16)
    grad_accum: int = 1  # optimiser step every N batches
    ema: Optional[float] = None  # EMA decay of trainable tensors (null: off)
    select: str = "val"  # model selection: val (best val mAP) | last (fixed final epoch)
    feature_cache: bool = True  # cache the frozen prefix of the image tower (and train on the cache)
    augment_views: int = 0  # cached random augmentations per training image (train transform), beside the eval view
    augment_seed: int = 0  # seed of those augmentations (fixed across train.seed so the cache is shared)
    extract_amp: str = "auto"  # frozen-tower precision: auto (bf16 where the device has it natively) | none | bf16
    threads: Optional[int] = None  # torch intra-op threads; null: the machine's budget (src/capnet/runtime/resources.py)
    keep_freed_memory: bool = True  # glibc keeps freed memory in the heap: ~2x faster CPU forwards (resources.py)
    refit: bool = False  # after selecting the epoch on val, retrain on train + val for that many epochs
    device: str = "auto"  # auto | cpu | cuda
    dist_timeout_s: float = 1800.0  # DDP process-group timeout: the longest one rank may wait for the others (e.g. rank 0 merging a feature cache)
    log_every: int = 20  # progress-bar refresh in steps
    log: LogConfig = field(default_factory=LogConfig)  # where epoch scalars go besides log.csv and the console
    compile: bool = False  # torch.compile the trained forward (the image suffix + head); compiles on the first step
    grad_checkpointing: bool = False  # recompute the image tower's activations in backward (less memory, ~30% more time)


@dataclass(frozen=True)
class TTEConfig:
    views: str = "single"  # single | flip | five_crop | ten_crop
    templates: bool = False  # average the fixed-template class embeddings over model.templates
    resize_scale: float = 1.15  # enlarge before cropping views (LIFT expands the resize)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tte: TTEConfig = field(default_factory=TTEConfig)


# ------------------------------------------------------------------------ building

def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(value: Any, tp: Any, where: str) -> Any:
    tp_inner = _unwrap_optional(tp)
    if value is None:
        if tp_inner is not tp:
            return None
        raise ConfigError(f"{where}: null is not allowed here")
    if dataclasses.is_dataclass(tp_inner):
        return _build(tp_inner, value, where)
    origin = get_origin(tp_inner)
    if origin in (list, List, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return list(value)
    if origin in (dict, Dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp_inner is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp_inner is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp_inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp_inner is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{path}'{hint}; valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


SELECTORS = ("name", "method")  # a section keyed by one of these owns its ``options``
OWNED = {"backbone": "backbone_options"}  # a key whose options go when it changes (unless restated)


def _deep_merge(base: Dict[str, Any], extra: Mapping[str, Any]) -> Dict[str, Any]:
    """Merge mappings key by key; a section whose selector (loss ``name``, PEFT ``method``)
    changes is replaced whole, so options meant for one loss/method never leak into another."""
    out = dict(base)
    for key, value in extra.items():
        old = out.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping) and not _selector_changed(old, value):
            out[key] = _deep_merge(old, value)
        else:
            out[key] = dict(value) if isinstance(value, Mapping) else value
    for key, options in OWNED.items():  # e.g. the demo's EfficientNet options never reach a CLIP
        if key in extra and key in base and extra[key] != base[key] and options not in extra:
            out.pop(options, None)
    return out


def _selector_changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    return any(k in new and k in old and new[k] != old[k] for k in SELECTORS)


def read_yaml(path: Union[str, Path]) -> Dict[str, Any]:
    """Read one YAML config (following its ``base:`` list) into a plain dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    merged: Dict[str, Any] = {}
    for base in raw.pop("base", []) or []:
        merged = _deep_merge(merged, _upgrade(read_yaml(path.parent / base)))
    return _deep_merge(merged, _upgrade(raw))


def parse_override(text: str) -> Dict[str, Any]:
    """``a.b.c=value`` -> {"a": {"b": {"c": value}}} with the value parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    node: Dict[str, Any] = {}
    cur = node
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cur[part] = {}
        cur = cur[part]
    cur[parts[-1]] = parsed
    return node


# Flat keys of the budgeted text branch before it became the ``model.text_budget`` section
# (run directories saved then still load).
_LEGACY_TEXT_KEYS = {"text_exact_up_to": "exact_up_to", "text_auto_budget": "auto", "text_hard_fraction": "hard_fraction",
                     "text_refresh_every": "refresh_every", "text_defer": "defer"}


def _upgrade(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    """``model.text_budget: N`` (or null) is short for ``{classes: N}``; legacy flat keys move in."""
    model = raw.get("model")
    if not isinstance(model, Mapping):
        return raw
    model = dict(model)
    budget = model.get("text_budget", {})
    budget = dict(budget) if isinstance(budget, Mapping) else {"classes": budget}
    for old, new in _LEGACY_TEXT_KEYS.items():
        if old in model:
            budget[new] = model.pop(old)
    if budget or "text_budget" in model:
        model["text_budget"] = budget
    return {**raw, "model": model}


def config_from_dict(raw: Mapping[str, Any]) -> Config:
    """Validate a plain dict into a frozen Config."""
    cfg = _build(Config, _upgrade(raw), "")
    validate(cfg)
    return cfg


def load_config(paths: Sequence[Union[str, Path]] = (), overrides: Sequence[str] = ()) -> Config:
    """Merge YAML files then ``key=value`` overrides (the order in the module docstring)."""
    merged: Dict[str, Any] = {}
    for p in paths:
        merged = _deep_merge(merged, _upgrade(read_yaml(p)))
    for o in overrides:
        merged = _deep_merge(merged, _upgrade(parse_override(o)))
    try:
        return config_from_dict(merged)
    except ConfigError as err:
        src = ", ".join(str(p) for p in paths) or "<defaults>"
        raise ConfigError(f"{err} (from {src})") from None


def to_dict(cfg: Any) -> Dict[str, Any]:
    """Frozen config -> plain dict (for YAML and JSON)."""
    return dataclasses.asdict(cfg)


RUNTIME_KEYS = ("train.device", "train.log_every", "data.num_workers", "train.threads", "train.keep_freed_memory",
                "train.log", "train.compile", "train.grad_checkpointing")  # how a run executes, not what it computes
# What ``eval`` / ``predict`` / ``export --set`` may change on a finished run: where things are and how
# the run executes, never what was trained (data.* here only says where to read images to score).
SERVING_KEYS = RUNTIME_KEYS + ("model.weights", "data.batch_size", "data.eval_batch_size", "train.amp",
                               "train.extract_amp", "data.root", "data.reader", "data.split_dir",
                               "data.reader_options", "data.max_image_pixels")
# Keys added after runs were recorded: left out of the hash while at their default, so old runs keep theirs.
_HASH_DEFAULTS = {"data.exclude_classes": [], "data.reader_options": {}, "data.subset": None,
                  "data.max_image_pixels": None, "optim.schedule_epochs": None}


def is_key_under(key: str, keys: Sequence[str]) -> bool:
    """Whether dotted ``key`` is one of ``keys`` or inside one of them (``train.log.wandb`` under ``train.log``)."""
    return any(key == k or key.startswith(k + ".") for k in keys)


_LATER_DEFAULTS = {
    "model": {k: v for k, v in dataclasses.asdict(ModelConfig()).items() if k.startswith("text_") or k == "residual_gate"},
    "graph": {"sparse": None, "chunk": 2048, "norm": "symmetric"},
    "gcn": {"init": "zero_last"},
}


def config_hash(cfg: Config) -> str:
    """sha256 of the resolved config without RUNTIME_KEYS: equal hashes mean the same experiment."""
    raw = to_dict(cfg)
    for dotted in RUNTIME_KEYS:
        section, key = dotted.split(".")
        raw[section].pop(key, None)
    for dotted, default in _HASH_DEFAULTS.items():
        section, key = dotted.split(".")
        if raw[section].get(key, default) == default:
            raw[section].pop(key, None)
    for section, defaults in _LATER_DEFAULTS.items():  # likewise for keys added with the class-count scaling
        node = raw["model"] if section == "model" else raw["model"][section]
        for key, default in defaults.items():
            if node.get(key) == default:
                node.pop(key)
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()


def save_config(cfg: Config, path: Union[str, Path]) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def replace(cfg: Any, **changes: Any) -> Any:
    """dataclasses.replace re-exported for frozen configs."""
    return dataclasses.replace(cfg, **changes)


_CHOICES = {
    "train.amp": ("none", "auto", "bf16", "fp16"),
    "train.extract_amp": ("auto", "none", "bf16", "fp16"),
    "train.select": ("val", "last"),
    "train.device": ("auto", "cpu", "cuda"),
    "optim.optimizer": ("sgd", "adamw", "adam"),
    "optim.scheduler": ("cosine", "constant", "onecycle"),
    "tte.views": ("single", "flip", "five_crop", "ten_crop"),
}


GRAPH_NORMS = ("symmetric", "row")  # model.graph.norm (label_graph.py)
GCN_INITS = ("zero_last", "uniform")  # model.gcn.init (gcn.py)


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    for dotted, choices in _CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(f"{dotted}={value!r} is not one of {', '.join(choices)}")
    if cfg.data.resplit_folds and not 0 <= cfg.data.resplit_fold < cfg.data.resplit_folds:
        raise ConfigError(f"data.resplit_fold={cfg.data.resplit_fold} must be in 0..{cfg.data.resplit_folds - 1}")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must be in [0, 1)")
    if cfg.train.select == "val" and cfg.data.val_fraction == 0.0:
        raise ConfigError("train.select=val needs data.val_fraction > 0 (model selection never uses test)")
    if len(set(cfg.data.exclude_classes)) != len(cfg.data.exclude_classes):
        raise ConfigError(f"data.exclude_classes lists a class twice: {cfg.data.exclude_classes}")
    m = cfg.model
    b = m.text_budget
    if (b.classes is not None and b.classes < 1) or b.auto < 1 or m.text_chunk < 1 or m.graph.chunk < 1:
        raise ConfigError("model.text_budget.classes, model.text_budget.auto, model.text_chunk and model.graph.chunk must be >= 1")
    if m.residual_gate is not None and not m.residual_gate > 0:
        raise ConfigError(f"model.residual_gate={m.residual_gate} must be > 0 (or null for no gate)")
    if not 0.0 <= b.hard_fraction <= 1.0 or b.refresh_every < 0:
        raise ConfigError("model.text_budget.hard_fraction must be in [0, 1] and model.text_budget.refresh_every >= 0")
    subset = cfg.data.subset
    if subset is not None and not (0.0 < subset < 1.0 or (subset >= 1 and float(subset).is_integer())):
        raise ConfigError(f"data.subset={subset} must be a whole number of images >= 1 or a fraction in (0, 1)")
    if cfg.data.max_image_pixels is not None and cfg.data.max_image_pixels < 1:
        raise ConfigError(f"data.max_image_pixels={cfg.data.max_image_pixels} must be >= 1 (null: Pillow's default)")
    if cfg.model.prompts.n_ctx < 1:
        raise ConfigError("model.prompts.n_ctx must be >= 1")
    if cfg.train.augment_views < 0:
        raise ConfigError("train.augment_views must be >= 0")
    if cfg.train.refit and cfg.train.select != "val":
        raise ConfigError("train.refit=true refits for the epoch chosen on validation: it needs train.select=val")
    if m.graph.norm not in GRAPH_NORMS or m.gcn.init not in GCN_INITS:
        raise ConfigError(f"model.graph.norm={m.graph.norm!r} must be one of {', '.join(GRAPH_NORMS)} and "
                          f"model.gcn.init={m.gcn.init!r} one of {', '.join(GCN_INITS)}")
    if cfg.optim.schedule_epochs is not None and cfg.optim.schedule_epochs < cfg.train.epochs:
        raise ConfigError(f"optim.schedule_epochs={cfg.optim.schedule_epochs} must be >= train.epochs={cfg.train.epochs} (null: equal)")
    if cfg.train.grad_accum < 1 or cfg.train.epochs < 1:
        raise ConfigError("train.grad_accum and train.epochs must be >= 1")
    for t in cfg.model.templates:
        if "{}" not in t:
            raise ConfigError(f"model.templates entry {t!r} has no '{{}}' placeholder for the class name")
