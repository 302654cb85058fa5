"""Benchmarks of capnet (speed: `python -m benchmarks.speed`); not part of the installed package."""
