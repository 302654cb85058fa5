"""The run file format, one module for the training that writes it and the serving that reads it.

A capnet file is a safetensors file, written atomically (``fileio``), with one JSON document in
its metadata under ``capnet``; ``torch.load`` is never used. A run directory holds:

* ``model.safetensors`` (:func:`save_model`): the trainable tensors as ``model.<name>``, the
  model's ``run_state`` (label graph, dense or as indices/values/shape; feature mean; residual
  gate), and in the metadata the backbone's identity and provenance, the class names and the
  training statistics (class counts, head/medium/tail);
* ``split_ids.json`` and ``test_scores.npz`` (:func:`write_run_record`): the image ids of every
  split as the run used them (val is what every choice was made on, train what it was fitted
  on) and the per-image test logits, so a benchmark can prove that no test image reached a
  choice and pool out-of-fold predictions image by image (``benchmarks/ablation.py``).

Training checkpoints (``best`` / ``last``, ``train/checkpoint.py``) use the same file format.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from capnet.errors import CheckpointError
from capnet.fileio import atomic_write_bytes

PathLike = Union[str, Path]

FORMAT = "capnet-checkpoint-v1"


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

def model_identity(model: Any) -> Dict[str, Any]:
    """Backbone name and weights checksum, recorded so a checkpoint is not paired with another."""
    return dict(model.backbone_identity())


# ---------------------------------------------------------- the run's model file

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


def save_model(model: Any, path: Path, classes: Sequence[str],
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


# ------------------------------------------------------ what the run saw and scored

SPLIT_IDS = "split_ids.json"
TEST_SCORES = "test_scores.npz"


def write_run_record(run_dir: Path, ds: Any, logits: np.ndarray, targets: np.ndarray) -> None:
    """Write ``split_ids.json`` and ``test_scores.npz`` into ``run_dir`` (atomically)."""
    run_dir = Path(run_dir)
    ids = {name: list(map(str, split.image_ids)) for name, split in ds.splits.items()}
    atomic_write_bytes(json.dumps(ids).encode(), run_dir / SPLIT_IDS)
    buf = io.BytesIO()
    np.savez(buf, ids=np.asarray(ids["test"]), logits=np.asarray(logits, dtype=np.float32),
             targets=np.asarray(targets, dtype=np.float32), classes=np.asarray(list(ds.classes)))
    atomic_write_bytes(buf.getvalue(), run_dir / TEST_SCORES)


def read_split_ids(run_dir: Path) -> Dict[str, List[str]]:
    """split name -> image ids, as written by :func:`write_run_record`."""
    return json.loads((Path(run_dir) / SPLIT_IDS).read_text())


def read_test_scores(run_dir: Path) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """(test ids, (N, C) logits, (N, C) targets) of a run."""
    with np.load(Path(run_dir) / TEST_SCORES, allow_pickle=False) as z:
        return [str(i) for i in z["ids"]], z["logits"], z["targets"]
