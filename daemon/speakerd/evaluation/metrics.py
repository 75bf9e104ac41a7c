"""Figures that judge speaker identification and change detection against known turns.

Times are stream seconds. Reference speech is the turns; hypothesis speech is the daemon's
``speaker.segment`` events. Everything is computed on a 10 ms grid, which is finer than any
decision the daemon makes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .conversation import Turn

GRID_S = 0.01
NOBODY = ""


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    label: str
    """A speaker name, or "" for speech the daemon did not attribute to an enrolled speaker."""


def _raster(items: Iterable[tuple[float, float, str]], n: int) -> np.ndarray:
    out = np.full(n, None, dtype=object)
    for start, end, label in items:
        a, b = max(0, int(round(start / GRID_S))), min(n, int(round(end / GRID_S)))
        out[a:b] = label
    return out


def attribution_accuracy(
    turns: Sequence[Turn], segments: Sequence[Segment], names: Mapping[str, str], duration: float
) -> float:
    """Share of enrolled speakers' speech time that the segments give the right name."""
    n = int(np.ceil(duration / GRID_S)) + 1
    ref = _raster(((a, b, names[t.speaker]) for t in turns if t.speaker in names for a, b in t.speech), n)
    hyp = _raster(((s.start, s.end, s.label) for s in segments), n)
    mask = ref != None  # noqa: E711 - element-wise on an object array
    if not mask.any():
        return float("nan")
    return float(np.mean(hyp[mask] == ref[mask]))


@dataclass(frozen=True)
class ChangeScores:
    precision: float
    recall: float
    f1: float
    latencies: list[float]
    """Decision time minus true change time, for every detected true change."""
    true_changes: int
    reported_changes: int

    @property
    def median_latency(self) -> float:
        return float(np.median(self.latencies)) if self.latencies else float("nan")

    @property
    def p95_latency(self) -> float:
        return float(np.percentile(self.latencies, 95)) if self.latencies else float("nan")


def change_scores(
    true_changes: Sequence[float], reported: Sequence[float], *, before: float = 0.5, after: float = 3.0
) -> ChangeScores:
    """Greedy one-to-one matching of reported change times to true ones within [t - before, t + after]."""
    used: set[int] = set()
    latencies: list[float] = []
    for t in sorted(true_changes):
        best = None
        for j, r in enumerate(reported):
            if j in used or not (t - before <= r <= t + after):
                continue
            if best is None or abs(r - t) < abs(reported[best] - t):
                best = j
        if best is not None:
            used.add(best)
            latencies.append(reported[best] - t)
    tp = len(latencies)
    precision = tp / len(reported) if reported else 1.0
    recall = tp / len(true_changes) if true_changes else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return ChangeScores(precision, recall, f1, latencies, len(true_changes), len(reported))
