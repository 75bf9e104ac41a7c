"""Audio sources: a file or the microphone, delivered as 16 kHz mono ``AudioChunk``s.

Both sources place audio on a sample clock counted from the session start, so every later stage
derives time from sample counts. The microphone callback does one non-blocking enqueue and only
counts what it drops; the reader fills a drop with zeros so the sample clock keeps matching real
elapsed audio. ``RecoveringSource`` wraps the microphone so a device that disappears or changes is
reopened with backoff while the daemon keeps running; the outage is filled with zeros, so the sample
clock keeps counting real time across it (no jump).
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

import numpy as np
import soundfile as sf

from . import devices
from .audio import SAMPLE_RATE, AudioChunk, to_samples
from .audiofile import AudioFile, open_audio_file
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
    """Audio from anything libsndfile or ffmpeg reads (see audiofile.py), in blocks, optionally at real speed.

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
        self._file: AudioFile | None = open_audio_file(self.path)
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
                 stream_factory: StreamFactory | None = None, list_devices: DeviceQuery | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings or SourceSettings()
        self._clock = clock
        self._monotonic = monotonic
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
        self._progress = 0  # callbacks seen by the last fault() check, and when that count last moved
        self._progress_at = 0.0

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
        stream = None
        try:
            stream = factory(device=self.device_index, channels=self.settings.channels, samplerate=self.rate,
                             blocksize=self.blocksize, dtype="float32", callback=self._callback)
            stream.start()
        except Exception as e:  # PortAudioError, ValueError from sounddevice: all mean "cannot open"
            if stream is not None:
                with suppress(*device_error_types()):  # opened but would not start: closed, not leaked
                    stream.close()
            raise AudioError(f"cannot open input device {self.device_name!r} at {self.rate} Hz, "
                             f"{self.settings.channels} ch: {e}") from e
        self._stream = stream
        self._progress_at = self._monotonic()
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

    def fault(self, stall_s: float) -> str | None:
        """Why the stream is dead, or None while it delivers audio. Reader thread.

        PortAudio has no "device lost" flag: a vanished device shows as a stream that is no longer
        active (its state may itself raise ``PortAudioError``), or, on some hosts, as callbacks that
        simply stop. Both are detected here; the caller decides what to do.
        """
        stream = self._stream
        if stream is None:
            return "the stream is not open"
        try:
            active = bool(getattr(stream, "active", True))
        except device_error_types() as e:
            return f"stream state unreadable: {e}"
        if not active:
            return "the stream stopped"
        seen = self._puts + self._dropped_blocks
        now = self._monotonic()
        if seen != self._progress:
            self._progress, self._progress_at = seen, now
            return None
        if now - self._progress_at > stall_s:
            return f"no audio for {now - self._progress_at:.1f} s"
        return None

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


def device_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the audio device failed": ours, the OS's and PortAudio's.

    ``sounddevice`` is looked up, not imported: if it was never imported, nothing can raise its error.
    """
    sd = sys.modules.get("sounddevice")
    errors: tuple[type[BaseException], ...] = (AudioError, OSError)
    return (*errors, sd.PortAudioError) if sd is not None else errors


@dataclass(frozen=True)
class RecoverySettings:
    """How a lost microphone is retried. Injectable so tests run in milliseconds.

    ``backoff_initial_s`` .. ``backoff_max_s``: the wait before each reopen, doubled (``backoff_factor``)
    after every failed attempt and reset once the reopened device delivers audio.
    ``stall_s``: a started stream with no callback for this long counts as lost (a device that
    vanished without an error). ``silence_chunk_s``: the longest zero chunk emitted while down.
    """

    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    backoff_factor: float = 2.0
    stall_s: float = 5.0
    silence_chunk_s: float = 0.1

    def __post_init__(self) -> None:
        check(0 < self.backoff_initial_s <= self.backoff_max_s, "recovery.backoff_initial_s",
              self.backoff_initial_s, "must be > 0 and at most backoff_max_s")
        check(self.backoff_factor >= 1.0, "recovery.backoff_factor", self.backoff_factor, "must be >= 1")
        check(self.stall_s > 0, "recovery.stall_s", self.stall_s, "must be > 0")
        check(0 < self.silence_chunk_s <= 10, "recovery.silence_chunk_s", self.silence_chunk_s, "must be in (0, 10] s")


_SUMMED_STATS = ("blocks", "overflows", "dropped_blocks", "dropped_samples")


class RecoveringSource(_ContextSource):
    """A microphone that survives its device disappearing or changing.

    When the inner ``MicSource`` fails (an error on read or reopen, a stream that stopped, or no
    callbacks for ``stall_s``), it is closed, counted in ``device_errors``, and reopened through
    ``reopen`` after a backoff; ``reopen`` resolves the device again, so it finds the current default
    input, or the configured device once it is back. Meanwhile ``read`` returns zeros paced in real
    time, so the sample clock keeps counting real time across the gap (downstream, the VAD simply
    hears silence and status events keep flowing); the first block of the new stream is placed by
    its capture time, with zeros for any remaining gap. The daemon never exits because of this.

    Startup is not retried: a device that cannot be opened the first time is a set-up error, reported
    by ``start`` (the service manager restarts the daemon after a failed exit).
    """

    def __init__(self, first: MicSource, reopen: Callable[[], MicSource], settings: RecoverySettings | None = None,
                 *, rescan: Callable[[], None] | None = None, monotonic: Callable[[], float] = time.monotonic,
                 clock: Callable[[], float] = time.time) -> None:
        self.recovery = settings or RecoverySettings()
        self._reopen_mic = reopen
        self._rescan = rescan
        self._monotonic = monotonic
        self._clock = clock
        self._inner: MicSource | None = first
        self.device_name = first.device_name
        self._started = False
        self._wake = threading.Event()  # stop() interrupts a wait for the next retry
        self._stopping = False
        self._emitted = 0  # samples delivered on this source's clock, zeros included
        self._realign = False  # the next inner chunk is the first of a reopened stream
        self._anchor_sample = 0  # the last delivered sample, its wall time and when it was delivered
        self._anchor_wall = 0.0
        self._anchor_mono = 0.0
        self._backoff = self.recovery.backoff_initial_s
        self._retry_at = 0.0
        self._down_since = 0.0
        self._closed_stats = dict.fromkeys(_SUMMED_STATS, 0)
        self.device_errors = 0
        self.reconnects = 0
        self._gap_samples = 0

    @property
    def finished(self) -> bool:
        return False

    @property
    def down(self) -> bool:
        """True while the device is lost and being reopened (not after ``stop``)."""
        return self._inner is None and self._started and not self._stopping

    def start(self) -> None:
        if self._started:
            return
        assert self._inner is not None, "start after stop"
        self._inner.start()  # errors here are set-up errors: raised, not retried
        self._started = True
        self._anchor_wall, self._anchor_mono = self._clock(), self._monotonic()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        inner, self._inner = self._inner, None
        if inner is not None:
            self._close(inner)

    def stats(self) -> dict[str, int]:
        current = self._inner.stats() if self._inner is not None else {}
        out = {k: self._closed_stats[k] + int(current.get(k, 0)) for k in _SUMMED_STATS}
        out.update(samples=self._emitted, queued=int(current.get("queued", 0)), device_errors=self.device_errors,
                   reconnects=self.reconnects, gap_samples=self._gap_samples, device_down=int(self.down))
        return out

    def read(self, timeout: float) -> AudioChunk | None:
        """The next chunk: audio from the device, or zeros while it is being reopened."""
        if not self._started:
            raise RuntimeError("RecoveringSource.read() before start()")
        if self._stopping:
            return None
        deadline = self._monotonic() + max(0.0, timeout)
        if self._inner is None:
            return self._read_down(deadline)
        return self._read_inner(self._inner, timeout)

    # -- up ----------------------------------------------------------------------------------------

    def _read_inner(self, inner: MicSource, timeout: float) -> AudioChunk | None:
        try:
            chunk = inner.read(timeout)
            reason = inner.fault(self.recovery.stall_s) if chunk is None else None
        except device_error_types() as e:
            chunk, reason = None, f"{type(e).__name__}: {e}"
        if reason is not None:
            self._lose(inner, reason)
            return None
        return None if chunk is None else self._place(chunk)

    def _place(self, chunk: AudioChunk) -> AudioChunk:
        """Put an inner chunk on this source's clock (inner streams are contiguous, so it goes at the
        end); the first chunk after a reopen is preceded by zeros for whatever gap is still open."""
        samples, capture_time = chunk.samples, chunk.capture_time
        if self._realign:
            self._realign = False
            self._backoff = self.recovery.backoff_initial_s  # the device works again
            gap = to_samples(capture_time - self._wall_of(self._emitted))
            if gap > 0:
                samples = np.concatenate([np.zeros(gap, np.float32), samples])
                capture_time -= gap / SAMPLE_RATE
                self._gap_samples += gap
        placed = AudioChunk(samples=samples, start=self._emitted, capture_time=capture_time)
        self._deliver(placed)
        return placed

    def _deliver(self, chunk: AudioChunk) -> None:
        self._emitted = chunk.end
        self._anchor_sample = chunk.end
        self._anchor_wall = chunk.wall_time_of(chunk.end)
        self._anchor_mono = self._monotonic()

    def _wall_of(self, sample: int) -> float:
        return self._anchor_wall + (sample - self._anchor_sample) / SAMPLE_RATE

    # -- down --------------------------------------------------------------------------------------

    def _lose(self, inner: MicSource, reason: str) -> None:
        self._inner = None
        self.device_errors += 1
        self._close(inner)
        now = self._monotonic()
        self._down_since = now
        self._retry_at = now + self._backoff
        log.warning("input device %r lost (%s); recording silence and retrying in %.1f s",
                    inner.device_name, reason, self._backoff)

    def _close(self, inner: MicSource) -> None:
        for key, value in inner.stats().items():
            if key in self._closed_stats:
                self._closed_stats[key] += int(value)
        try:
            inner.stop()
        except device_error_types() as e:  # closing a stream whose device is gone can fail too
            log.debug("closing the lost stream failed: %s", e)

    def _read_down(self, deadline: float) -> AudioChunk | None:
        """Zeros for the real time that passed, and a reopen attempt whenever one is due."""
        step = to_samples(self.recovery.silence_chunk_s)
        while not self._stopping:
            now = self._monotonic()
            if now >= self._retry_at and self._try_reopen(now):
                assert self._inner is not None
                return self._read_inner(self._inner, max(0.0, deadline - self._monotonic()))
            due = self._anchor_sample + to_samples(now - self._anchor_mono) - self._emitted
            if due >= step:
                return self._silence(min(due, step))
            if now >= deadline:
                return None
            next_block = (self._emitted + step - self._anchor_sample) / SAMPLE_RATE + self._anchor_mono
            self._wake.wait(max(0.0, min(deadline, self._retry_at, next_block) - now))
        return None

    def _silence(self, n: int) -> AudioChunk:
        chunk = AudioChunk(samples=np.zeros(n, np.float32), start=self._emitted,
                           capture_time=self._wall_of(self._emitted))
        self._gap_samples += n
        self._emitted = chunk.end  # the anchor stays at the last real sample: silence is paced from it
        return chunk

    def _try_reopen(self, now: float) -> bool:
        try:
            if self._rescan is not None:
                self._rescan()
            mic = self._reopen_mic()
            mic.start()
        except device_error_types() as e:
            self._backoff = min(self.recovery.backoff_max_s, self._backoff * self.recovery.backoff_factor)
            self._retry_at = self._monotonic() + self._backoff
            log.info("input device still unavailable (%s); next attempt in %.1f s", e, self._backoff)
            return False
        self._inner = mic
        self.device_name = mic.device_name
        self.reconnects += 1
        self._realign = True
        log.warning("input device back after %.1f s: recording from %r", now - self._down_since, mic.device_name)
        return True


def open_source(spec: str, settings: SourceSettings | None = None, *, realtime: bool,
                recovery: RecoverySettings | None = None) -> Source:
    """``mic``, ``mic:NAME_OR_INDEX``, ``file:PATH`` or an existing path -> a Source (not started).

    A microphone comes wrapped in ``RecoveringSource``; its device is looked up now, so a missing
    device is reported before anything starts.
    """
    settings = settings or SourceSettings()
    if spec == "mic" or spec.startswith("mic:"):
        mic_settings = settings
        if spec.startswith("mic:"):
            name = spec[len("mic:"):].strip()
            if not name:
                raise ConfigError("source", spec, "mic: needs a device name or index, e.g. mic:2 or mic:USB")
            mic_settings = replace(settings, device=int(name) if name.isdigit() else name)
        return RecoveringSource(MicSource(mic_settings), lambda: MicSource(mic_settings), recovery,
                                rescan=devices.rescan_devices)
    if spec.startswith("file:"):
        path = spec[len("file:"):]
        if not path:
            raise ConfigError("source", spec, "file: needs a path, e.g. file:meeting.wav")
        return FileSource(path, settings, realtime=realtime)
    if spec and Path(spec).is_file():
        return FileSource(spec, settings, realtime=realtime)
    raise ConfigError("source", spec, "expected mic, mic:NAME_OR_INDEX, file:PATH or an existing audio file")
