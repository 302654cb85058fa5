"""BitFit (Ben Zaken et al., ACL 2022): train only the tower's own bias terms.

ViT: every bias (attention in/out projections, MLP, LayerNorms). RN50 (ModifiedResNet): its convs
have no bias, so the BatchNorm biases and the attention-pool projection biases. Staged CNN (the
offline VGG): the conv biases of the chosen ``stages`` (default all; ``cached_depth`` = the first
chosen index). The biases stay where they are; this module saves and loads them in its own
state_dict under ``tower.<name>`` so a PEFT checkpoint holds them.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from torch import nn

from capnet.models.peft.base import RESNET, STAGED_CNN, VIT, PEFTError, PEFTMethod, named_biases, resolve_stages
from capnet.registry import PEFT

PREFIX = "tower."


class BitFit(PEFTMethod):
    """Unfreezes bias tensors of the tower; owns no new parameters."""

    name = "bitfit"
    supported = (VIT, RESNET, STAGED_CNN)

    def __init__(self, stages: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        self.stages = None if stages is None else list(stages)
        self._biases: Dict[str, nn.Parameter] = {}  # plain dict: not registered, owned by the tower

    def _patch(self, visual: nn.Module, kind: str) -> None:
        if kind == STAGED_CNN:
            count = len(visual.stages)
            chosen = resolve_stages(self.name, self.stages, count, list(range(count)))
            self.cached_depth = chosen[0]
            found = {
                f"stages.{k}.{name}": p for k in chosen for name, p in named_biases(visual.stages[k])
            }
        else:
            if self.stages is not None:
                raise PEFTError("PEFT method 'bitfit': option 'stages' applies only to staged CNN towers")
            found = dict(named_biases(visual))
        if not found:
            raise PEFTError(f"PEFT method 'bitfit': {type(visual).__name__} has no bias parameters")
        for param in found.values():
            param.requires_grad_(True)
        self._biases = found

    def trainable_parameters(self) -> List[nn.Parameter]:
        """The unfrozen tower biases (BitFit adds nothing of its own)."""
        return super().trainable_parameters() + list(self._biases.values())

    def bias_names(self) -> List[str]:
        """Names of the trained biases, relative to the visual tower."""
        return list(self._biases)

    def _save_to_state_dict(self, destination: Dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, param in self._biases.items():
            destination[prefix + PREFIX + name] = param if keep_vars else param.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:  # noqa: D401 - torch hook
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        for name, param in self._biases.items():
            key = prefix + PREFIX + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value = state_dict[key]
            if value.shape != param.shape:
                error_msgs.append(f"bitfit bias {name}: shape {tuple(value.shape)} != {tuple(param.shape)}")
                continue
            param.data.copy_(value)
        ours = {prefix + PREFIX + name for name in self._biases}
        unexpected_keys[:] = [k for k in unexpected_keys if k not in ours]


@PEFT.register("bitfit")
def bitfit(stages: Optional[Sequence[int]] = None) -> BitFit:
    """BitFit; ``stages`` (0-based ``visual.stages`` indices) only for staged CNN towers."""
    return BitFit(stages=stages)
