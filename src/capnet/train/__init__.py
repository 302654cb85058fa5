"""The gradient fit loop with validation selection, its optimiser / scheduler / EMA, and the
safetensors checkpoints (training state and the run's ``model.safetensors``), and where each
epoch's scalars go (``tracking``: the log line, TensorBoard, W&B).

``fit`` reads a ``FitPlan`` (the train and optim sections, the deployed text side, the config
record saved with checkpoints) and calls only the hooks ``models.heads.ClassifierBase`` declares.
May import ``capnet.evaluation``, ``capnet.features``, ``capnet.runtime`` and the model contract;
never serving or the CLI.
"""
