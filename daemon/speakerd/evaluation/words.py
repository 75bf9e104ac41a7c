"""Word-level speaker attribution: a recogniser's words, named through ``speakerd.client``,
judged against a conversation's known turns.

A word's true speaker is the turn holding its midpoint; words in no turn (the recogniser heard
something in a pause) are not judged, nor words within ``exclude_s`` of a true change, where a
word's own timing error decides more than the daemon does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .conversation import Conversation

EXCLUDE_S = 0.25


@dataclass(frozen=True)
class TimedLabel:
    start: float
    end: float
    label: str | None
    """The name (or provisional id) the timeline gave the word; None for nobody."""


@dataclass(frozen=True)
class WordScore:
    correct: int
    judged: int
    near_change: int
    outside_turns: int
    by_truth: dict[str, dict[str | None, int]]
    """True speaker -> label given -> words."""
    truths: dict[int, str]
    """Index of each judged word -> its true speaker."""

    @property
    def accuracy(self) -> float:
        return self.correct / self.judged if self.judged else float("nan")


def true_speaker(conv: Conversation, t: float) -> str | None:
    for turn in conv.turns:
        if turn.start <= t < turn.end:
            return turn.speaker
    return None


def word_attribution(
    conv: Conversation, words: Sequence[TimedLabel], names: Mapping[str, str], *, exclude_s: float = EXCLUDE_S
) -> WordScore:
    """``names``: conversation speaker -> the name the daemon should give (enrolled speakers);
    a never-enrolled speaker's words count as right when they carry any provisional id."""
    changes = [t for t, _, _ in conv.changes()]
    correct = judged = near = outside = 0
    by_truth: dict[str, dict[str | None, int]] = {}
    truths: dict[int, str] = {}
    for i, w in enumerate(words):
        truth = true_speaker(conv, (w.start + w.end) / 2)
        if truth is None:
            outside += 1
            continue
        if any(w.start - exclude_s <= c <= w.end + exclude_s for c in changes):
            near += 1
            continue
        judged += 1
        truths[i] = truth
        by_truth.setdefault(truth, {})
        by_truth[truth][w.label] = by_truth[truth].get(w.label, 0) + 1
        if truth in names:
            correct += w.label == names[truth]
        else:
            correct += bool(w.label and w.label.startswith("unknown-"))
    return WordScore(correct, judged, near, outside, by_truth, truths)


TRANSCRIPT_SEGMENT_S = (2.0, 4.0)


def truth_transcript(conv: Conversation, seed: int = 0, segment_s: tuple[float, float] = TRANSCRIPT_SEGMENT_S) -> dict[str, Any]:
    """A Whisper-style JSON of the truth: each turn's speech cut into segments of 2-4 s (a rest
    under 1 s joins the segment before it), each remembering its true speaker in ``truth``."""
    rng = np.random.default_rng(seed)
    segments: list[dict[str, Any]] = []
    for turn in conv.turns:
        if not turn.speech:
            continue
        a, end = turn.speech[0][0], turn.speech[-1][1]
        while a < end - 1e-6:
            b = min(end, a + float(rng.uniform(*segment_s)))
            if end - b < 1.0:
                b = end
            segments.append({"id": len(segments), "start": round(a, 3), "end": round(b, 3), "text": f" ({turn.speaker})",
                             "truth": turn.speaker})
            a = b
    return {"text": "", "language": "en", "segments": segments}


def segment_time_accuracy(segments: Sequence[Mapping[str, Any]], names: Mapping[str, str]) -> float:
    """Share of the labelled truth segments' time whose ``speaker`` is the true speaker's name."""
    total = sum(s["end"] - s["start"] for s in segments)
    right = sum(s["end"] - s["start"] for s in segments if s.get("speaker") == names.get(s["truth"]))
    return right / total if total else float("nan")
