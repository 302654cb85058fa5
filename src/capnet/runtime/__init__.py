"""What the process runs on: precision policy (autocast, native bf16), the core / worker budget,
seeding and the distributed helpers.

The lowest layer under training and serving: it may import ``capnet.config``, ``capnet.errors`` and the
standard libraries, nothing else of capnet.
"""
