"""Name the words of a recording: PocketSphinx transcribes it, speakerd says who spoke.

    speakerd run --source file:meeting.wav --no-realtime --events-out events.jsonl
    python examples/label_recording.py meeting.wav events.jsonl

For a file source the daemon's stream time is the file's own time, so the recogniser's word
times and the events need no alignment. Prints one line per run of words of one speaker.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from sphinx_words import Word, transcribe_file

from speakerd.client import SpeakerTimeline, Who

REACH_S = 0.5
"""A word the daemon's VAD left out (a soft word before a pause) takes the nearest speaker this close."""


def name_words(words: Sequence[Word], timeline: SpeakerTimeline, offset: float = 0.0) -> list[tuple[Word, Who]]:
    """Each word with the speaker covering most of it (``offset``: stream time of the words' zero)."""
    return [(w, timeline.who(w.start + offset, w.end + offset, reach=REACH_S)) for w in words]


def lines(named: Iterable[tuple[Word, Who]]) -> list[str]:
    out: list[str] = []
    label: str | None = "-"
    for word, who in named:
        if who.label != label:
            label = who.label
            out.append(f"[{word.start:8.2f}] {label or '?'}:")
        out[-1] += " " + word.text
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("audio", type=Path)
    parser.add_argument("events", type=Path)
    args = parser.parse_args()
    timeline = SpeakerTimeline()
    for line in args.events.read_text().splitlines():
        if line.strip():
            timeline.feed(json.loads(line))
    for line in lines(name_words(transcribe_file(args.audio), timeline)):
        print(line)


if __name__ == "__main__":
    main()
