"""File and microphone sources (the microphone through an injected fake stream), device lookup."""

from __future__ import annotations

import time
from math import gcd
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fake_audio import FakeInputStream
import soundfile as sf
from scipy.signal import resample_poly

from speakerd.audio import SAMPLE_RATE, AudioChunk
from speakerd.devices import format_devices, list_input_devices, resolve_device
from speakerd.errors import AudioError, ConfigError
from speakerd.sources import FileSource, MicSource, Source, SourceSettings, open_source

CLIP = "test-other/1688/1688-142285-0003.flac"
OTHER_CLIP = "test-other/3080/3080-5032-0000.flac"
READ_TIMEOUT = 5.0


@pytest.fixture(scope="module")
def speech(librispeech: Path) -> np.ndarray:
    x, sr = sf.read(librispeech / CLIP, dtype="float32")
    assert sr == SAMPLE_RATE and x.ndim == 1
    return x


def read_all(src: Source, limit_s: float = 60.0) -> list[AudioChunk]:
    """Every chunk until the source is finished, under an overall time limit."""
    chunks: list[AudioChunk] = []
    deadline = time.monotonic() + limit_s
    while not src.finished:
        assert time.monotonic() < deadline, "source did not finish in time"
        chunk = src.read(timeout=READ_TIMEOUT)
        if chunk is not None:
            chunks.append(chunk)
    return chunks


def joined(chunks: list[AudioChunk]) -> np.ndarray:
    """Concatenated samples, after checking the chunks are contiguous on the sample clock from 0."""
    expected = 0
    for c in chunks:
        assert c.start == expected and c.samples.dtype == np.float32 and len(c.samples) > 0
        expected = c.end
    return np.concatenate([c.samples for c in chunks]) if chunks else np.zeros(0, np.float32)


def best_correlation(a: np.ndarray, b: np.ndarray, max_lag: int) -> tuple[float, int]:
    """Highest normalised correlation of a against b over lags in [-max_lag, max_lag]."""
    n = min(len(a), len(b)) - 2 * max_lag
    ref = b[max_lag : max_lag + n]
    best, best_lag = -1.0, 0
    for lag in range(-max_lag, max_lag + 1):
        seg = a[max_lag + lag : max_lag + lag + n]
        c = float(np.dot(seg, ref) / (np.linalg.norm(seg) * np.linalg.norm(ref) + 1e-12))
        if c > best:
            best, best_lag = c, lag
    return best, best_lag


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"block_ms": 0}, "audio.block_ms"),
        ({"queue_blocks": 0}, "audio.queue_blocks"),
        ({"device": ""}, "audio.device"),
        ({"device": -1}, "audio.device"),
        ({"device_rate": 100}, "audio.device_rate"),
        ({"channels": 0}, "audio.channels"),
        ({"mic_block_ms": 0}, "audio.mic_block_ms"),
    ],
)
def test_settings_errors_name_the_key(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        SourceSettings(**kwargs)
    assert e.value.key == key and key in str(e.value)


# ---------------------------------------------------------------- files


@pytest.mark.parametrize(
    ("suffix", "fmt", "subtype", "min_corr"),
    [
        ("wav", "WAV", "PCM_16", 0.9999),
        ("flac", "FLAC", "PCM_16", 0.9999),
        ("ogg", "OGG", "VORBIS", 0.95),
        ("mp3", "MP3", "MPEG_LAYER_III", 0.95),
    ],
)
def test_file_formats(tmp_path: Path, speech: np.ndarray, suffix: str, fmt: str, subtype: str, min_corr: float) -> None:
    if fmt not in sf.available_formats():
        pytest.skip(f"libsndfile {sf.__libsndfile_version__} cannot write {fmt}")
    path = tmp_path / f"clip.{suffix}"
    sf.write(path, speech, SAMPLE_RATE, format=fmt, subtype=subtype)
    with FileSource(path, SourceSettings(block_ms=100), realtime=False) as src:
        out = joined(read_all(src))
        stats = src.stats()
    assert len(out) == len(speech)
    corr, lag = best_correlation(out, speech, 200)
    assert lag == 0 and corr > min_corr, (corr, lag)
    assert stats["samples"] == len(speech)
    assert stats["blocks"] == -(-len(speech) // 1600)
    if subtype == "PCM_16":
        assert np.max(np.abs(out - speech)) <= 1 / 32768


def test_stereo_is_mixed_down(tmp_path: Path, librispeech: Path, speech: np.ndarray) -> None:
    other, _ = sf.read(librispeech / OTHER_CLIP, dtype="float32")
    n = min(len(speech), len(other))
    stereo = np.stack([speech[:n], other[:n]], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, SAMPLE_RATE, subtype="FLOAT")
    with FileSource(path, SourceSettings(block_ms=50), realtime=False) as src:
        out = joined(read_all(src))
    assert np.max(np.abs(out - (speech[:n] + other[:n]) / 2)) < 1e-6


def test_48k_file_is_resampled(tmp_path: Path, speech: np.ndarray) -> None:
    x48 = resample_poly(speech.astype(np.float64), 3, 1)
    path = tmp_path / "clip48k.wav"
    sf.write(path, x48, 48_000, subtype="FLOAT")
    with FileSource(path, SourceSettings(block_ms=30), realtime=False) as src:
        assert src.file_rate == 48_000
        out = joined(read_all(src))
    assert len(out) == len(speech)  # ceil(3 n / 3)
    corr, lag = best_correlation(out, speech, 50)
    assert lag == 0 and corr > 0.999, (corr, lag)


def test_44k1_stereo_file(tmp_path: Path, speech: np.ndarray) -> None:
    g = gcd(44_100, SAMPLE_RATE)
    x = resample_poly(speech.astype(np.float64), 44_100 // g, SAMPLE_RATE // g)
    path = tmp_path / "clip44k.flac"
    sf.write(path, np.stack([x, x], axis=1), 44_100, subtype="PCM_24")
    with FileSource(path, SourceSettings(), realtime=False) as src:
        out = joined(read_all(src))
    assert len(out) == -(-len(x) * 160 // 441)
    corr, lag = best_correlation(out, speech, 50)
    assert lag == 0 and corr > 0.999, (corr, lag)


def test_capture_time_follows_the_sample_clock(tmp_path: Path, speech: np.ndarray) -> None:
    path = tmp_path / "clip.wav"
    sf.write(path, speech[:16_000], SAMPLE_RATE)
    src = FileSource(path, SourceSettings(block_ms=100), realtime=False, clock=lambda: 1_000.0)
    with src:
        chunks = read_all(src)
    assert [c.capture_time for c in chunks] == [1_000.0 + c.start / SAMPLE_RATE for c in chunks]
    assert [len(c.samples) for c in chunks] == [1_600] * 10


def test_realtime_pacing(tmp_path: Path, speech: np.ndarray) -> None:
    """One second of audio arrives over about one second, each chunk no earlier than its last sample."""
    path = tmp_path / "clip.wav"
    sf.write(path, speech[:SAMPLE_RATE], SAMPLE_RATE)
    t0 = time.monotonic()
    with FileSource(path, SourceSettings(block_ms=100), realtime=True) as src:
        late = []
        for chunk in read_all(src, limit_s=5.0):
            late.append(time.monotonic() - t0 - chunk.end / SAMPLE_RATE)
    elapsed = time.monotonic() - t0
    assert 0.9 <= elapsed < 1.5, elapsed
    assert min(late) >= -0.01, min(late)


def test_realtime_read_honours_timeout(tmp_path: Path, speech: np.ndarray) -> None:
    path = tmp_path / "clip.wav"
    sf.write(path, speech[:SAMPLE_RATE], SAMPLE_RATE)
    with FileSource(path, SourceSettings(block_ms=500), realtime=True) as src:
        t0 = time.monotonic()
        assert src.read(timeout=0.05) is None  # the first block is due only after 0.5 s
        assert time.monotonic() - t0 < 0.3
        chunk = src.read(timeout=1.0)
        assert chunk is not None and chunk.start == 0 and len(chunk.samples) == 8_000


def test_fast_mode_is_fast(tmp_path: Path, speech: np.ndarray) -> None:
    path = tmp_path / "clip.flac"
    sf.write(path, speech, SAMPLE_RATE)
    t0 = time.monotonic()
    with FileSource(path, SourceSettings(), realtime=False) as src:
        read_all(src)
    assert time.monotonic() - t0 < 0.5 * len(speech) / SAMPLE_RATE


@pytest.mark.parametrize(
    ("content", "soundfile_says"),
    [
        (b"this is a text file, not audio\n" * 64, "Format not recognised"),
        (b"RIFF\x00\x00\x00\x00WAVEjunk" * 64, "No 'data' chunk"),
    ],
)
def test_garbage_file_names_it(tmp_path: Path, content: bytes, soundfile_says: str) -> None:
    path = tmp_path / "not-audio.wav"
    path.write_bytes(content)
    with pytest.raises(AudioError) as e:
        FileSource(path, SourceSettings(), realtime=False)
    assert f"cannot read audio file {path}" in str(e.value) and soundfile_says in str(e.value)


def test_missing_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.flac"
    with pytest.raises(AudioError, match="nowhere.flac"):
        FileSource(path, SourceSettings(), realtime=False)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, np.float32), SAMPLE_RATE)
    with FileSource(path, SourceSettings(), realtime=True) as src:
        assert src.read(timeout=1.0) is None
        assert src.finished
        assert src.stats()["samples"] == 0


def test_stop_early_finishes(tmp_path: Path, speech: np.ndarray) -> None:
    path = tmp_path / "clip.wav"
    sf.write(path, speech, SAMPLE_RATE)
    src = FileSource(path, SourceSettings(), realtime=False)
    src.start()
    assert src.read(timeout=1.0) is not None
    src.stop()
    assert src.finished and src.read(timeout=0.1) is None


# ---------------------------------------------------------------- microphone with a fake stream


class FakeStream(FakeInputStream):
    """Also keeps every stream opened, so tests can reach the one MicSource made."""

    instances: list[FakeStream] = []

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        FakeStream.instances.append(self)


DEVICES = [
    {"index": 0, "name": "HDA Intel PCH: ALC3246 Analog", "max_input_channels": 2, "default_samplerate": 44100.0},
    {"index": 1, "name": "HDMI output", "max_input_channels": 0, "default_samplerate": 48000.0},
    {"index": 2, "name": "USB Audio Headset", "max_input_channels": 1, "default_samplerate": 48000.0},
]


def fake_devices() -> list[dict[str, Any]]:
    return list_input_devices(DEVICES, default_index=0)


def mic(settings: SourceSettings, clock: Any = time.time) -> tuple[MicSource, FakeStream]:
    src = MicSource(settings, clock=clock, stream_factory=FakeStream, list_devices=fake_devices)
    src.start()
    return src, FakeStream.instances[-1]


def drain(src: MicSource) -> list[AudioChunk]:
    chunks = []
    while (chunk := src.read(timeout=0.05)) is not None:
        chunks.append(chunk)
    return chunks


def test_mic_opens_device_and_resamples(speech: np.ndarray) -> None:
    x48 = resample_poly(speech[: SAMPLE_RATE * 2].astype(np.float64), 3, 1).astype(np.float32)
    src, stream = mic(SourceSettings(device="usb", channels=2))
    assert stream.kwargs == {"device": 2, "channels": 2, "samplerate": 48_000, "blocksize": 960,
                             "dtype": "float32", "callback": src._callback}
    for i in range(0, len(x48), 4_800):
        block = x48[i : i + 4_800]
        stream.feed(np.stack([block, block], axis=1))
    out = joined(drain(src))
    src.stop()
    assert stream.closed
    ref = resample_poly(x48.astype(np.float64), 1, 3)
    assert 0 < len(ref) - len(out) <= 11  # only the resampler's look-ahead is still held
    assert np.max(np.abs(out - ref[: len(out)])) < 1e-6
    assert src.stats()["blocks"] == 20 and src.stats()["samples"] == len(out)
    assert not src.finished


def test_mic_capture_time_from_adc_time() -> None:
    src, stream = mic(SourceSettings(device_rate=16_000), clock=lambda: 500.0)
    stream.feed(np.zeros(1_600), adc=10.0, current=10.25)  # captured 0.25 s before the callback ran
    stream.feed(np.zeros(1_600))  # no time info: the block ended now
    first, second = drain(src)
    src.stop()
    assert first.capture_time == pytest.approx(499.75)
    assert second.start == 1_600 and second.capture_time == pytest.approx(500.0 - 0.1)


def test_mic_counts_overflows() -> None:
    src, stream = mic(SourceSettings(device_rate=16_000))
    stream.feed(np.zeros(160), overflow=True)
    stream.feed(np.zeros(160))
    stream.feed(np.zeros(160), overflow=True)
    assert len(drain(src)) == 3
    src.stop()
    assert src.stats()["overflows"] == 2


def test_mic_full_queue_drops_and_fills_with_zeros() -> None:
    """Blocks dropped while the reader lags become zeros in their place, so the clock stays true."""
    src, stream = mic(SourceSettings(device_rate=16_000, queue_blocks=2))
    blocks = [np.full(1_000, (k + 1) / 10, dtype=np.float32) for k in range(6)]
    for b in blocks[:5]:  # 2 queued, 3 dropped
        stream.feed(b)
    assert src.stats()["dropped_blocks"] == 3
    first = drain(src)
    stream.feed(blocks[5])
    out = joined(first + drain(src))
    src.stop()
    assert len(out) == 6_000
    assert np.all(out[:1_000] == 0.1) and np.all(out[1_000:2_000] == 0.2)
    assert np.all(out[2_000:5_000] == 0.0)
    assert np.all(out[5_000:] == np.float32(0.6))
    s = src.stats()
    assert s["dropped_samples"] == 3_000 and s["blocks"] == 3


def test_mic_drop_keeps_clock_when_resampling() -> None:
    src, stream = mic(SourceSettings(device_rate=48_000, queue_blocks=1))
    tone = np.sin(2 * np.pi * 440 * np.arange(4_800 * 4) / 48_000).astype(np.float32)
    stream.feed(tone[:4_800])
    stream.feed(tone[4_800:9_600])  # dropped
    first = drain(src)
    stream.feed(tone[9_600:14_400])
    out = joined(first + drain(src))
    src.stop()
    resampled = 3 * 4_800 * SAMPLE_RATE // 48_000
    assert src.stats()["dropped_samples"] == 4_800
    assert 0 <= resampled - len(out) <= 11  # 0.3 s of device audio -> 4800 samples, less the look-ahead
    assert np.max(np.abs(out[1_700:3_100])) < 1e-3  # the dropped 0.1 s is silent (away from its edges)


def test_mic_read_times_out() -> None:
    src, _ = mic(SourceSettings(device_rate=16_000))
    t0 = time.monotonic()
    assert src.read(timeout=0.1) is None
    assert 0.09 <= time.monotonic() - t0 < 1.0
    src.stop()


def test_missing_device_is_named() -> None:
    with pytest.raises(AudioError) as e:
        MicSource(SourceSettings(device="Blue Yeti"), stream_factory=FakeStream, list_devices=fake_devices)
    message = str(e.value)
    assert "'Blue Yeti'" in message and "USB Audio Headset" in message and "HDMI" not in message


def test_missing_device_index_is_named() -> None:
    with pytest.raises(AudioError, match="input device 1 not found"):
        MicSource(SourceSettings(device=1), stream_factory=FakeStream, list_devices=fake_devices)


def test_device_that_fails_to_open_is_named() -> None:
    def refuse(**_: Any) -> Any:
        raise OSError("Error opening InputStream: Device unavailable [PaErrorCode -9985]")

    src = MicSource(SourceSettings(device=0), stream_factory=refuse, list_devices=fake_devices)
    with pytest.raises(AudioError, match="HDA Intel PCH.*Device unavailable"):
        src.start()


def test_no_default_input() -> None:
    with pytest.raises(AudioError, match="no default input device"):
        MicSource(SourceSettings(), stream_factory=FakeStream, list_devices=lambda: [])


# ---------------------------------------------------------------- devices and specs


def test_device_listing_and_lookup() -> None:
    devs = fake_devices()
    assert [d["index"] for d in devs] == [0, 2]
    assert devs[0]["is_default"] and not devs[1]["is_default"]
    assert resolve_device("usb", devs)["index"] == 2
    assert resolve_device("2", devs)["name"] == "USB Audio Headset"
    assert resolve_device(0, devs)["default_samplerate"] == 44_100.0
    with pytest.raises(AudioError, match="ambiguous"):
        resolve_device("a", devs)
    text = format_devices(devs)
    assert text.splitlines()[0].startswith("*") and "USB Audio Headset  (1 ch, 48000 Hz)" in text


def test_open_source_specs(tmp_path: Path, speech: np.ndarray) -> None:
    path = tmp_path / "clip.wav"
    sf.write(path, speech[:1_600], SAMPLE_RATE)
    for spec in (f"file:{path}", str(path)):
        src = open_source(spec, SourceSettings(), realtime=False)
        assert isinstance(src, FileSource) and src.path == path and isinstance(src, Source)
        src.stop()
    for bad in ("", "speaker", "mic:", "file:", str(tmp_path / "nowhere.wav")):
        with pytest.raises(ConfigError) as e:
            open_source(bad, SourceSettings(), realtime=False)
        assert e.value.key == "source"
    with pytest.raises(AudioError, match="nowhere.wav"):
        open_source(f"file:{tmp_path / 'nowhere.wav'}", SourceSettings(), realtime=False)
    with pytest.raises(AudioError, match="'no-such-device-xyz' not found"):
        open_source("mic:no-such-device-xyz", SourceSettings(), realtime=False)
    with pytest.raises(AudioError, match="input device 999 not found"):
        open_source("mic:999", SourceSettings(), realtime=False)
