"""StreamingResampler: equal to resample_poly, chunk-size invariant, clock-aligned, cheap."""

from __future__ import annotations

import time
from math import gcd
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from speakerd.resample import StreamingResampler

CLIP = "test-other/1688/1688-142285-0003.flac"
TOLERANCE = 1e-6
"""Float32 output against resample_poly in float64; measured differences are about 2e-8."""


def speech_at(librispeech: Path, rate: int) -> np.ndarray:
    """The 16 kHz clip brought to ``rate`` (by resample_poly, the reference), as float32."""
    x, sr = sf.read(librispeech / CLIP, dtype="float64")
    assert sr == 16_000
    g = gcd(rate, sr)
    return resample_poly(x, rate // g, sr // g).astype(np.float32)


def reference(x: np.ndarray, in_rate: int, out_rate: int = 16_000) -> np.ndarray:
    g = gcd(in_rate, out_rate)
    return resample_poly(x.astype(np.float64), out_rate // g, in_rate // g)


def run_chunked(r: StreamingResampler, x: np.ndarray, sizes: list[int]) -> np.ndarray:
    out, i, k = [], 0, 0
    while i < len(x):
        n = sizes[k % len(sizes)]
        out.append(r.process(x[i : i + n]))
        i, k = i + n, k + 1
    out.append(r.flush())
    return np.concatenate(out)


@pytest.mark.parametrize("rate", [44_100, 48_000, 8_000])
def test_equals_resample_poly_on_speech(librispeech: Path, rate: int) -> None:
    x = speech_at(librispeech, rate)
    r = StreamingResampler(rate)
    y = np.concatenate([r.process(x), r.flush()])
    ref = reference(x, rate)
    assert y.dtype == np.float32
    assert len(y) == len(ref) == r.output_length(len(x))
    # the whole signal, edges included: both treat what lies outside the signal as zeros
    assert np.max(np.abs(y - ref)) < TOLERANCE


@pytest.mark.parametrize("rate", [44_100, 48_000, 8_000])
def test_chunk_size_invariant(librispeech: Path, rate: int) -> None:
    x = speech_at(librispeech, rate)[: rate * 2]
    r = StreamingResampler(rate)
    whole = run_chunked(r, x, [len(x)])
    rng = np.random.default_rng(7)
    for sizes in ([1], [37], [160], [4000], list(rng.integers(1, 5000, size=50))):
        if sizes == [1]:
            part = run_chunked(r, x[: rate // 4], sizes)  # one-sample chunks on a quarter second
            ref = run_chunked(r, x[: rate // 4], [rate])
        else:
            part, ref = run_chunked(r, x, sizes), whole
        assert len(part) == len(ref)
        assert np.max(np.abs(part - ref)) <= TOLERANCE, sizes


@pytest.mark.parametrize("rate", [48_000, 32_000, 96_000])
def test_whole_number_ratios_take_a_strided_view_with_bit_identical_sums(rate: int) -> None:
    """The decimation path (a microphone at 48 or 32 kHz) gives exactly the general path's bits."""
    r = StreamingResampler(rate)
    assert r.up == 1
    rng = np.random.default_rng(3)
    for n in (1, 7, 320, 1000):
        length = (n - 1) * r.down + r.taps
        window = rng.standard_normal(length + 5)[5:]  # a view into a larger buffer, as the stream's is
        newest = np.arange(n) * r.down + r.taps - 1
        general = r._gather(window, newest, np.zeros(n, dtype=np.int64))
        assert np.array_equal(r._decimate(window, n), general)


def test_output_clock_lines_up_with_input() -> None:
    """A click at input time t comes out centred at output sample t * out_rate: no group delay."""
    for rate in (44_100, 48_000, 8_000, 22_050):
        x = np.zeros(rate, dtype=np.float32)
        t = 0.4
        x[int(round(t * rate))] = 1.0
        r = StreamingResampler(rate)
        y = np.concatenate([r.process(x[:1000]), r.process(x[1000:]), r.flush()])
        peak = int(np.argmax(np.abs(y)))
        assert abs(peak - t * 16_000) <= 0.5, rate


def test_delay_is_bounded_and_tail_is_flushed() -> None:
    """Outputs are held back by at most the filter look-ahead, and flush returns exactly the rest."""
    r = StreamingResampler(48_000)
    x = np.ones(48_000, dtype=np.float32)
    y = r.process(x)
    missing = r.output_length(len(x)) - len(y)
    # half_len taps at the upsampled rate are half_len / down outputs (10 at 48 kHz -> 16 kHz)
    assert 0 < missing <= -(-r.half_len // r.down) + 1
    assert len(r.flush()) == missing


def test_identity_passes_through() -> None:
    r = StreamingResampler(16_000)
    x = np.linspace(-1, 1, 999, dtype=np.float32)
    assert np.array_equal(r.process(x), x)
    assert len(r.flush()) == 0


def test_reset_starts_over() -> None:
    x = np.random.default_rng(0).standard_normal(44_100).astype(np.float32)
    r = StreamingResampler(44_100)
    first = np.concatenate([r.process(x), r.flush()])
    r.process(x[:1234])
    r.reset()
    again = np.concatenate([r.process(x), r.flush()])
    assert np.array_equal(first, again)


def test_bad_rate_rejected() -> None:
    with pytest.raises(ValueError, match="positive"):
        StreamingResampler(0)


def test_cost_per_second_of_audio() -> None:
    """44.1 kHz -> 16 kHz in 100 ms blocks must cost well under 5 % of real time on one core."""
    rate = 44_100
    x = np.random.default_rng(1).standard_normal(rate * 10).astype(np.float32)
    r = StreamingResampler(rate)
    t0 = time.perf_counter()
    for i in range(0, len(x), rate // 10):
        r.process(x[i : i + rate // 10])
    r.flush()
    per_second = (time.perf_counter() - t0) / 10
    assert per_second < 0.05, f"{per_second * 1000:.1f} ms per second of audio"
