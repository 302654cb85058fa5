"""Images to tower features: the on-disk feature cache, test-time and cached-augmentation views,
the train/val/test loaders over images or cached features, and the pre-flight image check.

May import ``capnet.runtime``, ``capnet.data`` and the model contracts (``capnet.models``); never
training, evaluation or serving.
"""
