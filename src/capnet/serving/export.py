"""``capnet export``: one graph from image to per-class sigmoid scores, for serving without capnet.

After training, CAPNET's text branch (prompts, template ensemble, label graph, GCN, projections,
class residual) yields fixed tensors. :class:`ExportGraph` computes them once and keeps them as
a constant, so the exported file holds only the image tower and the cosine head: no text
encoder, no tokenizer. Input: float32 RGB ``(N, 3, S, S)`` in [0, 1], already resized as the
metadata says (``resize``: ``whole`` = the whole image to S x S, ``crop`` = short side to S then
centre crop); the mean/std normalisation is inside. Output: ``(N, C)`` sigmoid scores, the mean
of the views' logits first when flip TTE is folded in (as ``capnet predict`` does).

Formats are registered by name (``EXPORT_FORMATS``): ``onnx`` (``torch.onnx.export``, dynamic
batch, metadata in ``metadata_props``) and ``torchscript`` (``torch.jit.trace`` + freeze,
metadata as the extra file ``capnet.json``). Both are written atomically.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from capnet import __version__
from capnet.config import config_hash
from capnet.errors import CapnetError
from capnet.plans import feature_plan
from capnet.fileio import atomic_write_bytes
from capnet.registry import Registry
from capnet.serving.exported import METADATA_KEY
from capnet.serving.run import ADDED_THRESHOLD_POLICY, LoadedRun

EXPORT_FORMATS = Registry("export format")
EXPORT_TTE = ("none", "flip")  # what can be folded into one graph (crops need the full-size image)
INPUT_NAME, OUTPUT_NAME = "images", "scores"


class ExportGraph(nn.Module):
    """Images in [0, 1] -> sigmoid scores through a trained model with its class embeddings fixed."""

    def __init__(self, model: nn.Module, mean: List[float], std: List[float], flip: bool, depth: int = 0) -> None:
        super().__init__()
        self.model = model
        self.flip = bool(flip)
        self.depth = int(depth)  # the cacheable frozen prefix, rounded to float16 as the cache stores it
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        with torch.no_grad():
            emb = model.class_embeddings()
        self.register_buffer("class_embeddings", None if emb is None else emb.detach().float().clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean) / self.std
        n = x.shape[0]
        if self.flip:
            x = torch.cat([x, x.flip(-1)], dim=0)
        if self.depth > 0:  # the run's scores were computed from stored prefix features: round the same way
            feats = self.model.backbone.image_prefix(x, self.depth)
            half = feats.to(torch.float16).float()
            feats = torch.where(torch.isfinite(half), half, feats)
            logits = self.model.forward_features(feats, self.depth, self.class_embeddings)
        else:
            logits = self.model.logits_from_image_features(self.model.image_features(x), self.class_embeddings)
        if self.flip:
            logits = (logits[:n] + logits[n:]) / 2
        return torch.sigmoid(logits.float())


def resolve_tte(run: LoadedRun, tte: Optional[str]) -> str:
    """``none`` or ``flip``: the asked one, else the run's own views when one graph can hold them."""
    if tte is not None:
        if tte not in EXPORT_TTE:
            raise CapnetError(f"--tte {tte!r}: an exported graph can fold in {' or '.join(EXPORT_TTE)}")
        return tte
    views = run.cfg.tte.views
    if views in ("single", "flip"):
        return "none" if views == "single" else "flip"
    raise CapnetError(f"the run tests with tte.views={views} (crops of an enlarged image), which one fixed-size "
                      f"input cannot hold; pass --tte none or --tte flip")


def resize_mode(run: LoadedRun) -> str:
    """How the image becomes S x S before the graph: the backbone's eval transform, by name."""
    return str(run.model.backbone.spec.extra.get("resize", "crop"))  # CLIP: resize + centre crop


def export_metadata(run: LoadedRun, tte: str, run_dir: Optional[Path]) -> Dict[str, Any]:
    """Everything a server needs to feed the graph and read its output, plus where it came from."""
    spec = run.model.backbone.spec
    meta: Dict[str, Any] = {
        "format_version": 1,
        "capnet_version": __version__,
        "classes": list(run.classes),
        "thresholds": [round(float(t), 6) for t in run.thresholds],
        "image_size": int(spec.image_size),
        "resize": resize_mode(run),
        "interpolation": spec.interpolation,
        "mean": [float(v) for v in spec.mean],
        "std": [float(v) for v in spec.std],
        "tte": tte,
        "input": f"{INPUT_NAME}: float32 (N, 3, {spec.image_size}, {spec.image_size}) RGB in [0, 1], resized "
                 f"({resize_mode(run)}) but not normalised",
        "output": f"{OUTPUT_NAME}: float32 (N, {len(run.classes)}) sigmoid scores in class order",
        "backbone": spec.name,
        "backbone_sha256": spec.weights_sha256,
        "model": run.cfg.model.kind,
        "source_run": None if run_dir is None else str(Path(run_dir).resolve()),
        "config_hash": run.config_sha256 or config_hash(run.cfg),
    }
    if run.added_classes:
        meta["added_classes"] = list(run.added_classes)
        meta["added_threshold_policy"] = ADDED_THRESHOLD_POLICY
    return meta


def build_graph(run: LoadedRun, tte: str) -> ExportGraph:
    """The eval-mode, CPU, float32 graph of ``run`` (test-time templates applied as in predict).

    The graph is float32 throughout; a run whose features were extracted in bf16
    (``train.extract_amp``) scores slightly differently in predict, which follows the run's own
    precision (``runtime.precision``): export such a run from ``train.extract_amp=none`` for parity.
    """
    run.model.set_test_time(run.cfg.tte.templates)
    model = run.model.to("cpu").float().eval()
    spec = model.backbone.spec
    return ExportGraph(model, list(spec.mean), list(spec.std), flip=(tte == "flip"),
                       depth=feature_plan(run.cfg, model, run.device).cached_depth).eval()


@contextlib.contextmanager
def _quiet_transformers():
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def example_input(size: int, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


@EXPORT_FORMATS.register("torchscript")
def export_torchscript(graph: ExportGraph, meta: Dict[str, Any], out: Path) -> None:
    """``torch.jit.trace`` then ``torch.jit.freeze`` (weights become constants; unused towers drop)."""
    with torch.no_grad(), warnings.catch_warnings(), _quiet_transformers():
        # torch.jit is deprecated but still what C++ / TorchServe load; tracing visits every
        # submodule, so the (unused) MiniLM's deprecated properties warn too.
        warnings.filterwarnings("ignore", category=FutureWarning)
        traced = torch.jit.trace(graph, example_input(meta["image_size"]), check_trace=False)
        frozen = torch.jit.freeze(traced)
        buf = io.BytesIO()
        torch.jit.save(frozen, buf, _extra_files={f"{METADATA_KEY}.json": json.dumps(meta)})
    atomic_write_bytes(buf.getvalue(), out)


@EXPORT_FORMATS.register("onnx")
def export_onnx(graph: ExportGraph, meta: Dict[str, Any], out: Path) -> None:
    """``torch.onnx.export`` (dynamo) with a dynamic batch axis; metadata in ``metadata_props``."""
    try:
        import onnx
    except ImportError as err:
        raise CapnetError("ONNX export needs the onnx packages: pip install 'capnet[export]'") from err
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        batch = torch.export.Dim("batch", min=1)
        with torch.no_grad():
            torch.onnx.export(graph, (example_input(meta["image_size"]),), str(path), input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], dynamic_shapes={"images": {0: batch}},
                              dynamo=True, external_data=False, verbose=False)
        proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    proto.doc_string = f"capnet {__version__} export of {meta['source_run'] or 'a run'}: {meta['output']}"
    atomic_write_bytes(proto.SerializeToString(), out)


def export_run(run: LoadedRun, fmt: str, out: Path, tte: Optional[str] = None,
               run_dir: Optional[Path] = None) -> Dict[str, Any]:
    """Write ``run`` as ``fmt`` to ``out``; returns the metadata stored in the file."""
    if fmt not in EXPORT_FORMATS.names():
        raise CapnetError(f"unknown export format {fmt!r}; choose {' or '.join(EXPORT_FORMATS.names())}")
    writer: Callable[[ExportGraph, Dict[str, Any], Path], None] = EXPORT_FORMATS.get(fmt)
    tte = resolve_tte(run, tte)
    meta = export_metadata(run, tte, run_dir)
    graph = build_graph(run, tte)
    writer(graph, meta, Path(out))  # atomic_write_bytes makes the parent folder
    return meta
