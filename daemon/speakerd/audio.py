"""The unit of audio that flows between streaming stages."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16_000
"""Every stage after the source works at this rate; sources resample to it."""


@dataclass(frozen=True)
class AudioChunk:
    """Mono float32 samples in [-1, 1] at ``SAMPLE_RATE``, placed on the session's sample clock.

    ``start`` counts samples since the session began, so stream time is derived, never accumulated
    from floats. ``capture_time`` is the Unix time at which the first sample was captured; later
    samples are placed by sample count from it.
    """

    samples: np.ndarray
    start: int
    capture_time: float

    @property
    def end(self) -> int:
        return self.start + len(self.samples)

    def wall_time_of(self, sample: int) -> float:
        return self.capture_time + (sample - self.start) / SAMPLE_RATE


def seconds(samples: int) -> float:
    return samples / SAMPLE_RATE


def to_samples(seconds_: float) -> int:
    return int(round(seconds_ * SAMPLE_RATE))
