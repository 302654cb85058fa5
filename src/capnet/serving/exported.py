"""Running a file written by ``capnet export``: read its metadata, preprocess, score, label.

This is the serving side and needs neither the run directory nor the backbone's weights: an
ONNX file runs under onnxruntime, a TorchScript file under ``torch.jit.load``. The preprocessing
is rebuilt from the metadata (resize mode, size, interpolation) and equals the backbone's eval
transform without its normalisation, which the graph does itself.
"""
from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Union

import numpy as np
import torch
from torchvision import transforms as T

from capnet.errors import CheckpointError

METADATA_KEY = "capnet"  # ONNX metadata_props key / TorchScript extra file "capnet.json"


def preprocess_transform(meta: Dict[str, Any]) -> T.Compose:
    """PIL RGB image -> float32 (3, S, S) in [0, 1], as the exported graph expects it."""
    size, mode = int(meta["image_size"]), T.InterpolationMode(meta["interpolation"])
    if meta["resize"] == "whole":
        geo = [T.Resize((size, size), interpolation=mode)]
    else:
        geo = [T.Resize(size, interpolation=mode), T.CenterCrop(size)]
    return T.Compose(geo + [T.ToTensor()])


class ExportedModel:
    """An exported capnet graph: ``scores(batch)`` on preprocessed tensors, ``predict(paths)`` on files."""

    def __init__(self, path: Union[str, Path], threads: int = 0) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such exported model")
        if zipfile.is_zipfile(self.path):
            self.backend = "torchscript"
            extra = {f"{METADATA_KEY}.json": ""}
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
                self._module = torch.jit.load(str(self.path), map_location="cpu", _extra_files=extra)
            raw = extra[f"{METADATA_KEY}.json"]
        else:
            self.backend = "onnxruntime"
            raw = self._open_onnx(threads)
        if not raw:
            raise CheckpointError(f"{self.path}: no capnet metadata; was it written by `capnet export`?")
        self.meta: Dict[str, Any] = json.loads(raw)
        self.classes: List[str] = list(self.meta["classes"])
        self.thresholds = np.asarray(self.meta["thresholds"], dtype=np.float64)
        self.transform = preprocess_transform(self.meta)

    def _open_onnx(self, threads: int) -> str:
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise CheckpointError(f"{self.path}: running an ONNX export needs onnxruntime: "
                                  f"pip install 'capnet[export]'") from err
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self._session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types
            raise CheckpointError(f"{self.path}: not a readable ONNX model ({str(err).splitlines()[0]})") from None
        self._input = self._session.get_inputs()[0].name
        return self._session.get_modelmeta().custom_metadata_map.get(METADATA_KEY, "")

    def scores(self, images: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
        """(N, 3, S, S) float32 in [0, 1] -> (N, C) sigmoid scores."""
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        images = np.ascontiguousarray(images, dtype=np.float32)
        if self.backend == "torchscript":
            with torch.inference_mode():
                return self._module(torch.from_numpy(images)).numpy()
        return self._session.run(None, {self._input: images})[0]

    def predict(self, paths: Sequence[Union[str, Path]], batch_size: int = 16) -> Iterator[Dict[str, Any]]:
        """One dict per image, shaped like ``capnet predict``'s lines (labels, scores)."""
        from capnet.data import load_image

        for start in range(0, len(paths), batch_size):
            chunk = list(paths[start:start + batch_size])
            batch = torch.stack([self.transform(load_image(p)) for p in chunk])
            for path, p in zip(chunk, self.scores(batch).astype(np.float64)):
                yield {"image": str(path),
                       "labels": [c for c, s, t in zip(self.classes, p, self.thresholds) if s >= t],
                       "scores": {c: round(float(s), 6) for c, s in zip(self.classes, p)}}


def load_exported(path: Union[str, Path], threads: int = 0) -> ExportedModel:
    """Open an ONNX or TorchScript file written by ``capnet export`` (format found from the file)."""
    return ExportedModel(path, threads)
