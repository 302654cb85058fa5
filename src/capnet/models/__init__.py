"""CAPNET and its parts. Importing this package fills BACKBONES, PEFT, GRAPHS and MODEL_KINDS.

``heads.ClassifierBase`` is the contract with the engine: every hook the training loop,
evaluation, the feature cache and serving call is declared there with a no-op default.
``text_bank.BudgetedCAPNET`` is CAPNET with a per-step class budget (large class counts only);
its lazy optimiser step for the rows outside a step's classes is ``lazy_rows.KeepRows``.
A model knows no training loop and no config beyond what ``build.py`` hands it.
"""
from capnet.models import backbones, peft  # noqa: F401  (register backbones and PEFT methods)
from capnet.models import label_graph  # noqa: F401  (registers the GRAPHS sources)
from capnet.models.build import MODEL_KINDS, build_model
from capnet.models import clap_authors  # noqa: F401,E402  (registers the clap_authors kind)
from capnet.models.capnet import CAPNET
from capnet.models.gcn import GCN
from capnet.models.heads import ClassifierBase, LinearProbe, ZeroShot
from capnet.models.prompts import PromptLearner
from capnet.models.tte import build_view_transform, tte_logits, view_transform

__all__ = [
    "CAPNET",
    "GCN",
    "MODEL_KINDS",
    "ClassifierBase",
    "LinearProbe",
    "PromptLearner",
    "ZeroShot",
    "build_model",
    "build_view_transform",
    "tte_logits",
    "view_transform",
]
