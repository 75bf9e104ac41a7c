"""Reproducible sounds that are not speech, for measuring what enrollment must refuse.

webrtcvad calls most loud, broadband or tonal sound speech, so each of these passes the VAD and the
speech-amount check; ``speakerd.speechcheck`` must refuse them all while passing every LibriSpeech
clip (tools/measure_speech_check.py, tests/test_speechcheck.py).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..audio import SAMPLE_RATE

LEVEL_RMS = 0.1
"""-20 dBFS: a normal recording level."""


def _level(x: np.ndarray) -> np.ndarray:
    x = x - x.mean()
    return (LEVEL_RMS * x / max(float(np.sqrt(np.mean(x**2))), 1e-12)).astype(np.float32)


def _coloured(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Noise whose power falls as 1/f**exponent (0 white, 1 pink, 2 brown)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    spectrum[1:] /= f[1:] ** (exponent / 2)
    spectrum[0] = 0
    return np.fft.irfft(spectrum, n)


def _note(f0: float, n: int, harmonics: int = 6) -> np.ndarray:
    t = np.arange(n) / SAMPLE_RATE
    tone = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, harmonics + 1) if f0 * k < SAMPLE_RATE / 2)
    attack, release = min(n // 4, int(0.02 * SAMPLE_RATE)), min(n // 4, int(0.08 * SAMPLE_RATE))
    env = np.ones(n)
    env[:attack] = np.linspace(0, 1, attack)
    env[n - release :] = np.linspace(1, 0, release)
    return tone * env


def _melody(rng: np.random.Generator, n: int, note_s: tuple[float, float], gap_s: float, voices: int) -> np.ndarray:
    scale = 220.0 * 2 ** (np.array([0, 2, 4, 5, 7, 9, 11, 12, 14, 16]) / 12)
    out = np.zeros(n)
    pos = 0
    while pos < n:
        length = int(rng.uniform(*note_s) * SAMPLE_RATE)
        chunk = sum(_note(float(rng.choice(scale)) * (1 + v), length) for v in range(voices))
        end = min(n, pos + length)
        out[pos:end] += chunk[: end - pos]
        pos = end + int(gap_s * SAMPLE_RATE)
    return out


def _hum(n: int, mains: float) -> np.ndarray:
    t = np.arange(n) / SAMPLE_RATE
    return sum(np.sin(2 * np.pi * mains * k * t) / k**0.7 for k in range(1, 12))


def _sweep(n: int) -> np.ndarray:
    t = np.arange(n) / SAMPLE_RATE
    f = 600 + 300 * np.sin(2 * np.pi * 0.5 * t)  # a siren
    return np.sin(2 * np.pi * np.cumsum(f) / SAMPLE_RATE)


SOUNDS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "white noise": lambda rng, n: _coloured(rng, n, 0.0),
    "pink noise": lambda rng, n: _coloured(rng, n, 1.0),
    "brown noise": lambda rng, n: _coloured(rng, n, 2.0),
    "50 Hz hum": lambda rng, n: _hum(n, 50.0),
    "60 Hz hum + noise": lambda rng, n: _hum(n, 60.0) + 0.3 * _coloured(rng, n, 1.0),
    "legato melody": lambda rng, n: _melody(rng, n, (0.2, 0.6), 0.0, 1),
    "staccato melody": lambda rng, n: _melody(rng, n, (0.1, 0.25), 0.12, 1),
    "chords": lambda rng, n: _melody(rng, n, (0.5, 1.2), 0.05, 3),
    "siren": lambda rng, n: _sweep(n),
}
"""Name -> generator of ``n`` samples at 16 kHz."""


def nonspeech(name: str, seconds: float, seed: int = 0) -> np.ndarray:
    """``seconds`` of the named sound at -20 dBFS, float32 at 16 kHz."""
    return _level(SOUNDS[name](np.random.default_rng(seed), int(seconds * SAMPLE_RATE)))
