"""PEFT methods for the visual tower, registered in PEFT (see base.py for the contract)."""
from capnet.models.peft import adaptformer, bitfit, conv_adapter, lora, vpt  # noqa: F401  (registration)
from capnet.models.peft.base import PEFTError, PEFTMethod, apply_peft, count_trainable, peft_options, tower_kind

__all__ = ["PEFTError", "PEFTMethod", "apply_peft", "count_trainable", "peft_options", "tower_kind"]
