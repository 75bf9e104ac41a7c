"""SpeechWindower: the window grid, region edges, tails, gating, invariance to chunking and bounded memory."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speakerd.audio import SAMPLE_RATE, AudioChunk
from speakerd.bundle import FeatureRecipe
from speakerd.errors import ConfigError
from speakerd.features import FeatureExtractor
from speakerd.vad import SpeechAudio, SpeechEnd, SpeechStart, VadSegmenter, VadSettings
from speakerd.windows import SpeechWindower, Window, WindowSettings

RECIPE = FeatureRecipe()  # kaldi fbank, snip_edges, 10 ms shift, CMN
T0 = 1_700_000_000.0
SPEAKER_DIR = ("test-other", "1688")  # tightly cut clips: the inserted pauses are the only region edges
CLIPS = ["1688-142285-0003.flac", "1688-142285-0006.flac", "1688-142285-0002.flac"]


def s(seconds: float) -> int:
    return int(round(seconds * SAMPLE_RATE))


@pytest.fixture(scope="module")
def clips(librispeech: Path) -> list[np.ndarray]:
    out = []
    for name in CLIPS:
        x, sr = sf.read(librispeech.joinpath(*SPEAKER_DIR, name), dtype="float32")
        assert sr == SAMPLE_RATE
        out.append(x)
    return out


@pytest.fixture(scope="module")
def conversation(clips: list[np.ndarray]) -> np.ndarray:
    gap = lambda sec: np.zeros(s(sec), np.float32)  # noqa: E731
    u1, u2, u3 = clips
    return np.concatenate([gap(0.5), u1, gap(1.0), u2, gap(0.8), u3, gap(0.5)])


def region_events(audio: np.ndarray, start: int, voiced: np.ndarray | None = None, size: int = 1600, end: bool = True):
    """SpeechStart, SpeechAudio pieces of ``size``, SpeechEnd for one hand-made region."""
    voiced = np.ones(len(audio), bool) if voiced is None else voiced
    events: list = [SpeechStart(start, T0 + start / SAMPLE_RATE)]
    for i in range(0, len(audio), size):
        a = start + i
        events.append(SpeechAudio(AudioChunk(audio[i : i + size], a, T0 + a / SAMPLE_RATE), voiced[i : i + size]))
    if end:
        events.append(SpeechEnd(start + len(audio), T0 + (start + len(audio)) / SAMPLE_RATE))
    return events


def run(windower: SpeechWindower, events) -> list:
    out: list = []
    for e in events:
        out += windower.process(e)
    return out


def windows_of(out: list) -> list[Window]:
    """The regular windows (probes have tests of their own below)."""
    return [o for o in out if isinstance(o, Window) and not o.probe]


def probes_of(out: list) -> list[Window]:
    return [o for o in out if isinstance(o, Window) and o.probe]


def spans(out: list, origin: int) -> list[tuple[float, float]]:
    return [((w.start - origin) / SAMPLE_RATE, (w.end - origin) / SAMPLE_RATE) for w in windows_of(out)]


def noise(seconds: float, seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(s(seconds)) * 0.05).astype(np.float32)


# -- the grid -------------------------------------------------------------------------------------


R = 12_345  # a region start off every grid, so the grid is relative to it


def test_default_grid_first_short_then_full_windows_every_hop(clips: list[np.ndarray]) -> None:
    audio = clips[1][: s(4.2)]
    w = SpeechWindower(WindowSettings(), RECIPE)
    out = run(w, region_events(audio, R))
    assert spans(out, R) == [(0.0, 1.0), (0.0, 1.5), (0.5, 2.0), (1.0, 2.5), (1.5, 3.0), (2.0, 3.5), (2.5, 4.0)]
    wins = windows_of(out)
    assert [w_.first_in_region for w_ in wins] == [True] + [False] * 6
    assert all(w_.region_start == R for w_ in wins)
    assert [w_.num_frames for w_ in wins] == [98] + [148] * 6
    assert w.windows_emitted == 7 and w.windows_rejected == 0
    for win in wins:  # features are the region stream's slice, exactly the per-window computation
        expected = FeatureExtractor(RECIPE, SAMPLE_RATE).compute(audio[win.start - R : win.end - R])
        assert np.array_equal(win.feats, expected), (win.start, win.end)
        assert win.wall_time == pytest.approx(T0 + win.end / SAMPLE_RATE, abs=1e-6)
        assert win.speech_fraction == 1.0


def test_short_hop_never_starts_a_window_before_the_region(clips: list[np.ndarray]) -> None:
    """Regression: with hop 0.25 s the second window once ended at 1.25 s and started 0.25 s early."""
    audio = clips[1][: s(2.6)]
    out = run(SpeechWindower(WindowSettings(hop_s=0.25), RECIPE), region_events(audio, R))
    assert spans(out, R) == [(0.0, 1.0), (0.0, 1.5), (0.25, 1.75), (0.5, 2.0), (0.75, 2.25), (1.0, 2.5)]


@pytest.mark.parametrize(
    "settings",
    [
        WindowSettings(),
        WindowSettings(hop_s=0.25),
        WindowSettings(hop_s=0.1, first_length_s=0.5, length_s=2.0),
        WindowSettings(hop_s=0.3, first_length_s=0.6, length_s=1.5),
        WindowSettings(hop_s=1.5, first_length_s=1.5, length_s=1.5),
    ],
    ids=str,
)
def test_grid_properties(clips: list[np.ndarray], settings: WindowSettings) -> None:
    audio = clips[1][: s(5.0)]
    wins = windows_of(run(SpeechWindower(settings, RECIPE), region_events(audio, R, end=False)))
    first, full, hop = s(settings.first_length_s), s(settings.length_s), s(settings.hop_s)
    assert (wins[0].start, wins[0].end) == (R, R + first)
    assert all(w.end - w.start == full and w.start >= R for w in wins[1:])
    assert wins[1].end == R + max(first + hop, full)
    assert all(b.end - a.end == hop for a, b in zip(wins[1:], wins[2:]))
    assert all((w.start - R) % 160 == 0 for w in wins)  # on the feature frame grid of the region
    assert wins[-1].end > R + len(audio) - hop  # nothing left behind while the region is open


# -- region edges -----------------------------------------------------------------------------------


def test_region_shorter_than_first_window_yields_no_regular_window(clips: list[np.ndarray]) -> None:
    w = SpeechWindower(WindowSettings(probe_hop_s=0), RECIPE)
    out = run(w, region_events(clips[0][: s(0.99)], R))
    assert [type(o) for o in out] == [SpeechStart, SpeechEnd]
    assert (w.windows_emitted, w.windows_rejected) == (0, 0)
    # probes still guess who spoke it (tentatively)
    probed = run(SpeechWindower(WindowSettings(), RECIPE), region_events(clips[0][: s(0.99)], R))
    assert windows_of(probed) == [] and [(w.end - R) / SAMPLE_RATE for w in probes_of(probed)] == [0.55, 0.8, 0.99]


@pytest.mark.parametrize(
    ("duration", "expected_tail"),
    [
        (1.0, None),  # exactly one first window, nothing uncovered
        (1.2, None),  # 0.2 s uncovered < hop/2
        (1.25, (0.25, 1.25)),  # hop/2 uncovered: a first-length window aligned to the end
        (1.4, (0.4, 1.4)),
        (2.2, None),
        (2.25, (0.75, 2.25)),  # a full-length tail once the region is long enough
        (2.3, (0.8, 2.3)),
    ],
)
def test_tail_window_aligned_to_region_end(clips: list[np.ndarray], duration: float, expected_tail) -> None:
    audio = clips[1][: s(duration)]
    out = run(SpeechWindower(WindowSettings(), RECIPE), region_events(audio, R))
    grid = [(0.0, 1.0)] + [(e - 1.5, e) for e in np.arange(1.5, duration + 1e-9, 0.5).round(3).tolist()]
    assert spans(out, R) == grid + ([expected_tail] if expected_tail else [])
    assert isinstance(out[-1], SpeechEnd) and isinstance(out[0], SpeechStart)
    if expected_tail:
        tail = windows_of(out)[-1]
        expected = FeatureExtractor(RECIPE, SAMPLE_RATE).compute(audio[tail.start - R : tail.end - R])
        assert np.array_equal(tail.feats, expected)
        assert not tail.first_in_region


def test_tail_snaps_to_the_frame_grid_when_the_region_end_is_off_it(clips: list[np.ndarray]) -> None:
    audio = clips[1][: s(2.25) + 77]
    (*_, tail) = windows_of(run(SpeechWindower(WindowSettings(), RECIPE), region_events(audio, R)))
    assert (tail.start - R, tail.end - R) == (s(0.75), s(2.25))  # snapped down by 77 samples, not past the end


def test_windows_never_straddle_a_region_and_markers_keep_their_order(conversation: np.ndarray) -> None:
    events = vad_events(conversation, [1600])
    out = run(SpeechWindower(WindowSettings(), RECIPE), events)
    markers_in = [e for e in events if not isinstance(e, SpeechAudio)]
    assert [o for o in out if not isinstance(o, Window)] == markers_in
    ends = [o.end for o in out if isinstance(o, Window)]
    assert ends == sorted(ends), "regular windows and probes leave in the order they end"
    assert len(markers_in) == 6  # three regions
    region = None
    for o in out:
        if isinstance(o, SpeechStart):
            region = [o.sample, None]
        elif isinstance(o, SpeechEnd):
            region[1] = o.sample
        else:
            assert o.region_start == region[0] and o.start >= region[0]
    for start, end in zip(markers_in[::2], markers_in[1::2]):
        inside = [w for w in windows_of(out) if w.region_start == start.sample]
        assert inside and all(start.sample <= w.start and w.end <= end.sample for w in inside)
        assert inside[0].first_in_region and inside[0].start == start.sample


def test_end_without_region_passes_through_and_audio_without_start_opens_one(clips: list[np.ndarray]) -> None:
    w = SpeechWindower(WindowSettings(), RECIPE)
    stray_end = SpeechEnd(5, T0)
    assert w.process(stray_end) == [stray_end]
    events = region_events(clips[1][: s(1.6)], R)[1:]  # no SpeechStart
    assert spans(run(w, events), R) == [(0.0, 1.0), (0.0, 1.5)]


# -- gating -----------------------------------------------------------------------------------------


def test_min_speech_gates_windows_on_the_voiced_mask(clips: list[np.ndarray]) -> None:
    audio = clips[1][: s(4.0)]
    voiced = np.zeros(len(audio), bool)
    voiced[: s(2.0)] = True
    w = SpeechWindower(WindowSettings(min_speech=0.5), RECIPE)
    wins = windows_of(run(w, region_events(audio, R, voiced)))
    assert spans(wins, R) == [(0.0, 1.0), (0.0, 1.5), (0.5, 2.0), (1.0, 2.5)]
    assert [round(x.speech_fraction, 4) for x in wins] == [1.0, 1.0, 1.0, 0.6667]
    assert (w.windows_emitted, w.windows_rejected) == (4, 3)  # [1.5,3) 1/3, [2,3.5) 0, [2.5,4) 0
    strict = SpeechWindower(WindowSettings(min_speech=0.7), RECIPE)
    run(strict, region_events(audio, R, voiced))
    assert (strict.windows_emitted, strict.windows_rejected) == (3, 4)


# -- chunking and memory ----------------------------------------------------------------------------


def vad_events(audio: np.ndarray, sizes: list[int]) -> list:
    seg = VadSegmenter(VadSettings())
    events, i, k = [], 0, 0
    while i < len(audio):
        n = sizes[k % len(sizes)]
        events += seg.process(AudioChunk(audio[i : i + n], i, T0 + i / SAMPLE_RATE))
        i, k = i + n, k + 1
    return events + seg.flush()


def test_vad_to_windows_is_chunk_size_invariant(conversation: np.ndarray) -> None:
    def outputs(sizes: list[int]) -> list:
        return run(SpeechWindower(WindowSettings(), RECIPE), vad_events(conversation, sizes))

    reference = outputs([1600])
    wins = windows_of(reference)
    assert len(wins) >= 20
    rng = np.random.default_rng(11)
    for sizes in ([160], [480], [4000], [16000], rng.integers(1, 6000, size=40).tolist()):
        got = outputs(sizes)
        assert [type(o) for o in got] == [type(o) for o in reference], sizes[:3]
        for a, b in zip(got, reference):
            if isinstance(a, Window):
                assert (a.start, a.end, a.region_start, a.first_in_region) == (b.start, b.end, b.region_start, b.first_in_region)
                assert a.speech_fraction == b.speech_fraction
                assert np.array_equal(a.feats, b.feats)
                assert a.wall_time == pytest.approx(b.wall_time, abs=1e-6)
            else:
                assert (type(a), a.sample) == (type(b), b.sample)
                assert a.wall_time == pytest.approx(b.wall_time, abs=1e-6)


def test_memory_stays_bounded_on_a_long_region() -> None:
    settings = WindowSettings()
    w = SpeechWindower(settings, RECIPE)
    audio = noise(60.0)
    limit_s = settings.length_s + 2 * settings.hop_s
    held_audio, held_frames, emitted = 0, 0, 0
    for e in region_events(audio, R, end=False):
        emitted += len(windows_of(w.process(e)))
        held_audio = max(held_audio, len(w._audio))
        held_frames = max(held_frames, len(w._stream._frames))
    assert emitted == 1 + 118  # 1.0 s, then full windows ending every 0.5 s from 1.5 s to 60 s
    assert held_audio < limit_s * SAMPLE_RATE
    assert held_frames < limit_s * 100
    assert len(w._voiced) == len(w._audio)


# -- settings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"hop_s": 0.255}, "windows.hop_s"),
        ({"first_length_s": 0.995}, "windows.first_length_s"),
    ],
)
def test_window_shapes_off_the_frame_grid_are_refused(kwargs: dict, key: str) -> None:
    settings = WindowSettings(**kwargs)
    with pytest.raises(ConfigError, match="10.0 ms frame shift") as err:
        SpeechWindower(settings, RECIPE)
    assert err.value.key == key
    assert err.value.value == kwargs[key.split(".")[1]]


def test_length_off_the_frame_grid_still_starts_windows_on_it(clips: list[np.ndarray]) -> None:
    """Only starts must sit on the frame grid; the first full window starts at the region start."""
    audio = clips[1][: s(3.0)]
    wins = windows_of(run(SpeechWindower(WindowSettings(length_s=1.5037), RECIPE), region_events(audio, R, end=False)))
    assert [(w.start - R, w.end - R) for w in wins] == [(0, 16000), (0, 24059), (8000, 32059), (16000, 40059)]
    for win in wins:
        expected = FeatureExtractor(RECIPE, SAMPLE_RATE).compute(audio[win.start - R : win.end - R])
        assert np.array_equal(win.feats, expected)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"length_s": 20.0}, "windows.length_s"),
        ({"length_s": 0.4, "first_length_s": 0.4, "hop_s": 0.2}, "windows.length_s"),
        ({"hop_s": 2.0}, "windows.hop_s"),
        ({"hop_s": 0.05}, "windows.hop_s"),
        ({"first_length_s": 2.0}, "windows.first_length_s"),
        ({"first_length_s": 0.4}, "windows.first_length_s"),
        ({"min_speech": 1.5}, "windows.min_speech"),
        ({"min_speech": -0.1}, "windows.min_speech"),
    ],
)
def test_window_settings_validation_names_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        WindowSettings(**kwargs)
    assert err.value.key == key
    assert key in str(err.value)


# -- probes ---------------------------------------------------------------------------------------


def test_probes_fill_a_finer_grid_between_regular_windows() -> None:
    audio = noise(3.0)
    out = run(SpeechWindower(WindowSettings(), RECIPE), region_events(audio, R))
    probes = [((w.start - R) / SAMPLE_RATE, (w.end - R) / SAMPLE_RATE) for w in probes_of(out)]
    # the first probe is cut to the region (0.55 s); the rest end every 0.25 s and begin on the regular window
    # start at or before 0.8 s back (0.8 or 1.05 s long); none ends with a regular window; the last one ends
    # with the region, where a new voice's first words before a pause would be
    assert probes == [(0.0, 0.55), (0.0, 0.8), (0.0, 1.05), (0.5, 1.3), (0.5, 1.55), (1.0, 1.8), (1.0, 2.05),
                      (1.5, 2.3), (1.5, 2.55), (2.0, 2.8), (2.2, 3.0)]
    assert spans(out, R) == [(0.0, 1.0), (0.0, 1.5), (0.5, 2.0), (1.0, 2.5), (1.5, 3.0)], "the regular grid is unchanged"
    # every grid probe starts on the regular windows' grid of starts: the lockstep backend's rows serve them all
    assert {a for a, _ in probes[:-1]} == {0.0, 0.5, 1.0, 1.5, 2.0}
    assert all(not w.first_in_region for w in probes_of(out))
    lengths = {w.num_frames for w in probes_of(out)}
    assert lengths == {RECIPE.num_frames(s(x), SAMPLE_RATE) for x in WindowSettings().probe_lengths()}


def test_unaligned_probes_are_all_probe_length_and_half_start_between_windows() -> None:
    settings = WindowSettings(probe_align="off")
    out = run(SpeechWindower(settings, RECIPE), region_events(noise(3.0), R))
    probes = [((w.start - R) / SAMPLE_RATE, (w.end - R) / SAMPLE_RATE) for w in probes_of(out)]
    assert probes == [(0.0, 0.55), (0.0, 0.8), (0.25, 1.05), (0.5, 1.3), (0.75, 1.55), (1.0, 1.8), (1.25, 2.05),
                      (1.5, 2.3), (1.75, 2.55), (2.0, 2.8), (2.2, 3.0)]
    starts = {a for a, _ in spans(out, R)}
    assert [a for a, _ in probes[1:-1] if a in starts] == [0.0, 0.5, 1.0, 1.5]
    assert settings.probe_lengths() == (0.55, 0.8)
    assert {w.num_frames for w in probes_of(out)} == {RECIPE.num_frames(s(x), SAMPLE_RATE) for x in settings.probe_lengths()}


@pytest.mark.parametrize(("duration", "tail_probe"),  # grid probes end at 2.55, 2.8, 3.05
                         [(2.9, None), (2.95, (2.15, 2.95)), (3.0, (2.2, 3.0)), (3.05, None)])
def test_a_probe_ends_with_the_region_unless_the_grid_put_one_there(duration: float, tail_probe) -> None:
    """Made when the VAD ends the region, so dated then (its lag), like the region's last regular window."""
    events = region_events(noise(duration), R)
    lag = s(0.25)
    events[-1] = replace(events[-1], lag=lag)
    out = run(SpeechWindower(WindowSettings(), RECIPE), events)
    end = R + s(duration)
    tail = [w for w in probes_of(out) if w.lag]
    assert [((w.start - R) / SAMPLE_RATE, (w.end - R) / SAMPLE_RATE) for w in tail] == ([tail_probe] if tail_probe else [])
    assert [w.decided for w in tail] == [(end + lag, pytest.approx(T0 + (end + lag) / SAMPLE_RATE))] * len(tail)
    open_ones = [w for w in out if isinstance(w, Window) and w.end < end]
    assert open_ones and all(w.lag == 0 for w in open_ones), "windows made while the region is open are decided at their end"


def test_probe_features_equal_a_fresh_computation_of_their_samples() -> None:
    audio = noise(2.0, seed=4)
    out = run(SpeechWindower(WindowSettings(), RECIPE), region_events(audio, R))
    assert probes_of(out)
    for w in probes_of(out):
        expected = FeatureExtractor(RECIPE, SAMPLE_RATE).compute(audio[w.start - R : w.end - R])
        np.testing.assert_allclose(w.feats, expected, atol=1e-4)


def test_probes_off_and_the_voiced_share_gates_them_too() -> None:
    audio = noise(3.0)
    off = run(SpeechWindower(WindowSettings(probe_hop_s=0), RECIPE), region_events(audio, R))
    assert probes_of(off) == [] and len(windows_of(off)) == 5
    voiced = np.zeros(len(audio), bool)
    voiced[: s(0.3)] = True
    gated = SpeechWindower(WindowSettings(), RECIPE)
    out = run(gated, region_events(audio, R, voiced=voiced))
    assert [((w.start - R) / SAMPLE_RATE, (w.end - R) / SAMPLE_RATE) for w in probes_of(out)] == [(0.0, 0.55)]
    assert gated.probes_emitted == 1 and gated.windows_emitted == len(windows_of(out))


def test_probe_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="windows.probe_hop_s"):
        WindowSettings(probe_hop_s=0.05)
    with pytest.raises(ConfigError, match="windows.probe_length_s"):
        WindowSettings(probe_length_s=0.3)
    with pytest.raises(ConfigError, match="windows.probe_start_s"):
        WindowSettings(probe_start_s=0.2)
    with pytest.raises(ConfigError, match="windows.probe_align"):
        WindowSettings(probe_align="yes")
    with pytest.raises(ConfigError, match="windows.probe_hop_s"):
        SpeechWindower(WindowSettings(probe_hop_s=0.255), RECIPE)
