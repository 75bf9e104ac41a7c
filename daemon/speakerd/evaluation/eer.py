"""Verification error rates from target and non-target scores: EER, DET points, a threshold table.

A *target trial* is a score of a window against its true speaker; a *non-target trial* is a score
of a window against any other enrolled speaker (for an unknown voice's window, every enrolled
speaker). False reject = target score below the threshold; false accept = non-target score at or
above it, which matches ``score >= threshold`` in the matcher.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Eer:
    eer: float
    threshold: float
    """The score where false accepts and false rejects are (closest to) equal."""
    targets: int
    nontargets: int


def error_rates(targets: np.ndarray, nontargets: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false accept rate, false reject rate) at each threshold, accepting ``score >= threshold``."""
    t = np.sort(np.asarray(targets, dtype=np.float64))
    n = np.sort(np.asarray(nontargets, dtype=np.float64))
    th = np.asarray(thresholds, dtype=np.float64)
    frr = np.searchsorted(t, th, side="left") / max(len(t), 1)
    far = 1.0 - np.searchsorted(n, th, side="left") / max(len(n), 1)
    return far, frr


def det_points(targets: Sequence[float], nontargets: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false accept, false reject, threshold) at every distinct score: the whole DET curve."""
    th = np.unique(np.concatenate([np.asarray(targets, float), np.asarray(nontargets, float), [np.inf]]))
    far, frr = error_rates(np.asarray(targets), np.asarray(nontargets), th)
    return far, frr, th


def equal_error_rate(targets: Sequence[float], nontargets: Sequence[float]) -> Eer:
    """EER as the mean of FA and FR at the threshold where they are closest (0 for separable scores)."""
    if len(targets) == 0 or len(nontargets) == 0:
        return Eer(float("nan"), float("nan"), len(targets), len(nontargets))
    far, frr, th = det_points(targets, nontargets)
    best = int(np.argmin(np.abs(far - frr)))
    return Eer(float((far[best] + frr[best]) / 2), float(th[best]), len(targets), len(nontargets))


def threshold_table(
    targets: Sequence[float], nontargets: Sequence[float], thresholds: Sequence[float]
) -> list[dict[str, float]]:
    """Rows of threshold, false accept rate, false reject rate."""
    far, frr = error_rates(np.asarray(targets), np.asarray(nontargets), np.asarray(thresholds))
    return [
        {"threshold": float(t), "false_accept": float(a), "false_reject": float(r)}
        for t, a, r in zip(thresholds, far, frr, strict=True)
    ]
