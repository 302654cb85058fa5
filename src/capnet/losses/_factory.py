"""build_loss: the one place that turns a loss name + options dict into a module."""
from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional, Sequence

from torch import nn

from capnet.errors import CapnetError
from capnet.registry import LOSSES, unknown_options_message

DATA_ARGS = ("class_freq", "train_num", "class_names")  # supplied from the training set, never from options


class LossConfigError(CapnetError, ValueError):
    """A loss option that the named loss does not accept, or missing class statistics."""


def loss_options(name: str) -> list:
    """The option names a registered loss accepts (constructor args minus the data statistics)."""
    params = inspect.signature(LOSSES.get(name)).parameters
    return [p for p in params if p not in DATA_ARGS and p != "self"]


def build_loss(
    name: str,
    options: Optional[Mapping[str, Any]] = None,
    class_freq: Optional[Sequence[int]] = None,
    train_num: Optional[int] = None,
    class_names: Optional[Sequence[str]] = None,
) -> nn.Module:
    """Build LOSSES[name](**options), passing class_freq/train_num/class_names only where the loss asks.

    ``class_names`` is optional (it only names classes in warnings); the counts are required.
    """
    builder = LOSSES.get(name)
    options = dict(options or {})
    valid = loss_options(name)
    message = unknown_options_message(f"loss '{name}'", options, valid)
    if message:
        raise LossConfigError(message)
    params = inspect.signature(builder).parameters
    for arg, value in (("class_freq", class_freq), ("train_num", train_num)):
        if arg in params:
            if value is None:
                raise LossConfigError(f"loss '{name}' needs {arg} from the training set, got None")
            options[arg] = value
    if "class_names" in params and class_names is not None:
        options["class_names"] = list(class_names)
    return builder(**options)
