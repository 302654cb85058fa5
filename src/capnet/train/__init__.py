"""The gradient fit loop with validation selection, its optimiser / scheduler / EMA, and the
safetensors checkpoints (training state and the run's ``model.safetensors``), and where each
epoch's scalars go (``tracking``: the log line, TensorBoard, W&B).

May import ``capnet.evaluation``, ``capnet.features`` and ``capnet.runtime``; never serving or the CLI.
"""
