"""Scores and metrics of a model over a loader or a whole split (views averaged in logit space),
and the scikit-learn linear probe.

May import ``capnet.features`` and ``capnet.runtime``; never training, serving or the CLI.
"""
