"""In-session adaptation (decisions.adaptation, policy.adapts / with_session): bounded, gated on
the enrolled voiceprints' own verdict, memory only."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from decision_values import GE2E
from speakerd.decisions import policy
from speakerd.decisions.adaptation import MIN_WINDOWS, SessionVoiceprints

V = GE2E  # adapt_windows 30, adapt_margin 0.05, adapt_penalty 0.05


def _match(score: float, second: float) -> policy.Match:
    return policy.verdict(V, [("a", "Ann", score), ("b", "Bob", second)])


def test_only_a_firm_enrolled_verdict_adapts() -> None:
    assert policy.adapts(V, _match(0.72, 0.60))
    assert not policy.adapts(V, _match(0.72, 0.69))  # too close to the runner-up
    assert not policy.adapts(V, _match(0.66, 0.40))  # named by the relaxed rule, under the threshold
    assert not policy.adapts(V, _match(0.60, 0.30))


def test_a_session_score_counts_less_the_penalty_and_reranks() -> None:
    out = policy.with_session(V, [("a", "Ann", 0.60), ("b", "Bob", 0.55)], {"b": 0.80})
    assert [(sid, round(s, 6)) for sid, _, s in out] == [("b", 0.75), ("a", 0.6)]
    # a session voiceprint never lowers an enrolled score
    assert policy.with_session(V, [("a", "Ann", 0.90)], {"a": 0.50})[0][2] == 0.90


def test_a_session_voiceprint_speaks_after_a_few_windows_and_lifts_its_voice() -> None:
    s = SessionVoiceprints(dim=2)
    x = np.array([1.0, 0.0])
    cands = [("a", "Ann", 0.55), ("b", "Bob", 0.50)]
    for i in range(MIN_WINDOWS):
        assert s.lifted(V, cands, x) == cands  # not yet
        assert s.observe(V, _match(0.75, 0.60), x * (i + 1))  # any norm
    lifted = s.lifted(V, cands, x)
    assert lifted[0] == ("a", "Ann", pytest.approx(1.0 - V.adapt_penalty))


def test_an_unnamed_window_never_adapts_and_adaptation_can_be_off() -> None:
    s = SessionVoiceprints(dim=2)
    assert not s.observe(V, _match(0.60, 0.40), np.array([1.0, 0.0]))
    off = dataclasses.replace(V, adapt_windows=0)
    assert not s.observe(off, _match(0.80, 0.40), np.array([1.0, 0.0])) and s.count("a") == 0


def test_a_session_voiceprint_is_bounded_and_the_old_windows_decay() -> None:
    v = dataclasses.replace(V, adapt_windows=4)
    s = SessionVoiceprints(dim=2)
    for _ in range(4):
        s.observe(v, _match(0.75, 0.60), np.array([1.0, 0.0]))
    for _ in range(12):  # the voice as heard later: the early windows fade out
        s.observe(v, _match(0.75, 0.60), np.array([0.0, 1.0]))
    assert s.count("a") == 4
    lifted = s.lifted(v, [("a", "Ann", 0.0)], np.array([0.0, 1.0]))
    assert lifted[0][2] > 0.95 - v.adapt_penalty


def test_the_layer_names_a_weak_window_once_its_voice_was_heard_firmly() -> None:
    from speakerd.audio import SAMPLE_RATE
    from speakerd.decisions.clustering import ProvisionalSettings
    from speakerd.decisions.layer import DecisionLayer
    from speakerd.decisions.tracker import TrackerSettings
    from speakerd.embedding.worker import EmbeddedWindow
    from speakerd.windows import Window

    class Scores:  # the 'embedding' is [Ann's score, Bob's score]
        def rank(self, embeddings: np.ndarray) -> list[list[tuple[str, str, float]]]:
            return [sorted([("a", "Ann", float(e[0])), ("b", "Bob", float(e[1]))], key=lambda c: -c[2]) for e in embeddings]

    def window(k: int, ann: float, bob: float) -> EmbeddedWindow:
        end = SAMPLE_RATE * (2 + k)
        w = Window(end - SAMPLE_RATE, end, np.zeros((1, 1), np.float32), 1.0, float(end) / SAMPLE_RATE, 0, k == 0)
        return EmbeddedWindow(w, np.array([ann, bob]))

    def layer(v: object) -> DecisionLayer:
        return DecisionLayer(v, TrackerSettings(), ProvisionalSettings(enabled=False), ranker=Scores(), dim=2, hop_samples=8000)

    weak = window(9, 0.60, 0.40)  # Ann's voice, 0.60 < 0.70: nobody without a session voiceprint
    for v, named in ((dataclasses.replace(V, adapt_windows=0), False), (V, True)):
        d = layer(v)
        d.process([window(k, 0.75, 0.60) for k in range(MIN_WINDOWS)])
        out = d.process([weak]).windows[0]
        assert out.match.known is named and out.match.nearest == "a"


def test_a_session_voiceprint_in_a_room_counts_the_rooms_colouring_against_it() -> None:
    # made in the room the window is in: every voice there scores high against it
    v = dataclasses.replace(V, room_score_penalty=1.0, cohort_clean_level=0.585)
    out = policy.with_session(v, [("a", "Ann", 0.50)], {"a": 0.85}, level=0.505)
    assert round(out[0][2], 6) == round(0.85 - v.adapt_penalty - 0.08, 6)
    # a clean window (no room to share) and a window of unknown level: the fixed penalty only
    assert round(policy.with_session(v, [("a", "Ann", 0.50)], {"a": 0.85}, level=0.60)[0][2], 6) == round(0.85 - v.adapt_penalty, 6)
    assert round(policy.with_session(v, [("a", "Ann", 0.50)], {"a": 0.85})[0][2], 6) == round(0.85 - v.adapt_penalty, 6)
