"""ECAPA-TDNN (``ecapa-speechbrain``): the network port and SpeechBrain's features against SpeechBrain itself.

``tests/data/speechbrain_reference.npz`` was written by SpeechBrain 1.1.2 (its ``ECAPA_TDNN`` with small
random weights and batch-norm statistics, its ``Fbank(n_mels=80)`` on a chirp with a quiet start), so
these tests compare with the official code without importing it (it needs torchaudio, which the
project does not install).
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


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE) as data:
        return {k: data[k] for k in data.files}


def test_features_equal_speechbrains_fbank(reference: dict[str, np.ndarray]) -> None:
    got = SpeechBrainFbank(ECAPA_RECIPE, SAMPLE_RATE).compute(reference["wave"])
    want = reference["fbank"]
    assert got.shape == want.shape == (ECAPA_RECIPE.num_frames(len(reference["wave"]), SAMPLE_RATE), 80)
    # dB values from -80 to +40; float32 torch against float64 numpy
    assert np.abs(got - want).max() < 2e-3
    # the quiet start sits on the 80 dB floor in both
    assert np.isclose(got.min(), want.max() - 80.0, atol=2e-3) and np.isclose(want.min(), want.max() - 80.0, atol=1e-4)


def test_ecapa_port_equals_speechbrains_network(reference: dict[str, np.ndarray]) -> None:
    torch = pytest.importorskip("torch")
    from speakerd.models.ecapa_net import EcapaTdnn

    model = EcapaTdnn(channels=(16, 16, 16, 16, 48), attention_channels=8, se_channels=8, lin_neurons=12)
    state = {k.removeprefix("state/"): torch.from_numpy(np.array(v)) for k, v in reference.items() if k.startswith("state/")}
    model.load_state_dict(state, strict=True)  # SpeechBrain's parameter names, one to one
    model.eval()
    with torch.no_grad():
        got = model(torch.from_numpy(reference["ecapa_input"])).numpy()
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
