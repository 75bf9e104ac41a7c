"""Audio sources: a file or the microphone, delivered as 16 kHz mono ``AudioChunk``s.

Both sources place audio on a sample clock counted from the session start, so every later stage
derives time from sample counts. The microphone callback does one non-blocking enqueue and only
counts what it drops; the reader fills a drop with zeros so the sample clock keeps matching real
elapsed audio.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

import numpy as np
import soundfile as sf

from . import devices
from .audio import SAMPLE_RATE, AudioChunk
from .errors import AudioError, ConfigError, check
from .resample import StreamingResampler

log = logging.getLogger(__name__)

MAX_BLOCK_MS = 10_000
MAX_CHANNELS = 64
MIN_DEVICE_RATE = 4_000
MAX_DEVICE_RATE = 768_000


@dataclass(frozen=True)
class SourceSettings:
    """How audio is read.

    ``block_ms``: file block length (also the unit a realtime file is paced in).
    ``queue_blocks``: how many microphone blocks may wait for the reader before new ones are dropped.
    ``device``: input device index or name (substring); None is the system default input.
    ``device_rate``: rate to open the device at; None is the device's default rate.
    ``channels``: channels to open the device with; they are averaged to mono.
    ``mic_block_ms``: microphone callback block. Fixed rather than PortAudio's variable default,
    which on ALSA's ``pulse`` PCM delays the first callback by 2 s; the queue then holds
    ``queue_blocks * mic_block_ms`` of audio (1 s by default) before blocks are dropped.
    """

    block_ms: int = 100
    queue_blocks: int = 50
    device: str | int | None = None
    device_rate: int | None = None
    channels: int = 1
    mic_block_ms: int = 20

    def __post_init__(self) -> None:
        check(isinstance(self.block_ms, int) and 1 <= self.block_ms <= MAX_BLOCK_MS,
              "audio.block_ms", self.block_ms, f"must be an integer in [1, {MAX_BLOCK_MS}]")
        check(isinstance(self.queue_blocks, int) and self.queue_blocks >= 1,
              "audio.queue_blocks", self.queue_blocks, "must be an integer >= 1")
        check(self.device is None or (isinstance(self.device, int) and self.device >= 0)
              or (isinstance(self.device, str) and bool(self.device.strip())),
              "audio.device", self.device, "must be a device index >= 0, a non-empty name, or unset")
        check(self.device_rate is None
              or (isinstance(self.device_rate, int) and MIN_DEVICE_RATE <= self.device_rate <= MAX_DEVICE_RATE),
              "audio.device_rate", self.device_rate, f"must be unset or in [{MIN_DEVICE_RATE}, {MAX_DEVICE_RATE}] Hz")
        check(isinstance(self.channels, int) and 1 <= self.channels <= MAX_CHANNELS,
              "audio.channels", self.channels, f"must be an integer in [1, {MAX_CHANNELS}]")
        check(isinstance(self.mic_block_ms, int) and 1 <= self.mic_block_ms <= MAX_BLOCK_MS,
              "audio.mic_block_ms", self.mic_block_ms, f"must be an integer in [1, {MAX_BLOCK_MS}]")


@runtime_checkable
class Source(Protocol):
    """Where audio comes from. ``read`` returns None when no audio arrived within ``timeout``."""

    def start(self) -> None: ...

    def read(self, timeout: float) -> AudioChunk | None: ...

    @property
    def finished(self) -> bool: ...

    def stop(self) -> None: ...

    def stats(self) -> dict[str, int]: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...


class _ContextSource:
    """start() on enter, stop() on exit, for both sources."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def mix_down(block: np.ndarray) -> np.ndarray:
    """Mean over channels: (frames, channels) or (frames,) -> (frames,) float32."""
    block = np.asarray(block, dtype=np.float32)
    if block.ndim == 1:
        return block
    if block.shape[1] == 1:
        return block[:, 0]
    return block.mean(axis=1, dtype=np.float32)


class FileSource(_ContextSource):
    """Audio from anything libsndfile reads, in blocks, optionally at real speed.

    The file is opened (and so validated) at construction. Blocks of ``block_ms`` are read at the
    file's rate, mixed down and resampled. With ``realtime`` a chunk is delivered no earlier than the
    moment its last sample would have been captured by a microphone started with the source.
    """

    def __init__(self, path: str | os.PathLike[str], settings: SourceSettings | None = None, *,
                 realtime: bool, monotonic: Callable[[], float] = time.monotonic,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.settings = settings or SourceSettings()
        self.realtime = realtime
        self._monotonic = monotonic
        self._clock = clock
        try:
            self._file: sf.SoundFile | None = sf.SoundFile(str(self.path))
        except (sf.LibsndfileError, RuntimeError, OSError, TypeError) as e:
            raise AudioError(f"cannot read audio file {self.path}: {e}") from e
        self.file_rate = int(self._file.samplerate)
        self._block_frames = max(1, self.file_rate * self.settings.block_ms // 1000)
        self._resampler = StreamingResampler(self.file_rate, SAMPLE_RATE)
        self._pending: AudioChunk | None = None
        self._started = False
        self._eof = False
        self._finished = False
        self._emitted = 0
        self._blocks = 0
        self._wall0 = 0.0
        self._mono0 = 0.0
        log.debug("file %s: %d Hz, %d ch, format %s", self.path, self.file_rate, self._file.channels,
                  self._file.format)

    @property
    def finished(self) -> bool:
        return self._finished

    def start(self) -> None:
        if self._started:
            return
        if self._file is None:
            raise RuntimeError(f"file source {self.path} was stopped; it cannot be restarted")
        self._started = True
        self._wall0 = self._clock()
        self._mono0 = self._monotonic()

    def stop(self) -> None:
        """Close the file; reads after this return None and the source counts as finished."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if not self._eof:  # stopped early: nothing more will come
            self._eof = True
            self._finished = True
            self._pending = None

    def stats(self) -> dict[str, int]:
        return {"blocks": self._blocks, "samples": self._emitted, "overflows": 0, "dropped_blocks": 0,
                "dropped_samples": 0}

    def read(self, timeout: float) -> AudioChunk | None:
        """The next chunk; None at the end or, when realtime, if it is not due within ``timeout``."""
        if not self._started:
            raise RuntimeError("FileSource.read() before start()")
        if self._finished:
            return None
        if self._pending is None:
            self._pending = self._next_chunk()
            if self._pending is None:
                self._finished = True
                return None
        if self.realtime:
            due = self._mono0 + self._pending.end / SAMPLE_RATE
            wait = due - self._monotonic()
            if wait > timeout:
                time.sleep(max(0.0, timeout))
                return None
            if wait > 0:
                time.sleep(wait)
        chunk, self._pending = self._pending, None
        return chunk

    def _next_chunk(self) -> AudioChunk | None:
        """Read and resample until some output exists; None once the file and the resampler are drained."""
        while not self._eof:
            samples = self._resampler.process(mix_down(self._read_block()))
            if len(samples):
                return self._chunk(samples)
        if self._file is None:
            return None
        tail = self._resampler.flush()
        self._file.close()
        self._file = None
        return self._chunk(tail) if len(tail) else None

    def _read_block(self) -> np.ndarray:
        assert self._file is not None, "read after stop"
        try:
            block = self._file.read(self._block_frames, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as e:
            raise AudioError(f"cannot decode audio file {self.path}: {e}") from e
        if len(block) < self._block_frames:
            self._eof = True
        if len(block):
            self._blocks += 1
        return block

    def _chunk(self, samples: np.ndarray) -> AudioChunk:
        start = self._emitted
        self._emitted += len(samples)
        return AudioChunk(samples=samples, start=start, capture_time=self._wall0 + start / SAMPLE_RATE)


StreamFactory = Callable[..., Any]
DeviceQuery = Callable[[], list[dict[str, Any]]]


class MicSource(_ContextSource):
    """The microphone through a sounddevice InputStream.

    The callback runs on PortAudio's thread and does one ``put_nowait`` of
    ``(block copy, capture wall time, status flags)``; when the queue is full the block is dropped
    and only counted, together with the number of blocks queued before it, so the reader can put
    zeros of the same length in the right place and the sample clock stays equal to elapsed audio.

    ``stream_factory`` defaults to ``sounddevice.InputStream`` and ``list_devices`` to
    ``devices.list_input_devices``; tests inject fakes to drive the callback without hardware.
    """

    def __init__(self, settings: SourceSettings | None = None, *, clock: Callable[[], float] = time.time,
                 stream_factory: StreamFactory | None = None, list_devices: DeviceQuery | None = None) -> None:
        self.settings = settings or SourceSettings()
        self._clock = clock
        self._stream_factory = stream_factory
        self.device_index, self.device_name, default_rate = self._resolve(list_devices)
        self.rate = int(self.settings.device_rate or default_rate)
        self.blocksize = max(1, self.rate * self.settings.mic_block_ms // 1000)
        self._resampler = StreamingResampler(self.rate, SAMPLE_RATE)
        # (block, capture wall time, sounddevice.CallbackFlags)
        self._queue: queue.Queue[tuple[np.ndarray, float, Any]] = queue.Queue(maxsize=self.settings.queue_blocks)
        self._stream: Any = None
        # written by the callback thread only
        self._puts = 0
        self._overflows = 0
        self._dropped_blocks = 0
        self._drops: deque[tuple[int, int]] = deque()  # (puts before the drop, frames dropped)
        # written by the reader only
        self._gets = 0
        self._blocks = 0
        self._in_samples = 0  # device-rate samples fed to the resampler, zeros included
        self._emitted = 0
        self._dropped_samples = 0

    def _resolve(self, list_devices: DeviceQuery | None) -> tuple[int | None, str, float]:
        """Device index, name and default rate; AudioError naming the device when it is missing."""
        wanted = self.settings.device
        if wanted is None and self.settings.device_rate is not None and list_devices is None:
            return None, "default input", float(self.settings.device_rate)  # nothing to look up
        listed = (list_devices or devices.list_input_devices)()
        dev = devices.default_input_device(listed) if wanted is None else devices.resolve_device(wanted, listed)
        return int(dev["index"]), str(dev["name"]), float(dev["default_samplerate"])

    @property
    def finished(self) -> bool:
        return False

    def start(self) -> None:
        if self._stream is not None:
            return
        factory = self._stream_factory or devices.sounddevice().InputStream
        try:
            stream = factory(device=self.device_index, channels=self.settings.channels, samplerate=self.rate,
                             blocksize=self.blocksize, dtype="float32", callback=self._callback)
            stream.start()
        except Exception as e:  # PortAudioError, ValueError from sounddevice: all mean "cannot open"
            raise AudioError(f"cannot open input device {self.device_name!r} at {self.rate} Hz, "
                             f"{self.settings.channels} ch: {e}") from e
        self._stream = stream
        log.info("recording from %r at %d Hz, %d ch, %d-frame blocks", self.device_name, self.rate,
                 self.settings.channels, self.blocksize)

    def stop(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.stop()
            stream.close()
            s = self.stats()
            if s["overflows"] or s["dropped_blocks"]:
                log.warning("microphone: %d overflows, %d blocks dropped (%d samples filled with zeros)",
                            s["overflows"], s["dropped_blocks"], s["dropped_samples"])

    def stats(self) -> dict[str, int]:
        return {"blocks": self._blocks, "samples": self._emitted, "overflows": self._overflows,
                "dropped_blocks": self._dropped_blocks, "dropped_samples": self._dropped_samples,
                "queued": self._queue.qsize()}

    def _callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        """PortAudio thread: one non-blocking enqueue; nothing that can block, log or allocate much."""
        if status.input_overflow:
            self._overflows += 1
        now = self._clock()
        adc = time_info.inputBufferAdcTime
        current = time_info.currentTime
        captured = now - (current - adc) if current and adc else now - frames / self.rate
        try:
            self._queue.put_nowait((indata.copy(), captured, status))
            self._puts += 1
        except queue.Full:
            self._dropped_blocks += 1
            self._drops.append((self._puts, frames))

    def read(self, timeout: float) -> AudioChunk | None:
        """The next chunk at 16 kHz, or None if the device delivered nothing within ``timeout``."""
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            try:
                block, captured, _flags = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            chunk = self._convert(block, captured)
            if chunk is not None:
                return chunk

    def _convert(self, block: np.ndarray, captured: float) -> AudioChunk | None:
        self._gets += 1
        self._blocks += 1
        gap = 0
        while self._drops and self._drops[0][0] < self._gets:  # dropped before this block was queued
            gap += self._drops.popleft()[1]
        mono = mix_down(block)
        if gap:
            self._dropped_samples += gap
            mono = np.concatenate([np.zeros(gap, dtype=np.float32), mono])
        first_real = self._in_samples + gap  # device-rate index of this block's first captured sample
        self._in_samples += len(mono)
        samples = self._resampler.process(mono)
        if not len(samples):
            return None
        start = self._emitted
        self._emitted += len(samples)
        # place the chunk by the capture time of this block, moved along the session clock
        capture_time = captured + start / SAMPLE_RATE - first_real / self.rate
        return AudioChunk(samples=samples, start=start, capture_time=capture_time)


def open_source(spec: str, settings: SourceSettings | None = None, *, realtime: bool) -> Source:
    """``mic``, ``mic:NAME_OR_INDEX``, ``file:PATH`` or an existing path -> a Source (not started)."""
    settings = settings or SourceSettings()
    if spec == "mic":
        return MicSource(settings)
    if spec.startswith("mic:"):
        name = spec[len("mic:"):].strip()
        if not name:
            raise ConfigError("source", spec, "mic: needs a device name or index, e.g. mic:2 or mic:USB")
        device: str | int = int(name) if name.isdigit() else name
        return MicSource(replace(settings, device=device))
    if spec.startswith("file:"):
        path = spec[len("file:"):]
        if not path:
            raise ConfigError("source", spec, "file: needs a path, e.g. file:meeting.wav")
        return FileSource(path, settings, realtime=realtime)
    if spec and Path(spec).is_file():
        return FileSource(spec, settings, realtime=realtime)
    raise ConfigError("source", spec, "expected mic, mic:NAME_OR_INDEX, file:PATH or an existing audio file")
