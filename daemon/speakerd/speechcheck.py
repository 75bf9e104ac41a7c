"""Is enrollment audio a voice? webrtcvad passes loud noise, hum and music as speech, and 20 s of
white noise enrolled as a "person" with consistency 1.00; this check refuses such files.

Three signs, each measured on what the VAD kept of one file:

- **window similarity**: the mean cosine between the file's window embeddings. A voice moves
  through sounds, so its windows differ (LibriSpeech: 0.68-0.88); steady noise and hum embed the
  same everywhere (0.99+).
- **voicing**: the share of frames with a clear pitch period (YIN). Speech alternates voiced and
  unvoiced sounds and pauses (LibriSpeech: at most 0.77); tones, music and sirens are voiced
  throughout (0.84-1.00).
- **held pitch**: the share of voiced frames that sit in a run of 100 ms or more at one pitch
  (within 0.15 semitone per 10 ms). Speech glides (LibriSpeech: at most 0.37); notes hold.

Figures: tools/measure_speech_check.py over every LibriSpeech clip in ../shared (176: none refused)
and the sounds of ``evaluation.nonspeech`` at three levels and three seeds (81: all refused, 60 of
them by this check after webrtcvad passed them as 20 s of speech, the rest by the VAD).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .audio import SAMPLE_RATE
from .errors import check

FRAME = 400
"""YIN integration window: 25 ms."""
HOP = 160
"""10 ms between pitch frames."""
MIN_LAG, MAX_LAG = SAMPLE_RATE // 400, SAMPLE_RATE // 60
"""Pitch periods looked for: 60-400 Hz."""
ACTIVE_DB = -40.0
"""Frames this far below the loudest frame are pauses, not counted."""
HELD_STEP_SEMITONES = 0.15
HELD_FRAMES = 10
BLOCK_FRAMES = 2_000
"""Frames analysed at once, so a long file needs bounded memory."""
_FFT = 2048


@dataclass(frozen=True)
class SpeechCheckSettings:
    max_window_similarity: float = 0.95
    """Above this mean window cosine a file is steady noise or hum (speech <= 0.88, noise >= 0.99)."""
    max_voiced: float = 0.85
    """Above this share of voiced frames it is a tone or music (speech <= 0.77, tones >= 0.84)."""
    max_held_pitch: float = 0.5
    """Above this share of voiced frames held at one pitch it is notes (speech <= 0.37, chords 0.94)."""
    voicing_threshold: float = 0.25
    """YIN's cumulative-mean-normalised difference below which a frame has a pitch."""
    min_voiced_frames: int = 50
    """Voicing figures from fewer voiced frames than this (0.5 s) are not judged."""

    def __post_init__(self) -> None:
        check(0 < self.max_window_similarity <= 1, "speech_check.max_window_similarity", self.max_window_similarity, "must be in (0, 1]")
        check(0 < self.max_voiced <= 1, "speech_check.max_voiced", self.max_voiced, "must be in (0, 1]")
        check(0 < self.max_held_pitch <= 1, "speech_check.max_held_pitch", self.max_held_pitch, "must be in (0, 1]")


@dataclass(frozen=True)
class SpeechEvidence:
    window_similarity: float | None
    """None with fewer than two windows."""
    voiced: float
    held_pitch: float
    voiced_frames: int

    def refusal(self, settings: SpeechCheckSettings) -> str | None:
        """Why this is not a voice, or None when it may be one."""
        s = settings
        if self.window_similarity is not None and self.window_similarity > s.max_window_similarity:
            return (f"every part of it sounds the same (window similarity {self.window_similarity:.2f}, speech "
                    f"stays below {s.max_window_similarity:.2f}): steady noise or hum, not a voice")
        if self.voiced_frames < s.min_voiced_frames:
            return None
        if self.voiced > s.max_voiced:
            return (f"it has a pitch {100 * self.voiced:.0f} % of the time (speech pauses and breaks "
                    f"its voicing, at most {100 * s.max_voiced:.0f} %): a tone or music, not speech")
        if self.held_pitch > s.max_held_pitch:
            return (f"{100 * self.held_pitch:.0f} % of its pitched sound holds one note (speech glides, at "
                    f"most {100 * s.max_held_pitch:.0f} %): music or tones, not speech")
        return None


def window_similarity(embeddings: np.ndarray) -> float | None:
    """Mean cosine over all pairs of window embeddings; None for fewer than two."""
    e = np.asarray(embeddings, dtype=np.float64)
    if len(e) < 2:
        return None
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    total = np.linalg.norm(e.sum(axis=0)) ** 2  # sum over all ordered pairs, the diagonal included
    return float((total - len(e)) / (len(e) * (len(e) - 1)))


def _yin(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: the minimum of YIN's normalised difference over the pitch lags, and that lag."""
    n = len(frames)
    spectrum = np.fft.rfft(frames, _FFT)
    head = np.fft.rfft(frames[:, :FRAME], _FFT)
    r = np.fft.irfft(np.conj(head) * spectrum, _FFT)[:, : MAX_LAG + 1]  # sum_j x_j x_(j+lag)
    cs = np.concatenate([np.zeros((n, 1)), np.cumsum(frames**2, axis=1)], axis=1)
    lags = np.arange(MAX_LAG + 1)
    d = cs[:, FRAME : FRAME + 1] + (cs[:, lags + FRAME] - cs[:, lags]) - 2 * r
    d = np.maximum(d[:, 1:], 0.0)
    cmnd = d * np.arange(1, MAX_LAG + 1) / np.maximum(np.cumsum(d, axis=1), 1e-12)
    window = cmnd[:, MIN_LAG - 1 :]
    return window.min(axis=1), window.argmin(axis=1) + MIN_LAG


def pitch_evidence(samples: np.ndarray, settings: SpeechCheckSettings) -> tuple[float, float, int]:
    """(voiced share of active frames, held-pitch share of voiced frames, voiced frames)."""
    x = np.asarray(samples, dtype=np.float64)
    count = (len(x) - FRAME - MAX_LAG) // HOP
    if count <= 0:
        return 0.0, 0.0, 0
    best, lag, level = np.empty(count), np.empty(count), np.empty(count)
    for start in range(0, count, BLOCK_FRAMES):
        idx = np.arange(start, min(count, start + BLOCK_FRAMES))[:, None] * HOP + np.arange(FRAME + MAX_LAG)
        frames = x[idx]
        best[start : start + len(idx)], lag[start : start + len(idx)] = _yin(frames)
        level[start : start + len(idx)] = np.sqrt(np.mean(frames[:, :FRAME] ** 2, axis=1))
    active = level > level.max() * 10 ** (ACTIVE_DB / 20)
    voiced = active & (best < settings.voicing_threshold)
    steps = np.abs(12 * np.log2(lag[1:] / lag[:-1]))
    steady = voiced[1:] & voiced[:-1] & (steps < HELD_STEP_SEMITONES)
    edges = np.diff(np.concatenate([[0], steady.astype(np.int8), [0]]))
    runs = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
    held = int(runs[runs >= HELD_FRAMES].sum())
    n_voiced = int(voiced.sum())
    return n_voiced / max(int(active.sum()), 1), held / max(n_voiced, 1), n_voiced


def speech_evidence(samples: np.ndarray, embeddings: np.ndarray, settings: SpeechCheckSettings) -> SpeechEvidence:
    """The evidence for one file: ``samples`` are what the VAD kept, ``embeddings`` its windows'."""
    voiced, held, n_voiced = pitch_evidence(samples, settings)
    return SpeechEvidence(window_similarity(embeddings), voiced, held, n_voiced)
