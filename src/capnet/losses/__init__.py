"""Multi-label losses, registered in LOSSES: bce, focal, db_focal (docs/losses.md)."""
from capnet.losses._factory import LossConfigError, build_loss, loss_options
from capnet.losses.bce import BCELoss
from capnet.losses.db_focal import DistributionBalancedLoss, class_aware_weights
from capnet.losses.focal import FocalLoss

__all__ = [
    "BCELoss",
    "DistributionBalancedLoss",
    "FocalLoss",
    "LossConfigError",
    "build_loss",
    "class_aware_weights",
    "loss_options",
]
