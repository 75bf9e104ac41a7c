"""What a ``SpeakerTimeline`` answers with, and how it is set up."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Literal

from ..events import SpeakerRef

Clock = Literal["stream", "wall"]
"""``stream``: the daemon's stream seconds (of one session); ``wall``: Unix seconds."""


@dataclass(frozen=True)
class Span:
    """``speaker`` spoke ``start``-``end`` (on the clock asked for). ``final``: from a finished
    segment, so only a rename or merge can still change it; otherwise from change events after the
    last finished segment, which later events may revise."""

    start: float
    end: float
    speaker: SpeakerRef
    final: bool

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Who:
    """The answer to "who spoke in this span": the speaker covering most of it (None if nobody),
    their ``share`` of the span's length, and ``final`` (False while a later event may still
    change the answer, renames and merges aside, which ``on_revision`` reports)."""

    speaker: SpeakerRef | None
    share: float
    final: bool

    @property
    def label(self) -> str | None:
        """What a transcript shows: the name, else the provisional id, else "unknown"; None for nobody."""
        return None if self.speaker is None else self.speaker.label


@dataclass(frozen=True)
class Line:
    """A transcript line registered with ``SpeakerTimeline.label``; ``key`` is the caller's own."""

    key: Hashable
    start: float
    end: float
    clock: Clock


Revision = Callable[[Line, Who, Who], None]
"""``on_revision(line, before, after)``: a registered line now carries another speaker."""


@dataclass(frozen=True)
class TimelineSettings:
    keep_s: float = 12 * 3600.0
    """Segments, sessions and registered lines that ended longer ago than this are forgotten."""
    max_lines: int = 100_000
    """Registered lines kept for revision at most (the oldest go first)."""

    def __post_init__(self) -> None:
        if not self.keep_s > 0 or self.max_lines < 1:
            raise ValueError(f"keep_s must be > 0 and max_lines >= 1, got {self.keep_s}, {self.max_lines}")
