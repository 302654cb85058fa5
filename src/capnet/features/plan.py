"""``FeaturePlan``: how a run turns images into model inputs, resolved once from the config.

The callers at the top (``capnet.experiment``, ``capnet.serving``) build one with
``capnet.plans.feature_plan``; features/ and evaluation/ read only these plain values, never the
whole config.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from capnet.runtime.stopwatch import Stopwatch


@dataclass(frozen=True)
class FeaturePlan:
    """Everything between an image file and the model's input."""

    cached_depth: int  # frozen image stages whose output is cached (0: images through the whole tower every time)
    views: str  # test-time image views of val/test (tte.views): single | flip | five_crop | ten_crop
    resize_scale: float  # enlargement before cropping views (tte.resize_scale)
    batch_size: int  # global training batch (data.batch_size; each of N processes loads batch_size // N)
    eval_batch_size: int  # batch of feature extraction and scoring
    num_workers: int  # JPEG-decoding DataLoader workers (resolved for this machine)
    extract_amp: str  # precision of the frozen prefix (resolved for the device): none | bf16 | fp16
    augment_views: int  # cached random augmentations per training image, beside the eval view
    augment_seed: int  # their seed (fixed across training seeds so caches are shared)
    seed: int  # loader order and sampled views (train.seed)
    device: torch.device
    cache_dir: Optional[Path] = None  # on-disk feature cache (None: features held in memory)
    stopwatch: Optional[Stopwatch] = None  # counts the image-tower work for the report
