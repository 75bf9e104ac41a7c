"""FeatureStream, finish_window and FeatureExtractor on real speech: chunking, slicing, memory, gain, CMN."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speakerd.audio import SAMPLE_RATE
from speakerd.bundle import FeatureRecipe
from speakerd.features import FeatureExtractor, FeatureStream, dbfs, finish_window

CLIP = ("1688", "1688-142285-0003.flac")
KALDI = FeatureRecipe()  # log power fbank, snip_edges, CMN (the wespeaker-style recipe)
GE2E = FeatureRecipe(  # what the shipped ge2e bundle uses: linear power mel, -30 dBFS gain, no CMN
    num_mel_bins=40, window_type="hann", preemph_coeff=0.0, remove_dc_offset=False, low_freq=0.0,
    high_freq=8000.0, round_to_power_of_two=False, mel_is_librosa=True, use_log_fbank=False,
    input_scale=1.0, gain_normalize_dbfs=-30.0, cmn=False,
)
RECIPES = {
    "log-power": dataclasses.replace(KALDI, gain_normalize_dbfs=-30.0, cmn=False),
    "power": GE2E,
    "log-magnitude": dataclasses.replace(KALDI, use_power=False, gain_normalize_dbfs=-30.0, cmn=False),
    "magnitude": dataclasses.replace(GE2E, use_power=False),
}


@pytest.fixture(scope="module")
def speech(librispeech: Path) -> np.ndarray:
    x, sr = sf.read(librispeech / "test-other" / CLIP[0] / CLIP[1], dtype="float32")
    assert sr == SAMPLE_RATE
    return x[: 3 * SAMPLE_RATE]


def at_dbfs(x: np.ndarray, level: float) -> np.ndarray:
    return (x * np.float32(10 ** ((level - dbfs(x)) / 20))).astype(np.float32)


def stream_frames(recipe: FeatureRecipe, audio: np.ndarray, sizes: list[int]) -> np.ndarray:
    stream = FeatureStream(recipe, SAMPLE_RATE)
    i, k = 0, 0
    while i < len(audio):
        n = sizes[k % len(sizes)]
        stream.process(audio[i : i + n])
        i, k = i + n, k + 1
    n = stream.finish()
    return stream.frames(0, n).copy()


@pytest.mark.parametrize("recipe", [KALDI, GE2E, dataclasses.replace(KALDI, snip_edges=False)], ids=["kaldi", "ge2e", "no-snip"])
def test_chunking_does_not_change_frames(speech: np.ndarray, recipe: FeatureRecipe) -> None:
    whole = stream_frames(recipe, speech, [len(speech)])
    assert whole.shape == (recipe.num_frames(len(speech), SAMPLE_RATE), recipe.num_mel_bins)
    rng = np.random.default_rng(7)
    for sizes in ([1], [37], [160], [4000], rng.integers(1, 3000, size=50).tolist()):
        audio = speech if sizes != [1] else speech[: SAMPLE_RATE // 2]  # 1-sample chunks are slow
        expected = whole if sizes != [1] else stream_frames(recipe, audio, [len(audio)])
        assert np.array_equal(stream_frames(recipe, audio, sizes), expected), sizes


@pytest.mark.parametrize("recipe", [KALDI, GE2E], ids=["kaldi", "ge2e"])
def test_stream_slice_equals_per_window_computation(speech: np.ndarray, recipe: FeatureRecipe) -> None:
    stream = FeatureStream(recipe, SAMPLE_RATE)
    stream.process(speech)
    extractor = FeatureExtractor(recipe, SAMPLE_RATE)
    length = SAMPLE_RATE  # 1 s window
    count = recipe.num_frames(length, SAMPLE_RATE)
    assert count == 98
    for first in (0, 1, 50, 133):
        start = stream.frame_start_sample(first)
        assert start == first * 160
        samples = speech[start : start + length]
        sliced = finish_window(recipe, stream.frames(first, first + count), samples)
        assert np.array_equal(sliced, extractor.compute(samples)), first
    assert stream.samples_for_frames(count) == 97 * 160 + 400  # 97 shifts + one 25 ms frame


def test_discard_before_bounds_memory_and_forgets(speech: np.ndarray) -> None:
    stream = FeatureStream(KALDI, SAMPLE_RATE)
    whole = stream_frames(KALDI, speech, [len(speech)])
    held_max = 0
    for i in range(0, len(speech), 1600):
        n = stream.process(speech[i : i + 1600])
        stream.discard_before(n - 50)
        held_max = max(held_max, len(stream._frames))
        assert stream.num_frames == n
    assert held_max <= 50 + 10  # one 100 ms chunk of new frames on top of the 50 kept
    assert stream.first_frame == stream.num_frames - 50
    assert np.array_equal(stream.frames(stream.first_frame, stream.num_frames), whole[stream.first_frame :])
    with pytest.raises(IndexError, match=r"frames \[0, 10\) not held"):
        stream.frames(0, 10)
    with pytest.raises(IndexError):
        stream.frames(stream.first_frame - 1, stream.first_frame + 1)
    with pytest.raises(IndexError):
        stream.frames(stream.first_frame, stream.num_frames + 1)
    stream.discard_before(0)  # going back is a no-op
    assert stream.first_frame == stream.num_frames - 50
    stream.discard_before(stream.num_frames + 100)  # past the end drops everything held, no further
    assert stream.first_frame == stream.num_frames
    stream.reset()
    assert (stream.first_frame, stream.num_frames) == (0, 0)


@pytest.mark.parametrize("name", list(RECIPES))
def test_gain_normalisation_makes_level_irrelevant(speech: np.ndarray, name: str) -> None:
    recipe = RECIPES[name]
    extractor = FeatureExtractor(recipe, SAMPLE_RATE)
    window = speech[SAMPLE_RATE // 2 : SAMPLE_RATE // 2 + 24_000]
    quiet, target = at_dbfs(window, -50.0), at_dbfs(window, -30.0)
    assert dbfs(quiet) == pytest.approx(-50.0, abs=0.01)
    fq, ft = extractor.compute(quiet), extractor.compute(target)
    if recipe.use_log_fbank:
        np.testing.assert_allclose(fq, ft, atol=2e-3)
    else:
        np.testing.assert_allclose(fq, ft, rtol=2e-3, atol=1e-6 * float(np.abs(ft).max()))
    # and the raw features really differed by the expected 20 dB before normalisation
    raw = dataclasses.replace(recipe, gain_normalize_dbfs=None)
    rq, rt = FeatureExtractor(raw, SAMPLE_RATE).compute(quiet), FeatureExtractor(raw, SAMPLE_RATE).compute(target)
    exponent = 2.0 if recipe.use_power else 1.0  # 20 dB is a factor of 10 in amplitude
    if recipe.use_log_fbank:
        assert float(np.median(rt - rq)) == pytest.approx(exponent * np.log(10.0), abs=1e-2)
    else:
        assert float(np.median(rt / np.maximum(rq, 1e-30))) == pytest.approx(10.0**exponent, rel=1e-2)


@pytest.mark.parametrize("name", list(RECIPES))
def test_gain_normalisation_never_lowers_a_loud_window(speech: np.ndarray, name: str) -> None:
    recipe = RECIPES[name]
    loud = at_dbfs(speech[:24_000], -12.0)
    stream = FeatureStream(recipe, SAMPLE_RATE)
    n = stream.process(loud)
    raw = stream.frames(0, n)
    assert np.array_equal(finish_window(recipe, raw, loud), raw)
    # and a quiet one is raised, by exactly the missing dB
    quiet = at_dbfs(speech[:24_000], -40.0)
    stream.reset()
    n = stream.process(quiet)
    raw = stream.frames(0, n)
    raised = finish_window(recipe, raw, quiet)
    exponent = (10.0 if recipe.use_power else 20.0)
    change = (-30.0 - dbfs(quiet)) / exponent
    if recipe.use_log_fbank:
        np.testing.assert_allclose(raised - raw, change * np.log(10.0), rtol=1e-4)
    else:
        np.testing.assert_allclose(raised, raw * 10.0**change, rtol=1e-5)


def test_gain_normalisation_skips_silence_and_missing_samples(speech: np.ndarray) -> None:
    recipe = RECIPES["power"]
    feats = FeatureExtractor(recipe, SAMPLE_RATE).compute(speech[:16_000])
    assert np.array_equal(finish_window(recipe, feats, None), feats)
    assert np.array_equal(finish_window(recipe, feats, np.zeros(0, np.float32)), feats)
    silence = np.zeros(16_000, np.float32)
    assert dbfs(silence) == -200.0
    out = finish_window(recipe, feats, silence)  # +170 dB on silence would be absurd, but finite: still applied
    assert np.all(np.isfinite(out))


def test_cmn_gives_zero_mean_per_bin(speech: np.ndarray) -> None:
    feats = FeatureExtractor(KALDI, SAMPLE_RATE).compute(speech[:24_000])
    assert feats.shape == (148, 80) and feats.dtype == np.float32
    np.testing.assert_allclose(feats.mean(axis=0), 0.0, atol=1e-4)
    assert float(feats.std(axis=0).min()) > 0.1  # CMN centred it, it did not flatten it
    plain = FeatureExtractor(dataclasses.replace(KALDI, cmn=False), SAMPLE_RATE).compute(speech[:24_000])
    np.testing.assert_allclose(plain - plain.mean(axis=0), feats, atol=1e-4)
    assert float(np.abs(plain.mean(axis=0)).min()) > 1.0  # without CMN the means are far from 0
