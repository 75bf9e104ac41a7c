"""Filterbank features with kaldi-native-fbank, configured only from a bundle's recipe.

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


class FeatureExtractor:
    """One window's features computed on their own: enrollment checks, references and tests."""

    def __init__(self, recipe: FeatureRecipe, sample_rate: int) -> None:
        self.recipe = recipe
        self.sample_rate = sample_rate

    def compute(self, samples: np.ndarray) -> np.ndarray:
        stream = FeatureStream(self.recipe, self.sample_rate)
        stream.process(samples)
        n = stream.finish()
        return finish_window(self.recipe, stream.frames(0, n), samples)
