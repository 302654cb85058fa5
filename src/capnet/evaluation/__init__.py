"""Scores and metrics of a model over a loader or a whole split (views averaged in logit space),
and the baselines fitted in closed loop on cached final features (``FEATURE_FITS``: the
scikit-learn linear probe, ZS-LP, CLAP, CLAP as its authors fit it), each registered by its model kind's name.

May import ``capnet.features``, ``capnet.models`` (the contract) and ``capnet.runtime``; never
training, serving or the CLI.
"""
from capnet.evaluation import clap_authors, probe, zs_probe  # noqa: F401  (fill FEATURE_FITS)
