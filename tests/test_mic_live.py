"""The real microphone path: sounddevice -> ALSA ``pulse`` PCM -> PulseAudio null sink monitor.

A LibriSpeech clip is played into the null sink while MicSource records its monitor, so what the
"microphone" hears is known exactly. See tests/pulse.py for the set-up (and its shell equivalent).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import correlate

from speakerd.audio import SAMPLE_RATE, AudioChunk
from speakerd.devices import list_input_devices, rescan_devices
from speakerd.sources import MicSource, SourceSettings

import pulse

pytestmark = pytest.mark.live

CLIP = "test-other/1688/1688-142285-0003.flac"
PAD_S = 0.5
PLAY_TIMEOUT_S = 30.0
READ_TIMEOUT_S = 1.0
START_TIMEOUT_S = 5.0
MIN_CORRELATION = 0.9
CLOCK_TOLERANCE = 0.03
SETTLE_S = 2.0
"""ALSA's pulse PCM reports a bogus input latency (currentTime - inputBufferAdcTime of 0.2 to 0.65 s,
against 15 ms later) for up to ~1.2 s after a stream starts, which moves capture_time by as much;
callbacks themselves arrive at the audio rate from the start."""


@pytest.fixture(scope="module")
def sink() -> Iterator[pulse.PulseSink]:
    missing = pulse.missing_tools()
    if missing:
        pytest.skip(f"live mic test needs {', '.join(missing)} (apt-get install pulseaudio pulseaudio-utils)")
    s = pulse.ensure_pulse()
    try:
        rescan_devices()  # PortAudio lists ALSA's pulse PCM only if a server answered at initialisation
        yield s
    finally:
        s.close()
        rescan_devices()


@dataclass
class Recording:
    chunks: list[AudioChunk]
    read_at: list[float]  # time.time() when each chunk was returned
    stats: dict[str, int]


def record_while_playing(sink: pulse.PulseSink, wav: Path) -> Recording:
    rec = Recording([], [], {})

    def read(src: MicSource) -> None:
        if (c := src.read(timeout=READ_TIMEOUT_S)) is not None:
            rec.chunks.append(c)
            rec.read_at.append(time.time())

    src = MicSource(SourceSettings(device="pulse"))
    with src:
        # play only once audio flows: the first stream of a process can take ~1 s to start
        deadline = time.monotonic() + START_TIMEOUT_S
        while not rec.chunks:
            assert time.monotonic() < deadline, f"no audio from 'pulse' within {START_TIMEOUT_S} s"
            read(src)
        player = sink.play(wav)
        try:
            deadline = time.monotonic() + PLAY_TIMEOUT_S
            while player.poll() is None:
                assert time.monotonic() < deadline, "paplay did not finish in time"
                read(src)
            tail_until = time.monotonic() + PAD_S  # the pipeline's latency, then some silence
            while time.monotonic() < tail_until:
                read(src)
        finally:
            if player.poll() is None:
                player.kill()
            _, err = player.communicate(timeout=PLAY_TIMEOUT_S)
        assert player.returncode == 0, f"paplay failed: {err.decode(errors='replace')}"
        rec.stats = src.stats()
    return rec


def test_mic_hears_what_is_played(sink: pulse.PulseSink, librispeech: Path, tmp_path: Path) -> None:
    names = [d["name"] for d in list_input_devices()]
    assert "pulse" in names, f"ALSA 'pulse' PCM not listed by PortAudio (input devices: {names})"
    speech, sr = sf.read(librispeech / CLIP, dtype="float32")
    pad = np.zeros(int(PAD_S * sr), np.float32)
    played = np.concatenate([pad, speech, pad])
    wav = tmp_path / "played.wav"
    sf.write(wav, played, sr, subtype="PCM_16")

    rec = record_while_playing(sink, wav)

    chunks = rec.chunks
    assert all(a.end == b.start for a, b in zip(chunks, chunks[1:])), "chunks not contiguous"
    assert rec.stats["dropped_blocks"] == 0 and rec.stats["overflows"] == 0, rec.stats
    captured = np.concatenate([c.samples for c in chunks])
    assert len(captured) > len(played), (len(captured), len(played))

    # align by cross-correlation, then compare the overlap
    xc = correlate(captured, played, mode="valid", method="fft")
    lag = int(np.argmax(xc))
    seg = captured[lag : lag + len(played)]
    corr = float(np.dot(seg, played) / (np.linalg.norm(seg) * np.linalg.norm(played)))
    assert corr > MIN_CORRELATION, f"normalised correlation {corr:.3f} at lag {lag / SAMPLE_RATE:.3f} s"

    # The sample clock runs at wall-clock speed, both by arrival times and by capture_time (the
    # latter only once the plugin's latency figures have settled, see SETTLE_S).
    k = next(i for i, t in enumerate(rec.read_at) if t >= rec.read_at[0] + SETTLE_S)
    sample_span = (chunks[-1].end - chunks[k].end) / SAMPLE_RATE
    read_span = rec.read_at[-1] - rec.read_at[k]
    capture_span = chunks[-1].capture_time - chunks[k].capture_time
    sample_start_span = (chunks[-1].start - chunks[k].start) / SAMPLE_RATE
    assert sample_span > 3.0, sample_span
    assert abs(read_span - sample_span) / sample_span < CLOCK_TOLERANCE, (read_span, sample_span)
    drift = abs(capture_span - sample_start_span) / sample_start_span
    assert drift < CLOCK_TOLERANCE, (capture_span, sample_start_span)


def test_bench_measures_the_pipeline_on_the_microphone(sink: pulse.PulseSink, librispeech: Path, default_model: Path, tmp_path: Path) -> None:
    """`speakerd bench --mic`: the whole pipeline on the real capture path (PortAudio's callback
    thread, the device's rate resampled, 20 ms blocks), its CPU over wall time, and what it heard."""
    from speakerd.bench import enrolled_index, run_microphone, speech
    from speakerd.bundle import load_bundle
    from speakerd.embedding import backend_for
    from speakerd.settings import Settings

    settings, bundle = Settings(), load_bundle(default_model)
    backend = backend_for(bundle, settings.embedding, settings.windows)
    try:
        index = enrolled_index(librispeech, settings, bundle, backend, tmp_path)
        wav = tmp_path / "speech.wav"
        sf.write(str(wav), speech(librispeech, 8.0), SAMPLE_RATE, subtype="PCM_16")
        player = sink.play(wav)
        try:
            got = run_microphone("pulse", 10.0, settings, bundle, backend, index)
        finally:
            player.wait(timeout=PLAY_TIMEOUT_S)
    finally:
        backend.close()
    assert got["device_rate"] >= SAMPLE_RATE and got["block_ms"] == 20
    assert got["wall_s"] >= 9.5 and got["dropped_blocks"] == 0 and got["dropped_windows"] == 0
    # 8 s of speech: about 13 windows of 1.5 s every 0.5 s, fewer where it pauses
    assert 6 <= got["windows"] <= 16, got
    # the whole process over wall time; the capture path's own threads are in it, so the per-thread
    # shares add up to the whole
    threads = got["cpu_percent_by_thread"]
    assert got["live_cpu_percent"] > 0 and threads["speakerd-embed"] > 0 and threads["MainThread"] > 0
    assert sum(threads.values()) == pytest.approx(got["live_cpu_percent"], abs=0.1 * got["live_cpu_percent"] + 0.5)
