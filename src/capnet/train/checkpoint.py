"""Training checkpoints (``best.safetensors``, ``last.safetensors``) in the run file format
(``capnet.run_files``: safetensors written atomically, ``torch.load`` never used).

Tensors (trainable weights, EMA weights, optimizer state tensors, torch RNG state) are stored
under prefixed names (``model.``, ``ema.``, ``optim.<param>.<key>``, ``rng.``); everything
else (optimizer hyper-parameters, scheduler and grad-scaler state, python/numpy RNG state,
epoch, metrics, config) is one JSON document in the safetensors metadata under ``capnet``.
A write goes to a temporary file in the same directory, is fsync'ed, then ``os.replace``d over
the target, so a crash mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from capnet.errors import CheckpointError, check_state
from capnet.run_files import load_file, model_identity, save_file, split_prefix, with_prefix

PathLike = Union[str, Path]


def save_weights(model: Any, path: PathLike, meta: Optional[Mapping[str, Any]] = None,
                 state: Optional[Mapping[str, torch.Tensor]] = None) -> None:
    """Save the trainable weights (``state`` or the model's own) with the backbone identity."""
    weights = dict(state) if state is not None else model.trainable_state_dict()
    save_file(with_prefix(weights, "model."), {**model_identity(model), **(meta or {})}, path)


def load_weights(model: Any, path: PathLike) -> Dict[str, Any]:
    """Load trainable weights saved by :func:`save_weights` into ``model``; returns the meta."""
    tensors, meta = load_file(path)
    weights = model.upgrade_state(split_prefix(tensors, "model."))
    check_state(model.trainable_state_dict(), weights, path)
    model.load_trainable_state_dict(weights)
    return meta


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
    check_state(model.trainable_state_dict(), weights, path)
    model.load_trainable_state_dict(weights)
    if ema is not None:
        averages = model.upgrade_state(split_prefix(tensors, "ema."))
        if not averages:
            raise CheckpointError(f"{path}: has no EMA weights but train.ema is set (resume with the same config)")
        check_state(ema.state_dict(), averages, path)
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


