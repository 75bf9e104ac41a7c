"""Diarization error rate with its parts, computed exactly on intervals (no time grid).

The daemon names enrolled speakers and calls everyone else "unknown", so the speaker mapping is
half fixed: a named hypothesis label maps to the reference speaker of that name, and only the
remaining (unnamed) hypothesis labels are mapped, optimally, by Hungarian assignment on overlap
time to the remaining reference speakers. Collars follow NIST md-eval: ``collar`` seconds either
side of every reference boundary are not scored (pyannote's ``collar`` is the total width, twice
this). Overlapping speech is scored as in md-eval: each extra reference speaker counts.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

logger = logging.getLogger(__name__)

DEFAULT_COLLAR_S = 0.25

Labelled = tuple[float, float, str]
"""(start, end, label) in seconds."""


@dataclass(frozen=True)
class DerResult:
    """Seconds of scored reference speech and of each error; rates are shares of ``total``."""

    total: float
    missed: float
    false_alarm: float
    confusion: float
    mapping: dict[str, str]
    """Hypothesis label -> reference label, for the labels that were mapped."""

    @property
    def der(self) -> float:
        return (self.missed + self.false_alarm + self.confusion) / self.total if self.total else float("nan")

    def rate(self, part: str) -> float:
        return float(getattr(self, part)) / self.total if self.total else float("nan")

    def as_dict(self) -> dict[str, object]:
        return {
            **asdict(self),
            "der": self.der,
            "missed_rate": self.rate("missed"),
            "false_alarm_rate": self.rate("false_alarm"),
            "confusion_rate": self.rate("confusion"),
        }

    def __add__(self, other: DerResult) -> DerResult:
        """Pool two files' seconds (a corpus DER weights files by their speech, not equally)."""
        return DerResult(
            self.total + other.total,
            self.missed + other.missed,
            self.false_alarm + other.false_alarm,
            self.confusion + other.confusion,
            {},
        )


EMPTY = DerResult(0.0, 0.0, 0.0, 0.0, {})


def _clean(items: Iterable[Labelled]) -> list[Labelled]:
    return [(float(a), float(b), str(lab)) for a, b, lab in items if b > a]


def _merge(intervals: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _elementary(reference: list[Labelled], hypothesis: list[Labelled], lo: float, hi: float) -> np.ndarray:
    cuts = {lo, hi}
    for a, b, _ in (*reference, *hypothesis):
        cuts.update((min(max(a, lo), hi), min(max(b, lo), hi)))
    return np.array(sorted(cuts))


def _active(items: list[Labelled], mids: np.ndarray, labels: list[str]) -> np.ndarray:
    """(pieces, labels) booleans: is label j speaking in piece i."""
    out = np.zeros((len(mids), len(labels)), dtype=bool)
    col = {lab: j for j, lab in enumerate(labels)}
    for a, b, lab in items:
        out[(mids > a) & (mids < b), col[lab]] = True
    return out


def diarization_error(
    reference: Iterable[Labelled],
    hypothesis: Iterable[Labelled],
    *,
    collar: float = DEFAULT_COLLAR_S,
    fixed: Collection[str] = (),
    uem: tuple[float, float] | None = None,
) -> DerResult:
    """DER of ``hypothesis`` against ``reference`` within ``uem`` (default: their joint extent).

    ``fixed``: hypothesis labels that map to the reference label of the same name and take no part
    in the optimal assignment (the enrolled names). A fixed label with no reference speaker of that
    name stays unmapped, so its speech is confusion (or false alarm where nobody speaks).
    """
    ref, hyp = _clean(reference), _clean(hypothesis)
    if uem is None:
        points = [t for a, b, _ in (*ref, *hyp) for t in (a, b)]
        if not points:
            return EMPTY
        uem = (min(points), max(points))
    lo, hi = uem
    no_score = _merge([(t - collar, t + collar) for a, b, _ in ref for t in (a, b)]) if collar > 0 else []
    # every piece between consecutive cuts is wholly inside or outside each segment and collar
    cuts = _elementary(ref, hyp, lo, hi)
    cuts = np.unique(np.concatenate([cuts, np.clip(np.array(no_score).reshape(-1), lo, hi)]))
    starts, ends = cuts[:-1], cuts[1:]
    mids, dur = (starts + ends) / 2, ends - starts
    scored = np.ones(len(mids), dtype=bool)
    for a, b in no_score:
        scored &= ~((mids > a) & (mids < b))
    mids, dur = mids[scored], dur[scored]
    ref_labels = sorted({lab for *_, lab in ref})
    hyp_labels = sorted({lab for *_, lab in hyp})
    r = _active(ref, mids, ref_labels)
    h = _active(hyp, mids, hyp_labels)
    n_ref = r.sum(axis=1)
    n_hyp = h.sum(axis=1)
    # overlap[i, j]: seconds where hypothesis label i and reference label j speak together
    overlap = (h.T * dur) @ r.astype(float) if len(mids) else np.zeros((len(hyp_labels), len(ref_labels)))
    mapping: dict[str, str] = {}
    free_h = [i for i, lab in enumerate(hyp_labels) if lab not in fixed]
    taken_r = set()
    for i, lab in enumerate(hyp_labels):
        if lab in fixed and lab in ref_labels:
            mapping[lab] = lab
            taken_r.add(ref_labels.index(lab))
    free_r = [j for j in range(len(ref_labels)) if j not in taken_r]
    if free_h and free_r:
        sub = overlap[np.ix_(free_h, free_r)]
        rows, cols = linear_sum_assignment(sub, maximize=True)
        for a, b in zip(rows, cols, strict=True):
            if sub[a, b] > 0:
                mapping[hyp_labels[free_h[a]]] = ref_labels[free_r[b]]
    correct = np.zeros(len(mids))
    for hyp_label, ref_label in mapping.items():
        i, j = hyp_labels.index(hyp_label), ref_labels.index(ref_label)
        correct += h[:, i] & r[:, j]
    total = float(np.sum(n_ref * dur))
    missed = float(np.sum(np.maximum(n_ref - n_hyp, 0) * dur))
    false_alarm = float(np.sum(np.maximum(n_hyp - n_ref, 0) * dur))
    confusion = float(np.sum((np.minimum(n_ref, n_hyp) - correct) * dur))
    return DerResult(total, missed, false_alarm, confusion, mapping)


def speech_share_labelled(
    reference: Iterable[Labelled], hypothesis: Iterable[Labelled], ref_labels: Collection[str], hyp_labels: Collection[str]
) -> tuple[float, float]:
    """(seconds of ``ref_labels`` speech that the hypothesis gives one of ``hyp_labels``, seconds of that speech).

    With the unknown voices as ``ref_labels`` and the enrolled names as ``hyp_labels`` this is the
    open-set false accept: an unknown voice announced as an enrolled person.
    """
    ref = [(a, b) for a, b, lab in _clean(reference) if lab in ref_labels]
    hyp = [(a, b) for a, b, lab in _clean(hypothesis) if lab in hyp_labels]
    ref_m, hyp_m = _merge(ref), _merge(hyp)
    hit = 0.0
    for a, b in ref_m:
        for c, d in hyp_m:
            hit += max(0.0, min(b, d) - max(a, c))
    return hit, float(sum(b - a for a, b in ref_m))
