"""Using a finished run: load it, score labelled data, label new images, export ONNX /
TorchScript graphs and run them (``exported`` needs only torch, torchvision and numpy).

May import every layer below (``capnet.run_files`` for the run files, ``evaluation``,
``features``, ``runtime``); never ``capnet.experiment`` or the CLI.
"""
