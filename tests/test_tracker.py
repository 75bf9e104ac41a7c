"""SpeakerTracker on hand-made match sequences: confirmation, decisive windows, change points, segments."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from speakerd.audio import SAMPLE_RATE
from speakerd.errors import ConfigError
from speakerd.events import SpeakerChange, SpeakerRef, SpeakerSegment
from decision_values import GE2E
from speakerd.decisions.evidence import UNKNOWN, Match, MatchedWindow
from speakerd.decisions.tracker import Phase, SpeakerTracker, TrackerSettings
from speakerd.decisions.turns import Decision
from speakerd.vad import SpeechEnd, SpeechStart
from speakerd.windows import Window

HOP = SAMPLE_RATE // 2  # windows every 0.5 s: first 1.0 s, then 1.5 s, as the windower makes them
FIRST, FULL = SAMPLE_RATE, SAMPLE_RATE * 3 // 2
T0 = 1_700_000_000.0
A = SpeakerRef("a", "Ann", True)
B = SpeakerRef("b", "Bob", True)
WEAK, DECISIVE = 0.02, 0.06  # margins either side of the default decisive_margin 0.05
BASE = TrackerSettings(tentative_changes=False)
"""Confirmed changes only; the tentative announcements on top are pinned separately below."""


def window(region: int, k: int) -> Window:
    """The k-th window (0-based) of a region starting at ``region``, on the windower's grid."""
    end = region + FIRST if k == 0 else region + FULL + (k - 1) * HOP
    start = end - (FIRST if k == 0 else FULL)
    return Window(start=start, end=end, feats=np.zeros((1, 1), np.float32), speech_fraction=1.0,
                  wall_time=T0 + end / SAMPLE_RATE, region_start=region, first_in_region=k == 0)


def match(who: SpeakerRef, score: float = 0.8, margin: float = WEAK) -> Match:
    if not who.known:
        return Match(speaker_id=None, name=None, score=score, margin=margin, runner_up="a", known=False, nearest="a")
    return Match(speaker_id=who.id, name=who.name, score=score, margin=margin, runner_up="z", known=True)


class Run:
    """Feeds regions of windows to a tracker and keeps every decision."""

    def __init__(self, settings: TrackerSettings | None = None) -> None:
        self.tracker = SpeakerTracker(settings or BASE, GE2E, HOP)
        self.decisions: list[Decision] = []
        self.region = 0

    def start(self, region: int) -> None:
        self.region = region
        self.decisions += self.tracker.process(SpeechStart(region, T0 + region / SAMPLE_RATE))

    def window(self, k: int, who: SpeakerRef, score: float = 0.8, margin: float = WEAK) -> list[Decision]:
        new = self.tracker.process(MatchedWindow(window(self.region, k), match(who, score, margin)))
        self.decisions += new
        return new

    def end(self, sample: int) -> list[Decision]:
        new = self.tracker.process(SpeechEnd(sample, T0 + sample / SAMPLE_RATE))
        self.decisions += new
        return new

    def changes(self) -> list[SpeakerChange]:
        return [d.payload for d in self.decisions if isinstance(d.payload, SpeakerChange)]

    def segments(self) -> list[SpeakerSegment]:
        return [d.payload for d in self.decisions if isinstance(d.payload, SpeakerSegment)]


R1, R2 = 10 * SAMPLE_RATE, 30 * SAMPLE_RATE


def sec(sample: int) -> float:
    return sample / SAMPLE_RATE


def key(payload: SpeakerChange | SpeakerSegment) -> tuple:
    """A payload with its floats rounded, so float sums compare as the figures they stand for."""
    if isinstance(payload, SpeakerChange):
        return ("change", payload.speaker, payload.previous, round(payload.score, 9), round(payload.margin, 9),
                round(payload.at, 6), payload.tentative)
    return ("segment", round(payload.start, 6), round(payload.end, 6), payload.speaker, round(payload.score, 9), payload.windows)


def keys(items) -> list[tuple]:
    return [key(getattr(i, "payload", i)) for i in items]


def Seg(start: float, end: float, speaker: SpeakerRef, score: float, windows: int) -> tuple:  # noqa: N802
    return key(SpeakerSegment(start=start, end=end, speaker=speaker, score=score, windows=windows))


def Chg(speaker: SpeakerRef, previous: SpeakerRef | None, score: float, margin: float, at: float,  # noqa: N802
        tentative: bool = False) -> tuple:
    return key(SpeakerChange(speaker=speaker, previous=previous, score=score, margin=margin, at=at, tentative=tentative))


def test_first_known_window_names_the_speaker_at_once() -> None:
    run = Run()
    run.start(R1)
    (d,) = run.window(0, A, score=0.7)
    assert key(d.payload) == Chg(speaker=A, previous=None, score=0.7, margin=WEAK, at=sec(R1))
    assert (d.sample, d.wall_time) == (R1 + FIRST, T0 + (R1 + FIRST) / SAMPLE_RATE)
    assert run.tracker.current == A and run.tracker.changes == 1


def test_confirm_windows_agreeing_windows_change_the_speaker() -> None:
    run = Run()
    run.start(R1)
    for k, score in enumerate((0.7, 0.8, 0.9)):
        run.window(k, A, score=score)
    assert run.window(3, B, score=0.6, margin=0.01) == []
    assert run.tracker.current == A
    decisions = run.window(4, B, score=0.8, margin=0.03)
    assert [type(d.payload) for d in decisions] == [SpeakerSegment, SpeakerChange]
    first_b = window(R1, 3)  # [R1+1.0, R1+2.5): centre R1+1.75, change point 0.25 s before it
    at = first_b.center - HOP // 2
    assert at == R1 + 3 * SAMPLE_RATE // 2
    segment, change = (d.payload for d in decisions)
    assert key(segment) == Seg(start=sec(R1), end=sec(at), speaker=A, score=0.8, windows=3)
    assert key(change) == Chg(speaker=B, previous=A, score=0.7, margin=0.02, at=sec(at))
    assert all(d.sample == window(R1, 4).end for d in decisions)
    run.window(5, B, score=0.9)
    run.end(R1 + 4 * SAMPLE_RATE)
    assert key(run.segments()[-1]) == Seg(
        start=sec(at), end=sec(R1 + 4 * SAMPLE_RATE), speaker=B, score=(0.6 + 0.8 + 0.9) / 3, windows=3
    )


def test_one_odd_window_does_not_flip_the_turn() -> None:
    run = Run()
    run.start(R1)
    for k in range(3):
        run.window(k, A, score=0.8)
    assert run.window(3, B, margin=0.049) == []
    for k in (4, 5):
        assert run.window(k, A, score=0.5) == []
    assert keys(run.changes()) == [Chg(speaker=A, previous=None, score=0.8, margin=WEAK, at=sec(R1))]
    run.end(R1 + 4 * SAMPLE_RATE)
    (segment,) = run.segments()
    assert key(segment) == Seg(start=sec(R1), end=sec(R1) + 4.0, speaker=A, score=0.68, windows=5)  # (3 x 0.8 + 2 x 0.5) / 5


def test_odd_windows_of_different_speakers_do_not_add_up() -> None:
    run = Run()
    run.start(R1)
    run.window(0, A)
    C = SpeakerRef("c", None, True)
    for k, who in enumerate((B, C, B, C), start=1):
        assert run.window(k, who) == []
    assert run.tracker.current == A


@pytest.mark.parametrize("margin", [0.05, DECISIVE, 0.5])
def test_a_decisive_window_changes_at_once(margin: float) -> None:
    run = Run()
    run.start(R1)
    for k in range(3):
        run.window(k, A)
    decisions = run.window(3, B, score=0.65, margin=margin)
    change = decisions[-1].payload
    assert key(change) == Chg(speaker=B, previous=A, score=0.65, margin=margin, at=sec(R1) + 1.5)
    assert decisions[-1].sample == window(R1, 3).end
    assert run.tracker.current == B


def test_unknown_needs_unknown_confirm_windows_and_is_never_decisive() -> None:
    run = Run(TrackerSettings(unknown_confirm_windows=3, tentative_changes=False))
    run.start(R1)
    for k in range(3):
        run.window(k, A)
    assert run.window(3, UNKNOWN, score=0.2, margin=0.9) == []
    assert run.window(4, UNKNOWN, score=0.3, margin=0.9) == []
    decisions = run.window(5, UNKNOWN, score=0.4, margin=0.9)
    segment, change = (d.payload for d in decisions)
    at = window(R1, 3).center - HOP // 2
    assert key(change) == Chg(speaker=UNKNOWN, previous=A, score=0.3, margin=0.9, at=sec(at), tentative=True)  # anonymous: may be named later
    assert segment.end == sec(at) and segment.windows == 3
    # and back to a known speaker: two agreeing windows (or one decisive)
    assert run.window(6, A) == []
    assert run.window(7, A)[-1].payload.speaker == A


def test_stream_opening_with_unknown_speech() -> None:
    run = Run()
    run.start(R1)
    assert run.window(0, UNKNOWN) == run.window(1, UNKNOWN) == []
    (d,) = run.window(2, UNKNOWN)
    assert key(d.payload) == Chg(speaker=UNKNOWN, previous=None, score=0.8, margin=WEAK, at=sec(R1), tentative=True)


def test_a_new_voice_opening_a_region_changes_at_the_region_start() -> None:
    run = Run()
    run.start(R1)
    run.window(0, A)
    run.window(1, A)
    (seg_a,) = run.end(R1 + 2 * SAMPLE_RATE)
    assert key(seg_a.payload) == Seg(start=sec(R1), end=sec(R1) + 2.0, speaker=A, score=0.8, windows=2)
    run.start(R2)
    assert run.window(0, B) == []
    (d,) = run.window(1, B)  # the previous turn was already closed by the pause
    assert key(d.payload) == Chg(speaker=B, previous=A, score=0.8, margin=WEAK, at=sec(R2))
    run.window(2, B)
    (seg_b,) = run.end(R2 + 3 * SAMPLE_RATE)
    assert key(seg_b.payload) == Seg(start=sec(R2), end=sec(R2) + 3.0, speaker=B, score=0.8, windows=3)


def test_a_change_on_the_first_full_window_keeps_the_first_windows_turn() -> None:
    """The first full window also starts at the region start, but the region's first window was A:
    B did not open the region, so the change point is its centre - hop/2 and A keeps a segment."""
    run = Run()
    run.start(R1)
    run.window(0, A, score=0.7)
    decisions = run.window(1, B, margin=DECISIVE)
    at = window(R1, 1).center - HOP // 2
    assert at == R1 + SAMPLE_RATE // 2
    assert keys(decisions) == [
        Seg(start=sec(R1), end=sec(at), speaker=A, score=0.7, windows=1),
        Chg(speaker=B, previous=A, score=0.8, margin=DECISIVE, at=sec(at)),
    ]


def test_change_point_is_clamped_to_the_open_turn() -> None:
    run = Run(TrackerSettings(confirm_windows=1, tentative_changes=False))
    run.start(R1)
    for k in range(4):
        run.window(k, A)
    run.window(4, B)  # B from window 4 ([R1+1.5, R1+3.0)): at = R1+2.25-0.25 = R1+2.0
    assert run.changes()[-1].at == sec(R1) + 2.0
    run.window(5, A)  # A again at once: centre R1+2.75-0.25 = R1+2.5, inside B's turn
    assert run.changes()[-1].at == sec(R1) + 2.5
    run.window(6, B)
    assert [s.windows for s in run.segments()] == [4, 1, 1]
    assert [(s.start - sec(R1), s.end - sec(R1)) for s in run.segments()] == [(0.0, 2.0), (2.0, 2.5), (2.5, 3.0)]


def test_same_speaker_after_a_pause_is_a_new_segment_without_a_change() -> None:
    run = Run()
    run.start(R1)
    run.window(0, A, score=0.6)
    run.end(R1 + SAMPLE_RATE + 100)
    run.start(R2)
    for k in range(3):
        assert run.window(k, A, score=0.9) == []
    run.end(R2 + 5 * SAMPLE_RATE // 2)
    assert len(run.changes()) == 1
    assert keys(run.segments()) == [
        Seg(start=sec(R1), end=sec(R1 + SAMPLE_RATE + 100), speaker=A, score=0.6, windows=1),
        Seg(start=sec(R2), end=sec(R2) + 2.5, speaker=A, score=0.9, windows=3),
    ]


@pytest.mark.parametrize(("pause_s", "bridged"), [(0.5, True), (0.75, True), (0.8, False)])
def test_a_short_pause_inside_a_turn_is_bridged(pause_s: float, bridged: bool) -> None:
    """The VAD ends a region at a breath; the next segment of the same voice starts where the last ended."""
    run = Run()
    run.start(R1)
    for k in range(3):
        run.window(k, A)
    first_end = R1 + 2 * SAMPLE_RATE
    run.end(first_end)
    resume = first_end + round(pause_s * SAMPLE_RATE)
    run.start(resume)
    for k in range(2):
        assert run.window(k, A) == []
    run.end(resume + 2 * SAMPLE_RATE)
    starts = [s.start for s in run.segments()]
    assert starts == [sec(R1), sec(first_end) if bridged else sec(resume)]
    assert len(run.changes()) == 1


def test_a_pause_with_another_voice_in_it_is_not_bridged() -> None:
    run = Run()
    run.start(R1)
    for k in range(3):
        run.window(k, A)
    run.end(R1 + 2 * SAMPLE_RATE)
    run.start(R1 + 2 * SAMPLE_RATE + 8_000)
    run.window(0, B, margin=DECISIVE)
    run.end(R1 + 3 * SAMPLE_RATE + 8_000)
    back = R1 + 3 * SAMPLE_RATE + 16_000
    run.start(back)
    for k in range(2):
        run.window(k, A, margin=DECISIVE)
    run.end(back + 2 * SAMPLE_RATE)
    assert [(s.speaker, s.start) for s in run.segments()] == [
        (A, sec(R1)), (B, sec(R1 + 2 * SAMPLE_RATE + 8_000)), (A, sec(back)),
    ]


def test_bridge_pause_zero_keeps_segments_to_the_regions() -> None:
    run = Run(TrackerSettings(tentative_changes=False, bridge_pause_s=0.0))
    run.start(R1)
    run.window(0, A)
    run.end(R1 + SAMPLE_RATE)
    run.start(R1 + SAMPLE_RATE + 1_600)
    run.window(0, A)
    run.end(R1 + 2 * SAMPLE_RATE + 1_600)
    assert [s.start for s in run.segments()] == [sec(R1), sec(R1 + SAMPLE_RATE + 1_600)]
    with pytest.raises(ConfigError, match="tracker.bridge_pause_s"):
        TrackerSettings(bridge_pause_s=-1.0)


def test_flush_closes_the_open_turn() -> None:
    run = Run()
    run.start(R1)
    for k in range(3):
        run.window(k, A, score=0.5 + 0.1 * k)
    end = R1 + 5 * SAMPLE_RATE // 2 + 37
    (d,) = run.tracker.flush(end, 123.0)
    assert key(d.payload) == Seg(start=sec(R1), end=sec(end), speaker=A, score=0.6, windows=3)
    assert (d.sample, d.wall_time) == (end, 123.0)
    assert run.tracker.flush(end, 124.0) == []  # nothing left open


def test_a_region_with_only_a_brief_new_voice_is_attributed_to_it_at_speech_end() -> None:
    run = Run()
    run.start(R1)
    run.window(0, A)
    run.end(R1 + SAMPLE_RATE)
    run.start(R2)
    assert run.window(0, B, score=0.7) == []
    end = R2 + 6 * SAMPLE_RATE // 5
    decisions = run.end(end)
    assert keys(decisions) == [
        Chg(speaker=B, previous=A, score=0.7, margin=WEAK, at=sec(R2)),
        Seg(start=sec(R2), end=sec(end), speaker=B, score=0.7, windows=1),
    ]
    assert all((d.sample, d.wall_time) == (end, T0 + end / SAMPLE_RATE) for d in decisions)
    # unknown speech too, below unknown_confirm_windows
    run.start(R2 + 10 * SAMPLE_RATE)
    run.window(0, UNKNOWN, score=0.3)
    run.window(1, UNKNOWN, score=0.4)
    decisions = run.end(R2 + 12 * SAMPLE_RATE)
    assert [type(d.payload) for d in decisions] == [SpeakerChange, SpeakerSegment]
    assert decisions[0].payload.speaker == UNKNOWN and decisions[1].payload.windows == 2


def test_a_brief_new_voice_after_the_current_one_in_the_same_region_is_not_attributed() -> None:
    run = Run()
    run.start(R1)
    run.window(0, A)
    run.window(1, A)
    run.window(2, B)
    (d,) = run.end(R1 + 2 * SAMPLE_RATE)
    assert key(d.payload) == Seg(start=sec(R1), end=sec(R1) + 2.0, speaker=A, score=0.8, windows=2)
    assert run.tracker.current == A


def test_segment_windows_and_scores_add_up_over_a_conversation() -> None:
    run = Run()
    rng = np.random.default_rng(3)
    plan = [(R1, [A] * 4 + [B] * 5), (R2, [B] * 3 + [A] * 6 + [UNKNOWN] * 4)]
    scores: dict[int, float] = {}
    for region, voices in plan:
        run.start(region)
        for k, who in enumerate(voices):
            scores[region + k] = float(rng.uniform(0.6, 0.95))
            run.window(k, who, score=scores[region + k])
        run.end(window(region, len(voices) - 1).end)
    segs = run.segments()
    assert [(s.speaker, s.windows) for s in segs] == [(A, 4), (B, 5), (B, 3), (A, 6), (UNKNOWN, 4)]
    flat = [scores[r + k] for r, v in plan for k in range(len(v))]
    i = 0
    for seg in segs:
        assert seg.score == pytest.approx(np.mean(flat[i : i + seg.windows]))
        i += seg.windows
    assert [c.speaker for c in run.changes()] == [A, B, A, UNKNOWN]
    for a, b in zip(segs, segs[1:]):
        assert a.end <= b.start


# -- tentative changes (on by default) ---------------------------------------------------------------


def test_tentative_change_then_confirmed() -> None:
    run = Run(TrackerSettings())
    assert run.tracker.phase == Phase.IDLE
    run.start(R1)
    for k in range(3):
        run.window(k, A, score=0.9)
    assert run.tracker.phase == Phase.SPEAKING
    at = window(R1, 3).center - HOP // 2
    assert keys(run.window(3, B, score=0.7)) == [Chg(B, A, 0.7, WEAK, sec(at), tentative=True)]
    assert run.tracker.current == A  # announced, not yet the speaker
    assert run.tracker.phase == Phase.TENTATIVE
    assert keys(run.window(4, B, score=0.8)) == [
        Seg(sec(R1), sec(at), A, 0.9, 3),
        Chg(B, A, 0.75, WEAK, sec(at)),
    ]
    assert run.tracker.current == B
    assert run.tracker.phase == Phase.SPEAKING


def test_tentative_change_withdrawn_by_the_current_speaker() -> None:
    run = Run(TrackerSettings())
    run.start(R1)
    for k in range(3):
        run.window(k, A, score=0.9)
    (tentative,) = run.window(3, B)
    assert tentative.payload.tentative
    assert run.tracker.phase == Phase.TENTATIVE
    (withdrawal,) = run.window(4, A, score=0.6)
    assert run.tracker.phase == Phase.SPEAKING
    assert key(withdrawal.payload) == Chg(A, A, 0.9, 0.0, tentative.payload.at)  # A's turn so far, before window 4
    assert withdrawal.sample == window(R1, 4).end
    assert run.tracker.current == A
    assert keys(run.end(R1 + 3 * SAMPLE_RATE)) == [Seg(sec(R1), sec(R1) + 3.0, A, (0.9 * 3 + 0.6) / 4, 4)]


def test_unknown_windows_are_never_announced() -> None:
    run = Run(TrackerSettings())
    run.start(R1)
    run.window(0, A)
    assert run.window(1, UNKNOWN) == run.window(2, UNKNOWN) == []


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"confirm_windows": 0}, "tracker.confirm_windows"),
        ({"confirm_windows": 11}, "tracker.confirm_windows"),
        ({"unknown_confirm_windows": 0}, "tracker.unknown_confirm_windows"),
        ({"decisive_margin": -0.1}, "decision.decisive_margin"),
        ({"decisive_margin": 2.5}, "decision.decisive_margin"),
    ],
)
def test_tracker_settings_validation_names_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        if key.startswith("decision."):
            replace(GE2E, **kwargs)
        else:
            TrackerSettings(**kwargs)
    assert err.value.key == key


# -- probes and weak evidence: tentative changes sooner -------------------------------------------------

PROBE = SAMPLE_RATE * 4 // 5  # 0.8 s probes


def probe(region: int, end_s: float, nearest: SpeakerRef, score: float, margin: float, known: bool = False) -> MatchedWindow:
    end = region + int(round(end_s * SAMPLE_RATE))
    w = Window(start=end - PROBE, end=end, feats=np.zeros((1, 1), np.float32), speech_fraction=1.0,
               wall_time=T0 + end / SAMPLE_RATE, region_start=region, first_in_region=False, probe=True)
    m = Match(speaker_id=nearest.id if known else None, name=nearest.name if known else None, score=score,
              margin=margin, runner_up="z", known=known, nearest=nearest.id, nearest_name=nearest.name)
    return MatchedWindow(w, m)


def test_a_probe_announces_a_hand_over_tentatively_and_the_regular_windows_confirm_it() -> None:
    r = Run(TrackerSettings())
    r.start(R1)
    r.window(0, A, margin=DECISIVE)
    r.window(1, A)
    r.window(2, A)  # ends at 2.0 s
    out = r.tracker.process(probe(R1, 2.35, B, score=0.66, margin=0.10))  # below the matcher's threshold
    assert [(d.payload.speaker, d.payload.tentative, sec(d.sample - R1)) for d in out] == [(B, True, 2.35)]
    # the next regular window began before the tentative change point: naming Ann there withdraws nothing
    assert r.window(3, A) == []
    confirmed = r.window(4, B, margin=DECISIVE)
    assert [(c.speaker, c.tentative) for c in (d.payload for d in confirmed) if isinstance(c, SpeakerChange)] == [(B, False)]
    assert [c.speaker for c in r.changes()] == [A, B]


def test_a_probe_alone_never_confirms_and_a_wrong_one_is_withdrawn() -> None:
    r = Run(TrackerSettings())
    r.start(R1)
    r.window(0, A, margin=DECISIVE)
    r.tracker.process(probe(R1, 1.35, B, score=0.9, margin=0.3, known=True))
    assert r.tracker.current == A, "a probe changes nothing but the announcement"
    for k in range(1, 5):
        r.window(k, A)
    changes = [(c.speaker, c.tentative) for c in r.changes()]
    assert changes[-1] == (A, False), "Ann's windows after the probe's change point withdraw it"


def test_a_new_voice_heard_only_in_a_probe_stands_until_the_next_region_decides() -> None:
    """A new voice's short first phrase (too short for a regular window) is announced by a probe;
    the pause after it is no evidence for the old voice, so the announcement is not withdrawn, and
    the confirmation in the next region keeps its change point."""
    r = Run(TrackerSettings())
    r.start(R1)
    for k in range(4):
        r.window(k, A, margin=DECISIVE)
    r.end(R1 + 3 * SAMPLE_RATE)
    short = R1 + 4 * SAMPLE_RATE
    r.start(short)
    r.decisions += r.tracker.process(probe(short, 0.6, B, score=0.75, margin=0.2))
    r.end(short + 7 * SAMPLE_RATE // 10)
    r.start(short + SAMPLE_RATE)
    r.window(0, B, margin=DECISIVE)
    assert [(c.speaker, c.previous, c.at, c.tentative) for c in r.changes()] == [
        (A, None, sec(R1), False),
        (B, A, sec(short), True),
        (B, A, sec(short), False),
    ]
    r.end(short + 3 * SAMPLE_RATE)
    assert [(s.speaker, s.start) for s in r.segments()] == [(A, sec(R1)), (B, sec(short))]


def test_a_probe_guess_in_a_region_the_old_voice_spoke_in_is_withdrawn_at_its_end() -> None:
    r = Run(TrackerSettings())
    r.start(R1)
    for k in range(3):
        r.window(k, A, margin=DECISIVE)
    r.decisions += r.tracker.process(probe(R1, 2.25, B, score=0.75, margin=0.2))
    r.end(R1 + 3 * SAMPLE_RATE)  # 0.75 s of the region after the guess, with nothing for Bob
    assert [(c.speaker, c.previous, c.tentative) for c in r.changes()] == [(A, None, False), (B, A, True), (A, A, False)]
    assert [(s.speaker, s.end) for s in r.segments()] == [(A, sec(R1 + 3 * SAMPLE_RATE))]


def _ann_then_bob_in_her_region_tail(settings: TrackerSettings | None = None) -> tuple[Run, float]:
    """Ann speaks 3 s; the region's last probe (ending at its end) announces Bob. Returns the run
    and the announced change point."""
    r = Run(settings or TrackerSettings())
    r.start(R1)
    for k in range(4):
        r.window(k, A, margin=DECISIVE)
    (d,) = r.tracker.process(probe(R1, 3.0, B, score=0.75, margin=0.2))
    r.decisions.append(d)
    r.end(R1 + 3 * SAMPLE_RATE)
    return r, d.payload.at


def test_a_new_voice_whose_first_words_end_a_region_begins_there() -> None:
    """Bob's first words end Ann's region, before a pause: the announcement stands over the pause,
    Ann's segment ends where it said Bob began, and Bob's confirmed change keeps that point."""
    r, at = _ann_then_bob_in_her_region_tail()
    assert [(c.speaker, c.tentative) for c in r.changes()] == [(A, False), (B, True)], "not withdrawn at the pause"
    assert [(s.speaker, s.start, s.end) for s in r.segments()] == [(A, sec(R1), at)]
    nxt = R1 + 7 * SAMPLE_RATE // 2  # a 0.5 s pause
    r.start(nxt)
    r.window(0, B, margin=DECISIVE)
    r.end(nxt + 2 * SAMPLE_RATE)
    assert [(c.speaker, c.previous, c.at, c.tentative) for c in r.changes()][-1] == (B, A, at, False)
    assert [(s.speaker, s.start, s.end) for s in r.segments()] == [(A, sec(R1), at), (B, at, sec(nxt) + 2)]


def test_the_old_voice_going_on_after_the_pause_withdraws_it_and_keeps_its_words() -> None:
    r, at = _ann_then_bob_in_her_region_tail()
    nxt = R1 + 7 * SAMPLE_RATE // 2
    r.start(nxt)
    r.window(0, A, margin=DECISIVE)
    r.end(nxt + 2 * SAMPLE_RATE)
    assert [(c.speaker, c.previous, c.tentative) for c in r.changes()] == [(A, None, False), (B, A, True), (A, A, False)]
    assert [(s.speaker, s.start, s.end) for s in r.segments()] == [(A, sec(R1), at), (A, at, sec(nxt) + 2)]


def test_after_a_long_pause_the_held_words_are_the_old_voices() -> None:
    r, at = _ann_then_bob_in_her_region_tail()
    late = R1 + 5 * SAMPLE_RATE  # 2 s of silence: longer than bridge_pause_s
    r.start(late)
    withdrawn = [(d.payload.speaker, d.payload.tentative, sec(d.sample)) for d in r.decisions[-2:]
                 if isinstance(d.payload, SpeakerChange)]
    assert withdrawn == [(A, False, sec(late))]
    assert [(s.speaker, s.start, s.end) for s in r.segments()] == [(A, sec(R1), at), (A, at, sec(R1) + 3)]
    r.window(0, B, margin=DECISIVE)
    assert r.changes()[-1].at == sec(late), "Bob began after the pause, not before it"


def tail_probe(region: int, end_s: float, nearest: SpeakerRef, score: float, runner_up: SpeakerRef,
               margin: float) -> MatchedWindow:
    mw = probe(region, end_s, nearest, score, margin, known=True)
    return replace(mw, match=replace(mw.match, runner_up=runner_up.id, runner_up_name=runner_up.name))


def test_a_region_whose_last_probes_score_another_voice_at_the_threshold_is_cut_there() -> None:
    """Too mixed to announce anyone, but the last two probes score Bob at least tail_score as the
    runner-up: if the next region brings Bob, he began at the first of them."""
    r = Run(TrackerSettings())
    r.start(R1)
    for k in range(4):
        r.window(k, A, margin=DECISIVE)
    for end_s, bob in ((2.5, 0.62), (2.75, 0.70), (3.0, 0.72)):
        r.decisions += r.tracker.process(tail_probe(R1, end_s, A, 0.76, B, margin=0.76 - bob))
    (segment, heard) = r.end(R1 + 3 * SAMPLE_RATE)
    assert r.tracker.phase == Phase.HELD
    first = R1 + round(2.75 * SAMPLE_RATE) - PROBE // 2  # the centre of the first probe at the bar
    assert [(s.speaker, s.end) for s in r.segments()] == [(A, sec(first))]
    # announced when the region ends, not after the pause; score and margin are the last probe's
    c = heard.payload
    assert (c.speaker, c.previous, c.at, c.tentative, heard.sample) == (B, A, sec(first), True, R1 + 3 * SAMPLE_RATE)
    assert (c.score, c.margin) == (pytest.approx(0.72), pytest.approx(-0.04))
    nxt = R1 + 7 * SAMPLE_RATE // 2
    r.start(nxt)
    assert r.tracker.process(probe(nxt, 0.6, B, score=0.8, margin=0.2, known=True)) == [], "placed already"
    r.window(0, B, margin=DECISIVE)
    assert r.tracker.phase == Phase.SPEAKING
    assert [(c.speaker, c.at, c.tentative) for c in r.changes()][-2:] == [(B, sec(first), True), (B, sec(first), False)]


def test_a_runner_up_far_behind_the_speaking_voice_is_not_heard_in_the_tail() -> None:
    """The same tail, but the speaking voice leads each probe by the relaxed margin or more: the
    probes are hers, however high Bob scores (a model whose scores spread as ECAPA-TDNN's do)."""
    lead = GE2E.relaxed_margin
    r = Run(TrackerSettings())
    r.start(R1)
    for k in range(4):
        r.window(k, A, margin=DECISIVE)
    for end_s in (2.75, 3.0):
        r.decisions += r.tracker.process(tail_probe(R1, end_s, A, 0.72 + lead, B, margin=lead))
    (segment,) = r.end(R1 + 3 * SAMPLE_RATE)
    assert r.tracker.phase == Phase.SPEAKING and [c.speaker for c in r.changes()] == [A]
    assert (segment.payload.speaker, segment.payload.end) == (A, sec(R1) + 3)
    # a hair under the lead, Bob is heard again
    r = Run(TrackerSettings())
    r.start(R1)
    for k in range(4):
        r.window(k, A, margin=DECISIVE)
    for end_s in (2.75, 3.0):
        r.decisions += r.tracker.process(tail_probe(R1, end_s, A, 0.72 + lead - 0.01, B, margin=lead - 0.01))
    r.end(R1 + 3 * SAMPLE_RATE)
    assert r.tracker.phase == Phase.HELD and r.changes()[-1].speaker == B


def test_a_voice_announced_earlier_in_the_region_is_not_announced_again_at_its_end() -> None:
    r = Run(TrackerSettings())
    r.start(R1)
    for k in range(4):
        r.window(k, A, margin=DECISIVE)
    (early,) = r.tracker.process(probe(R1, 2.0, B, score=0.75, margin=0.2))
    for end_s in (2.75, 3.0):
        r.decisions += r.tracker.process(tail_probe(R1, end_s, A, 0.76, B, margin=0.04))
    r.decisions.append(early)
    r.end(R1 + 3 * SAMPLE_RATE)
    assert [(c.speaker, c.tentative) for c in r.changes()] == [(A, False), (B, True)], "one announcement"
    assert [(s.speaker, s.end) for s in r.segments()] == [(A, early.payload.at)], "cut at the earlier point"


def test_a_short_region_a_probe_names_as_the_current_voice_continues_the_turn() -> None:
    """A region too short for a regular window, after a short pause: a probe naming the current
    voice continues the turn over it."""
    r = Run(TrackerSettings())
    r.start(R1)
    for k in range(3):
        r.window(k, A, margin=DECISIVE)
    r.end(R1 + 2 * SAMPLE_RATE)
    short = R1 + 5 * SAMPLE_RATE // 2
    r.start(short)
    r.decisions += r.tracker.process(probe(short, 0.6, A, score=0.75, margin=0.2, known=True))
    r.end(short + 9 * SAMPLE_RATE // 10)
    assert [(s.speaker, s.start, s.end) for s in r.segments()] == [
        (A, sec(R1), sec(R1) + 2), (A, sec(R1) + 2, sec(short) + 0.9),
    ]
    assert len(r.changes()) == 1


def test_decisions_at_a_regions_end_are_dated_when_the_vad_knew() -> None:
    """The VAD hears end_silence_ms of quiet before it ends a region: what is decided then is
    stamped there, not at the region's end."""
    r = Run(TrackerSettings())
    r.start(R1)
    r.window(0, A, margin=DECISIVE)
    end, lag = R1 + 2 * SAMPLE_RATE, SAMPLE_RATE // 4
    (seg,) = r.tracker.process(SpeechEnd(end, T0 + end / SAMPLE_RATE, lag=lag))
    assert (seg.payload.end, seg.sample, seg.wall_time) == (sec(end), end + lag, T0 + sec(end) + 0.25)


GUEST = SpeakerRef("unknown-1", None, False)


@pytest.mark.parametrize(
    ("label_score", "label_margin", "current_known", "announced"),
    [
        (0.70, 0.15, True, True),
        (0.58, 0.15, True, False),  # below tentative_score
        (0.70, 0.05, True, False),  # not clearly nearer the guest than any enrolled voice
        (0.70, 0.15, False, False),  # an unnamed voice is speaking already
    ],
)
def test_a_probe_near_a_provisional_speaker_announces_that_voice_returning(
    label_score: float, label_margin: float, current_known: bool, announced: bool
) -> None:
    r = Run(TrackerSettings())
    r.start(R1)
    for k in range(4):
        r.window(k, A if current_known else UNKNOWN, margin=DECISIVE)
    mw = probe(R1, 3.35, A, score=0.55, margin=0.02)  # the matcher names nobody
    mw = MatchedWindow(mw.window, mw.match, label=GUEST, label_score=label_score, label_margin=label_margin)
    out = r.tracker.process(mw)
    assert [(d.payload.speaker, d.payload.tentative) for d in out] == ([(GUEST, True)] if announced else [])


@pytest.mark.parametrize(
    ("guest", "label_score", "announced"),
    [
        (GUEST, 0.60, True),  # Bob's voiceprint leads every provisional centroid by tentative_margin
        (GUEST, 0.70, False),  # by less: most likely the guest, near Bob
        (UNKNOWN, 0.60, False),  # the voice speaking has no centroid yet to be compared with
    ],
)
def test_a_probe_nearer_an_enrolled_voice_than_the_speaking_guest_announces_it(
    guest: SpeakerRef, label_score: float, announced: bool
) -> None:
    r = Run(TrackerSettings())
    r.start(R1)
    for k in range(4):
        w = MatchedWindow(window(R1, k), match(UNKNOWN, score=0.5))
        r.decisions += r.tracker.process(w if guest == UNKNOWN else replace(w, label=guest, label_score=0.85, label_margin=0.3))
    assert r.tracker.current == guest
    mw = probe(R1, 3.35, B, score=0.75, margin=0.2, known=True)
    out = r.tracker.process(replace(mw, label=GUEST, label_score=label_score, label_margin=label_score - 0.75))
    assert [(d.payload.speaker, d.payload.tentative) for d in out] == ([(B, True)] if announced else [])


@pytest.mark.parametrize(
    ("score", "margin", "uncertain", "current_known", "is_probe", "announced"),
    [
        (0.66, 0.10, False, True, True, True),
        (0.58, 0.10, False, True, True, False),  # below tentative_score
        (0.66, 0.05, False, True, True, False),  # below tentative_margin
        (0.66, 0.10, True, True, True, True),  # a probe is judged by the tentative bar, not the threshold band
        (0.66, 0.10, True, True, False, False),  # an uncertain regular window never acts alone
        (0.66, 0.10, False, True, False, True),  # a regular window the matcher left unnamed is evidence too
        (0.66, 0.10, False, False, True, False),  # an unnamed voice is speaking: a near miss is most likely it
    ],
)
def test_weak_evidence_rules(
    score: float, margin: float, uncertain: bool, current_known: bool, is_probe: bool, announced: bool
) -> None:
    r = Run(TrackerSettings())
    r.start(R1)
    speaker = A if current_known else UNKNOWN
    for k in range(4):
        r.window(k, speaker, margin=DECISIVE)
    mw = probe(R1, 3.35, B, score, margin)
    if not is_probe:
        mw = MatchedWindow(window(R1, 4), mw.match)
    if uncertain:
        mw = MatchedWindow(mw.window, Match(**{**mw.match.__dict__, "uncertain": True}))
    out = r.tracker.process(mw)
    assert bool(out) == announced
    if announced:
        (d,) = out
        assert d.payload.tentative and d.payload.speaker == B


def test_a_probe_the_matcher_names_needs_only_the_decisive_margin() -> None:
    """0.06 ahead of the runner-up: enough when the probe clears the matcher's threshold (known),
    as for a regular window acting alone; not for a near miss."""
    for known, announced in ((True, True), (False, False)):
        r = Run(TrackerSettings())
        r.start(R1)
        for k in range(4):
            r.window(k, A, margin=DECISIVE)
        out = r.tracker.process(probe(R1, 3.35, B, score=0.75 if known else 0.66, margin=0.06, known=known))
        assert [(d.payload.speaker, d.payload.tentative) for d in out] == ([(B, True)] if announced else [])


def test_a_narrow_announcement_is_early_but_a_firmer_probe_places_the_change() -> None:
    """A change announced on a narrow margin comes early, from a probe that is still partly the old
    voice: its change point is not trusted. A later probe for the same voice that clears
    tentative_margin announces it again, and the confirmed change keeps that point."""
    r = Run(TrackerSettings())
    r.start(R1)
    for k in range(4):
        r.window(k, A, margin=DECISIVE)
    (narrow,) = r.tracker.process(probe(R1, 3.35, B, score=0.74, margin=0.06, known=True))
    (firm,) = r.tracker.process(probe(R1, 3.6, B, score=0.78, margin=0.2, known=True))
    assert (firm.payload.speaker, firm.payload.tentative) == (B, True)
    assert firm.payload.at > narrow.payload.at
    assert r.tracker.process(probe(R1, 3.85, B, score=0.8, margin=0.25, known=True)) == [], "once is enough"
    confirmed = [d.payload for d in r.window(6, B, margin=DECISIVE) if isinstance(d.payload, SpeakerChange)]
    assert [(c.speaker, c.tentative, c.at) for c in confirmed] == [(B, False, firm.payload.at)]


def test_a_narrow_announcement_alone_does_not_place_the_change() -> None:
    r = Run(TrackerSettings())
    r.start(R1)
    for k in range(4):
        r.window(k, A, margin=DECISIVE)
    (narrow,) = r.tracker.process(probe(R1, 3.35, B, score=0.74, margin=0.06, known=True))
    confirmed = [d.payload for d in r.window(6, B, margin=DECISIVE) if isinstance(d.payload, SpeakerChange)]
    first_b = window(R1, 6)
    assert [(c.speaker, c.at) for c in confirmed] == [(B, sec(first_b.center - HOP // 2))]
    assert confirmed[0].at > narrow.payload.at


def _after_own_probes(n: int) -> Run:
    """Ann speaking, with ``n`` probes of hers scoring 0.75: her own level."""
    r = Run(TrackerSettings())
    r.start(R1)
    for k in range(4):
        r.window(k, A, margin=DECISIVE)
    for i in range(n):
        r.decisions += r.tracker.process(probe(R1, 2.6 + 0.25 * i, A, score=0.75, margin=0.2, known=True))
    return r


@pytest.mark.parametrize(
    ("own", "nearest", "score", "margin", "announced"),
    [
        (3, A, 0.50, 0.05, True),  # near no enrolled voice, 0.25 below Ann's level
        (2, A, 0.50, 0.05, False),  # too few of Ann's probes for a level
        (3, A, 0.59, 0.05, False),  # 0.16 below her level: within departure_drop
        (3, B, 0.61, 0.05, False),  # near Bob (>= tentative_score), though not clearly enough to name him
    ],
)
def test_a_probe_falling_away_from_the_speakers_own_level_announces_an_unnamed_voice(
    own: int, nearest: SpeakerRef, score: float, margin: float, announced: bool
) -> None:
    r = _after_own_probes(own)
    out = r.tracker.process(probe(R1, 4.1, nearest, score, margin))
    assert [(d.payload.speaker, d.payload.tentative) for d in out] == ([(UNKNOWN, True)] if announced else [])


def test_a_voice_that_fell_away_and_is_then_named_keeps_the_change_point() -> None:
    r = _after_own_probes(3)
    (fell,) = r.tracker.process(probe(R1, 4.1, A, score=0.50, margin=0.05))
    (named,) = r.tracker.process(probe(R1, 4.6, B, score=0.72, margin=0.2))
    assert (named.payload.speaker, named.payload.tentative, named.payload.at) == (B, True, fell.payload.at)
    confirmed = [d.payload for d in r.window(7, B, margin=DECISIVE) if isinstance(d.payload, SpeakerChange)]
    assert [(c.speaker, c.tentative, c.at) for c in confirmed] == [(B, False, fell.payload.at)]


def test_tentative_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="decision.tentative_score"):
        replace(GE2E, tentative_score=1.5)
    with pytest.raises(ConfigError, match="decision.tentative_margin"):
        replace(GE2E, tentative_margin=-0.1)
    with pytest.raises(ConfigError, match="decision.departure_drop"):
        replace(GE2E, departure_drop=-0.1)


def near_miss(w: Window, nearest: SpeakerRef, score: float) -> MatchedWindow:
    """A window the matcher names nobody for, with ``nearest`` ahead by less than any bar."""
    return MatchedWindow(w, Match(speaker_id=None, name=None, score=score, margin=0.03, runner_up="z", known=False,
                                  nearest=nearest.id, nearest_name=nearest.name))


C = SpeakerRef("c", "Cat", True)


@pytest.mark.parametrize(
    ("probe_first", "probe_voice", "probe_score", "window_voice", "current", "announced_at"),
    [
        (True, B, 0.66, B, A, 1.0),  # the probe, then the first window: announced at the window
        (False, B, 0.66, B, A, 1.35),  # the first window, then a probe: announced at the probe
        (True, C, 0.66, B, A, None),  # they disagree
        (True, B, 0.58, B, A, None),  # one of them under tentative_score
        (True, A, 0.66, A, A, None),  # the voice speaking already
        (True, B, 0.66, B, GUEST, None),  # an unnamed voice speaks: a near miss is most likely it
    ],
)
def test_two_agreeing_near_misses_announce_the_new_voice(probe_first: bool, probe_voice: SpeakerRef, probe_score: float,
                                                         window_voice: SpeakerRef, current: SpeakerRef,
                                                         announced_at: float | None) -> None:
    """In a room a new voice is nearest from its first window on, but under every margin: a window
    and the probe beside it that agree on it announce it (tentatively) a window sooner."""
    r = Run(TrackerSettings())
    r.start(R1)
    for k in range(3):
        w = MatchedWindow(window(R1, k), match(current if current.known else UNKNOWN, margin=DECISIVE))
        r.decisions += r.tracker.process(w if current.known else replace(w, label=current, label_score=0.85, label_margin=0.3))
    assert r.tracker.current == current
    r.end(R1 + 3 * SAMPLE_RATE)
    r.start(R2)
    pieces = [near_miss(probe(R2, 0.8 if probe_first else 1.35, probe_voice, 0, 0).window, probe_voice, probe_score),
              near_miss(window(R2, 0), window_voice, 0.68)]
    out = [d for mw in (pieces if probe_first else pieces[::-1]) for d in r.tracker.process(mw)]
    changes = [(d.payload.speaker, d.payload.tentative, sec(d.sample - R2)) for d in out if isinstance(d.payload, SpeakerChange)]
    assert changes == ([(window_voice, True, announced_at)] if announced_at is not None else [])
