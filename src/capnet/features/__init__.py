"""Images to tower features: the on-disk feature cache, test-time and cached-augmentation views,
the train/val/test loaders over images or cached features.

Everything here reads a ``FeaturePlan`` (plan.py: depth, views, batch, workers, precision, cache)
or plain values, never the config. May import ``capnet.runtime``, ``capnet.data`` and the model
contracts (``capnet.models``); never training, evaluation or serving.
"""
