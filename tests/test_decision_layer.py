"""The decision layer end to end on hand-made rankings: embedded windows and speech boundaries in,
every event payload out, in order; nothing is published by the layer itself."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from decision_values import GE2E

from speakerd import events as ev
from speakerd.audio import SAMPLE_RATE
from speakerd.decisions.clustering import ProvisionalSettings
from speakerd.decisions.evidence import Candidate
from speakerd.decisions.layer import DecisionLayer
from speakerd.decisions.tracker import Phase, TrackerSettings
from speakerd.decisions.values import DecisionValues
from speakerd.embedding.worker import EmbeddedWindow
from speakerd.vad import SpeechEnd, SpeechStart
from speakerd.windows import Window

HOP = SAMPLE_RATE // 2
FIRST, FULL, PROBE = SAMPLE_RATE, SAMPLE_RATE * 3 // 2, SAMPLE_RATE * 4 // 5
T0 = 1_700_000_000.0
R1 = 10 * SAMPLE_RATE
ANN, BOB = ("a", "Ann"), ("b", "Bob")


class Scores:
    """A ranker whose 'embedding' is the two enrolled speakers' scores: [Ann, Bob]."""

    def rank(self, embeddings: np.ndarray) -> list[list[Candidate]]:
        return [sorted([(*ANN, float(e[0])), (*BOB, float(e[1]))], key=lambda c: -c[2]) for e in embeddings]


def layer(values: DecisionValues = GE2E) -> DecisionLayer:
    return DecisionLayer(values, TrackerSettings(), ProvisionalSettings(enabled=False), ranker=Scores(), dim=2, hop_samples=HOP)


def regular(region: int, k: int, ann: float, bob: float) -> EmbeddedWindow:
    end = region + FIRST if k == 0 else region + FULL + (k - 1) * HOP
    start = end - (FIRST if k == 0 else FULL)
    w = Window(start, end, np.zeros((1, 1), np.float32), 1.0, T0 + end / SAMPLE_RATE, region, k == 0)
    return EmbeddedWindow(w, np.array([ann, bob], np.float64))


def probe(region: int, end_s: float, ann: float, bob: float) -> EmbeddedWindow:
    end = region + round(end_s * SAMPLE_RATE)
    w = Window(end - PROBE, end, np.zeros((1, 1), np.float32), 1.0, T0 + end / SAMPLE_RATE, region, False, probe=True)
    return EmbeddedWindow(w, np.array([ann, bob], np.float64))


def boundary(kind: type, sample: int) -> SpeechStart | SpeechEnd:
    return kind(sample, T0 + sample / SAMPLE_RATE)


def test_a_turn_end_held_over_a_long_pause_is_given_back_to_the_old_voice() -> None:
    """A region ends with Bob's score at the threshold in its last probes: Ann's turn is cut there
    and the rest held. Bob does not come after the pause (longer than bridge_pause_s): the held end
    is Ann's segment and Bob's tentative change is withdrawn, both before the next region starts.
    No session voiceprints: this ranker's 'embeddings' are score pairs, all nearly parallel, so Ann's
    session voiceprint would lift her probes 0.2 ahead of Bob, and a runner-up that far behind is not
    heard (``policy.tail_voice``)."""
    d = layer(replace(GE2E, adapt_windows=0))
    out = d.process([boundary(SpeechStart, R1)]).events
    for k in range(4):
        out += d.process([regular(R1, k, 0.80, 0.74)]).events  # Ann, decisive margin 0.06
    for end_s, bob in ((2.5, 0.62), (2.75, 0.70), (3.0, 0.72)):
        out += d.process([probe(R1, end_s, 0.76, bob)]).events
    end = R1 + 3 * SAMPLE_RATE
    out += d.process([boundary(SpeechEnd, end)]).events
    assert d.tracker.phase == Phase.HELD
    cut = R1 + round(2.75 * SAMPLE_RATE) - PROBE // 2
    nxt = end + 2 * SAMPLE_RATE  # 2 s of silence: more than bridge_pause_s (0.75 s)
    resumed = d.process([boundary(SpeechStart, nxt)]).events
    payloads = [x.payload for x in resumed]
    assert [type(p) for p in payloads] == [ev.SpeakerChange, ev.SpeakerSegment, ev.SpeechStart]
    withdrawal, held, start = payloads
    assert (withdrawal.speaker.id, withdrawal.previous.id, withdrawal.tentative, withdrawal.at) == ("a", "a", False, cut / SAMPLE_RATE)
    assert (held.speaker.id, held.start, held.end) == ("a", cut / SAMPLE_RATE, end / SAMPLE_RATE)
    assert start.start == nxt / SAMPLE_RATE and all(x.sample == nxt for x in resumed)
    assert d.tracker.phase == Phase.SPEAKING
    # Ann's speech is covered without a gap: up to the cut, then the held end
    segments = [x.payload for x in out + resumed if isinstance(x.payload, ev.SpeakerSegment)]
    assert [(s.start, s.end) for s in segments] == [(R1 / SAMPLE_RATE, cut / SAMPLE_RATE), (cut / SAMPLE_RATE, end / SAMPLE_RATE)]
    assert d.counters == {"changes": 3, "segments": 2, "relabels": 0}


def test_the_layer_names_windows_with_the_models_values() -> None:
    d = layer()
    d.process([boundary(SpeechStart, R1)])
    decided = d.process([regular(R1, 0, 0.71, 0.40), regular(R1, 1, 0.69, 0.40)])
    first, second = decided.windows
    assert (first.match.known, second.match.known) == (True, False)  # GE2E's threshold 0.70
    assert second.match.uncertain is False and first.match.margin == pytest.approx(0.31)
    d.swap_values(GE2E.__class__(**{**GE2E.to_dict(), "threshold": 0.68}))
    assert d.verdict(np.array([0.69, 0.40], np.float32)).known, "a reload's values apply to the next window"


class Cosines:
    """A ranker with one enrolled voice, Ann, scored by cosine to her voiceprint (the first axis)."""

    def rank(self, embeddings: np.ndarray) -> list[list[Candidate]]:
        return [[(*ANN, float(e[0] / np.linalg.norm(e)))] for e in embeddings]


def test_a_window_nearer_a_voice_heard_unnamed_than_the_enrolled_one_is_that_voices() -> None:
    """A voice nobody enrolled lies at cosine 0.55 to Ann: its windows go to a provisional speaker.
    One of its windows then scores 0.72 against Ann, over the threshold, but nearer its own voice:
    it stays that voice's, not Ann's. Ann's own window, as high, is still Ann's."""
    d = DecisionLayer(GE2E, TrackerSettings(), ProvisionalSettings(), ranker=Cosines(), dim=8, hop_samples=HOP)
    rng = np.random.default_rng(1)
    other = np.array([0.55, np.sqrt(1 - 0.55**2), 0, 0, 0, 0, 0, 0])
    d.process([boundary(SpeechStart, R1)])
    for k in range(8):
        e = other + rng.normal(scale=0.02, size=8)
        out = d.process([EmbeddedWindow(regular(R1, k, 0, 0).window, e)])
    label = out.windows[0].label
    assert label is not None and not label.known  # a provisional speaker by now
    leaning = other + 0.3 * np.eye(8)[0]  # cosine 0.72 to Ann, 0.95 to the other voice
    assert 0.70 <= leaning[0] / np.linalg.norm(leaning) <= 0.75
    got = d.process([EmbeddedWindow(regular(R1, 8, 0, 0).window, leaning)]).windows[0]
    assert not got.match.known and got.label == label and got.match.score == pytest.approx(0.72, abs=0.03)
    ann = np.eye(8)[0] * 0.72 + np.eye(8)[2] * np.sqrt(1 - 0.72**2)  # Ann at 0.72, far from the other voice
    mine = d.process([EmbeddedWindow(regular(R1, 9, 0, 0).window, ann)]).windows[0]
    assert mine.match.known and mine.match.name == "Ann"
