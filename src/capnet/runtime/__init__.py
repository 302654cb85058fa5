"""What the process runs on: precision policy (autocast, native bf16), the core / worker budget,
seeding and DataLoader worker set-up, the distributed helpers, the run's stopwatch and whether
progress bars are drawn (only on a terminal).

The lowest layer under training and serving: it takes plain values (never a config) and imports
only ``capnet.errors`` of capnet.
"""
