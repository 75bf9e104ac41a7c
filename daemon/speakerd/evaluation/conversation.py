"""Build multi-speaker conversations with known turns from a LibriSpeech-layout folder.

Real meetings have pauses, direct hand-overs and people at different distances from the
microphone; these conversations have all three, reproducibly from a seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from ..audio import SAMPLE_RATE
from ..rooms import RoomSettings


@dataclass(frozen=True)
class Turn:
    speaker: str
    start: float
    end: float
    clip: str
    speech: tuple[tuple[float, float], ...] = ()
    """Where inside the turn the speaker actually speaks (a read sentence has pauses too)."""

    def shifted(self, seconds: float) -> Turn:
        return Turn(
            self.speaker,
            self.start + seconds,
            self.end + seconds,
            self.clip,
            tuple((a + seconds, b + seconds) for a, b in self.speech),
        )


@dataclass(frozen=True)
class Conversation:
    audio: np.ndarray
    turns: list[Turn]
    sample_rate: int = SAMPLE_RATE
    interjections: list[Turn] = field(default_factory=list)
    """Short words of another speaker over a turn: reference speech, but no change of speaker."""
    noise: np.ndarray | None = None
    """A room's noise bed as mixed into ``audio`` (what its SNR is measured against)."""

    @property
    def duration(self) -> float:
        return len(self.audio) / self.sample_rate

    def changes(self) -> list[tuple[float, str, str]]:
        """(time, previous speaker, new speaker) at every turn whose speaker differs from the last.

        The time is when the new speaker's voice begins, not where the cut was made: a turn cut from
        a read sentence can open on a pause, and nobody can hear a speaker before they speak.
        """
        return [
            (b.speech[0][0] if b.speech else b.start, a.speaker, b.speaker)
            for a, b in zip(self.turns, self.turns[1:])
            if a.speaker != b.speaker
        ]

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
    """If set, add noise at this SNR relative to the speech."""
    noise_color: str = "white"
    """white, pink (1/f, closer to fans and distant chatter) or brown (1/f^2, rumble)."""
    rt60_s: float | None = None
    """If set, each speaker gets their own simulated room response with this reverberation time."""
    room: RoomSettings | None = None
    """If set, everyone speaks in one simulated room (pyroomacoustics) through one table microphone,
    over a noise bed at the room's SNR (``snr_db``, ``noise_color`` and ``rt60_s`` are then unused)."""
    overlap_share: float = 0.0
    """Share of hand-overs where the next speaker starts before the last one stops."""
    overlap_s: tuple[float, float] = (0.2, 1.0)
    interjections: float = 0.0
    """Share of turns (long enough) with a short interjection of another speaker over them."""
    interjection_s: tuple[float, float] = (0.3, 1.0)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap_share <= 1.0 or not 0.0 <= self.interjections <= 1.0:
            raise ValueError(f"overlap_share and interjections are shares within 0 to 1, got {self.overlap_share}, {self.interjections}")
        if self.noise_color not in NOISE_COLORS:
            raise ValueError(f"noise_color must be one of {', '.join(NOISE_COLORS)}, got {self.noise_color!r}")
        if self.rt60_s is not None and not 0.05 <= self.rt60_s <= 3.0:
            raise ValueError(f"rt60_s must be within 0.05 to 3 s, got {self.rt60_s}")


NOISE_COLORS = ("white", "pink", "brown")
UNKNOWN_PREFIX = "unknown-"
"""Speakers from the unknown pool are labelled with this prefix, so nobody mistakes them for enrolled ones."""


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


def unknown_pool(root: Path, subset: str = "train-clean-100", min_s: float = 4.0) -> dict[str, list[Path]]:
    """Voices that are never enrolled: ``unknown-<id>`` -> clips at least ``min_s`` long (room for a turn)."""
    pool: dict[str, list[Path]] = {}
    for speaker, paths in librispeech_speakers(root, subset).items():
        long_enough = [p for p in paths if sf.info(str(p)).duration >= min_s]
        if long_enough:
            pool[UNKNOWN_PREFIX + speaker] = long_enough
    return pool


def pick_speakers(pool: dict[str, list[Path]], count: int, seed: int) -> dict[str, list[Path]]:
    """``count`` speakers of ``pool``, the same ones for the same seed."""
    if count > len(pool):
        raise ValueError(f"asked for {count} speakers, the pool has {len(pool)}")
    chosen = np.random.default_rng(seed).choice(sorted(pool), size=count, replace=False)
    return {str(s): pool[str(s)] for s in sorted(chosen)}


def room_response(rt60_s: float, rng: np.random.Generator, drr_db: float = 3.0) -> np.ndarray:
    """A synthetic room impulse response: direct path plus exponentially decaying noise.

    The tail decays by 60 dB in ``rt60_s`` (amplitude ``exp(-6.91 t / rt60)``) and starts after a
    few milliseconds like early reflections; ``drr_db`` is the direct-to-reverberant energy ratio, so
    a smaller value puts the talker further from the microphone.
    """
    n = int(rt60_s * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    tail = rng.normal(0.0, 1.0, n) * np.exp(-np.log(1000.0) * t / rt60_s)
    tail[: int(0.003 * SAMPLE_RATE)] = 0.0  # no reflection arrives with the direct sound
    tail *= np.sqrt(10 ** (-drr_db / 10) / np.sum(tail**2))
    tail[0] = 1.0
    return tail.astype(np.float32)


def _noise(color: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS noise of the given colour."""
    if color == "brown":
        from ..rooms import colored_noise

        return colored_noise(color, n, rng)
    white = rng.normal(0.0, 1.0, n)
    if color == "pink":
        spectrum = np.fft.rfft(white)
        spectrum[1:] /= np.sqrt(np.arange(1, len(spectrum)))
        spectrum[0] = 0.0
        white = np.fft.irfft(spectrum, n)
    return (white / max(float(np.sqrt(np.mean(white**2))), 1e-12)).astype(np.float32)


def _load(path: Path) -> np.ndarray:
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    if rate != SAMPLE_RATE:
        raise ValueError(f"{path}: expected {SAMPLE_RATE} Hz clips, got {rate}")
    return audio.mean(axis=1)


SPEECH_FRAME_S = 0.02
SPEECH_FLOOR_DB = 40.0
"""Frames more than this below the turn's loudest frames are not speech."""
SPEECH_ABOVE_NOISE_DB = 6.0
"""Frames less than this above the turn's noise floor (its quietest 5 %) are room tone, not speech.
Without it, readers recorded with a -45 to -55 dB floor (1688, 1998, 533) had every frame within
40 dB of their loudest, so whole turns, pauses and silent lead-ins included, counted as speech."""
SPEECH_BRIDGE_S = 0.3
"""Pauses shorter than this inside a turn count as speech (nobody hears them as a break)."""
SPEECH_MIN_S = 0.1
"""A stretch shorter than this, after bridging, is a click or a lip noise, not speech."""


def speech_intervals(piece: np.ndarray, offset_s: float) -> tuple[tuple[float, float], ...]:
    """Speech inside a clean turn by frame energy: independent of the VAD the daemon uses."""
    hop = int(SPEECH_FRAME_S * SAMPLE_RATE)
    n = len(piece) // hop
    if n == 0:
        return ()
    frames = piece[: n * hop].reshape(n, hop)
    db = 10 * np.log10(np.mean(np.square(frames, dtype=np.float64), axis=1) + 1e-12)
    loud, floor = np.percentile(db, [95, 5])
    active = db > max(loud - SPEECH_FLOOR_DB, floor + SPEECH_ABOVE_NOISE_DB)
    intervals: list[list[float]] = []
    for i in np.flatnonzero(active):
        start, end = i * SPEECH_FRAME_S, (i + 1) * SPEECH_FRAME_S
        if intervals and start - intervals[-1][1] < SPEECH_BRIDGE_S:
            intervals[-1][1] = end
        else:
            intervals.append([start, end])
    return tuple((offset_s + a, offset_s + b) for a, b in intervals if b - a >= SPEECH_MIN_S - 1e-9)


def _speech_only(piece: np.ndarray) -> tuple[np.ndarray, tuple[tuple[float, float], ...]]:
    """The piece from its first to its last speech, and that speech (seconds into the result).

    A cut from a clip often begins or ends in the reader's pause, and every clip begins with its
    own silent lead-in; trimmed, a hand-over with no pause is direct in speech too. The speech is
    found on the whole cut: the trimmed piece's own quietest frames are speech, not the room.
    """
    speech = speech_intervals(piece, 0.0)
    if not speech:
        return piece.copy(), ()
    first = speech[0][0]
    trimmed = piece[int(round(first * SAMPLE_RATE)) : int(round(speech[-1][1] * SAMPLE_RATE))].copy()
    return trimmed, tuple((a - first, b - first) for a, b in speech)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


def build_conversation(
    clips: dict[str, Sequence[Path]], settings: ConversationSettings | None = None, babble: Sequence[Path] = ()
) -> Conversation:
    """Alternate speakers (never the same twice in a row), cutting turns from their clips.

    With ``settings.room``, ``babble`` are the clips of the distant voices in its noise bed (people
    who are not in the meeting).
    """
    s = settings or ConversationSettings()
    rng = np.random.default_rng(s.seed)
    overlap_rng = np.random.default_rng(s.seed + 4)  # its own draws: the turns stay the clean meeting's
    speakers = sorted(clips)
    if len(speakers) < 2:
        raise ValueError("a conversation needs at least two speakers")
    cache: dict[Path, np.ndarray] = {}
    pieces: list[tuple[int, np.ndarray]] = []  # (start sample, audio) of every turn, pauses between
    turns: list[Turn] = []
    cursor = 0
    previous: str | None = None
    # every speaker speaks at least once: cycle a shuffled order first, then choose freely
    order = [str(x) for x in rng.permutation(speakers)]
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
        piece, speech = _speech_only(audio[offset : offset + want])
        piece *= np.float32(10 ** (rng.uniform(*s.level_db) / 20) * 0.1 / max(_rms(piece), 1e-6))  # -20 dBFS, then the turn's level
        overlap = i > 0 and s.overlap_share > 0 and overlap_rng.random() < s.overlap_share
        if i > 0 and rng.random() < s.pause_probability:
            gap = int(rng.uniform(*s.pause_s) * SAMPLE_RATE)
            if not overlap:
                cursor += gap
        if overlap:
            back = int(overlap_rng.uniform(*s.overlap_s) * SAMPLE_RATE)
            cursor -= min(back, len(pieces[-1][1]) // 2, len(piece) // 2)
        start = cursor / SAMPLE_RATE
        turns.append(Turn(speaker, start, start + len(piece) / SAMPLE_RATE, clip.name, tuple((start + a, start + b) for a, b in speech)))
        pieces.append((cursor, piece))
        cursor = max(cursor + len(piece), pieces[-2][0] + len(pieces[-2][1]) if len(pieces) > 1 else 0)
        previous = speaker
    extra = _interjections(turns, clips, cache, s) if s.interjections > 0 else []
    lead = SAMPLE_RATE // 2
    total = lead + cursor + lead
    dry = np.zeros(total, dtype=np.float32)
    placed = [(lead + at, piece, turn.speaker) for (at, piece), turn in zip(pieces, turns, strict=True)]
    placed += [(lead + at, piece, turn.speaker) for at, piece, turn in extra]
    for at, piece, _ in placed:
        dry[at : at + len(piece)] += piece
    shift = lead / SAMPLE_RATE
    turns = [t.shifted(shift) for t in turns]
    interjections = [turn.shifted(shift) for *_, turn in extra]
    noise = None
    if s.room is not None:
        speech_mask = _mask([iv for t in [*turns, *interjections] for iv in t.speech], total)
        audio, noise = _in_room(placed, total, speech_mask, s, babble)
    else:
        audio = dry.copy()
        if s.rt60_s is not None:
            audio = _reverberate(placed, total - lead, total, s.rt60_s, np.random.default_rng(s.seed + 2))
        noise_rng = np.random.default_rng(s.seed + 1)
        audio = audio + noise_rng.normal(0, 10 ** (s.noise_dbfs / 20), len(audio)).astype(np.float32)
        if s.snr_db is not None:
            speech_rms = _rms(np.concatenate([piece for at, piece, _ in placed[: len(turns)]]))
            audio = audio + _noise(s.noise_color, len(audio), noise_rng) * np.float32(speech_rms / 10 ** (s.snr_db / 20))
    return Conversation(np.clip(audio, -1.0, 1.0).astype(np.float32), turns, interjections=interjections, noise=noise)


Placed = tuple[int, np.ndarray, str]
"""(start sample, dry audio, speaker) of one turn or interjection."""


def _interjections(
    turns: list[Turn], clips: dict[str, Sequence[Path]], cache: dict[Path, np.ndarray], s: ConversationSettings
) -> list[tuple[int, np.ndarray, Turn]]:
    """Short words of another speaker ("yes", "right") inside a share of the turns, over the speaker.

    Drawn from their own generator, so the turns stay those of the meeting without interjections.
    """
    rng = np.random.default_rng(s.seed + 3)
    out: list[tuple[int, np.ndarray, Turn]] = []
    for turn in turns:
        if rng.random() >= s.interjections or turn.end - turn.start < 2 * s.interjection_s[1] + 1.0:
            continue
        who = str(rng.choice([x for x in sorted(clips) if x != turn.speaker]))
        clip = Path(clips[who][int(rng.integers(len(clips[who])))])
        audio = cache.setdefault(clip, _load(clip))
        length = int(rng.uniform(*s.interjection_s) * SAMPLE_RATE)
        # from the clip's speech, so the interjection is words, not a pause
        speech = speech_intervals(audio, 0.0)
        long = [(a, b) for a, b in speech if (b - a) * SAMPLE_RATE >= length] or [(0.0, len(audio) / SAMPLE_RATE)]
        a, b = long[int(rng.integers(len(long)))]
        first = int(rng.uniform(a * SAMPLE_RATE, max(a * SAMPLE_RATE, b * SAMPLE_RATE - length)))
        piece = audio[first : first + length].copy()
        piece *= np.float32(10 ** (rng.uniform(*s.level_db) / 20) * 0.1 / max(_rms(piece), 1e-6))
        at = rng.uniform(turn.start + 0.5, turn.end - 0.5 - length / SAMPLE_RATE)
        start = int(at * SAMPLE_RATE)
        t0 = start / SAMPLE_RATE
        out.append((start, piece, Turn(who, t0, t0 + length / SAMPLE_RATE, clip.name, ((t0, t0 + length / SAMPLE_RATE),))))
    return out


def _mask(intervals: Sequence[tuple[float, float]], n: int) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    for a, b in intervals:
        mask[int(a * SAMPLE_RATE) : int(b * SAMPLE_RATE)] = True
    return mask


def meeting_room(s: ConversationSettings, speakers: Sequence[str]) -> tuple[Any, dict[str, tuple[float, float, float]], np.random.Generator]:
    """The meeting's room, each speaker's place in it, and the generator that draws its noise.

    Also what an enrollment "in the same room" needs to put a speaker's clips where they sit.
    """
    from .. import rooms

    if s.room is None:
        raise ValueError("the conversation has no room")
    rng = np.random.default_rng(s.seed + 5)
    room = rooms.build_room(s.room, rng)
    places = {speaker: room.place(rng, s.room.distance_m) for speaker in sorted(speakers)}
    return room, places, rng


def _in_room(placed: Sequence[Placed], total: int, speech_mask: np.ndarray, s: ConversationSettings,
             babble: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Everyone at their own place in one simulated room, one microphone, a noise bed at the SNR.

    The speech level is measured over the reference speech (the dry turns), the noise over all of it.
    """
    from .. import rooms

    assert s.room is not None
    room, places, rng = meeting_room(s, sorted({who for *_, who in placed}))
    wet = np.zeros(total, dtype=np.float64)
    for speaker, where in places.items():
        track = np.zeros(total, dtype=np.float32)
        for at, piece, who in placed:
            if who == speaker:
                track[at : at + len(piece)] += piece
        wet += rooms.convolve(track, room.response(where))
    return room_mix(wet.astype(np.float32), speech_mask, s, room, rng, babble)


def room_mix(wet: np.ndarray, speech_mask: np.ndarray, s: ConversationSettings, room: Any, rng: np.random.Generator,
             babble: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(room speech at the recording level over the noise bed at the SNR, that noise as mixed).

    The bed is coloured noise and babble; without an SNR, only the quiet floor of ``noise_dbfs``.
    """
    from .. import rooms

    assert s.room is not None
    if s.room.snr_db is None:
        floor = rng.normal(0, 10 ** (s.noise_dbfs / 20), len(wet)).astype(np.float32)
        return rooms.mix_at_snr(wet, floor, 20 * np.log10(rooms.SPEECH_LEVEL) - s.noise_dbfs, speech_mask)
    bed = rooms.noise_bed(len(wet), s.room, room, rng, [_load(Path(p)) for p in babble])
    return rooms.mix_at_snr(wet, bed, float(rng.uniform(*s.room.snr_db)), speech_mask)


def _reverberate(placed: Sequence[Placed], end: int, total: int, rt60_s: float, rng: np.random.Generator) -> np.ndarray:
    """Every turn convolved with its speaker's room response, tails spilling into what follows up to
    ``end`` (the last turn's end), then the silent lead-out.

    Each speaker sits at their own place in the room (own response, own direct-to-reverberant
    ratio); the reference turns stay the dry ones, as a listener would mark them.
    """
    from scipy.signal import fftconvolve

    responses: dict[str, np.ndarray] = {}
    for speaker in sorted({who for *_, who in placed}):
        responses[speaker] = room_response(rt60_s, rng, drr_db=float(rng.uniform(-3.0, 6.0)))
    wet = np.zeros(end + max(len(r) for r in responses.values()), dtype=np.float64)
    for at, piece, who in placed:
        out = fftconvolve(piece, responses[who])
        out *= _rms(piece) / max(_rms(out[: len(piece)]), 1e-12)  # keep the turn's level
        wet[at : at + len(out)] += out
    return np.concatenate([wet[:end], np.zeros(total - end, dtype=np.float64)]).astype(np.float32)
