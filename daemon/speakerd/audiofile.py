"""Opening an audio file for block reads: libsndfile first, then ffmpeg (through PyAV) for what
libsndfile cannot read, such as m4a/AAC from a phone or a Mac's voice memos.

A file that neither reads fails with a message that names the file, says what is wrong with it in
plain words (no such file, a directory, not readable, not audio) and lists the formats that work.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import soundfile as sf

from .errors import AudioError

logger = logging.getLogger(__name__)

FFMPEG_FORMATS = "M4A/AAC, MP4, WebM, WMA, AMR and most others"
"""What the ffmpeg fallback adds to libsndfile's list (PyAV's wheels carry ffmpeg's decoders)."""


class AudioFile(Protocol):
    """The part of ``soundfile.SoundFile`` a file source uses; float32 (frames, channels) blocks."""

    samplerate: int
    channels: int

    @property
    def format(self) -> str: ...

    def read(self, frames: int, dtype: str = "float32", always_2d: bool = True) -> np.ndarray: ...

    def close(self) -> None: ...


def readable_formats() -> str:
    """The formats speakerd reads, for messages."""
    native = ", ".join(sorted(sf.available_formats()))
    return f"{native} (libsndfile), and {FFMPEG_FORMATS} (ffmpeg, through PyAV)"


def open_audio_file(path: Path) -> AudioFile:
    """``path`` opened for reading; AudioError saying what is wrong and what is readable."""
    if not path.exists():
        raise AudioError(f"cannot read audio file {path}: no such file")
    if path.is_dir():
        raise AudioError(f"cannot read audio file {path}: it is a directory, not an audio file")
    if not os.access(path, os.R_OK):
        raise AudioError(f"cannot read audio file {path}: permission denied")
    try:
        return sf.SoundFile(str(path))
    except (sf.LibsndfileError, RuntimeError, OSError, TypeError) as exc:
        native_error = str(getattr(exc, "error_string", "") or exc)
    try:
        import av
    except ImportError:
        raise AudioError(
            f"cannot read audio file {path}: libsndfile cannot ({native_error}), and PyAV, which reads "
            f"{FFMPEG_FORMATS}, is not installed (pip install av); libsndfile reads "
            f"{', '.join(sorted(sf.available_formats()))}"
        ) from None
    try:
        return FFmpegFile(path, av)
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise AudioError(
            f"cannot read audio file {path}: not audio in a format speakerd reads "
            f"(libsndfile: {native_error.rstrip('.')}; ffmpeg: {exc}). "
            f"speakerd reads {readable_formats()}"
        ) from None


class FFmpegFile:
    """A file ffmpeg decodes, read in blocks like a SoundFile: float32 frames x channels at the
    file's own rate (the file source resamples). Decoding is lazy: a long file is never all in memory."""

    def __init__(self, path: Path, av: Any) -> None:
        self.path = path
        self._av = av
        self._container = av.open(str(path))
        try:
            if not self._container.streams.audio:
                raise ValueError("it has no audio stream")
            stream = self._container.streams.audio[0]
            if not stream.rate or not stream.channels:
                raise ValueError("its audio stream has no sample rate or channels")
            self.samplerate = int(stream.rate)
            self.channels = int(stream.channels)
            self._format = f"{self._container.format.name}/{stream.codec_context.name}"
            self._resampler = av.AudioResampler(format="flt", layout=stream.layout.name, rate=self.samplerate)
            self._frames = self._container.decode(stream)
        except BaseException:
            self._container.close()
            raise
        self._pending: list[np.ndarray] = []
        self._buffered = 0
        self._drained = False
        self._closed = False
        logger.debug("%s: decoding %s through ffmpeg", path, self._format)

    @property
    def format(self) -> str:
        return self._format

    def read(self, frames: int, dtype: str = "float32", always_2d: bool = True) -> np.ndarray:
        """Up to ``frames`` frames; fewer only at the end of the file."""
        if dtype != "float32" or not always_2d:
            raise ValueError("FFmpegFile reads float32 (frames, channels) blocks only")
        if self._closed:
            raise ValueError(f"{self.path} is closed")
        while self._buffered < frames and not self._drained:
            self._decode_more()
        block = np.concatenate(self._pending) if self._pending else np.zeros((0, self.channels), np.float32)
        out, rest = block[:frames], block[frames:]
        self._pending = [rest] if len(rest) else []
        self._buffered = len(rest)
        return out

    def _decode_more(self) -> None:
        try:
            frame = next(self._frames, None)
            decoded = self._resampler.resample(frame)  # None flushes the resampler
        except self._av.FFmpegError as exc:
            raise AudioError(f"cannot decode audio file {self.path}: {exc}") from exc
        if frame is None:
            self._drained = True
        for out in decoded:
            samples = out.to_ndarray().reshape(-1, self.channels).astype(np.float32, copy=False)  # packed: interleaved
            self._pending.append(samples)
            self._buffered += len(samples)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._container.close()
