"""ECAPA-TDNN (``ecapa-speechbrain``): the network port and SpeechBrain's features against SpeechBrain itself.

``tests/data/speechbrain_reference.npz`` holds only SpeechBrain 1.1.2's outputs (12 KB): its
``Fbank(n_mels=80)`` on ``chirp()`` and its ``ECAPA_TDNN`` (the ``SMALL`` shape, parameters from
``random_state``) on ``ecapa_input()``. The inputs and parameters are made here from fixed seeds, so
these tests compare with the official code without importing it (it needs torchaudio, which the
project does not install) and without committing weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from speakerd.features import FeatureExtractor, SpeechBrainFbank
from speakerd.models.ecapa import ECAPA_RECIPE
from speakerd.windows import SpeechWindower, WindowSettings

REFERENCE = Path(__file__).parent / "data" / "speechbrain_reference.npz"
SAMPLE_RATE = 16000
SMALL = {"channels": (16, 16, 16, 16, 48), "attention_channels": 8, "se_channels": 8, "lin_neurons": 12}


def chirp() -> np.ndarray:
    """0.4 s of a rising tone over noise, its first 50 ms 60 dB down, so the 80 dB floor acts."""
    t = np.arange(6400) / SAMPLE_RATE
    wave = 0.3 * np.sin(2 * np.pi * (180 + 400 * t) * t) + 0.05 * np.random.default_rng(0).standard_normal(len(t))
    wave[:800] *= 0.001
    return wave.astype(np.float32)


def ecapa_input() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((2, 37, 80)).astype(np.float32)


def random_state(shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Parameters for every name in ``shapes`` (sorted), from one seed; batch-norm variances positive
    and its other statistics non-trivial, so the test sees them used."""
    rng = np.random.default_rng(2)
    state = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("num_batches_tracked"):
            state[name] = np.zeros(shape, dtype=np.int64)
        elif name.endswith("running_var"):
            state[name] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        else:
            state[name] = (0.3 * rng.standard_normal(shape)).astype(np.float32)
    return state


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE) as data:
        return {k: data[k] for k in data.files}


def test_features_equal_speechbrains_fbank(reference: dict[str, np.ndarray]) -> None:
    wave = chirp()
    got = SpeechBrainFbank(ECAPA_RECIPE, SAMPLE_RATE).compute(wave)
    want = reference["fbank"]
    assert got.shape == want.shape == (ECAPA_RECIPE.num_frames(len(wave), SAMPLE_RATE), 80)
    # dB values from -80 to +40; float32 torch against float64 numpy
    assert np.abs(got - want).max() < 2e-3
    # the quiet start sits on the 80 dB floor in both
    assert np.isclose(got.min(), want.max() - 80.0, atol=2e-3) and np.isclose(want.min(), want.max() - 80.0, atol=1e-4)


def test_ecapa_port_equals_speechbrains_network(reference: dict[str, np.ndarray]) -> None:
    torch = pytest.importorskip("torch")
    from speakerd.models.ecapa_net import EcapaTdnn

    model = EcapaTdnn(**SMALL)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # the same names SpeechBrain's network has, so the reference was made with these very values
    model.load_state_dict({k: torch.from_numpy(v) for k, v in random_state(shapes).items()}, strict=True)
    model.eval()
    with torch.no_grad():
        got = model(torch.from_numpy(ecapa_input())).numpy()
    assert got.shape == reference["ecapa_output"].shape == (2, 12)
    assert np.abs(got - reference["ecapa_output"]).max() < 1e-5


@pytest.mark.parametrize("seconds", [0.8, 1.0, 1.5, 2.37])
def test_frame_count_is_torch_stft_centre(seconds: float) -> None:
    samples = int(seconds * SAMPLE_RATE)
    feats = FeatureExtractor(ECAPA_RECIPE, SAMPLE_RATE).compute(np.random.default_rng(1).standard_normal(samples) * 0.1)
    assert feats.shape == (1 + samples // 160, 80)
    assert np.abs(feats.mean(axis=0)).max() < 1e-3  # the window's mean is removed (SpeechBrain's sentence norm)


def test_windows_are_computed_from_their_own_samples() -> None:
    """Overlapping windows and probes each see zero-padded edges of their own, as in training: a window's
    features equal the features of its samples alone, not a slice of the region's stream."""
    from speakerd.audio import AudioChunk
    from speakerd.vad import SpeechAudio, SpeechEnd, SpeechStart

    rng = np.random.default_rng(2)
    audio = (0.2 * np.sin(2 * np.pi * 220 * np.arange(4 * SAMPLE_RATE) / SAMPLE_RATE) + 0.02 * rng.standard_normal(4 * SAMPLE_RATE)).astype(np.float32)
    windower = SpeechWindower(WindowSettings(), ECAPA_RECIPE)
    out = windower.process(SpeechStart(0, 0.0))
    for start in range(0, len(audio), 1600):
        chunk = AudioChunk(samples=audio[start : start + 1600], start=start, capture_time=start / SAMPLE_RATE)
        out += windower.process(SpeechAudio(chunk, np.ones(1600, dtype=bool)))
    out += windower.process(SpeechEnd(len(audio), len(audio) / SAMPLE_RATE))
    windows = [w for w in out if hasattr(w, "feats")]
    extractor = FeatureExtractor(ECAPA_RECIPE, SAMPLE_RATE)
    assert sum(w.probe for w in windows) >= 8 and sum(not w.probe for w in windows) >= 6
    for w in windows:
        np.testing.assert_allclose(w.feats, extractor.compute(audio[w.start : w.end]), atol=1e-4)
