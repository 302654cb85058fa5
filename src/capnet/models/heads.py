"""The model contract shared by CAPNET and its baselines, and the baseline heads.

Every model kind (``capnet``, ``linear_probe``, ``zeroshot``, ...) is a ``ClassifierBase``. The
engine (train/, evaluation/, features/, serving/) calls only what this class declares, and
never probes a model for optional attributes: every hook below has a no-op default, so a kind
overrides what it uses. The hooks, in the order a run calls them:

- ``needs_feature_mean`` / ``set_feature_mean``: centring on the training set's mean feature;
- ``set_test_time``: switch the text side between its training and its deployed form;
- ``cached_depth`` / ``forward_features`` / ``forward``: where image work may be cached;
- ``param_groups`` / ``text_parameter_names``: what the optimiser and DDP see;
- per epoch ``start_epoch``; per optimiser step ``step_class_embeddings`` (the text pass all
  micro-batches share), ``around_optimizer_step`` (what the optimiser step must leave as it is) and
  ``after_optimizer_step`` (project parameters back into range);
- ``resume_state`` / ``load_resume_state``: training state beyond weights and optimiser;
- ``run_state`` / ``load_run_state``: non-trainable tensors a saved run needs.

The backbone stays frozen and in eval mode (BatchNorm statistics of RN50/VGG never drift, so
cached features stay valid).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from capnet.errors import CapnetError, check_state
from capnet.models.backbones.base import Backbone

GROUP_NAMES = ("prompts", "gcn", "peft", "head")  # keys param_groups() may return


@dataclass
class StepInputs:
    """What one optimiser step knows before its text pass: the first micro-batch's targets and
    the previous step's logits. Reductions over processes happen only when a model asks, so a
    model that ignores them costs nothing (and under DDP every rank gets the same answers)."""

    targets: torch.Tensor  # (B, C) this step's first micro-batch
    scores: Optional[torch.Tensor] = None  # (B', C) the last step's logits, None at the first step

    def positives(self) -> torch.Tensor:
        """(1, C) positives per class, summed over processes."""
        from capnet.runtime import distributed

        return distributed.all_reduce_sum(self.targets.detach().float().sum(0, keepdim=True))

    def hardness(self) -> Optional[torch.Tensor]:
        """(1, C) the last step's max logit per class, averaged over processes (None at the first step)."""
        from capnet.runtime import distributed

        if self.scores is None:
            return None
        return distributed.all_reduce_sum(self.scores.detach().float().amax(0, keepdim=True)) / distributed.world_size()


def cosine_logits(image_features: torch.Tensor, class_embeddings: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``scale * cos(image, class)`` with ``class_embeddings`` already unit-norm (CAPNET Eq. logits)."""
    image = F.normalize(image_features.to(class_embeddings.dtype), dim=-1)
    return scale * image @ class_embeddings.T


def backbone_logit_scale(backbone: Backbone, default: float) -> float:
    """The backbone's own (CLIP: log-parametrised) logit scale, clamped at 100, else ``default``."""
    value = getattr(backbone, "logit_scale", None)
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().exp().clamp(max=100.0))
    return float(default)


class ModelHooks:
    """The hooks the engine may call on a model, each a no-op by default (module docstring).

    ``ClassifierBase`` inherits them; a model that is not built on a capnet backbone (a test's
    toy) can inherit them too and still meet the engine's contract.
    """

    def class_embeddings(self) -> Optional[torch.Tensor]:
        """(C, D) unit-norm class embeddings of the text branch (None: no text branch)."""
        return None

    def backbone_identity(self) -> Dict[str, object]:
        """Backbone name and weights checksum, recorded with every checkpoint so it is not paired with another."""
        return {}

    def upgrade_state(self, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Trainable tensors saved under an older layout of this model, renamed to today's (identity)."""
        return state

    def text_parameter_names(self) -> List[str]:
        """Trainable parameters used only by ``class_embeddings`` (the text branch), by name."""
        return []

    def needs_feature_mean(self) -> bool:
        """Whether the engine must call ``set_feature_mean`` with the training set's mean feature."""
        return False

    def set_feature_mean(self, mean: torch.Tensor) -> None:
        """Centre image features on ``mean`` (only models whose ``needs_feature_mean`` is true)."""
        raise CapnetError(f"{type(self).__name__} does not centre its image features")

    def set_test_time(self, templates: bool) -> bool:
        """Switch the text side to its deployed form (``tte.templates``) or back; returns the
        previous setting so a caller can restore it. Models without a text side ignore it."""
        return False

    def start_epoch(self, seed: int) -> None:
        """Called before an epoch's first step with a seed that depends only on (train.seed, epoch)."""

    def step_class_embeddings(self, step: StepInputs) -> Optional[torch.Tensor]:
        """The class embeddings of one optimiser step, shared by its micro-batches."""
        return self.class_embeddings()

    def around_optimizer_step(self, optimizer: torch.optim.Optimizer) -> ContextManager[Any]:
        """Entered around each optimiser step: what the step must leave as it is (the budgeted
        CAPNET keeps the prompt rows outside the step's classes, ``lazy_rows.py``); a no-op here."""
        return contextlib.nullcontext()

    def after_optimizer_step(self) -> None:
        """Project parameters back into their range after an optimiser step (no-op by default)."""

    def resume_state(self) -> Dict[str, torch.Tensor]:
        """Training state outside the weights and the optimiser that an exact resume needs."""
        return {}

    def load_resume_state(self, state: Dict[str, torch.Tensor]) -> None:
        """Restore what ``resume_state`` returned."""

    def run_state(self) -> Dict[str, torch.Tensor]:
        """Non-trainable tensors a saved run needs to be rebuilt anywhere, by file key."""
        return {}

    def load_run_state(self, tensors: Dict[str, torch.Tensor]) -> None:
        """Restore the tensors of ``run_state`` (keys this model does not use are ignored)."""



class ClassifierBase(ModelHooks, nn.Module):
    """Frozen backbone + a head; subclasses define the logits and the trainable groups."""

    def __init__(self, backbone: Backbone, peft: Optional[nn.Module] = None) -> None:
        super().__init__()
        # PEFT is registered first so parameters it shares with the backbone are named peft.*.
        self.peft = peft
        self.backbone = backbone
        trainable = {id(p) for p in peft.trainable_parameters()} if peft is not None else set()
        for p in backbone.parameters():
            p.requires_grad_(id(p) in trainable)
        self.backbone.train(False)

    def backbone_identity(self) -> Dict[str, object]:
        """The backbone's name, weights and their sha256 (``BackboneSpec``), and the weights' provenance
        (``spec.extra``: origin, format, QuickGELU, open_clip version; docs/weights.md#provenance)."""
        spec = self.backbone.spec
        provenance = {k: v for k, v in (spec.extra or {}).items() if v is None or isinstance(v, (str, int, float, bool))}
        return {"backbone": spec.name, "backbone_sha256": spec.weights_sha256, "backbone_weights": spec.weights,
                "backbone_provenance": provenance}

    # ------------------------------------------------------------------ forward paths
    def logits_from_image_features(self, image_features: torch.Tensor, class_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, image_dim) final image features -> (B, C) logits."""
        raise NotImplementedError

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, image_dim) through the (possibly PEFT-adapted) image tower."""
        return self.backbone.encode_image(images)

    def forward(self, images: torch.Tensor, class_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, C) logits (``class_embeddings``: reuse a text pass)."""
        return self.logits_from_image_features(self.image_features(images), class_embeddings)

    def forward_features(self, features: torch.Tensor, depth: int,
                         class_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits from ``backbone.image_prefix(images, depth)`` (features cached by the engine)."""
        if depth > self.cached_depth():
            raise CapnetError(f"cannot start at stage {depth}: only {self.cached_depth()} stages are frozen")
        return self.logits_from_image_features(self.backbone.image_suffix(features, depth), class_embeddings)

    def cached_depth(self) -> int:
        """Depth of the frozen visual prefix whose output may be cached."""
        return self.peft.cached_depth if self.peft is not None else self.backbone.num_image_stages

    def train(self, mode: bool = True) -> "ClassifierBase":
        """Train the head (and PEFT modules); the frozen backbone always stays in eval mode."""
        super().train(mode)
        self.backbone.train(False)
        if self.peft is not None:
            self.peft.train(mode)
        return self

    # ------------------------------------------------------------- trainable tensors
    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        """Trainable parameters by optimiser group (keys among GROUP_NAMES, empty ones left out)."""
        raise NotImplementedError

    def _checked_groups(self, groups: Dict[str, List[nn.Parameter]]) -> Dict[str, List[nn.Parameter]]:
        """Drop frozen/empty entries and check every trainable parameter is in exactly one group."""
        out = {k: [p for p in v if p.requires_grad] for k, v in groups.items()}
        out = {k: v for k, v in out.items() if v}
        listed = [id(p) for v in out.values() for p in v]
        trainable = {id(p): n for n, p in self.named_parameters() if p.requires_grad}
        if len(listed) != len(set(listed)) or set(listed) != set(trainable):
            missing = [n for i, n in trainable.items() if i not in set(listed)]
            raise CapnetError(
                f"{type(self).__name__}.param_groups is inconsistent: parameters in no group: {missing}; "
                f"{len(listed) - len(set(listed))} listed twice"
            )
        return out

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """Only the trainable tensors, by stable module path (the tensors share storage)."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Strictly load tensors saved by ``trainable_state_dict`` (CheckpointError on any mismatch)."""
        own = dict((n, p) for n, p in self.named_parameters() if p.requires_grad)
        check_state(own, state, f"trainable state for {type(self).__name__}")
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(state[k].to(device=p.device, dtype=p.dtype))


class ModelForward(nn.Module):
    """``forward(inputs, depth)``: images -> ``model(inputs)``; cached prefix features from stage
    ``depth`` -> ``model.forward_features``. One module, so DDP and torch.compile see one forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, depth: Optional[int] = None,
                class_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        extra = {} if class_embeddings is None else {"class_embeddings": class_embeddings}
        if depth is None:
            return self.model(inputs, **extra)
        return self.model.forward_features(inputs, depth, **extra)


class LinearProbe(ClassifierBase):
    """Baseline: logistic regression on frozen image features, ``W f + b``.

    It is fitted in closed loop by scikit-learn (``capnet.train.probe``: standardised features,
    L2 strength chosen on validation, L-BFGS to convergence) and the standardisation is folded
    into ``W`` and ``b`` (``load_fit``), so the head reads raw features. Logits are float32.
    """

    def __init__(self, backbone: Backbone, num_classes: int) -> None:
        super().__init__(backbone)
        self.fc = nn.Linear(backbone.image_dim, num_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def load_fit(self, coef: np.ndarray, intercept: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> None:
        """Set ``W = coef / scale`` and ``b = intercept - W mean`` (a probe on standardised features)."""
        weight = np.asarray(coef, dtype=np.float64) / np.asarray(scale, dtype=np.float64)[None, :]
        bias = np.asarray(intercept, dtype=np.float64) - weight @ np.asarray(mean, dtype=np.float64)
        if weight.shape != tuple(self.fc.weight.shape):
            raise CapnetError(f"linear probe fit has shape {weight.shape}, the head {tuple(self.fc.weight.shape)}")
        with torch.no_grad():
            self.fc.weight.copy_(torch.from_numpy(weight))
            self.fc.bias.copy_(torch.from_numpy(bias))

    def logits_from_image_features(self, image_features: torch.Tensor, class_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``W f + b`` in float32."""
        with torch.autocast(image_features.device.type, enabled=False):
            return self.fc(image_features.float())

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        """Everything trainable is the head."""
        return self._checked_groups({"head": list(self.fc.parameters())})


class ZeroShot(ClassifierBase):
    """Baseline: fixed template-ensemble class embeddings, the backbone's scale, nothing trained."""

    def __init__(self, backbone: Backbone, class_embeddings: torch.Tensor, logit_scale: float) -> None:
        super().__init__(backbone)
        if backbone.image_dim != backbone.text_dim or not backbone.spec.extra.get("aligned", True):
            raise CapnetError(f"zero-shot needs aligned towers; {backbone.spec.name} has image_dim {backbone.image_dim}, text_dim {backbone.text_dim} and is not aligned")
        self.register_buffer("text_features", F.normalize(class_embeddings.detach().float(), dim=-1))
        self.register_buffer("fixed_logit_scale", torch.tensor(float(logit_scale)))

    def class_embeddings(self) -> torch.Tensor:
        """The fixed unit-norm template-ensemble embeddings."""
        return self.text_features

    def logit_scale(self) -> torch.Tensor:
        """The fixed multiplier on cosine similarities."""
        return self.fixed_logit_scale

    def logits_from_image_features(self, image_features: torch.Tensor, class_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``scale * cos(image, class)`` in float32."""
        emb = self.text_features if class_embeddings is None else class_embeddings
        with torch.autocast(image_features.device.type, enabled=False):
            return cosine_logits(image_features.float(), emb.float(), self.fixed_logit_scale)

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        """No trainable parameters."""
        return self._checked_groups({})


class ZeroShotLinearProbe(ClassifierBase):
    """Baseline: a linear head on L2-normalised image features, initialised at the zero-shot classifier.

    ``logits = s * <f / |f|, w_c> + b_c`` with ``w_c`` starting at the unit zero-shot class
    embedding and ``s`` the zero-shot model's own (fixed) logit scale, so before any fitting the
    head ranks exactly like zero-shot (the ZS-LP of Silva-Rodriguez et al., CVPR 2024, and the
    zero-shot head of WiSE-FT). ``w`` is left unnormalised: its norm is a per-class temperature.
    The per-class bias is the multi-label addition (a sigmoid needs one; a softmax does not).
    It is fitted on cached final features (``capnet.train.zs_probe``), plainly or with
    CLAP's class-adaptive pull towards ``w_zs`` (model kinds ``zs_linear_probe`` and ``clap``).
    """

    def __init__(self, backbone: Backbone, class_embeddings: torch.Tensor, logit_scale: float) -> None:
        super().__init__(backbone)
        if backbone.image_dim != class_embeddings.shape[-1]:
            raise CapnetError(f"a zero-shot-initialised probe needs aligned towers; {backbone.spec.name} has "
                              f"image_dim {backbone.image_dim}, class embeddings {class_embeddings.shape[-1]}-d")
        zs = F.normalize(class_embeddings.detach().float(), dim=-1)
        self.register_buffer("zeroshot_weight", zs.clone())
        self.register_buffer("fixed_logit_scale", torch.tensor(float(logit_scale)))
        self.weight = nn.Parameter(zs.clone())
        self.bias = nn.Parameter(torch.zeros(zs.shape[0]))

    def class_embeddings(self) -> torch.Tensor:
        """The zero-shot class embeddings the head started from (for graphs and open vocabulary)."""
        return self.zeroshot_weight

    def logits_from_image_features(self, image_features: torch.Tensor, class_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``s * <normalise(f), w> + b`` in float32."""
        with torch.autocast(image_features.device.type, enabled=False):
            image = F.normalize(image_features.float(), dim=-1)
            return self.fixed_logit_scale * image @ self.weight.float().T + self.bias.float()

    def load_fit(self, weight: np.ndarray, bias: np.ndarray) -> None:
        """Set the fitted ``w`` (C, D) and ``b`` (C,)."""
        if tuple(weight.shape) != tuple(self.weight.shape) or tuple(bias.shape) != tuple(self.bias.shape):
            raise CapnetError(f"zero-shot probe fit has shapes {weight.shape}/{bias.shape}, the head "
                              f"{tuple(self.weight.shape)}/{tuple(self.bias.shape)}")
        with torch.no_grad():
            self.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
            self.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        """Everything trainable is the head."""
        return self._checked_groups({"head": [self.weight, self.bias]})
