"""VadSegmenter on real speech with inserted pauses: region count, boundaries, invariance, reset."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import lfilter

from speakerd.audio import SAMPLE_RATE, AudioChunk
from speakerd.errors import ConfigError
from speakerd.vad import SpeechAudio, SpeechEnd, SpeechStart, VadEvent, VadSegmenter, VadSettings

# Speaker 1688's clips are cut tightly (speech from the first to the last sample) and have no
# internal pause longer than end_silence_ms, so the inserted pauses are the only region edges.
# Other speakers' clips carry ~0.5 s of room tone at their ends, which would blur "the edge".
CLIPS = ["1688-142285-0003.flac", "1688-142285-0006.flac", "1688-142285-0002.flac"]
EDGE_TOLERANCE_S = 0.100
NOISE_DBFS = -60.0
"""Low background noise between utterances. Note: webrtcvad (mode 2) calls stationary noise at
-50 dBFS and above speech, so "low" must really be low."""
T0 = 1_700_000_000.0


@dataclass
class Region:
    start: int
    end: int
    audio: np.ndarray
    voiced: np.ndarray
    start_wall: float
    pieces: int


@dataclass
class Conversation:
    audio: np.ndarray
    speech: list[tuple[int, int]]  # [first, last) sample of each inserted utterance


def load(librispeech: Path, name: str) -> np.ndarray:
    x, sr = sf.read(librispeech / "test-other" / "1688" / name, dtype="float32")
    assert sr == SAMPLE_RATE
    return x


def pink_noise(seconds: float, dbfs: float, seed: int) -> np.ndarray:
    n = np.random.default_rng(seed).standard_normal(int(seconds * SAMPLE_RATE))
    n = lfilter([1.0], [1.0, -0.95], n)
    return (n / np.sqrt(np.mean(n**2)) * 10 ** (dbfs / 20)).astype(np.float32)


def build(parts: list[np.ndarray | float]) -> Conversation:
    """Utterances (arrays) and digital silences (seconds) in a row; records where the speech is."""
    pieces, speech, at = [], [], 0
    for p in parts:
        a = np.zeros(int(p * SAMPLE_RATE), np.float32) if isinstance(p, float) else p
        if not isinstance(p, float) and p.std() > 0.01:
            speech.append((at, at + len(a)))
        pieces.append(a)
        at += len(a)
    return Conversation(np.concatenate(pieces), speech)


@pytest.fixture(scope="module")
def conversation(librispeech: Path) -> Conversation:
    u1, u2, u3 = (load(librispeech, c) for c in CLIPS)
    return build([0.5, u1, 1.0, u2, pink_noise(1.0, NOISE_DBFS, seed=3), u3, 0.5])


def feed(seg: VadSegmenter, audio: np.ndarray, sizes: list[int], start: int = 0) -> list[VadEvent]:
    events: list[VadEvent] = []
    i, k = 0, 0
    while i < len(audio):
        n = sizes[k % len(sizes)]
        s = start + i
        events += seg.process(AudioChunk(audio[i : i + n], s, T0 + s / SAMPLE_RATE))
        i, k = i + n, k + 1
    return events + seg.flush()


def regions(events: list[VadEvent]) -> list[Region]:
    """Groups events per region, checking the contract: pieces contiguous from start to end."""
    out: list[Region] = []
    current: dict[str, Any] | None = None
    for e in events:
        if isinstance(e, SpeechStart):
            assert current is None, "SpeechStart inside a region"
            current = {"start": e.sample, "wall": e.wall_time, "audio": [], "voiced": [], "at": e.sample}
        elif isinstance(e, SpeechAudio):
            assert current is not None, "SpeechAudio outside a region"
            assert e.chunk.start == current["at"], "pieces must be contiguous"
            assert len(e.voiced) == len(e.chunk.samples) and e.voiced.dtype == bool
            assert e.chunk.capture_time == pytest.approx(T0 + e.chunk.start / SAMPLE_RATE, abs=1e-6)
            current["audio"].append(e.chunk.samples)
            current["voiced"].append(e.voiced)
            current["at"] = e.chunk.end
        else:
            assert current is not None, "SpeechEnd outside a region"
            assert e.sample == current["at"], "SpeechEnd must be the end of the last piece"
            assert e.wall_time == pytest.approx(T0 + e.sample / SAMPLE_RATE, abs=1e-6)
            out.append(Region(current["start"], e.sample, np.concatenate(current["audio"]),
                              np.concatenate(current["voiced"]), current["wall"], len(current["audio"])))
            current = None
    assert current is None, "region left open after flush"
    return out


def test_regions_follow_inserted_pauses(conversation: Conversation) -> None:
    settings = VadSettings()
    found = regions(feed(VadSegmenter(settings), conversation.audio, [1_600]))
    assert len(found) == len(conversation.speech) == 3
    pad = settings.padding_ms / 1000
    for r, (first, last) in zip(found, conversation.speech):
        assert abs(r.start / SAMPLE_RATE - (first / SAMPLE_RATE - pad)) <= EDGE_TOLERANCE_S, (r.start, first)
        assert abs(r.end / SAMPLE_RATE - (last / SAMPLE_RATE + pad)) <= EDGE_TOLERANCE_S, (r.end, last)
        assert np.array_equal(r.audio, conversation.audio[r.start : r.end])
        assert r.start_wall == pytest.approx(T0 + r.start / SAMPLE_RATE)
        assert r.voiced.mean() > 0.7  # mostly speech
        assert not r.voiced[: settings.frame_samples].any()  # the pre-roll is padding, not speech
        assert r.pieces > 10  # emitted while the region is open, not all at its end


def test_short_pause_does_not_split(librispeech: Path) -> None:
    u1, u3 = load(librispeech, CLIPS[0]), load(librispeech, CLIPS[2])
    settings = VadSettings(end_silence_ms=400)
    pause = 0.25  # plus the VAD's own hangover, still below end_silence_ms
    conv = build([0.5, u1, pause, u3, 0.5])
    found = regions(feed(VadSegmenter(settings), conv.audio, [1_600]))
    assert len(found) == 1
    (r,) = found
    gap = slice(conv.speech[0][1] - r.start, conv.speech[1][0] - r.start)
    assert np.all(r.audio[gap] == 0)  # the interior pause was emitted, as silence
    assert r.end - r.start > len(u1) + len(u3)


def test_longer_end_silence_joins_regions(conversation: Conversation) -> None:
    """end_silence_ms above the inserted 1.0 s pauses keeps one region throughout."""
    found = regions(feed(VadSegmenter(VadSettings(end_silence_ms=1_500)), conversation.audio, [4_000]))
    assert len(found) == 1


def test_pieces_hold_back_trailing_silence(conversation: Conversation) -> None:
    """While a region is open, no piece ends in unvoiced audio: that waits for speech or the close."""
    events = feed(VadSegmenter(VadSettings()), conversation.audio, [1_600])
    for e, after in zip(events, events[1:]):
        if isinstance(e, SpeechAudio) and not isinstance(after, SpeechEnd):
            assert e.voiced[-1]


@pytest.mark.parametrize("sizes", [[1], [37], [160], [4_000], "random"])
def test_chunk_size_invariant(conversation: Conversation, sizes: list[int] | str) -> None:
    audio = conversation.audio
    if sizes == [1]:
        # one-sample chunks on the first two regions only, to keep the test quick
        audio = audio[: conversation.speech[1][0] + 2 * SAMPLE_RATE]
    reference = regions(feed(VadSegmenter(VadSettings()), audio, [len(audio)]))
    if sizes == "random":
        sizes = list(np.random.default_rng(5).integers(1, 6_000, size=97))
    assert isinstance(sizes, list)
    got = regions(feed(VadSegmenter(VadSettings()), audio, sizes))
    assert len(got) == len(reference) >= 2
    for a, b in zip(got, reference):
        assert (a.start, a.end) == (b.start, b.end)
        assert np.array_equal(a.audio, b.audio) and np.array_equal(a.voiced, b.voiced)


def test_reset_starts_a_new_stream(conversation: Conversation) -> None:
    seg = VadSegmenter(VadSettings())
    fresh = regions(feed(VadSegmenter(VadSettings()), conversation.audio, [1_600], start=48_000))
    seg.process(AudioChunk(conversation.audio[:150_000], 0, T0))  # stops mid-region
    assert seg.in_speech
    seg.reset()
    assert not seg.in_speech
    again = regions(feed(seg, conversation.audio, [1_600], start=48_000))
    assert [(r.start, r.end) for r in again] == [(r.start, r.end) for r in fresh]
    assert fresh[0].start > 48_000  # the grid starts at the first chunk, wherever that is


def test_boundaries_are_dated_by_the_audio_the_vad_needed(conversation: Conversation) -> None:
    """A region's start is known start_frames of speech later, its end after the closing silence:
    each event's ``decided`` lies in the chunk that produced it, ``lag`` past its own sample."""
    settings, size = VadSettings(), 1_600
    seg = VadSegmenter(settings)
    audio = conversation.audio
    frame, pad = settings.frame_samples, SAMPLE_RATE * settings.padding_ms // 1000
    closing = -(-SAMPLE_RATE * settings.end_silence_ms // 1000 // frame) * frame  # whole frames of quiet
    seen = 0
    for i in range(0, len(audio), size):
        for e in seg.process(AudioChunk(audio[i : i + size], i, T0 + i / SAMPLE_RATE)):
            if isinstance(e, SpeechAudio):
                continue
            decided, wall = e.decided
            assert i < decided <= i + size and wall == pytest.approx(T0 + decided / SAMPLE_RATE, abs=1e-6)
            assert e.lag == (settings.start_frames * frame + pad if isinstance(e, SpeechStart) else closing - pad)
            seen += 1
    (piece, end) = seg.flush()  # the last region runs into the end of the audio: closed when it ends
    assert isinstance(end, SpeechEnd) and len(audio) - frame < end.decided[0] <= len(audio)
    assert seen == 2 * len(conversation.speech) - 1


def test_flush_closes_an_open_region(conversation: Conversation) -> None:
    seg = VadSegmenter(VadSettings())
    cut = conversation.speech[0][0] + 2 * SAMPLE_RATE  # in the middle of the first utterance
    events = seg.process(AudioChunk(conversation.audio[:cut], 0, T0))
    assert not any(isinstance(e, SpeechEnd) for e in events)
    events += seg.flush()
    (r,) = regions(events)
    assert cut - seg.settings.frame_samples <= r.end <= cut


def test_non_contiguous_chunks_are_rejected() -> None:
    seg = VadSegmenter(VadSettings())
    seg.process(AudioChunk(np.zeros(1_000, np.float32), 0, T0))
    with pytest.raises(ValueError, match="expected 1000"):
        seg.process(AudioChunk(np.zeros(1_000, np.float32), 1_500, T0))


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"aggressiveness": 4}, "vad.aggressiveness"),
        ({"frame_ms": 25}, "vad.frame_ms"),
        ({"start_frames": 0}, "vad.start_frames"),
        ({"end_silence_ms": -1}, "vad.end_silence_ms"),
        ({"padding_ms": 500, "end_silence_ms": 400}, "vad.padding_ms"),
    ],
)
def test_settings_errors_name_the_key(kwargs: dict[str, int], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        VadSettings(**kwargs)
    assert e.value.key == key and key in str(e.value)


@pytest.mark.parametrize("frame_ms", [10, 20, 30])
def test_every_frame_length_finds_the_regions(librispeech: Path, frame_ms: int) -> None:
    # Digital silence only: with 10 and 20 ms frames webrtcvad keeps calling even -60 dBFS noise
    # after speech "speech" for about a second, so the noisy pause above would not close a region.
    u1, u2, u3 = (load(librispeech, c) for c in CLIPS)
    conv = build([0.5, u1, 1.0, u2, 1.0, u3, 0.5])
    found = regions(feed(VadSegmenter(VadSettings(frame_ms=frame_ms)), conv.audio, [1_600]))
    assert len(found) == 3
    for r, (first, last) in zip(found, conv.speech):
        assert r.start <= first and r.end >= last


def test_cost_per_second_of_audio(conversation: Conversation) -> None:
    seg = VadSegmenter(VadSettings())
    t0 = time.perf_counter()
    feed(seg, conversation.audio, [1_600])
    per_second = (time.perf_counter() - t0) / (len(conversation.audio) / SAMPLE_RATE)
    assert per_second < 0.02, f"{per_second * 1000:.2f} ms per second of audio"
