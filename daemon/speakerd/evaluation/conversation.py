"""Build multi-speaker conversations with known turns from a LibriSpeech-layout folder.

Real meetings have pauses, direct hand-overs and people at different distances from the
microphone; these conversations have all three, reproducibly from a seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from ..audio import SAMPLE_RATE


@dataclass(frozen=True)
class Turn:
    speaker: str
    start: float
    end: float
    clip: str


@dataclass(frozen=True)
class Conversation:
    audio: np.ndarray
    turns: list[Turn]
    sample_rate: int = SAMPLE_RATE

    @property
    def duration(self) -> float:
        return len(self.audio) / self.sample_rate

    def changes(self) -> list[tuple[float, str, str]]:
        """(time, previous speaker, new speaker) at every turn whose speaker differs from the last."""
        return [(b.start, a.speaker, b.speaker) for a, b in zip(self.turns, self.turns[1:]) if a.speaker != b.speaker]

    def write(self, path: Path) -> Path:
        sf.write(str(path), self.audio, self.sample_rate, subtype="PCM_16")
        return path


@dataclass(frozen=True)
class ConversationSettings:
    turns: int = 12
    turn_s: tuple[float, float] = (3.0, 8.0)
    """Range of turn lengths."""
    pause_probability: float = 0.5
    """Share of hand-overs with a pause; the rest are direct (no gap)."""
    pause_s: tuple[float, float] = (0.5, 1.5)
    level_db: tuple[float, float] = (-12.0, 0.0)
    """Range of per-turn gain, so some speakers are far from the microphone."""
    noise_dbfs: float = -65.0
    """Level of the room noise under everything (also fills the pauses)."""
    snr_db: float | None = None
    """If set, add white noise at this SNR relative to the speech."""
    seed: int = 0


def librispeech_speakers(root: Path, subset: str = "test-other") -> dict[str, list[Path]]:
    """speaker id -> sorted clips, for either layout of ../shared (folders per speaker or flat files)."""
    base = Path(root) / subset
    speakers: dict[str, list[Path]] = {}
    for path in sorted(base.rglob("*.flac")):
        speakers.setdefault(path.name.split("-")[0], []).append(path)
    return speakers


def split_enrollment(clips: dict[str, list[Path]], per_speaker: int) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """The first ``per_speaker`` clips of each speaker for enrollment, the rest for conversations."""
    enroll = {s: c[:per_speaker] for s, c in clips.items()}
    rest = {s: c[per_speaker:] for s, c in clips.items()}
    return enroll, rest


def _load(path: Path) -> np.ndarray:
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    if rate != SAMPLE_RATE:
        raise ValueError(f"{path}: expected {SAMPLE_RATE} Hz clips, got {rate}")
    return audio.mean(axis=1)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


def build_conversation(
    clips: dict[str, Sequence[Path]], settings: ConversationSettings | None = None
) -> Conversation:
    """Alternate speakers (never the same twice in a row), cutting turns from their clips."""
    s = settings or ConversationSettings()
    rng = np.random.default_rng(s.seed)
    speakers = sorted(clips)
    if len(speakers) < 2:
        raise ValueError("a conversation needs at least two speakers")
    cache: dict[Path, np.ndarray] = {}
    pieces: list[np.ndarray] = []
    turns: list[Turn] = []
    cursor = 0
    previous: str | None = None
    # every speaker speaks at least once: cycle a shuffled order first, then choose freely
    order = list(rng.permutation(speakers))
    for i in range(s.turns):
        if i < len(order) and order[i] != previous:
            speaker = order[i]
        else:
            speaker = str(rng.choice([x for x in speakers if x != previous]))
        clip = Path(clips[speaker][int(rng.integers(len(clips[speaker])))])
        audio = cache.setdefault(clip, _load(clip))
        want = int(rng.uniform(*s.turn_s) * SAMPLE_RATE)
        want = min(want, len(audio))
        offset = int(rng.integers(0, len(audio) - want + 1))
        piece = audio[offset : offset + want].copy()
        piece *= np.float32(10 ** (rng.uniform(*s.level_db) / 20) * 0.1 / max(_rms(piece), 1e-6))  # -20 dBFS, then the turn's level
        if i > 0 and rng.random() < s.pause_probability:
            gap = int(rng.uniform(*s.pause_s) * SAMPLE_RATE)
            pieces.append(np.zeros(gap, dtype=np.float32))
            cursor += gap
        turns.append(Turn(speaker, cursor / SAMPLE_RATE, (cursor + len(piece)) / SAMPLE_RATE, clip.name))
        pieces.append(piece)
        cursor += len(piece)
        previous = speaker
    lead = np.zeros(SAMPLE_RATE // 2, dtype=np.float32)
    audio = np.concatenate([lead, *pieces, lead])
    shift = len(lead) / SAMPLE_RATE
    turns = [Turn(t.speaker, t.start + shift, t.end + shift, t.clip) for t in turns]
    noise_rng = np.random.default_rng(s.seed + 1)
    audio = audio + noise_rng.normal(0, 10 ** (s.noise_dbfs / 20), len(audio)).astype(np.float32)
    if s.snr_db is not None:
        speech_rms = _rms(np.concatenate(pieces))
        audio = audio + noise_rng.normal(0, speech_rms / 10 ** (s.snr_db / 20), len(audio)).astype(np.float32)
    return Conversation(np.clip(audio, -1.0, 1.0).astype(np.float32), turns)
