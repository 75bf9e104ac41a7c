"""``SpeakerTimeline``: speakerd's events folded into the current best answer to "who spoke when".

A subscriber that labels transcript lines needs more than the latest event: tentative changes are
confirmed or withdrawn, a later ``at`` replaces an earlier one, the end of a turn may be held and
cut, ``speaker.renamed`` / ``speaker.merged`` rewrite earlier lines, and its own clock must meet
``stream_time`` / ``wall_time``. The timeline applies every rule of docs/events.md once (see
docs/client.md) and answers queries; lines registered with ``label`` are re-checked whenever an
event changes their answer, and ``on_revision`` hears about those that now carry another name.

Memory stays bounded over a day: segments, sessions and lines older than ``keep_s`` are dropped,
and what is still open (the speech after the last finished segment) is a handful of change points.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..events import EventError, SpeakerRef
from .clock import SessionClock
from .types import Clock, Line, Revision, Span, TimelineSettings, Who

logger = logging.getLogger(__name__)

INF = float("inf")
LINE_LOOKBACK_S = 600.0
"""Registered lines are looked at back to this long before a change: no transcript line is longer."""
ALIAS_DEPTH = 64
"""Longest relabel chain followed (``unknown-3`` -> ``unknown-1`` -> Alice); stops a cycle from hanging."""


@dataclass(slots=True)
class _Boundary:
    at: float
    speaker: SpeakerRef
    tentative: bool


@dataclass(slots=True)
class _Seg:
    start: float
    end: float
    speaker: SpeakerRef


@dataclass
class _Session:
    """One daemon run: its finished segments, and the open part after them."""

    id: str
    clock: SessionClock = field(default_factory=SessionClock)
    finals: list[_Seg] = field(default_factory=list)
    starts: list[float] = field(default_factory=list)  # finals' starts, for bisect
    final_end: float = 0.0
    boundaries: list[_Boundary] = field(default_factory=list)
    speech: list[list[float]] = field(default_factory=list)  # [start, end]; end INF while open
    speech_seen: bool = False


@dataclass
class _Registered:
    line: Line
    session: str | None
    answer: Who
    reach: float


def _key(ref: SpeakerRef | None) -> str | None:
    """Identity of a speaker: its id; anonymous unknown speech is one identity of its own."""
    if ref is None:
        return None
    return ref.id if ref.id is not None else ""


class SpeakerTimeline:
    """Feed it every event (``feed``); ask ``who``, ``speaker_at``, ``segments``; ``label`` lines.

    Thread-safe: a ``Subscriber`` may feed it from its thread while others query. ``on_revision``
    runs on the feeding thread, under the timeline's (re-entrant) lock, so it may query.
    """

    def __init__(self, settings: TimelineSettings | None = None, *, on_revision: Revision | None = None) -> None:
        self.settings = settings or TimelineSettings()
        self.on_revision = on_revision
        self._lock = threading.RLock()
        self._sessions: list[_Session] = []
        self._alias: dict[str, SpeakerRef] = {}
        self._lines: list[_Registered] = []

    # -- feeding ---------------------------------------------------------------------------------

    def feed(self, event: Mapping[str, Any]) -> None:
        """Apply one event (a parsed dict: ``json.loads`` of an events-file line, or what
        ``speakerd.events.parse_event`` returns). Unknown types only move the clock; EventError if
        the event lacks what its type needs."""
        if not isinstance(event, Mapping):
            raise EventError(f"an event is a JSON object, got {type(event).__name__}")
        with self._lock:
            try:
                revised = self._apply(event)
            except (KeyError, TypeError, ValueError) as e:
                raise EventError(f"bad {event.get('type', 'untyped')} event: {e!r}") from None
            if self.on_revision is not None:
                for line, before, after in revised:  # outside the try: the callback's errors are its own
                    self.on_revision(line, before, after)

    def feed_all(self, events: Iterable[Mapping[str, Any]]) -> SpeakerTimeline:
        for event in events:
            self.feed(event)
        return self

    def _apply(self, e: Mapping[str, Any]) -> list[tuple[Line, Who, Who]]:
        session = self._session_for(str(e["session"]))
        stream_time, wall_time = float(e["stream_time"]), float(e["wall_time"])
        session.clock.anchor(stream_time, wall_time)
        etype = e.get("type")
        affected: float | None = None
        renamed: str | None = None
        if etype == "speech.start":
            session.speech.append([float(e["start"]), INF])
            session.speech_seen = True
            affected = float(e["start"])
        elif etype == "speech.end":
            self._speech_end(session, float(e["start"]), float(e["end"]))
            affected = float(e["end"])
        elif etype == "speaker.change":
            affected = self._change(session, e)
        elif etype == "speaker.segment":
            affected = self._segment(session, float(e["start"]), float(e["end"]), _ref(e["speaker"]))
        elif etype in ("speaker.renamed", "speaker.merged"):
            old, new = _ref(e["old"]), _ref(e["new"])
            if old.id is not None:
                self._alias[old.id] = new  # same id: the new name; another: that speaker from now on
            renamed = old.id
        revised = self._revise(session, affected, renamed is not None) if affected is not None or renamed else []
        self._forget(session)
        return revised

    def _session_for(self, sid: str) -> _Session:
        if self._sessions and self._sessions[-1].id == sid:
            return self._sessions[-1]
        if self._sessions:
            logger.info("new session %s: the daemon restarted", sid)
            self._freeze(self._sessions[-1])
        session = _Session(sid)
        self._sessions.append(session)
        return session

    def _freeze(self, s: _Session) -> None:
        """A session that ended without closing its open part (the daemon died): what it last
        said stands, up to the last audio it published."""
        for span in self._open_spans(s, s.final_end, s.clock.last_stream):
            self._add_final(s, _Seg(span.start, span.end, span.speaker))
        s.boundaries.clear()
        s.speech.clear()

    def _speech_end(self, s: _Session, start: float, end: float) -> None:
        for region in reversed(s.speech):
            if region[1] == INF and abs(region[0] - start) < 1e-6:
                region[1] = end
                return
        s.speech.append([start, end])  # joined after the region began
        s.speech.sort()
        s.speech_seen = True

    def _change(self, s: _Session, e: Mapping[str, Any]) -> float:
        """The rules of docs/client.md: a change tells who the daemon believes was speaking
        (``previous``); a trailing tentative change to anyone else is superseded (replaced,
        confirmed or withdrawn); a change to ``previous`` itself only withdraws; any other places
        a boundary at ``at``, replacing every boundary at or after it (a later ``at`` estimate, or
        the naming of a change already announced)."""
        speaker = _ref(e["speaker"])
        previous = None if e.get("previous") is None else _ref(e["previous"])
        at, tentative = float(e["at"]), bool(e["tentative"])
        affected = at
        prev_key = _key(self._resolve(previous))
        b = s.boundaries
        while b and b[-1].tentative and _key(self._resolve(b[-1].speaker)) != prev_key:
            affected = min(affected, b.pop().at)
        if previous is not None and (_key(self._resolve(b[-1].speaker)) if b else None) != prev_key:
            # the daemon says ``previous`` was speaking (e.g. anonymous speech that became a
            # provisional speaker after its turn closed): it is, from the end of what is final
            b.append(_Boundary(at if b else min(at, s.final_end), previous, False))
        if previous is not None and _key(self._resolve(speaker)) == prev_key:
            return affected  # withdrawn: the speaker did not change after all
        while b and b[-1].at >= at:
            affected = min(affected, b.pop().at)
        b.append(_Boundary(at, speaker, tentative))
        return affected

    def _segment(self, s: _Session, start: float, end: float, speaker: SpeakerRef) -> float:
        self._add_final(s, _Seg(start, end, speaker))
        # keep only the boundary in force at the end of the finished part, and what follows it
        b = s.boundaries
        while len(b) >= 2 and b[1].at <= s.final_end:
            b.pop(0)
        s.speech = [r for r in s.speech if r[1] > s.final_end]
        return start

    def _add_final(self, s: _Session, seg: _Seg) -> None:
        if seg.end <= seg.start:
            return
        i = bisect.bisect_right(s.starts, seg.start)
        s.starts.insert(i, seg.start)
        s.finals.insert(i, seg)
        s.final_end = max(s.final_end, seg.end)

    # -- forgetting ------------------------------------------------------------------------------

    def _forget(self, current: _Session) -> None:
        keep = self.settings.keep_s
        horizon = current.clock.last_stream - keep
        if current.finals and current.finals[0].end < horizon:
            n = 0
            while n < len(current.finals) and current.finals[n].end < horizon:
                n += 1
            del current.finals[:n], current.starts[:n]
            current.clock.forget(horizon)
        wall_horizon = current.clock.last_wall - keep
        while len(self._sessions) > 1 and self._sessions[0].clock.last_wall < wall_horizon:
            self._sessions.pop(0)
        if self._lines and (len(self._lines) > self.settings.max_lines or self._line_end_wall(self._lines[0]) < wall_horizon):
            lines = self._lines
            n = max(0, len(lines) - self.settings.max_lines)
            while n < len(lines) and self._line_end_wall(lines[n]) < wall_horizon:
                n += 1
            del lines[:n]

    def _line_end_wall(self, r: _Registered) -> float:
        if r.line.clock == "wall":
            return r.line.end
        s = self._find(r.session)
        return s.clock.to_wall(r.line.end) if s is not None else -INF

    # -- relabelling -----------------------------------------------------------------------------

    def _resolve(self, ref: SpeakerRef | None) -> SpeakerRef | None:
        """The speaker ``ref`` is now, following renames and merges."""
        for _ in range(ALIAS_DEPTH):
            if ref is None or ref.id is None or ref.id not in self._alias:
                return ref
            new = self._alias[ref.id]
            if new.id == ref.id:
                return new  # renamed in place: same id, new name
            ref = new
        return ref

    def resolve(self, ref: SpeakerRef | Mapping[str, Any] | None) -> SpeakerRef | None:
        """What an id from an earlier event is called now (``unknown-3`` -> Alice)."""
        with self._lock:
            return self._resolve(_ref(ref) if isinstance(ref, Mapping) else ref)

    def _revise(self, session: _Session, affected: float | None, everything: bool) -> list[tuple[Line, Who, Who]]:
        """Re-answer the registered lines an event may have changed; those whose speaker did."""
        if not self._lines:
            return []
        if everything:
            candidates = self._lines
        else:
            assert affected is not None
            wall_from = session.clock.to_wall(affected)
            candidates = []
            for r in reversed(self._lines):
                limit = affected if r.line.clock == "stream" else wall_from
                if r.line.start < limit - LINE_LOOKBACK_S:
                    break  # lines come roughly in time order: none before this can reach the change
                if r.line.end > limit and (r.line.clock == "wall" or r.session == session.id):
                    candidates.append(r)
        revised = []
        for r in candidates:
            after = self._who(r.line.start, r.line.end, r.line.clock, r.session, r.reach)
            before, r.answer = r.answer, after
            if _key(before.speaker) != _key(after.speaker) or (
                before.speaker is not None and after.speaker is not None and before.speaker.name != after.speaker.name
            ):
                revised.append((r.line, before, after))
        return revised

    # -- queries ---------------------------------------------------------------------------------

    @property
    def session(self) -> str | None:
        """The current daemon session's id (None before any event)."""
        with self._lock:
            return self._sessions[-1].id if self._sessions else None

    def to_wall(self, t: float, session: str | None = None) -> float:
        """Unix time of stream time ``t`` (of the current session, or ``session``)."""
        with self._lock:
            return self._need(session).clock.to_wall(t)

    def to_stream(self, wall: float, session: str | None = None) -> float:
        with self._lock:
            return self._need(session).clock.to_stream(wall)

    def segments(self, start: float = -INF, end: float = INF, clock: Clock = "stream", *, session: str | None = None) -> list[Span]:
        """Who spoke when within ``[start, end]``, in time order, with current names."""
        with self._lock:
            return self._spans(start, end, clock, session)

    def who(self, start: float, end: float, clock: Clock = "stream", *, session: str | None = None, reach: float = 0.0) -> Who:
        """The speaker covering most of ``[start, end]``, their share of it, and whether final.

        ``reach``: when no speech of anyone overlaps the span, answer the nearest speaker within
        that many seconds of it (share 0), e.g. for a transcript's word the VAD put in a pause."""
        with self._lock:
            return self._who(start, end, clock, session, reach)

    def speaker_at(self, t: float, clock: Clock = "stream", *, session: str | None = None) -> Who:
        with self._lock:
            spans = self._spans(t, t, clock, session)
            return Who(spans[-1].speaker, 1.0, spans[-1].final) if spans else Who(None, 0.0, self._final_at(t, clock, session))

    def label(self, key: Hashable, start: float, end: float, clock: Clock = "stream", *, reach: float = 0.0) -> Who:
        """``who`` for a line the caller emits now; kept, so ``on_revision`` reports it if a later
        event gives it another speaker (in stream time: lines of the current session)."""
        with self._lock:
            sid = self._sessions[-1].id if self._sessions and clock == "stream" else None
            answer = self._who(start, end, clock, sid, reach)
            self._lines.append(_Registered(Line(key, start, end, clock), sid, answer, reach))
            return answer

    def _who(self, start: float, end: float, clock: Clock, session: str | None, reach: float) -> Who:
        if end <= start:
            spans = self._spans(start, start, clock, session)
            return Who(spans[-1].speaker, 1.0, spans[-1].final) if spans else Who(None, 0.0, self._final_at(end, clock, session))
        spans = self._spans(start, end, clock, session)
        spoken: dict[str | None, float] = {}
        refs: dict[str | None, SpeakerRef] = {}
        for sp in spans:
            k = _key(sp.speaker)
            spoken[k] = spoken.get(k, 0.0) + sp.duration
            refs[k] = sp.speaker
        final = all(sp.final for sp in spans) and self._final_at(end, clock, session, span_end=True)
        if not spoken:
            near = self._nearest(start, end, clock, session, reach) if reach > 0 else None
            return Who(near, 0.0, final) if near is not None else Who(None, 0.0, final)
        best = max(spoken, key=lambda k: spoken[k])
        return Who(refs[best], min(1.0, spoken[best] / (end - start)), final)

    def _nearest(self, start: float, end: float, clock: Clock, session: str | None, reach: float) -> SpeakerRef | None:
        spans = self._spans(start - reach, end + reach, clock, session)
        if not spans:
            return None
        return min(spans, key=lambda sp: max(sp.start - end, start - sp.end, 0.0)).speaker

    def _final_at(self, t: float, clock: Clock, session: str | None, *, span_end: bool = False) -> bool:
        """True when nothing the daemon may still say can change the answer at ``t`` (or, with
        ``span_end``, for a span ending at ``t``: one ending where the finished part ends is final)."""
        for s in self._sessions_for(clock, session):
            st = s.clock.to_stream(t) if clock == "wall" else t
            if s is self._sessions[-1] and (st > s.final_end or st == s.final_end and not span_end):
                return False
        return True

    def _find(self, sid: str | None) -> _Session | None:
        return next((s for s in reversed(self._sessions) if s.id == sid), None)

    def _need(self, sid: str | None) -> _Session:
        s = self._sessions[-1] if sid is None and self._sessions else self._find(sid)
        if s is None:
            raise LookupError(f"no session {sid!r} in the timeline" if sid else "the timeline has no events yet")
        return s

    def _sessions_for(self, clock: Clock, sid: str | None) -> list[_Session]:
        if clock == "wall" and sid is None:
            return self._sessions
        s = self._find(sid) if sid is not None else (self._sessions[-1] if self._sessions else None)
        return [] if s is None else [s]

    def _spans(self, start: float, end: float, clock: Clock, sid: str | None) -> list[Span]:
        out: list[Span] = []
        for s in self._sessions_for(clock, sid):
            if clock == "wall":
                a, b = s.clock.to_stream(start), s.clock.to_stream(end)
                if s is not self._sessions[-1]:
                    b = min(b, s.clock.last_stream)
                out += [Span(s.clock.to_wall(x.start), s.clock.to_wall(x.end), x.speaker, x.final) for x in self._session_spans(s, a, b)]
            else:
                out += self._session_spans(s, start, end)
        return out

    def _session_spans(self, s: _Session, start: float, end: float) -> list[Span]:
        out = []
        i = max(0, bisect.bisect_right(s.starts, start) - 1)
        for j in range(i, len(s.finals)):  # no slice: a query of the morning must not copy the day
            seg = s.finals[j]
            if seg.start > end:
                break
            if seg.end >= start and (seg.end > start or start == end):
                out.append(Span(max(seg.start, start), min(seg.end, end), self._resolve(seg.speaker), True))  # type: ignore[arg-type]
        point = start == end
        if end > s.final_end or point and end == s.final_end:
            out += self._open_spans(s, max(start, s.final_end), end, point)
        return out

    def _open_spans(self, s: _Session, start: float, end: float, point: bool = False) -> list[Span]:
        """The part after the last finished segment, from the change points and speech regions."""
        out: list[Span] = []
        b = s.boundaries
        for i, bd in enumerate(b):
            a = max(bd.at, s.final_end, start)
            z = min(b[i + 1].at if i + 1 < len(b) else INF, end)
            if z < a or (z == a and not point):
                continue
            pieces = [(max(a, r[0]), min(z, r[1])) for r in s.speech] if s.speech_seen else [(a, z)]
            for p, q in pieces:
                if q > p or (q == p and point):
                    out.append(Span(p, q, self._resolve(bd.speaker), False))  # type: ignore[arg-type]
        return out


def _ref(d: Mapping[str, Any]) -> SpeakerRef:
    return SpeakerRef.from_dict(d)
