"""Per-window matches -> speaker turns, smoothed so one odd window does not flip the speaker.

A new speaker becomes the stable one after ``confirm_windows`` windows in a row agree, or at once
when a single window is decisive (clear margin). With ``tentative_changes`` the first window for a
new speaker is announced as a *tentative* change at once; the confirmed change follows (or a
confirmed change back to the current speaker withdraws it). Windows that name nobody are
"unknown" and need ``unknown_confirm_windows`` in a row, so a mixed window at a hand-over does not
start an unknown turn; a change to anonymous unknown speech is always tentative, because
open-set clustering may soon give that voice a provisional id (``relabel`` then confirms it
under that id). A probe near no enrolled voice that falls well below the current enrolled
speaker's own level announces such a change sooner; a later change at the same ``at`` names the
voice if it turns out to be someone known. A new voice's first words often end the old voice's
speech region, before a pause: when the region's last probes announced or scored another voice,
the old turn is cut there and the next region decides whose those words were. Uncertain windows
(score near the threshold, small margin) never change the speaker on their own. A turn closes at a
change or at the end of speech, emitting ``speaker.segment``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .audio import SAMPLE_RATE
from .errors import check
from .events import SpeakerChange, SpeakerRef, SpeakerSegment
from .matcher import Match
from .vad import SpeechEnd, SpeechStart
from .windows import Window

UNKNOWN = SpeakerRef(id=None, name=None, known=False)
OWN_LEVEL_PROBES = 8
"""The current speaker's own level is the median of their latest 8 probes ..."""
OWN_LEVEL_MIN_PROBES = 3
"""... once there are at least 3."""
MAX_LEAD_WINDOWS = 4
"""Weak windows before a change that may move its change point back (2 s at the default hop)."""
TAIL_PROBES = 2
"""A region's last probes that may show a new voice's first words before a pause."""


@dataclass(frozen=True)
class TrackerSettings:
    confirm_windows: int = 2
    """Windows in a row that must agree before the stable speaker changes."""
    unknown_confirm_windows: int = 3
    """Unknown windows in a row before the speaker becomes unknown."""
    decisive_margin: float = 0.05
    """A single known window this far ahead of the runner-up changes the speaker at once. Measured:
    on conversations from ../shared no pure window was misnamed, and waiting for a second window
    costs a whole hop of latency (median change latency 1.4 s -> 0.9 s). A probe the matcher names
    (known) needs this margin for a tentative change: of the pure probes of eval's enrolled
    meetings (seeds 0-1) that were known with a margin of 0.05-0.08, 50 of 50 named the right
    voice; such a change comes early, so its change point is not trusted (see ``tentative_margin``)."""
    lead_in_score: float = 0.55
    """Weak windows (unknown or uncertain) just before a change to an enrolled speaker, nearest to
    that speaker and scoring at least this, count for it: they move the change point back and vote
    for the change. A voice often scores low in its first, shorter window."""
    bridge_pause_s: float = 0.75
    """A pause at most this long between two stretches of the same speaker belongs to the turn: the
    next segment starts where the last one ended, so segments do not break at every breath (the VAD
    ends a region after 400 ms of quiet) and soft speech the VAD drops inside such a gap is labelled.
    Measured on eval's enrolled meetings (seed 0): identification 96.7 % -> 97.1 %, DER 1.8 % ->
    2.3 % (the gaps are mostly silence). 0 keeps segments to the VAD's regions."""
    tentative_changes: bool = True
    """Announce a change at the first certain window for a new speaker, marked ``tentative``, before
    it is confirmed; a confirmed change (the same speaker, or the old one to withdraw it) follows."""
    tentative_score: float = 0.60
    """A probe, or a regular window the matcher left unnamed, whose nearest enrolled speaker scores
    at least this (short windows score lower than the matcher's threshold is set for), or a probe
    whose nearest provisional speaker does ..."""
    tentative_margin: float = 0.08
    """... and leads the runner-up by at least this, is evidence enough for a tentative change to
    that speaker, never for a confirmed one. Only a tentative change on this margin places the
    change point the confirmed change keeps; one on a known probe's narrower margin is announced
    again when a probe clears this. While an unnamed voice is speaking, a near miss on an
    enrolled voice is most likely that voice (measured, it halved change precision on eval's open
    meetings): only a probe that also leads every provisional centroid by this much counts."""

    departure_drop: float = 0.18
    """A probe near no enrolled voice (nearest below ``tentative_score``) that scores this much below
    the current enrolled speaker's own level (their latest probes) is evidence that a voice nobody
    enrolled took over: a tentative anonymous change, which a later change at the same ``at`` may
    name. A new voice has no voiceprint to be near, only the old one to fall away from, and some
    voices score lower throughout, hence their own level. On the pure probes of eval's meetings
    (seeds 0-1) and the open-set conversations, this fired on none of 2,251 probes of the current
    speaker, 0-4 % of another enrolled speaker's, and 43-58 % of a never-enrolled voice's; 0.15
    was faster on open meetings but cost change precision on enrolled ones (seed 2: F1 0.92 -> 0.91)."""

    tail_score: float = 0.70
    """When a region's last probes score another enrolled voice at least this (as nearest or
    runner-up), that voice's first words most likely ended the region: the old turn is cut where
    they began, and if the next region (after a pause of at most ``bridge_pause_s``) brings that
    voice, its change starts there. Set at the matcher's threshold: on the last probes of the
    open-set conversations' regions, an enrolled voice with no speech in the probe scored at most
    0.69 (434 cases)."""

    def __post_init__(self) -> None:
        check(1 <= self.confirm_windows <= 10, "tracker.confirm_windows", self.confirm_windows, "must be within 1 to 10")
        check(
            1 <= self.unknown_confirm_windows <= 20,
            "tracker.unknown_confirm_windows",
            self.unknown_confirm_windows,
            "must be within 1 to 20",
        )
        check(0.0 <= self.decisive_margin <= 2.0, "tracker.decisive_margin", self.decisive_margin, "must be within 0 to 2")
        check(0.0 <= self.bridge_pause_s <= 10.0, "tracker.bridge_pause_s", self.bridge_pause_s, "must be within 0 to 10 s")
        check(-1.0 <= self.lead_in_score <= 1.0, "tracker.lead_in_score", self.lead_in_score, "must be a cosine in [-1, 1]")
        check(-1.0 <= self.tentative_score <= 1.0, "tracker.tentative_score", self.tentative_score, "must be a cosine in [-1, 1]")
        check(0.0 <= self.tentative_margin <= 2.0, "tracker.tentative_margin", self.tentative_margin, "must be within 0 to 2")
        check(0.0 <= self.departure_drop <= 2.0, "tracker.departure_drop", self.departure_drop, "must be within 0 to 2")
        check(-1.0 <= self.tail_score <= 1.0, "tracker.tail_score", self.tail_score, "must be a cosine in [-1, 1]")


@dataclass(frozen=True)
class MatchedWindow:
    window: Window
    match: Match
    embedding: np.ndarray | None = field(default=None, compare=False, repr=False)
    """The window's embedding, kept for clustering unknown voices and enrolling from the stream."""
    label: SpeakerRef | None = None
    """Who open-set clustering says this is (a provisional speaker, or an enrolled one it folded
    into) when the matcher named nobody; None when the matcher did, or clustering has no label yet."""
    label_score: float = 0.0
    """Evidence for ``label`` (see ``provisional.Assignment.score``)."""
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
        return self.label is None and bool(getattr(self.match, "uncertain", False))


@dataclass(frozen=True)
class Decision:
    """An event payload and the audio position (and its capture time) at which it was decided."""

    payload: Any
    sample: int
    wall_time: float


def _at_sample(change: SpeakerChange) -> int:
    """A change's estimated start (seconds in the event) on the sample clock."""
    return round(change.at * SAMPLE_RATE)


def _score_of(m: Match, speaker_id: str | None) -> float:
    """``speaker_id``'s score in a match: exact for the nearest and the runner-up, an upper bound
    (the runner-up's) for anyone else."""
    return m.score if m.nearest == speaker_id else m.score - m.margin


def is_anonymous(ref: SpeakerRef) -> bool:
    """Unknown speech that clustering has not (yet) given a provisional id."""
    return not ref.known and ref.id is None


@dataclass
class _Cut:
    """The end of the current speaker's turn, held back at a pause: from ``at`` to ``end`` it may
    have been ``to``'s first words. The next region decides (see ``SpeakerTracker._cut_turn``)."""

    at: int
    end: int
    to: SpeakerRef
    score: float
    """The score of the region's last window, which covered the held end."""

    def goes_to(self, new: SpeakerRef) -> bool:
        return self.to.id == new.id and self.to.known == new.known


@dataclass
class _Turn:
    speaker: SpeakerRef
    start: int
    scores: list[float] = field(default_factory=list)
    previous: SpeakerRef | None = None


class SpeakerTracker:
    def __init__(self, settings: TrackerSettings, hop_samples: int) -> None:
        self.settings = settings
        self._half_hop = hop_samples // 2
        self._bridge = round(settings.bridge_pause_s * SAMPLE_RATE)
        self.reset()

    def reset(self) -> None:
        self.current: SpeakerRef | None = None
        self._turn: _Turn | None = None
        self._pending: list[MatchedWindow] = []
        self._tentative: SpeakerChange | None = None
        self._region_start = 0
        self._region_has_current = False
        self._previous: SpeakerRef | None = None
        self._lead: list[MatchedWindow] = []
        self._paused_at: int | None = None  # where the current speaker's last turn ended at a pause
        self._own: list[float] = []  # the current enrolled speaker's latest probe scores
        self._tail: list[MatchedWindow] = []  # this region's latest probes
        self._announced_at = 0  # end of the window that announced the standing tentative change
        self._cut: _Cut | None = None
        self.changes = 0

    def process(self, item: MatchedWindow | SpeechStart | SpeechEnd) -> list[Decision]:
        if isinstance(item, SpeechStart):
            out: list[Decision] = []
            cut = self._cut
            if cut is not None and item.sample - cut.end > self._bridge:
                # too long a pause for the words before it to have begun the next turn
                out += self._withdraw(*item.decided) + self._uncut(*item.decided)
            self._region_start = item.sample
            self._region_has_current = False
            self._pending = []
            self._lead = []
            self._tail = []
            return out
        if isinstance(item, SpeechEnd):
            return self._end_of_speech(item.sample, *item.decided)
        return self._window(item)

    # -- windows ---------------------------------------------------------------------------------

    def _window(self, mw: MatchedWindow) -> list[Decision]:
        if mw.window.probe:
            self._tail = [*self._tail[-TAIL_PROBES + 1 :], mw]
            return self._probe(mw)
        out = self._decide(mw)
        if mw.uncertain or is_anonymous(mw.ref):
            self._lead = [*self._lead[-MAX_LEAD_WINDOWS + 1 :], mw]
        else:
            self._lead = []
        return out

    def _probe(self, mw: MatchedWindow) -> list[Decision]:
        """A probe between regular windows can only announce a tentative change."""
        target = self._evidence(mw) or self._departure(mw)
        if self.current is not None and self.current.known and mw.match.nearest == self.current.id:
            self._own = [*self._own[-OWN_LEVEL_PROBES + 1 :], mw.match.score]
        if self._turn is None and not self._region_has_current and self._speaks_for_current(mw):
            # a short region after a pause, with no full window yet: the current voice goes on
            self._extend(mw)
        if target is None or target == self.current:
            return []
        if not self._tentative_for(target) and not self._firmer(mw, target):
            return []
        return self._announce(mw, target)

    def _firmer(self, mw: MatchedWindow, target: SpeakerRef) -> bool:
        """A probe clearing ``tentative_margin`` after a change to the same voice announced on a
        narrower margin: announced again, with its change point (see ``_change``)."""
        t = self._tentative
        if t is None or t.speaker != target or self._placed(t) or self._cut is not None:
            return False  # a held cut has placed the change already
        return mw.margin >= self.settings.tentative_margin

    def _placed(self, change: SpeakerChange) -> bool:
        """A tentative change whose evidence cleared ``tentative_margin``: its ``at`` is trusted as
        the change point. One announced on a known probe's narrower margin is only early."""
        return change.margin >= self.settings.tentative_margin

    def _speaks_for_current(self, mw: MatchedWindow) -> bool:
        """A probe the matcher names as the current enrolled speaker, or that returns to the current
        provisional one."""
        current = self.current
        if current is None or is_anonymous(current):
            return False
        if current.known:
            return mw.match.known and mw.match.speaker_id == current.id and not mw.uncertain
        return self._returning(mw) and mw.label == current

    def _evidence(self, mw: MatchedWindow) -> SpeakerRef | None:
        """The speaker a probe, or a window the matcher left unnamed, is evidence for, if enough for
        a tentative change: an enrolled speaker, or (a probe only) a provisional one heard before."""
        m = mw.match
        # a probe is judged by the tentative bar alone: the matcher's threshold band is for full windows
        if not self.settings.tentative_changes or mw.uncertain and not mw.window.probe:
            return None
        if self.current is not None and not self.current.known and not self._nearer_enrolled(mw):
            return None  # an unnamed voice is speaking: a near miss on an enrolled one is most likely it
        if self._returning(mw):
            return mw.label
        if m.nearest is None or m.nearest_name is None:
            return None
        # a probe the matcher names needs only the margin a regular window needs to act alone
        bar = self.settings.decisive_margin if m.known else self.settings.tentative_margin
        if not (m.known or m.score >= self.settings.tentative_score) or m.margin < bar:
            return None
        return SpeakerRef(id=m.nearest, name=m.nearest_name, known=True)

    def _departure(self, mw: MatchedWindow) -> SpeakerRef | None:
        """Anonymous speech, when a probe near no enrolled voice falls well below the current one's level."""
        current, m = self.current, mw.match
        if not self.settings.tentative_changes or current is None or not current.known:
            return None
        if len(self._own) < OWN_LEVEL_MIN_PROBES or m.score >= self.settings.tentative_score:
            return None
        drop = float(np.median(self._own)) - _score_of(m, current.id)
        return UNKNOWN if drop > self.settings.departure_drop else None

    def _nearer_enrolled(self, mw: MatchedWindow) -> bool:
        """A probe nearer an enrolled voiceprint than every provisional centroid (so than the
        current unnamed voice's), by the margin a runner-up must be beaten by, is evidence against
        that voice."""
        return (
            mw.window.probe
            and self.current is not None
            and not is_anonymous(self.current)
            and mw.label is not None
            and mw.match.score - mw.label_score >= self.settings.tentative_margin
        )

    def _returning(self, mw: MatchedWindow) -> bool:
        """A probe nearest a provisional speaker's centroid, by the same bar an enrolled voiceprint
        must clear, announces that voice's return (measured on eval's open meetings, seeds 0-2:
        never-enrolled speech named as enrolled 9.8/3.3/4.3 % -> 8.2/2.5/3.1 %)."""
        label = mw.label
        return (
            mw.window.probe
            and label is not None
            and not label.known
            and mw.label_score >= self.settings.tentative_score
            and mw.label_margin >= self.settings.tentative_margin
        )

    def _decide(self, mw: MatchedWindow) -> list[Decision]:
        ref = mw.ref
        if self.current is not None and ref == self.current:
            # a window that began before a tentative change point is expected to name the old voice
            t = self._tentative
            out = [] if t is not None and mw.window.start < _at_sample(t) else self._withdraw(*mw.window.decided)
            self._pending = []
            self._extend(mw)
            return out
        if self._pending and self._pending[-1].ref != ref:
            self._pending = []
        self._pending.append(mw)
        if mw.uncertain and all(p.uncertain for p in self._pending):
            return []  # too close to call: counts towards a change only beside a certain window
        needed = self.settings.unknown_confirm_windows if is_anonymous(ref) else self.settings.confirm_windows
        decisive = ref.known and not mw.uncertain and mw.margin >= self.settings.decisive_margin
        # weak windows just before, nearest to this same enrolled voice, vote for it too
        votes = len(self._pending) + len(self._lead_in(ref))
        if votes >= needed or decisive or self.current is None and ref.known:
            return self._change(*mw.window.decided)
        target = ref if not is_anonymous(ref) else self._evidence(mw)
        if self.settings.tentative_changes and target is not None and target != self.current and self._tentative_for(target):
            return self._announce(mw, target)
        return []

    def _tentative_for(self, ref: SpeakerRef) -> bool:
        return self._tentative is None or self._tentative.speaker != ref

    def _extend(self, mw: MatchedWindow) -> None:
        if self._turn is None:  # same speaker as before a pause: a new turn, no change event
            start = max(self._region_start, mw.window.start)
            if self._cut is not None:
                start, self._cut = self._cut.at, None  # the words before the pause were theirs after all
            elif self._paused_at is not None and start - self._paused_at <= self._bridge:
                start = self._paused_at  # a short pause inside the turn: the segments meet across it
            self._turn = _Turn(self.current, start, previous=self._previous)  # type: ignore[arg-type]
        self._turn.scores.append(mw.score)
        self._region_has_current = True

    def _announce(self, mw: MatchedWindow, target: SpeakerRef) -> list[Decision]:
        """A tentative change on one window: shown early, confirmed or withdrawn later. After an
        anonymous one (a voice fell away from the current speaker) it names that same change."""
        t = self._tentative
        at = self._change_point(mw.window, target) if t is None or not is_anonymous(t.speaker) else _at_sample(t)
        change = SpeakerChange(
            speaker=target, previous=self.current, score=mw.score, margin=mw.margin, at=at / SAMPLE_RATE, tentative=True
        )
        self._tentative = change
        self._announced_at = mw.window.end
        return [Decision(change, *mw.window.decided)]

    def _withdraw(self, sample: int, wall_time: float) -> list[Decision]:
        """The tentative change did not hold: a confirmed change to the current speaker supersedes it."""
        tentative, self._tentative = self._tentative, None
        if tentative is None or self.current is None:
            return []
        scores = self._turn.scores if self._turn is not None and self._turn.scores else [tentative.score]
        change = SpeakerChange(
            speaker=self.current, previous=self.current, score=sum(scores) / len(scores), margin=0.0, at=tentative.at
        )
        return [Decision(change, sample, wall_time)]

    def _lead_in(self, new: SpeakerRef) -> list[MatchedWindow]:
        """The windows just before a change to enrolled ``new`` that were too weak to name anyone
        but were nearest to ``new``: a voice often scores low in its first, shorter window."""
        if not new.known:
            return []
        lead: list[MatchedWindow] = []
        for mw in reversed(self._lead):
            if (
                mw.match.nearest != new.id
                or mw.match.score < self.settings.lead_in_score
                or mw.window.region_start != self._region_start
            ):
                break
            lead.insert(0, mw)
        return lead

    def _change(self, sample: int, wall_time: float) -> list[Decision]:
        pending, self._pending = self._pending, []
        tentative, self._tentative = self._tentative, None
        new = pending[-1].ref
        lead = self._lead_in(new)
        swallowed = self.current is not None and is_anonymous(self.current) and self._turn is not None and bool(lead)
        if swallowed:
            # the anonymous turn was this voice's weak start: it never happened
            assert self._turn is not None
            self._turn.scores = []
            self.current = self._turn.previous
        first = (lead or pending)[0].window
        at = self._change_point(first, new)
        if tentative is not None and not swallowed and (
            tentative.speaker == new and self._placed(tentative) or is_anonymous(tentative.speaker)
        ):
            # announced earlier (or a voice fell away from the old one then), and nothing has
            # spoken for the old voice since: it began then
            at = min(at, _at_sample(tentative))
        if self._cut is not None and self._cut.goes_to(new):
            self._cut = None  # the held end of the old turn was this voice's start
        out = self._uncut(sample, wall_time) + self._close_turn(at, sample, wall_time)
        self._paused_at = None
        previous = self.current
        self.current = new
        self._own = []
        self._previous = previous
        self.changes += 1
        self._turn = _Turn(new, at, [p.score for p in pending], previous)
        self._region_has_current = True
        score = sum(p.score for p in pending) / len(pending)
        margin = sum(p.margin for p in pending) / len(pending)
        change = SpeakerChange(
            speaker=new, previous=previous, score=score, margin=margin, at=at / SAMPLE_RATE, tentative=is_anonymous(new)
        )
        out.append(Decision(change, sample, wall_time))
        return out

    def _change_point(self, first: Window, new: SpeakerRef) -> int:
        """Where the new voice most likely began.

        A voice that opens the region (nobody named in it yet) began with the region, or before the
        pause if the last one ended with its words. Otherwise the first window whose majority is the
        new voice has its centre at most one hop past the change.
        """
        if not self._region_has_current:
            cut = self._cut
            return cut.at if cut is not None and cut.goes_to(new) else self._region_start
        turn_start = self._turn.start if self._turn is not None else self._region_start
        return max(first.center - self._half_hop, turn_start, self._region_start)

    def _close_turn(self, end: int, sample: int, wall_time: float) -> list[Decision]:
        turn, self._turn = self._turn, None
        if turn is None or end <= turn.start or not turn.scores:
            return []
        score = sum(turn.scores) / len(turn.scores)
        segment = SpeakerSegment(
            start=turn.start / SAMPLE_RATE,
            end=end / SAMPLE_RATE,
            speaker=turn.speaker,
            score=score,
            windows=len(turn.scores),
        )
        return [Decision(segment, sample, wall_time)]

    # -- relabelling -------------------------------------------------------------------------------

    def relabel(self, old: SpeakerRef, new: SpeakerRef, sample: int, wall_time: float) -> list[Decision]:
        """``old`` is ``new`` from now on (renamed, merged, folded, or anonymous speech given an id).

        The open turn and the pending windows take the new label, so the segment that closes the
        turn carries it. Anonymous speech has no id a subscriber could rewrite, so when it gets one
        the turn's change is confirmed again under the new label (same ``at``).
        """
        out: list[Decision] = []
        self._pending = [replace(p, label=new) if p.ref == old else p for p in self._pending]
        if self._previous == old:
            self._previous = new
        if self._turn is not None and self._turn.previous == old:
            self._turn.previous = new
        if self._tentative is not None and self._tentative.speaker == old:
            self._tentative = replace(self._tentative, speaker=new)
        if self._cut is not None and self._cut.goes_to(old):
            self._cut.to = new
        if self.current != old:
            return out
        self.current = new
        if self._turn is not None:
            self._turn.speaker = new
            if is_anonymous(old) and not is_anonymous(new):
                scores = self._turn.scores
                change = SpeakerChange(
                    speaker=new,
                    previous=self._turn.previous,
                    score=sum(scores) / len(scores) if scores else 0.0,
                    margin=0.0,
                    at=self._turn.start / SAMPLE_RATE,
                )
                out.append(Decision(change, sample, wall_time))
        return out

    # -- boundaries ------------------------------------------------------------------------------

    def _end_of_speech(self, end: int, sample: int, wall_time: float) -> list[Decision]:
        """The region ended at ``end``; the VAD knew at ``sample``."""
        out: list[Decision] = []
        if self._pending and not self._region_has_current and not all(p.uncertain for p in self._pending):
            # the region held only the new voice, too briefly to confirm it: it spoke the region
            out.extend(self._change(sample, wall_time))
        out.extend(self._uncut(sample, wall_time))  # the region between said nothing about it
        cut, heard = self._cut_turn(end) if self._region_has_current else (None, None)
        if self._region_has_current and cut is None:
            # the old voice spoke in this region; a new voice heard here only in a probe was a guess
            out.extend(self._withdraw(sample, wall_time))
        self._pending = []
        if self._turn is not None:
            self._paused_at = end
        out.extend(self._close_turn(end if cut is None else cut.at, sample, wall_time))
        self._cut = cut
        if heard is not None and self.settings.tentative_changes:
            # announced now, not after the pause: the words are as much evidence as a probe
            self._tentative, self._announced_at = heard, end
            out.append(Decision(heard, sample, wall_time))
        return out

    def _cut_turn(self, end: int) -> tuple[_Cut | None, SpeakerChange | None]:
        """The region ended with another voice's first words, by a tentative change its last probes
        announced or by their scores: the turn ends where those words began, and the rest is held.
        Also the tentative change to announce for that voice, if none was."""
        turn, t = self._turn, self._tentative
        if turn is None or not turn.scores:
            return None, None
        heard: SpeakerChange | None
        if t is not None and end - self._announced_at <= self._half_hop:
            at, to, heard = _at_sample(t), t.speaker, None
        else:
            heard = self._tail_voice(end, turn.speaker)
            if heard is None:
                return None, None
            at, to = _at_sample(heard), heard.speaker
            if t is not None and t.speaker == to:  # announced earlier in the region already
                at, heard = min(at, _at_sample(t)), None
        if at <= turn.start:
            return None, None
        return _Cut(at, end, to, turn.scores[-1]), heard

    def _tail_voice(self, end: int, speaking: SpeakerRef) -> SpeakerChange | None:
        """Another enrolled voice the probes ending the region score at least ``tail_score``, as a
        tentative change from the earliest of them on (score and margin: the latest's)."""
        if not self._tail or end - self._tail[-1].window.end > self._half_hop:
            return None
        found: SpeakerChange | None = None
        for mw in reversed(self._tail):
            m = mw.match
            other = m.nearest if m.nearest != speaking.id else m.runner_up
            if other is None or found is not None and other != found.speaker.id:
                break
            nearest = other == m.nearest
            score = _score_of(m, other)
            if score < self.settings.tail_score:
                break
            at = mw.window.center / SAMPLE_RATE
            if found is None:
                who = SpeakerRef(id=other, name=m.nearest_name if nearest else m.runner_up_name, known=True)
                margin = m.margin if nearest else -m.margin  # behind the nearest when the runner-up
                found = SpeakerChange(speaker=who, previous=speaking, score=score, margin=margin, at=at, tentative=True)
            else:
                found = replace(found, at=at)
        return found

    def _uncut(self, sample: int, wall_time: float) -> list[Decision]:
        """The held end of the turn was the old voice's after all: its own segment."""
        cut, self._cut = self._cut, None
        if cut is None or self.current is None:
            return []
        segment = SpeakerSegment(
            start=cut.at / SAMPLE_RATE, end=cut.end / SAMPLE_RATE, speaker=self.current, score=cut.score, windows=1
        )
        return [Decision(segment, sample, wall_time)]

    def flush(self, end: int, wall_time: float) -> list[Decision]:
        """End of stream: close whatever turn is open."""
        out = self._end_of_speech(end, end, wall_time)
        if self._cut is not None:  # no next region will decide: the old voice had it
            out += self._withdraw(end, wall_time) + self._uncut(end, wall_time)
        return out
