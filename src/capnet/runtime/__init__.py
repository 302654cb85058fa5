"""What the process runs on: precision policy (autocast, native bf16), the core / worker budget,
seeding, the distributed helpers and the run's stopwatch.

The lowest layer under training and serving: it takes plain values (never a config) and imports
only ``capnet.errors`` of capnet.
"""
