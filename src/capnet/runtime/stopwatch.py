"""One stopwatch per run: wall seconds per phase, with the image-feature work split out.

Feature extraction happens inside several phases (training, thresholds, test); the report
shows it as its own line, so each ``lap`` subtracts the feature seconds spent since the last lap.
"""
from __future__ import annotations

import time
from typing import Dict


class Stopwatch:
    """Phase laps plus what the image tower did (images, seconds waiting for decode, seconds in the tower)."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}
        self.images, self.decode_wait_s, self.tower_s = 0, 0.0, 0.0
        self._t, self._features = time.perf_counter(), 0.0

    def add_features(self, images: int, decode_wait_s: float, tower_s: float) -> None:
        """Count ``images`` through the tower and the seconds they took."""
        self.images += int(images)
        self.decode_wait_s += decode_wait_s
        self.tower_s += tower_s

    def lap(self, phase: str) -> None:
        """Close ``phase``: its wall time less the feature work done meanwhile (booked apart)."""
        now, features = time.perf_counter(), self.decode_wait_s + self.tower_s
        spent = features - self._features
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._t - spent
        self.seconds["image features"] = self.seconds.get("image features", 0.0) + spent
        self._t, self._features = now, features

    def total(self) -> float:
        """Seconds over every lap."""
        return sum(self.seconds.values())

    def breakdown(self) -> Dict[str, float]:
        """Seconds per phase; image features split into waiting for JPEG decoding and the tower itself."""
        out = {k: round(v, 2) for k, v in self.seconds.items()}
        out["image features: images through the tower"] = int(self.images)
        out["image features: waiting for decode"] = round(self.decode_wait_s, 2)
        out["image features: in the tower"] = round(self.tower_s, 2)
        return out
