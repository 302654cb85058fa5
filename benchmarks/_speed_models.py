"""Model set-up for the speed benchmark: CAPNET, its bare-encoder twin, steps and class sets.

The bare encoder shares CAPNET's backbone *and* its PEFT module (same hooks, same trainable
tensors), adds a linear head on the L2-normalised image features and trains with the same
loss and optimiser recipe, so the difference between the two is exactly CAPNET's text branch
(prompts through the text tower, graph, GCN) and its cosine head.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from capnet.config import Config, load_config
from capnet.runtime.precision import autocast
from capnet.train.optim import build_optimizer
from capnet.losses import build_loss
from capnet.models import build_model

REPO = Path(__file__).resolve().parents[1]
# backbone -> (model recipe YAML, PEFT method the recipe uses for that tower)
ARCHS: Dict[str, Tuple[str, str]] = {
    "clip_vit_b16.openai": ("configs/model/clip_vit_b16.yaml", "adaptformer"),
    "clip_rn50.openai": ("configs/model/clip_rn50.yaml", "bitfit"),
    "clip_tiny_vit.random": ("configs/model/clip_vit_b16.yaml", "adaptformer"),
    "clip_tiny_rn.random": ("configs/model/clip_rn50.yaml", "bitfit"),
}
CLASS_FILES = {20: "data/splits/voc_lt/classes.txt", 80: "data/splits/coco_lt/classes.txt"}


@dataclasses.dataclass(frozen=True)
class ClassSet:
    """Class names with a synthetic long-tailed count profile (the loss needs counts)."""

    names: List[str]
    class_freq: List[int]
    train_num: int


def class_set(num_classes: int) -> ClassSet:
    """VOC (20) / COCO (80) names from the shipped splits, ImageNet names for 1000, else 'class i'."""
    path = REPO / CLASS_FILES[num_classes] if num_classes in CLASS_FILES else None
    if path is not None and path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    elif num_classes == 1000:
        from torchvision.models import ResNet50_Weights  # category names ship with torchvision

        names = list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    else:
        names = [f"class {i}" for i in range(num_classes)]
    freq = [max(2, int(1000 * (i + 1) ** -1.0)) for i in range(len(names))]  # Zipf-like tail
    return ClassSet(names, freq, train_num=4 * sum(freq))


def model_config(arch: str, peft: Optional[str], image_size: Optional[int], extra: Sequence[str] = ()) -> Config:
    """The shipped recipe for ``arch`` with random weights, optionally another PEFT / input size
    and further ``key=value`` overrides (``extra``)."""
    if arch not in ARCHS:
        raise SystemExit(f"speed: no recipe for backbone '{arch}'; choose from {', '.join(ARCHS)}")
    recipe, default_peft = ARCHS[arch]
    overrides = [f"model.backbone={arch}", "model.weights=random", f"model.peft.method={peft or default_peft}"]
    if image_size is not None:
        overrides.append(f"model.backbone_options={{image_size: {int(image_size)}}}")
    return load_config([REPO / recipe], overrides + list(extra))


class BareEncoder(nn.Module):
    """The visual tower (with CAPNET's PEFT module) + a linear head: the baseline CAPNET is timed against."""

    def __init__(self, backbone: nn.Module, peft: Optional[nn.Module], num_classes: int) -> None:
        super().__init__()
        self.backbone, self.peft = backbone, peft
        self.fc = nn.Linear(backbone.image_dim, num_classes).to(backbone.device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C) logits of a linear head on unit-norm image features."""
        return self.fc(F.normalize(self.backbone.encode_image(images).float(), dim=-1))

    def train(self, mode: bool = True) -> "BareEncoder":
        """Like CAPNET: the frozen backbone stays in eval mode (BatchNorm statistics fixed)."""
        super().train(mode)
        self.backbone.train(False)
        return self

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        """The PEFT tensors CAPNET trains plus this head."""
        peft = list(self.peft.trainable_parameters()) if self.peft is not None else []
        return {k: v for k, v in (("peft", peft), ("head", list(self.fc.parameters()))) if v}


@dataclasses.dataclass
class Pair:
    """CAPNET and its bare twin on one device, with their optimisers and the shared loss."""

    cfg: Config
    classes: ClassSet
    capnet: nn.Module
    bare: BareEncoder
    loss: nn.Module
    optimizers: Dict[str, torch.optim.Optimizer]


def _optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """The engine's optimiser over ``model.param_groups()`` (lr scales of absent groups dropped)."""
    groups = model.param_groups()
    scales = {k: v for k, v in cfg.optim.lr_scale.items() if k in groups}
    return build_optimizer(groups, dataclasses.replace(cfg.optim, lr_scale=scales))


def build_pair(arch: str, num_classes: int, device: torch.device, peft: Optional[str], image_size: Optional[int],
               extra: Sequence[str] = ()) -> Pair:
    """Build CAPNET (shipped recipe, random weights, ``extra`` overrides) for ``num_classes`` and its bare twin."""
    cfg = model_config(arch, peft, image_size, extra)
    classes = class_set(num_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "random weights: features are meaningless" is the point here
        capnet = build_model(cfg, classes.names, None).to(device)
    bare = BareEncoder(capnet.backbone, capnet.peft, num_classes)
    loss = build_loss(cfg.loss.name, cfg.loss.options, classes.class_freq, classes.train_num).to(device)
    optimizers = {"capnet": _optimizer(capnet, cfg), "bare": _optimizer(bare, cfg)}
    return Pair(cfg, classes, capnet, bare, loss, optimizers)


def trainable_count(model: nn.Module) -> int:
    """Trainable scalars in ``model.param_groups()`` (shared tensors counted once)."""
    seen = {id(p): p.numel() for ps in model.param_groups().values() for p in ps}
    return sum(seen.values())


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
               images: torch.Tensor, targets: torch.Tensor, amp: str) -> Callable[[], None]:
    """One engine-style step: zero grads, autocast forward, float32 loss, backward, optimiser step."""
    device = images.device

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            logits = model(images)
        loss_fn(logits.float(), targets).backward()
        optimizer.step()

    return step


def capnet_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, images: torch.Tensor,
                targets: torch.Tensor, amp: str, seed: int = 0) -> Callable[[], None]:
    """``train_step`` the way the training loop drives CAPNET: ``model.step_class_embeddings``
    (exact, or the budgeted subset ranked by the previous step's logits), then the logits on those
    embeddings; a budgeted step keeps the rows outside its subset through the optimiser step
    (``around_optimizer_step``, a no-op for the exact model)."""
    from capnet.models.heads import StepInputs

    device, state = images.device, {"scores": None}
    with torch.no_grad(), autocast(device, amp):
        model.start_epoch(seed)  # the epoch's class-sampling generator (and, budgeted, a full bank)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            emb = model.step_class_embeddings(StepInputs(targets, state["scores"]))
            logits = model(images, emb)
        loss_fn(logits.float(), targets).backward()
        with model.around_optimizer_step(optimizer):
            optimizer.step()
        state["scores"] = logits.detach()

    return step


def branch_steps(capnet: nn.Module, images: torch.Tensor, amp: str) -> Dict[str, Callable[[], None]]:
    """Forward + backward of CAPNET's text branch alone and of its image branch alone."""
    device = images.device
    with torch.no_grad():
        text_grad = torch.randn_like(capnet.class_embeddings().float())
        image_grad = torch.randn_like(capnet.image_features(images[:1]).float()).expand(images.shape[0], -1)

    def text() -> None:
        capnet.zero_grad(set_to_none=True)
        with autocast(device, amp):
            emb = capnet.class_embeddings()
        (emb.float() * text_grad).sum().backward()

    def image() -> None:
        capnet.zero_grad(set_to_none=True)
        with autocast(device, amp):
            feats = capnet.image_features(images)
        (feats.float() * image_grad).sum().backward()

    return {"text_branch": text, "image_branch": image}


def batch(num: int, num_classes: int, image_size: int, device: torch.device, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random normalised images and multi-hot targets (about 3 positives per image)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(num, 3, image_size, image_size, generator=gen)
    targets = (torch.rand(num, num_classes, generator=gen) < min(0.5, 3.0 / num_classes)).float()
    return images.to(device), targets.to(device)
