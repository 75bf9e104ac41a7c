"""Enrollment refuses audio that is not a person speaking (webrtcvad passes noise, hum and music),
and refuses no real speech. Full figures: tools/measure_speech_check.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from daemon_harness import speakerd

from speakerd.audio import SAMPLE_RATE
from speakerd.enroll import EnrollError, embed_windows, file_speech, prepare_enrollment
from speakerd.evaluation.nonspeech import SOUNDS, nonspeech
from speakerd.speechcheck import SpeechCheckSettings, pitch_evidence, speech_evidence, window_similarity

SECONDS = 20.0
"""As long as the white noise the issue enrolled with consistency 1.00."""


def test_window_similarity_is_the_mean_pairwise_cosine() -> None:
    e = np.random.default_rng(0).standard_normal((7, 16))
    u = e / np.linalg.norm(e, axis=1, keepdims=True)
    pairs = [float(u[i] @ u[j]) for i in range(7) for j in range(7) if i != j]
    assert window_similarity(e) == pytest.approx(np.mean(pairs), abs=1e-12)
    assert window_similarity(e[:1]) is None


def test_pitch_evidence_tells_a_held_note_from_noise() -> None:
    t = np.arange(int(3 * SAMPLE_RATE)) / SAMPLE_RATE
    note = 0.1 * np.sin(2 * np.pi * 150 * t) + 0.05 * np.sin(2 * np.pi * 300 * t)
    voiced, held, n = pitch_evidence(note, SpeechCheckSettings())
    assert voiced > 0.99 and held > 0.99 and n > 250
    voiced, held, n = pitch_evidence(np.random.default_rng(1).standard_normal(3 * SAMPLE_RATE) * 0.1, SpeechCheckSettings())
    assert voiced < 0.05 and n < 50


@pytest.fixture(scope="module")
def embedder(default_model: Path):  # noqa: ANN201
    from speakerd.bundle import resolve_bundle
    from speakerd.embedding import backend_for
    from speakerd.settings import load_settings

    settings = load_settings(None, {})
    bundle = resolve_bundle(settings.embedding.model)
    backend = backend_for(bundle, settings.embedding, settings.windows)
    yield settings, bundle.features, backend.embed
    backend.close()


@pytest.mark.parametrize("sound", sorted(SOUNDS))
def test_non_speech_that_the_vad_passes_is_refused(sound: str, embedder, tmp_path: Path) -> None:
    settings, features, embed = embedder
    path = tmp_path / "sound.wav"
    sf.write(path, nonspeech(sound, SECONDS, seed=7), SAMPLE_RATE)
    with pytest.raises(EnrollError) as info:
        prepare_enrollment("Nobody", [path], settings, features, embed)
    message = str(info.value)
    assert str(path) in message
    assert "does not sound like a person speaking" in message or "speech found" in message


def refusals(clips: list[Path], embedder) -> list[str]:  # noqa: ANN001
    """The speech check's refusals for each clip, through enrollment's own path."""
    settings, features, embed = embedder
    check = SpeechCheckSettings()
    out = []
    for clip in clips:
        windows, _, audio = file_speech(clip, settings, features)
        why = speech_evidence(audio, embed_windows(windows, embed), check).refusal(check)
        if why is not None:
            out.append(f"{clip.name}: {why}")
    return out


def test_real_speech_is_never_refused(librispeech: Path, embedder) -> None:
    clips = sorted((librispeech / "test-other").rglob("*.flac"))[::5] + sorted((librispeech / "train-clean-100").glob("*.flac"))[::18]
    assert len(clips) == 17
    assert refusals(clips, embedder) == []


@pytest.mark.slow
def test_every_librispeech_clip_passes(librispeech: Path, embedder) -> None:
    clips = sorted((librispeech / "test-other").rglob("*.flac")) + sorted((librispeech / "train-clean-100").glob("*.flac"))
    assert len(clips) == 176
    assert refusals(clips, embedder) == []


def test_white_noise_is_not_enrolled_through_the_cli(tmp_path: Path, default_model: Path) -> None:
    noise = tmp_path / "noise.wav"
    sf.write(noise, nonspeech("white noise", SECONDS, seed=3), SAMPLE_RATE)
    store = tmp_path / "store"
    proc = speakerd("enroll", "Static", str(noise), "--store", str(store), check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "noise.wav does not sound like a person speaking" in proc.stderr and "steady noise or hum" in proc.stderr
    assert "enrolled" not in proc.stdout
    assert not store.exists(), "a refused first enrollment creates no store"
