"""Words with times from PocketSphinx, the offline recogniser the examples and tests use.

The ``pocketsphinx`` wheel ships an English acoustic model, language model and dictionary, so
this runs without any download. Its own endpointer cuts the stream into utterances; each is
decoded as it arrives, and its words come out when it ends, timed in seconds since the first
sample fed (add the stream's start to place them on another clock).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from pocketsphinx import Decoder, Endpointer

SAMPLE_RATE = 16_000
FRAME_RATE = 100
"""PocketSphinx's feature frames per second: a word's frames / FRAME_RATE are seconds."""
_ALTERNATE = re.compile(r"\(\d+\)$")


@dataclass(frozen=True)
class Word:
    start: float
    end: float
    text: str


def is_word(token: str) -> bool:
    """Real words only: not <s>, </s>, <sil>, [NOISE] or ++filler++."""
    return bool(token) and token[0] not in "<[+"


class SphinxWords:
    """Feed 16 kHz 16-bit mono PCM in any chunk size; get words as each utterance ends."""

    def __init__(self) -> None:
        self.decoder = Decoder(samprate=SAMPLE_RATE, loglevel="FATAL")
        self.endpointer = Endpointer(sample_rate=SAMPLE_RATE)
        self._buffer = b""
        self._utterance_start = 0.0
        self._open = False

    def feed(self, pcm: bytes) -> list[Word]:
        self._buffer += pcm
        size = self.endpointer.frame_bytes
        words: list[Word] = []
        while len(self._buffer) >= size:
            frame, self._buffer = self._buffer[:size], self._buffer[size:]
            words += self._frame(self.endpointer.process(frame))
        return words

    def close(self) -> list[Word]:
        """The end of the stream: the utterance still open, if any."""
        if not self.endpointer.in_speech:
            return []
        speech = self.endpointer.end_stream(self._buffer)
        self._buffer = b""
        if speech:
            self.decoder.process_raw(speech, False, False)
        return self._end()

    def _frame(self, speech: bytes | None) -> list[Word]:
        if speech is None:
            return []
        if not self._open:
            self.decoder.start_utt()
            self._open = True
            self._utterance_start = self.endpointer.speech_start
        self.decoder.process_raw(speech, False, False)
        return [] if self.endpointer.in_speech else self._end()

    def _end(self) -> list[Word]:
        self._open = False
        self.decoder.end_utt()
        t0 = self._utterance_start
        return [
            Word(t0 + s.start_frame / FRAME_RATE, t0 + (s.end_frame + 1) / FRAME_RATE, _ALTERNATE.sub("", s.word))
            for s in self.decoder.seg()
            if is_word(s.word)
        ]


def to_pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()


def transcribe_file(path: Path, chunk_s: float = 0.5) -> list[Word]:
    """Every word of a 16 kHz recording, seconds from its start (the daemon's stream time for a file)."""
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    if rate != SAMPLE_RATE:
        raise ValueError(f"{path}: PocketSphinx's model wants {SAMPLE_RATE} Hz, got {rate}")
    recogniser = SphinxWords()
    mono = audio.mean(axis=1)
    step = int(chunk_s * SAMPLE_RATE)
    words: list[Word] = []
    for i in range(0, len(mono), step):
        words += recogniser.feed(to_pcm16(mono[i : i + step]))
    return words + recogniser.close()
