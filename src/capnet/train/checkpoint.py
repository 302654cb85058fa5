"""Checkpoints as safetensors files, written atomically; ``torch.load`` is never used.

Tensors (trainable weights, EMA weights, optimizer state tensors, torch RNG state) are stored
under prefixed names (``model.``, ``ema.``, ``optim.<param>.<key>``, ``rng.``); everything
else (optimizer hyper-parameters, scheduler and grad-scaler state, python/numpy RNG state,
epoch, metrics, config) is one JSON document in the safetensors metadata under ``capnet``.
A write goes to a temporary file in the same directory, is fsync'ed, then ``os.replace``d over
the target, so a crash mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import nn

from capnet.errors import CheckpointError
from capnet.fileio import atomic_write_bytes

FORMAT = "capnet-checkpoint-v1"
PathLike = Union[str, Path]


# --------------------------------------------------------------- raw file I/O

def save_file(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], path: PathLike) -> None:
    """Atomically save tensors plus a JSON-able ``meta`` dict as one safetensors file."""
    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {"format": FORMAT, "capnet": json.dumps(meta, sort_keys=True)}
    atomic_write_bytes(st_save(clean, metadata=header), path)


def load_file(path: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read a file written by :func:`save_file` -> (tensors on CPU, meta)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            header = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({err})") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a capnet checkpoint (format={header.get('format')!r})")
    return tensors, json.loads(header.get("capnet", "{}"))


def split_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """The tensors whose names start with ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def with_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """Prefix every tensor name."""
    return {prefix + k: v for k, v in tensors.items()}


# ---------------------------------------------------------- weights <-> model

def check_compatible(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], path: PathLike) -> None:
    """Raise CheckpointError naming the file and every missing / unexpected / mis-shaped key."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(found))
        if tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if shapes:
            parts.append(f"shape mismatches [{'; '.join(shapes)}]")
        raise CheckpointError(f"{path}: does not match the model: " + ", ".join(parts))


def save_weights(model: Any, path: PathLike, meta: Optional[Mapping[str, Any]] = None,
                 state: Optional[Mapping[str, torch.Tensor]] = None) -> None:
    """Save the trainable weights (``state`` or the model's own) with the backbone identity."""
    weights = dict(state) if state is not None else model.trainable_state_dict()
    save_file(with_prefix(weights, "model."), {**model_identity(model), **(meta or {})}, path)


def load_weights(model: Any, path: PathLike) -> Dict[str, Any]:
    """Load trainable weights saved by :func:`save_weights` into ``model``; returns the meta."""
    tensors, meta = load_file(path)
    weights = model.upgrade_state(split_prefix(tensors, "model."))
    check_compatible(model.trainable_state_dict(), weights, path)
    model.load_trainable_state_dict(weights)
    return meta


def model_identity(model: Any) -> Dict[str, Any]:
    """Backbone name and weights checksum, recorded so a checkpoint is not paired with another."""
    return dict(model.backbone_identity())


# ------------------------------------------------------------ optimizer state

def flatten_optimizer(opt_state: Mapping[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """``optimizer.state_dict()`` -> (tensors named ``optim.<param>.<key>``, JSON rest)."""
    tensors: Dict[str, torch.Tensor] = {}
    scalars: Dict[str, Dict[str, Any]] = {}
    for pid, pstate in opt_state["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Dict[str, Any]:
    """Inverse of :func:`flatten_optimizer` (ready for ``optimizer.load_state_dict``)."""
    state: Dict[int, Dict[str, Any]] = {}
    for name, value in split_prefix(tensors, "optim.").items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in meta["param_groups"]]  # JSON turned tuples (Adam betas) into lists
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------- full training state

def save_training_state(path: PathLike, *, model: Any, optimizer: Any, scheduler: Any = None,
                        scaler: Any = None, ema: Any = None, progress: Optional[Mapping[str, Any]] = None) -> None:
    """Everything ``resume`` needs: weights, optimizer, scheduler, scaler, EMA, RNG, progress."""
    from capnet.runtime.seed import rng_state

    opt_tensors, opt_meta = flatten_optimizer(optimizer.state_dict())
    rng_tensors, rng_meta = rng_state()
    tensors = {**with_prefix(model.trainable_state_dict(), "model."), **opt_tensors, **rng_tensors}
    if ema is not None:
        tensors.update(with_prefix(ema.state_dict(), "ema."))
    tensors.update(with_prefix(model.resume_state(), "resume."))  # e.g. a budgeted text branch's owed gradient
    meta = {
        **model_identity(model),
        "optimizer": opt_meta,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": rng_meta,
        "progress": dict(progress or {}),
    }
    save_file(tensors, meta, path)


def load_training_state(path: PathLike, *, model: Any, optimizer: Any, scheduler: Any = None,
                        scaler: Any = None, ema: Any = None) -> Dict[str, Any]:
    """Restore what :func:`save_training_state` wrote (in place); returns its ``progress`` dict."""
    from capnet.runtime.seed import set_rng_state

    tensors, meta = load_file(path)
    weights = model.upgrade_state(split_prefix(tensors, "model."))
    check_compatible(model.trainable_state_dict(), weights, path)
    model.load_trainable_state_dict(weights)
    if ema is not None:
        averages = model.upgrade_state(split_prefix(tensors, "ema."))
        if not averages:
            raise CheckpointError(f"{path}: has no EMA weights but train.ema is set (resume with the same config)")
        check_compatible(ema.state_dict(), averages, path)
        ema.load_state_dict(averages)
    try:
        optimizer.load_state_dict(unflatten_optimizer(tensors, meta["optimizer"]))
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: optimizer state does not match this model's parameter groups ({err})") from None
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    if scaler is not None and meta.get("scaler") is not None:
        scaler.load_state_dict(meta["scaler"])
    model.load_resume_state(split_prefix(tensors, "resume."))
    set_rng_state(split_prefix(tensors, ""), meta["rng"])
    return meta["progress"]


SPARSE_PARTS = (".indices", ".values", ".shape")  # a sparse tensor (the label graph above 2,000 classes) is saved as these


def extra_state(model: Any) -> Dict[str, torch.Tensor]:
    """The model's ``run_state`` as dense tensors (safetensors holds dense tensors only)."""
    out = {}
    for key, tensor in model.run_state().items():
        if tensor.is_sparse:
            tensor = tensor.detach().cpu().coalesce()
            out.update({key + ".indices": tensor.indices().contiguous(), key + ".values": tensor.values().contiguous(),
                        key + ".shape": torch.tensor(tensor.shape)})
        else:
            out[key] = tensor.detach().cpu().contiguous()
    return out


# The keys of run state a model.safetensors may hold beside the trained ``model.*`` weights
# (``ClassifierBase.run_state``: label graph, feature mean, residual gate).
RUN_STATE = ("graph.adjacency", "model.feature_mean", "model.residual_gate")
EXTRA_STATE_KEYS = RUN_STATE + tuple(key + part for key in RUN_STATE for part in SPARSE_PARTS)


def save_model(model: nn.Module, path: Path, classes: Sequence[str],
               statistics: Optional[Dict[str, Any]] = None) -> None:
    """model.safetensors: trainable tensors + extra state, backbone identity (and the training
    statistics) in the metadata."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.trainable_state_dict().items()}
    tensors.update(extra_state(model))
    meta = {**model_identity(model), "classes": list(classes), **(statistics or {})}
    save_file(tensors, meta, path)


def load_extra_state(model: Any, tensors: Dict[str, torch.Tensor]) -> None:
    """Restore what ``extra_state`` saved (sparse tensors reassembled) through ``load_run_state``."""
    state: Dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.endswith(".indices") and key[: -len(".indices")] + ".values" in tensors:
            base = key[: -len(".indices")]
            shape = tuple(int(n) for n in tensors[base + ".shape"])
            state[base] = torch.sparse_coo_tensor(value, tensors[base + ".values"].float(), shape).coalesce()
        elif not key.endswith(SPARSE_PARTS):
            state[key] = value
    model.load_run_state(state)
