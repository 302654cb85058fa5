"""The gradient fit loop with validation selection, its optimiser / scheduler / EMA, and the
safetensors checkpoints (training state and the run's ``model.safetensors``).

May import ``capnet.evaluation``, ``capnet.features`` and ``capnet.runtime``; never serving or the CLI.
"""
