"""Filterbank features with kaldi-native-fbank, configured only from a bundle's recipe (and
SpeechBrain's ``Fbank`` in numpy for the recipe kind that names it).

Features are computed once per speech region as a stream and windows are slices of it: overlapping
windows share frames instead of recomputing them, and a slice equals the per-window computation
whenever windows start on the frame-shift grid (with ``snip_edges``), which the windower guarantees.
"""

from __future__ import annotations

import math

import kaldi_native_fbank as knf
import numpy as np

from .bundle import FeatureRecipe


def fbank_options(recipe: FeatureRecipe, sample_rate: int) -> knf.FbankOptions:
    opts = knf.FbankOptions()
    frame = opts.frame_opts
    frame.samp_freq = float(sample_rate)
    frame.frame_length_ms = recipe.frame_length_ms
    frame.frame_shift_ms = recipe.frame_shift_ms
    frame.dither = recipe.dither
    frame.window_type = recipe.window_type
    frame.preemph_coeff = recipe.preemph_coeff
    frame.remove_dc_offset = recipe.remove_dc_offset
    frame.snip_edges = recipe.snip_edges
    frame.round_to_power_of_two = recipe.round_to_power_of_two
    mel = opts.mel_opts
    mel.num_bins = recipe.num_mel_bins
    mel.low_freq = recipe.low_freq
    mel.high_freq = recipe.high_freq
    mel.is_librosa = recipe.mel_is_librosa
    mel.norm = recipe.mel_norm
    opts.use_energy = False
    opts.use_log_fbank = recipe.use_log_fbank
    opts.use_power = recipe.use_power
    return opts


class FeatureStream:
    """Incremental filterbank over one contiguous stretch of audio.

    Frames are kept from ``first_frame`` on; callers ``discard_before`` what no window needs any more,
    so a long speech region does not grow memory without bound.
    """

    def __init__(self, recipe: FeatureRecipe, sample_rate: int) -> None:
        self.recipe = recipe
        self.sample_rate = sample_rate
        self._opts = fbank_options(recipe, sample_rate)
        self.frame_shift = int(sample_rate * recipe.frame_shift_ms / 1000)
        self.frame_length = int(sample_rate * recipe.frame_length_ms / 1000)
        self.reset()

    def reset(self) -> None:
        self._fbank = knf.OnlineFbank(self._opts)
        self._frames = np.zeros((0, self.recipe.num_mel_bins), dtype=np.float32)
        self.first_frame = 0
        self._finished = False

    @property
    def num_frames(self) -> int:
        """Frames computed so far, counted from the start of the stream."""
        return self.first_frame + len(self._frames)

    def process(self, samples: np.ndarray) -> int:
        """Feed float samples in [-1, 1]; returns the total number of frames now available."""
        if len(samples):
            wave = np.asarray(samples, dtype=np.float32) * np.float32(self.recipe.input_scale)
            self._fbank.accept_waveform(float(self.sample_rate), wave)
        return self._collect()

    def finish(self) -> int:
        """Flush the tail (matters only without ``snip_edges``)."""
        if not self._finished:
            self._fbank.input_finished()
            self._finished = True
        return self._collect()

    def frames(self, start: int, stop: int) -> np.ndarray:
        if start < self.first_frame or stop > self.num_frames:
            raise IndexError(f"frames [{start}, {stop}) not held (have [{self.first_frame}, {self.num_frames}))")
        return self._frames[start - self.first_frame : stop - self.first_frame]

    def discard_before(self, frame: int) -> None:
        drop = min(max(0, frame - self.first_frame), len(self._frames))
        if drop:
            self._frames = self._frames[drop:]
            self.first_frame += drop

    def _collect(self) -> int:
        ready = self._fbank.num_frames_ready
        have = self.num_frames
        if ready > have:
            new = np.stack([self._fbank.get_frame(i) for i in range(have, ready)]).astype(np.float32)
            self._frames = np.concatenate([self._frames, new]) if len(self._frames) else new
            self._fbank.pop(ready - have)
        return self.num_frames

    def frame_start_sample(self, frame: int) -> int:
        """First sample of ``frame``, relative to the stream start."""
        if self.recipe.snip_edges:
            return frame * self.frame_shift
        return frame * self.frame_shift + self.frame_shift // 2 - self.frame_length // 2

    def samples_for_frames(self, num_frames: int) -> int:
        """Audio a window of ``num_frames`` frames spans."""
        return (num_frames - 1) * self.frame_shift + self.frame_length


def finish_window(recipe: FeatureRecipe, feats: np.ndarray, samples: np.ndarray | None) -> np.ndarray:
    """Per-window post-processing the model was trained with: gain normalisation, then CMN."""
    return finish_gained(recipe, feats, gain_db(recipe, samples))


def gain_db(recipe: FeatureRecipe, samples: np.ndarray | None) -> float:
    """The gain (dB) the recipe's normalisation gives this window's samples: up to
    ``gain_normalize_dbfs``, never down; 0 when none applies."""
    if recipe.gain_normalize_dbfs is None or samples is None or not len(samples):
        return 0.0
    change_db = recipe.gain_normalize_dbfs - dbfs(samples)
    return change_db if change_db > 0 and math.isfinite(change_db) else 0.0


def finish_gained(recipe: FeatureRecipe, feats: np.ndarray, change_db: float) -> np.ndarray:
    """``finish_window`` with the window's ``gain_db`` already known.

    Gain is applied in the feature domain (a power spectrum scales by g^2, a log one shifts by its
    log), so the shared stream never has to be recomputed per window.
    """
    out = feats
    if change_db > 0:
        # amplitude gain g = 10^(dB/20); a power spectrum scales by g^2, a magnitude one by g
        exponent_db = change_db / 10.0 if recipe.use_power else change_db / 20.0
        if recipe.use_log_fbank:
            out = out + np.float32(exponent_db * math.log(10.0))
        else:
            out = out * np.float32(10.0**exponent_db)
    if recipe.cmn:
        out = out - out.mean(axis=0, keepdims=True)
    return out.astype(np.float32, copy=False)


def dbfs(wave: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.square(wave, dtype=np.float64)))) if len(wave) else 0.0
    return 20.0 * math.log10(max(rms, 1e-10))


class SpeechBrainFbank:
    """SpeechBrain's ``Fbank`` (ECAPA's training features) for one window, in numpy.

    torch.stft with ``center=True``: a frame centred on every hop, the window's edges zero-padded, so
    a window's features depend on where it starts and are computed from its own samples rather than
    sliced from a stream. Periodic Hamming window, power spectrum, SpeechBrain's triangular filters
    (equally spaced on the HTK mel scale, each as wide on the right as on the left), 10 log10 with a
    floor 80 dB under the window's loudest bin. Equal to SpeechBrain 1.0's output to float rounding.
    """

    TOP_DB = 80.0
    AMIN = 1e-10

    def __init__(self, recipe: FeatureRecipe, sample_rate: int) -> None:
        self.recipe = recipe
        self.shift = int(sample_rate * recipe.frame_shift_ms / 1000)
        self.length = int(sample_rate * recipe.frame_length_ms / 1000)
        self.window = np.hamming(self.length + 1)[:-1].astype(np.float64)
        self.mel = speechbrain_mel_matrix(recipe.num_mel_bins, sample_rate, self.length, recipe.low_freq, recipe.high_freq)

    def compute(self, samples: np.ndarray) -> np.ndarray:
        """(frames, mels) for ``samples``: ``recipe.num_frames(len(samples))`` frames."""
        half = self.length // 2
        wave = np.pad(np.asarray(samples, dtype=np.float64) * self.recipe.input_scale, half)
        count = 1 + (len(wave) - self.length) // self.shift
        starts = np.arange(count)[:, None] * self.shift
        frames = wave[starts + np.arange(self.length)[None, :]] * self.window
        power = np.square(np.abs(np.fft.rfft(frames, n=self.length)))
        db = 10.0 * np.log10(np.maximum(power @ self.mel, self.AMIN))
        return np.maximum(db, db.max() - self.TOP_DB).astype(np.float32)


def speechbrain_mel_matrix(bins: int, sample_rate: int, n_fft: int, low_hz: float, high_hz: float) -> np.ndarray:
    """(n_fft // 2 + 1, bins) filters as SpeechBrain's ``Filterbank`` builds them (triangular, HTK mel)."""
    high_hz = high_hz if high_hz > 0 else sample_rate / 2
    to_mel = lambda hz: 2595.0 * np.log10(1.0 + hz / 700.0)  # noqa: E731
    edges = 700.0 * (10.0 ** (np.linspace(to_mel(low_hz), to_mel(high_hz), bins + 2) / 2595.0) - 1.0)
    centre, width = edges[1:-1], (edges[1:] - edges[:-1])[:-1]
    slope = (np.linspace(0, sample_rate // 2, n_fft // 2 + 1)[:, None] - centre[None, :]) / width[None, :]
    return np.maximum(0.0, np.minimum(slope + 1.0, 1.0 - slope))


class FeatureExtractor:
    """One window's features computed on their own: enrollment checks, references and tests."""

    def __init__(self, recipe: FeatureRecipe, sample_rate: int) -> None:
        self.recipe = recipe
        self.sample_rate = sample_rate

    def compute(self, samples: np.ndarray) -> np.ndarray:
        if self.recipe.per_window:
            return finish_window(self.recipe, SpeechBrainFbank(self.recipe, self.sample_rate).compute(samples), samples)
        stream = FeatureStream(self.recipe, self.sample_rate)
        stream.process(samples)
        n = stream.finish()
        return finish_window(self.recipe, stream.frames(0, n), samples)
