"""What one window says about who is speaking: its match against enrolled speakers, and the label
open-set clustering gave it. Built once per window; the policy and the tracker only read it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..events import SpeakerRef
from ..windows import Window

UNKNOWN = SpeakerRef(id=None, name=None, known=False)

Candidate = tuple[str, str, float]
"""(speaker id, name, score) of one enrolled speaker for one window."""


@dataclass(frozen=True)
class Match:
    """The verdict for one window (``policy.verdict`` of its ranked candidates).

    ``margin`` is ``score`` minus the runner-up speaker's score; with no runner-up among the
    candidates it equals ``score``. When not ``known``, ``speaker_id`` and ``name`` are None and the
    nearest speaker's id is still in ``nearest`` for diagnostics. ``runner_up`` is a speaker id.
    ``uncertain`` marks a verdict too close to call (score near the threshold or a small margin).
    """

    speaker_id: str | None
    name: str | None
    score: float
    margin: float
    runner_up: str | None
    known: bool
    nearest: str | None = None
    uncertain: bool = False
    nearest_name: str | None = None
    """The nearest speaker's name, known or not: weak evidence the tracker may act on tentatively."""
    runner_up_name: str | None = None


UNKNOWN_EMPTY = Match(speaker_id=None, name=None, score=0.0, margin=0.0, runner_up=None, known=False, nearest=None)
"""The answer when nobody is enrolled."""


@dataclass(frozen=True)
class MatchedWindow:
    window: Window
    match: Match
    embedding: np.ndarray | None = field(default=None, compare=False, repr=False)
    """The window's embedding, kept for clustering unknown voices and enrolling from the stream."""
    label: SpeakerRef | None = None
    """Who open-set clustering says this is (a provisional speaker, or an enrolled one it folded
    into) when the matcher named nobody; for a probe, its nearest provisional speaker. None when the
    matcher named the window, or clustering has no label yet."""
    label_score: float = 0.0
    """Evidence for ``label`` (see ``clustering.Assignment.score``)."""
    label_margin: float = 0.0
    """``label_score`` minus the runner-up's."""

    @property
    def ref(self) -> SpeakerRef:
        if self.match.known and self.match.speaker_id is not None:
            return SpeakerRef(id=self.match.speaker_id, name=self.match.name, known=True)
        return self.label if self.label is not None else UNKNOWN

    @property
    def score(self) -> float:
        """Evidence for ``ref``: the matcher's score, or the cluster similarity for a label."""
        return self.match.score if self.label is None or self.match.known else self.label_score

    @property
    def margin(self) -> float:
        """``score`` minus the runner-up's."""
        return self.match.margin if self.label is None or self.match.known else self.label_margin

    @property
    def uncertain(self) -> bool:
        """Too close to call (score near the threshold, or a small margin): never changes the
        speaker on its own. A window clustering placed is not uncertain."""
        return self.label is None and self.match.uncertain


def score_of(m: Match, speaker_id: str | None) -> float:
    """``speaker_id``'s score in a match: exact for the nearest and the runner-up, an upper bound
    (the runner-up's) for anyone else."""
    return m.score if m.nearest == speaker_id else m.score - m.margin


def is_anonymous(ref: SpeakerRef) -> bool:
    """Unknown speech that clustering has not (yet) given a provisional id."""
    return not ref.known and ref.id is None
