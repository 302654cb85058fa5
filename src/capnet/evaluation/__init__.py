"""Scores and metrics of a model over a loader or a whole split (views averaged in logit space):
what validation, thresholds, test, ``capnet eval`` and the benchmarks all judge.

May import ``capnet.features``, ``capnet.models`` (the contract) and ``capnet.runtime``; never
training, serving or the CLI.
"""
