"""SpeakerTimeline's rules on synthetic event sequences (docs/client.md): fast, no daemon."""

from __future__ import annotations

import time
import tracemalloc
from typing import Any

import pytest

from speakerd.client import SpeakerTimeline, TimelineSettings, Who
from speakerd.events import (
    EventError,
    Heartbeat,
    SpeakerChange,
    SpeakerMerged,
    SpeakerRef,
    SpeakerRenamed,
    SpeakerSegment,
    SpeechEnd,
    SpeechStart,
    make_event,
)

ALICE = SpeakerRef("spk-a", "Alice", True)
BOB = SpeakerRef("spk-b", "Bob", True)
ANON = SpeakerRef.unknown()
U1 = SpeakerRef("unknown-1", None, False)
U3 = SpeakerRef("unknown-3", None, False)
WALL0 = 1_718_000_000.0


class Stream:
    """Builds a session's events with the envelope the daemon puts on them."""

    def __init__(self, session: str = "aaaaaaaaaaaa", wall0: float = WALL0) -> None:
        self.session, self.wall0, self.seq = session, wall0, 0

    def __call__(self, payload: Any, t: float) -> dict[str, Any]:
        self.seq += 1
        return make_event(payload, seq=self.seq, session=self.session, stream_time=t, wall_time=self.wall0 + t)


def change(speaker: SpeakerRef, previous: SpeakerRef | None, at: float, tentative: bool = False) -> SpeakerChange:
    return SpeakerChange(speaker=speaker, previous=previous, score=0.8, margin=0.2, at=at, tentative=tentative)


def segment(speaker: SpeakerRef, start: float, end: float) -> SpeakerSegment:
    return SpeakerSegment(start=start, end=end, speaker=speaker, score=0.8, windows=3)


def names(tl: SpeakerTimeline, start: float = 0.0, end: float = 1e9) -> list[tuple[float, float, str, bool]]:
    return [(round(s.start, 3), round(s.end, 3), s.speaker.label, s.final) for s in tl.segments(start, end)]


def test_segments_are_final_and_who_takes_the_speaker_covering_most() -> None:
    ev = Stream()
    tl = SpeakerTimeline().feed_all([
        ev(SpeechStart(1.0), 1.2), ev(change(ALICE, None, 1.0), 2.0), ev(change(BOB, ALICE, 4.0), 5.0),
        ev(SpeechEnd(1.0, 6.0), 6.5), ev(segment(ALICE, 1.0, 4.0), 5.0), ev(segment(BOB, 4.0, 6.0), 6.5),
    ])
    assert names(tl) == [(1.0, 4.0, "Alice", True), (4.0, 6.0, "Bob", True)]
    who = tl.who(3.0, 5.0)
    assert who.speaker == BOB or who.speaker == ALICE
    assert tl.who(3.5, 5.0) == Who(BOB, pytest.approx(1.0 / 1.5), True)
    assert tl.speaker_at(2.0).label == "Alice" and tl.speaker_at(4.0).label == "Bob"
    assert tl.who(6.5, 7.0).speaker is None  # silence after the last segment
    assert tl.who(6.5, 7.0, reach=1.0).speaker == BOB  # ... unless the nearest voice within reach will do


def test_open_part_follows_changes_until_a_segment_closes_it() -> None:
    ev = Stream()
    tl = SpeakerTimeline().feed_all([ev(SpeechStart(1.0), 1.2), ev(change(ALICE, None, 1.0), 2.0)])
    assert tl.who(1.0, 3.0) == Who(ALICE, 1.0, False)
    assert tl.speaker_at(0.5).speaker is None  # before speech began
    assert tl.who(100.0, 101.0).speaker == ALICE  # the daemon has not got there yet: still Alice, not final


def test_tentative_change_then_confirmed_change_replaces_its_at() -> None:
    ev = Stream()
    tl = SpeakerTimeline().feed_all([ev(SpeechStart(0.0), 0.2), ev(change(ALICE, None, 0.0), 1.0)])
    tl.feed(ev(change(BOB, ALICE, 5.0, tentative=True), 5.5))
    assert names(tl) == [(0.0, 5.0, "Alice", False), (5.0, 1e9, "Bob", False)]
    tl.feed(ev(change(BOB, ALICE, 4.6), 6.0))  # confirmed on more windows: its at is the better one
    assert names(tl) == [(0.0, 4.6, "Alice", False), (4.6, 1e9, "Bob", False)]


def test_confirmed_change_to_the_previous_speaker_withdraws_the_tentative_one() -> None:
    ev = Stream()
    revised: list[tuple[Any, str | None, str | None]] = []
    tl = SpeakerTimeline(on_revision=lambda line, a, b: revised.append((line.key, a.label, b.label)))
    tl.feed_all([ev(SpeechStart(0.0), 0.2), ev(change(ALICE, None, 0.0), 1.0), ev(change(BOB, ALICE, 5.0, tentative=True), 5.5)])
    assert tl.label("line-1", 5.2, 5.8) == Who(BOB, 1.0, False)
    tl.feed(ev(change(ALICE, ALICE, 5.0), 6.5))  # speaker == previous: it did not change after all
    assert names(tl) == [(0.0, 1e9, "Alice", False)]
    assert revised == [("line-1", "Bob", "Alice")]


def test_a_tentative_change_replaces_the_standing_tentative_one() -> None:
    ev = Stream()
    tl = SpeakerTimeline().feed_all([ev(change(ALICE, None, 0.0), 1.0), ev(change(BOB, ALICE, 5.0, tentative=True), 5.5)])
    tl.feed(ev(change(U1, ALICE, 5.2, tentative=True), 6.0))
    assert names(tl) == [(0.0, 5.2, "Alice", False), (5.2, 1e9, "unknown-1", False)]


def test_anonymous_change_is_named_by_a_later_change_with_the_same_at() -> None:
    ev = Stream()
    tl = SpeakerTimeline().feed_all([ev(change(ALICE, None, 0.0), 1.0), ev(change(ANON, ALICE, 5.0, tentative=True), 5.5)])
    assert tl.speaker_at(6.0).speaker == ANON and tl.speaker_at(6.0).label == "unknown"
    tl.feed(ev(change(U1, ALICE, 5.0), 9.0))  # the voice became a provisional speaker: same at
    assert names(tl) == [(0.0, 5.0, "Alice", False), (5.0, 1e9, "unknown-1", False)]
    # and a tentative change away from the anonymous turn stacks on it rather than replacing it
    tl2 = SpeakerTimeline().feed_all([ev(change(ALICE, None, 0.0), 1.0), ev(change(ANON, ALICE, 5.0, tentative=True), 5.5)])
    tl2.feed(ev(change(BOB, ANON, 7.0, tentative=True), 7.5))
    assert names(tl2) == [(0.0, 5.0, "Alice", False), (5.0, 7.0, "unknown", False), (7.0, 1e9, "Bob", False)]
    tl2.feed(ev(change(BOB, ANON, 6.8), 8.0))
    assert names(tl2) == [(0.0, 5.0, "Alice", False), (5.0, 6.8, "unknown", False), (6.8, 1e9, "Bob", False)]


def test_a_held_cut_goes_to_the_new_voice_or_back_to_the_old_one() -> None:
    ev = Stream()
    head = [
        ev(SpeechStart(0.0), 0.2), ev(change(ALICE, None, 0.0), 1.0), ev(SpeechEnd(0.0, 6.0), 6.5),
        ev(segment(ALICE, 0.0, 5.4), 6.5), ev(change(BOB, ALICE, 5.4, tentative=True), 6.5),
    ]
    tl = SpeakerTimeline().feed_all(head)
    # the stretch ended with Bob's first words: Alice's segment ends there, the rest is held for Bob
    assert names(tl) == [(0.0, 5.4, "Alice", True), (5.4, 6.0, "Bob", False)]
    assert tl.who(6.2, 6.8).speaker is None  # the pause
    going_on = SpeakerTimeline().feed_all(head)
    going_on.feed_all([ev(SpeechStart(6.5), 6.7), ev(SpeechEnd(6.5, 9.0), 9.5), ev(change(ALICE, ALICE, 5.4), 9.5),
                       ev(segment(ALICE, 5.4, 9.0), 9.5)])
    assert names(going_on) == [(0.0, 5.4, "Alice", True), (5.4, 9.0, "Alice", True)]
    bob = SpeakerTimeline().feed_all(head)
    bob.feed_all([ev(SpeechStart(6.5), 6.7), ev(change(BOB, ALICE, 5.4), 7.5)])
    assert names(bob) == [(0.0, 5.4, "Alice", True), (5.4, 6.0, "Bob", False), (6.5, 1e9, "Bob", False)]


def test_renames_and_merges_rewrite_earlier_lines_through_the_chain() -> None:
    ev = Stream()
    revised: list[tuple[str, str | None, str | None]] = []
    tl = SpeakerTimeline(on_revision=lambda line, a, b: revised.append((str(line.key), a.label, b.label)))
    tl.feed_all([ev(change(U3, None, 0.0), 1.0), ev(segment(U3, 0.0, 3.0), 3.5), ev(change(U1, U3, 3.0), 4.0),
                 ev(segment(U1, 3.0, 6.0), 6.5)])
    tl.label("w1", 1.0, 1.5)
    tl.label("w2", 4.0, 4.5)
    tl.feed(ev(SpeakerMerged(old=U3, new=U1, cause="clustering"), 7.0))
    assert revised == [("w1", "unknown-3", "unknown-1")]
    named = SpeakerRef("spk-c", "Carol", True)
    tl.feed(ev(SpeakerRenamed(old=U1, new=named), 8.0))
    assert sorted(revised[1:]) == [("w1", "unknown-1", "Carol"), ("w2", "unknown-1", "Carol")]
    assert names(tl, 0.0, 6.0) == [(0.0, 3.0, "Carol", True), (3.0, 6.0, "Carol", True)]
    assert tl.resolve({"id": "unknown-3", "name": None, "known": False}) == named
    tl.feed(ev(SpeakerRenamed(old=named, new=SpeakerRef("spk-c", "Caroline", True)), 9.0))  # same id, new name
    assert tl.speaker_at(1.0).label == "Caroline" and revised[-1][2] == "Caroline"


def test_wall_clock_queries_and_a_daemon_restart() -> None:
    first = Stream("111111111111", WALL0)
    tl = SpeakerTimeline().feed_all([first(change(ALICE, None, 0.0), 1.0), first(SpeechStart(0.0), 1.0),
                                     first(Heartbeat(2.0, 10.0, 1), 10.0)])
    assert tl.to_wall(5.0) == pytest.approx(WALL0 + 5.0)
    assert tl.who(WALL0 + 2.0, WALL0 + 3.0, "wall") == Who(ALICE, 1.0, False)
    # the daemon died without closing the turn and came back 100 s later: a new session, its own clock
    second = Stream("222222222222", WALL0 + 100.0)
    tl.feed_all([second(SpeechStart(1.0), 1.2), second(change(BOB, None, 1.0), 2.0)])
    assert tl.session == "222222222222"
    assert tl.who(1.0, 2.0).speaker == BOB  # stream time: the current session
    assert tl.who(1.0, 2.0, session="111111111111") == Who(ALICE, 1.0, True)  # what it last said stands
    assert tl.who(WALL0 + 2.0, WALL0 + 3.0, "wall") == Who(ALICE, 1.0, True)
    assert tl.who(WALL0 + 102.0, WALL0 + 103.0, "wall").speaker == BOB
    assert tl.who(WALL0 + 50.0, WALL0 + 60.0, "wall").speaker is None  # while the daemon was down


def test_drift_between_clocks_is_followed_anchor_by_anchor() -> None:
    ev = Stream()
    tl = SpeakerTimeline()
    for i in range(0, 3600, 60):  # the sound card runs 100 ppm slow against the system clock
        e = ev(Heartbeat(2.0, float(i), 1), float(i))
        e["wall_time"] = WALL0 + i * 1.0001
        tl.feed(e)
    assert tl.to_wall(60.0) == pytest.approx(WALL0 + 60.006, abs=1e-3)
    assert tl.to_wall(3540.0) == pytest.approx(WALL0 + 3540.354, abs=1e-3)
    assert tl.to_stream(WALL0 + 3540.354) == pytest.approx(3540.0, abs=1e-3)


def test_bad_events_are_refused_with_a_clear_error() -> None:
    tl = SpeakerTimeline()
    with pytest.raises(EventError, match="JSON object"):
        tl.feed(["not", "an", "event"])  # type: ignore[arg-type]
    ev = Stream()
    e = ev(change(ALICE, None, 0.0), 1.0)
    del e["at"]
    with pytest.raises(EventError, match="speaker.change"):
        tl.feed(e)


def day_of_events(hours: float, session: str = "dddddddddddd") -> Any:
    """A meeting room all day: four enrolled voices and new unknown ones, turns of 2-9 s, pauses,
    tentative changes, withdrawals, provisional voices named or merged, heartbeats."""
    import random

    rng = random.Random(7)
    ev = Stream(session)
    people = [ALICE, BOB, SpeakerRef("spk-c", "Carol", True), SpeakerRef("spk-d", "Dan", True)]
    t, current, n_unknown = 0.5, None, 0
    while t < hours * 3600:
        if rng.random() < 0.02:
            n_unknown += 1
            who = SpeakerRef(f"unknown-{n_unknown}", None, False)
        else:
            who = rng.choice([p for p in people if p != current] or people)
        length = rng.uniform(2.0, 9.0)
        yield ev(SpeechStart(t), t + 0.2)
        if current is not None and rng.random() < 0.3:
            yield ev(change(rng.choice(people), current, t + 0.5, tentative=True), t + 1.0)
            yield ev(change(current, current, t + 0.5), t + 1.5)
        yield ev(change(who, current, t), t + 0.8)
        yield ev(SpeechEnd(t, t + length), t + length + 0.4)
        yield ev(segment(who, t, t + length), t + length + 0.4)
        if who.id and who.id.startswith("unknown-") and rng.random() < 0.5:
            yield ev(SpeakerRenamed(old=who, new=SpeakerRef(f"spk-g{n_unknown}", f"Guest {n_unknown}", True)), t + length + 0.5)
        current = who
        gap = rng.uniform(0.0, 3.0)
        if gap > 2.0:
            yield ev(Heartbeat(2.0, t, 1), t + length + 2.0)
        t += length + gap


@pytest.mark.parametrize("keep_s", [TimelineSettings().keep_s])
def test_a_day_of_events_stays_under_50_mb_in_seconds(keep_s: float) -> None:
    tl = SpeakerTimeline(TimelineSettings(keep_s=keep_s), on_revision=lambda *a: None)
    tracemalloc.start()
    started = time.process_time()
    n = 0
    for e in day_of_events(24.0):
        tl.feed(e)
        n += 1
        if n % 20 == 0:  # a transcriber labelling a line every few events
            tl.label(n, e["stream_time"] - 3.0, e["stream_time"] - 1.0)
    cpu = time.process_time() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n > 50_000
    assert peak < 50e6, f"{peak / 1e6:.1f} MB"
    assert cpu < 60.0, f"{cpu:.1f} s of CPU for {n} events"
    # still answering correctly at the end of the day, and the morning is forgotten
    last = max(tl.segments(0, 1e9), key=lambda s: s.end)
    assert tl.speaker_at(last.end - 0.1).speaker is not None
    assert tl.segments(0.0, 3600.0) == []


def test_a_withdrawal_keeps_the_previous_speaker_even_when_it_was_named_after_its_turn_closed() -> None:
    # from a real run: anonymous speech, its segment closed, then the voice became unknown-1 and a
    # tentative change away from it was withdrawn under its new id
    ev = Stream()
    tl = SpeakerTimeline().feed_all([
        ev(SpeechStart(2.0), 2.2), ev(change(ANON, None, 2.0, tentative=True), 3.0), ev(segment(ANON, 2.0, 4.2), 4.9),
        ev(change(ALICE, ANON, 4.2, tentative=True), 4.9), ev(SpeechEnd(2.0, 4.6), 4.9), ev(SpeechStart(4.8), 5.0),
        ev(change(U1, U1, 4.2), 5.8),
    ])
    assert tl.who(4.8, 5.8) == Who(U1, 1.0, False)


def test_revisions_answer_lines_as_label_did_and_callback_errors_stay_the_callbacks() -> None:
    ev = Stream()
    revised: list[Any] = []
    tl = SpeakerTimeline(on_revision=lambda line, a, b: revised.append((line.key, a.label, b.label)))
    tl.feed_all([ev(SpeechStart(0.0), 0.2), ev(change(ALICE, None, 0.0), 1.0), ev(SpeechEnd(0.0, 4.0), 4.4),
                 ev(segment(ALICE, 0.0, 4.0), 4.4)])
    assert tl.label("soft word", 4.1, 4.3, reach=0.5).label == "Alice"  # in the pause, within reach
    tl.feed_all([ev(SpeechStart(6.0), 6.2), ev(change(BOB, ALICE, 6.0), 7.0)])
    assert revised == []  # answered again with the same reach: still Alice, nothing to report

    def broken(*_: Any) -> None:
        raise KeyError("the callback's own bug")

    tl.on_revision = broken
    tl.label("w", 6.5, 7.0)
    with pytest.raises(KeyError, match="own bug"):  # not disguised as a bad event
        tl.feed(ev(SpeakerRenamed(old=BOB, new=SpeakerRef("spk-b", "Robert", True)), 8.0))


def test_the_worked_example_of_docs_client_md() -> None:
    ev = Stream()
    revised: list[tuple[str, str | None, str | None]] = []
    tl = SpeakerTimeline(on_revision=lambda line, a, b: revised.append((str(line.key), a.label, b.label)))
    tl.feed(ev(change(ALICE, None, 0.0), 1.0))
    tl.feed(ev(change(BOB, ALICE, 5.0, tentative=True), 5.5))
    assert tl.label("L", 5.2, 5.8) == Who(BOB, 1.0, False)
    tl.feed(ev(change(ALICE, ALICE, 5.0), 6.5))
    assert revised == [("L", "Bob", "Alice")]
    tl.feed(ev(segment(ALICE, 0.0, 10.4), 10.8))
    assert tl.who(0.0, 10.4) == Who(ALICE, 1.0, True)
    tl.feed(ev(change(ANON, ALICE, 10.4, tentative=True), 11.0))
    assert tl.speaker_at(11.0).label == "unknown"
    tl.feed(ev(change(U1, ALICE, 10.4), 13.5))
    assert tl.label("M", 12.0, 13.0).label == "unknown-1"
    tl.feed(ev(segment(U1, 10.4, 16.0), 16.4))
    carol = SpeakerRef("spk-3f2a9c1b", "Carol", True)
    tl.feed(ev(SpeakerRenamed(old=U1, new=carol), 30.0))
    assert revised[1:] == [("M", "unknown-1", "Carol")]
    assert [(s.start, s.end, s.speaker.label) for s in tl.segments(0.0, 16.0)] == [(0.0, 10.4, "Alice"), (10.4, 16.0, "Carol")]
