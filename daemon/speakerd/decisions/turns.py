"""Turns and the events that describe them: segments, withdrawals, change points.

The tracker decides *when* a turn opens, closes or is held; this module builds *what* is said about
it, on the sample clock (``SAMPLE_RATE`` samples per second of audio).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..audio import SAMPLE_RATE
from ..events import Payload, SpeakerChange, SpeakerRef, SpeakerSegment
from ..windows import Window


@dataclass(frozen=True)
class Decision:
    """An event payload and the audio position (and its capture time) at which it was decided."""

    payload: Payload
    sample: int
    wall_time: float


@dataclass
class Turn:
    """The current speaker's open turn: where it began, and the scores of its windows."""

    speaker: SpeakerRef
    start: int
    scores: list[float] = field(default_factory=list)
    previous: SpeakerRef | None = None

    @property
    def mean_score(self) -> float:
        return sum(self.scores) / len(self.scores) if self.scores else 0.0


@dataclass
class Cut:
    """The end of the current speaker's turn, held back at a pause: from ``at`` to ``end`` it may
    have been ``to``'s first words. The next region decides."""

    at: int
    end: int
    to: SpeakerRef
    score: float
    """The score of the region's last window, which covered the held end."""

    def goes_to(self, new: SpeakerRef) -> bool:
        return self.to.id == new.id and self.to.known == new.known


@dataclass(frozen=True)
class Tentative:
    """A change announced on one window's evidence, and the end of the window that announced it."""

    change: SpeakerChange
    announced_at: int

    @property
    def speaker(self) -> SpeakerRef:
        return self.change.speaker

    @property
    def at(self) -> int:
        return at_sample(self.change)


def at_sample(change: SpeakerChange) -> int:
    """A change's estimated start (seconds in the event) on the sample clock."""
    return round(change.at * SAMPLE_RATE)


def segment(turn: Turn | None, end: int) -> SpeakerSegment | None:
    """The segment a closing turn leaves; None for a turn with no window or no length."""
    if turn is None or end <= turn.start or not turn.scores:
        return None
    return SpeakerSegment(
        start=turn.start / SAMPLE_RATE, end=end / SAMPLE_RATE, speaker=turn.speaker, score=turn.mean_score, windows=len(turn.scores)
    )


def held_segment(cut: Cut, speaker: SpeakerRef) -> SpeakerSegment:
    """The held end of a turn that was the old voice's after all."""
    return SpeakerSegment(start=cut.at / SAMPLE_RATE, end=cut.end / SAMPLE_RATE, speaker=speaker, score=cut.score, windows=1)


def withdrawal(tentative: SpeakerChange, current: SpeakerRef, turn: Turn | None) -> SpeakerChange:
    """A confirmed change back to the current speaker, superseding a tentative one that did not hold."""
    scores = turn.scores if turn is not None and turn.scores else [tentative.score]
    return SpeakerChange(speaker=current, previous=current, score=sum(scores) / len(scores), margin=0.0, at=tentative.at)


def change_point(first: Window, half_hop: int, turn_start: int, region_start: int) -> int:
    """Within a region the old voice spoke in: the first window whose majority is the new voice has
    its centre at most one hop past the change."""
    return max(first.center - half_hop, turn_start, region_start)
