"""Live captions with names: PocketSphinx hears the microphone, speakerd says who is speaking.

    speakerd run &                                   # the daemon, on the same microphone
    python examples/live_captions.py [--config speakerd.toml] [--device NAME]

Words are timed by this program's own capture clock (Unix seconds) and named through a
``SpeakerTimeline`` on the wall clock, so the two programs need no shared clock beyond the
system's. A word is shown once the daemon has heard past it; a later correction (a tentative
change withdrawn, a voice named over the control socket) is printed as a revision.
"""

from __future__ import annotations

import argparse
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import sounddevice as sd
from sphinx_words import SAMPLE_RATE, SphinxWords, Word

from speakerd.client import Line, SpeakerTimeline, Subscriber, Who

BLOCK_S = 0.02
READ_TIMEOUT_S = 0.1


class MicWords:
    """The microphone through PocketSphinx: ``run`` calls ``on_word`` with words in Unix seconds."""

    def __init__(self, device: str | int | None = None) -> None:
        self.device = device
        self.started = threading.Event()
        """Set once audio flows (the first block arrived)."""
        self._blocks: queue.Queue[tuple[bytes, float]] = queue.Queue(maxsize=500)
        self.dropped = 0

    def _callback(self, data: Any, frames: int, time_info: Any, status: Any) -> None:
        try:  # one non-blocking enqueue on the audio thread; the block began frames/rate ago
            self._blocks.put_nowait((bytes(data), time.time() - frames / SAMPLE_RATE))
        except queue.Full:
            self.dropped += 1

    def run(self, on_word: Callable[[Word], None], stop: threading.Event) -> None:
        recogniser = SphinxWords()
        t0: float | None = None
        with sd.RawInputStream(samplerate=SAMPLE_RATE, channels=1, dtype="int16", blocksize=int(BLOCK_S * SAMPLE_RATE),
                               device=self.device, callback=self._callback):
            while not stop.is_set():
                try:
                    pcm, at = self._blocks.get(timeout=READ_TIMEOUT_S)
                except queue.Empty:
                    continue
                if t0 is None:
                    t0 = at  # the recogniser counts seconds from the first sample
                    self.started.set()
                for w in recogniser.feed(pcm):
                    on_word(Word(t0 + w.start, t0 + w.end, w.text))
        for w in recogniser.close():
            on_word(Word((t0 or 0.0) + w.start, (t0 or 0.0) + w.end, w.text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="the daemon's TOML settings (its publish endpoint and CURVE keys)")
    parser.add_argument("--sub", help="the daemon's publish endpoint, if not the config's")
    parser.add_argument("--device", help="input device name or index (default: the system's)")
    args = parser.parse_args()

    def revised(line: Line, before: Who, after: Who) -> None:
        print(f"  (revised) {line.key}: {before.label} -> {after.label}", flush=True)

    timeline = SpeakerTimeline(on_revision=revised)
    held: list[Word] = []
    lock = threading.Lock()

    def show_heard(event: dict[str, Any]) -> None:
        """Show the words the daemon has heard past (its events carry where it is)."""
        heard_to = event["wall_time"]
        with lock:
            while held and held[0].end <= heard_to:
                w = held.pop(0)
                who = timeline.label(w.text, w.start, w.end, "wall", reach=0.5)
                print(f"{time.strftime('%H:%M:%S', time.localtime(w.start))}  {who.label or '?'}: {w.text}", flush=True)

    def heard(word: Word) -> None:
        with lock:
            held.append(word)

    device = int(args.device) if args.device and args.device.isdigit() else args.device
    stop = threading.Event()
    with Subscriber.from_config(args.config, endpoint=args.sub, timeline=timeline, on_event=show_heard):
        try:
            MicWords(device).run(heard, stop)
        except KeyboardInterrupt:
            stop.set()


if __name__ == "__main__":
    main()
