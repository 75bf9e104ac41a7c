"""The GE2E d-vector encoder of Resemblyzer 0.1.4, rebuilt so its weights load strictly.

Resemblyzer itself loads ``pretrained.pt`` with ``strict=False``, which would hide a renamed or
missing tensor; here every key must match, so a changed checkpoint fails loudly at build time.
This module imports torch: only ``speakerd models build`` and tests use it, never ``speakerd run``.

It also holds a numpy re-implementation of the mel spectrogram Resemblyzer computes
(``librosa.feature.melspectrogram`` with its defaults), the reference the kaldi-native-fbank recipe
is measured against; it needs neither librosa nor torch.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from .state_dict import CheckpointError, state_dict_problems

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
MEL_BINS = 40
HIDDEN_SIZE = 256
EMBEDDING_DIM = 256
NUM_LAYERS = 3
PARTIAL_FRAMES = 160
"""Frames per partial utterance in training (1.6 s)."""
N_FFT = 400
HOP = 160
TARGET_DBFS = -30.0
"""Resemblyzer raises (never lowers) each utterance to this level before the mel spectrogram."""




class GE2EEncoder(nn.Module):
    """3-layer LSTM 40->256, final hidden state of the last layer -> linear -> ReLU -> L2 norm.

    ``similarity_weight`` / ``similarity_bias`` are the GE2E loss scale and offset. They play no part
    in inference but are in the checkpoint, and keeping them lets the load be strict.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(MEL_BINS, HIDDEN_SIZE, NUM_LAYERS, batch_first=True)
        self.linear = nn.Linear(HIDDEN_SIZE, EMBEDDING_DIM)
        self.relu = nn.ReLU()
        self.similarity_weight = nn.Parameter(torch.tensor([10.0]))
        self.similarity_bias = nn.Parameter(torch.tensor([-5.0]))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(batch, frames, 40) mel power -> (batch, 256) L2-normalised embeddings."""
        _, (hidden, _) = self.lstm(feats)
        raw = self.relu(self.linear(hidden[-1]))
        # Resemblyzer divides by the bare norm; the floor only guards an all-zero ReLU output
        return raw / torch.clamp(torch.linalg.vector_norm(raw, dim=1, keepdim=True), min=1e-12)


def check_state_dict(model: nn.Module, state: Mapping[str, Any]) -> None:
    """Raise CheckpointError naming every missing, unexpected or wrongly shaped key."""
    problems = state_dict_problems(model.state_dict(), state)
    if problems:
        raise CheckpointError("GE2E checkpoint does not match the encoder: " + "; ".join(problems))


def load_encoder(weights: Path | Mapping[str, Any]) -> GE2EEncoder:
    """Build the encoder from ``pretrained.pt`` (or its ``model_state``), strictly, in eval mode."""
    if isinstance(weights, Path):
        checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
        if not isinstance(checkpoint, dict) or "model_state" not in checkpoint:
            raise CheckpointError(f"{weights}: expected a dict with 'model_state', as Resemblyzer saves")
        state = checkpoint["model_state"]
    else:
        state = weights
    model = GE2EEncoder()
    check_state_dict(model, state)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


# --- reference features: Resemblyzer's audio.wav_to_mel_spectrogram, without librosa ---------


# Slaney's mel scale: linear below 1 kHz, logarithmic above (librosa's default, htk=False)
_SLANEY_HZ_PER_MEL = 200.0 / 3
_SLANEY_MIN_LOG_HZ = 1000.0
_SLANEY_MIN_LOG_MEL = _SLANEY_MIN_LOG_HZ / _SLANEY_HZ_PER_MEL
_SLANEY_LOG_STEP = math.log(6.4) / 27.0


def _hz_to_mel_slaney(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    mel = hz / _SLANEY_HZ_PER_MEL
    high = hz >= _SLANEY_MIN_LOG_HZ
    mel[high] = _SLANEY_MIN_LOG_MEL + np.log(hz[high] / _SLANEY_MIN_LOG_HZ) / _SLANEY_LOG_STEP
    return mel


def _mel_to_hz_slaney(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    hz = _SLANEY_HZ_PER_MEL * mel
    high = mel >= _SLANEY_MIN_LOG_MEL
    hz[high] = _SLANEY_MIN_LOG_HZ * np.exp(_SLANEY_LOG_STEP * (mel[high] - _SLANEY_MIN_LOG_MEL))
    return hz


def slaney_mel_filters(
    sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = MEL_BINS, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """``librosa.filters.mel(sr, n_fft, n_mels, htk=False, norm="slaney")``: (n_mels, 1 + n_fft // 2)."""
    fmax = sr / 2.0 if fmax is None else fmax
    fft_freqs = np.linspace(0.0, sr / 2.0, 1 + n_fft // 2)
    mel_f = _mel_to_hz_slaney(np.linspace(_hz_to_mel_slaney(np.array([fmin]))[0], _hz_to_mel_slaney(np.array([fmax]))[0], n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]
    return weights.astype(np.float32)


def normalize_volume(wav: np.ndarray, target_dbfs: float = TARGET_DBFS) -> np.ndarray:
    """Resemblyzer's ``normalize_volume(..., increase_only=True)``."""
    rms = float(np.sqrt(np.mean(np.square(wav, dtype=np.float64)))) if len(wav) else 0.0
    change = target_dbfs - 20.0 * math.log10(max(rms, 1e-10))
    if change <= 0 or not math.isfinite(change):
        return wav
    return (wav * np.float32(10.0 ** (change / 20.0))).astype(np.float32)


def reference_mel(wav: np.ndarray, *, pad_mode: str = "constant") -> np.ndarray:
    """(frames, 40) mel power as ``librosa.feature.melspectrogram(y, sr=16000, n_fft=400, hop_length=160,
    n_mels=40)`` gives it (center=True, periodic hann, Slaney mel, power 2), transposed like Resemblyzer.

    ``pad_mode`` is librosa's centre padding: "constant" (zeros) since librosa 0.10, "reflect" before.
    Volume normalisation is not applied here; see :func:`normalize_volume`.
    """
    y = np.asarray(wav, dtype=np.float32)
    padded = np.pad(y, N_FFT // 2, mode=pad_mode)
    n_frames = 1 + (len(padded) - N_FFT) // HOP
    idx = np.arange(N_FFT)[None, :] + HOP * np.arange(n_frames)[:, None]
    window = (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)
    spec = np.fft.rfft(padded[idx] * window, n=N_FFT, axis=1)
    power = (spec.real**2 + spec.imag**2).astype(np.float32)
    return (power @ slaney_mel_filters().T).astype(np.float32)
