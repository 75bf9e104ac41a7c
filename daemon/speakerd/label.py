"""``speakerd label EVENTS TRANSCRIPT``: name the lines of a transcript from recorded events.

The events file is what ``--events-out`` wrote; the transcript a Whisper-style JSON, SRT or
WebVTT file. Each line gets the speaker covering most of it, read from a ``SpeakerTimeline``;
a JSON segment with timed words that spans a change is split at the change. The transcript's
zero is the daemon's stream time zero unless ``--offset`` or ``--start-time`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from .client import SpeakerTimeline, Who
from .errors import SpeakerdError
from .transcripts import FORMATS, Cue, Transcript, Word, read_transcript, write_transcript

REACH_S = 1.0
"""A line or word no speaker's speech overlaps (the VAD put it in a pause) takes the nearest
speaker within this many seconds."""

Answer = Callable[[float, float], Who]


class LabelError(SpeakerdError):
    """The events and the transcript cannot be put together; the message says which option helps."""

    exit_code = 2


def read_events(path: Path) -> list[dict[str, Any]]:
    events = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError as e:
            raise LabelError(f"{path}:{n} is not a JSON event ({e}); is it a file written by --events-out?") from None
        if not isinstance(event, dict) or "session" not in event:
            raise LabelError(f"{path}:{n} is no speakerd event (no 'session'); is it a file written by --events-out?")
        events.append(event)
    if not events:
        raise LabelError(f"{path} holds no events")
    return events


def timeline_answer(events: list[dict[str, Any]], *, offset: float = 0.0, start_time: float | None = None,
                    session: str | None = None) -> Answer:
    """Transcript seconds -> who: on stream time (``+ offset``) of one session, or on the wall
    clock when the transcript's zero is the Unix time ``start_time``."""
    sessions = list(dict.fromkeys(e["session"] for e in events))
    if session is not None and session not in sessions:
        raise LabelError(f"no session {session!r} in the events; they hold {', '.join(sessions)}")
    if start_time is None and session is None and len(sessions) > 1:
        raise LabelError(
            f"the events hold {len(sessions)} daemon sessions ({', '.join(sessions)}): pick one with --session ID, "
            "or give the transcript's start as --start-time (Unix seconds or ISO 8601) to align on the wall clock"
        )
    chosen = session or sessions[-1]
    timeline = SpeakerTimeline()
    timeline.feed_all(e for e in events if start_time is not None or e["session"] == chosen)
    if start_time is not None:
        return lambda a, b: timeline.who(start_time + a, start_time + b, "wall", reach=REACH_S)
    return lambda a, b: timeline.who(a + offset, b + offset, reach=REACH_S)


def label_cue(cue: Cue, answer: Answer) -> list[tuple[Cue, str | None]]:
    """The cue with its speaker; split at every change of speaker between its words, if timed."""
    if not cue.words:
        return [(cue, answer(cue.start, cue.end).label)]
    last: str | None = None
    for w in cue.words:
        w.speaker = answer(w.start, w.end).label or last  # a word nobody covers stays with the one before
        last = w.speaker
    runs: list[list[Word]] = []
    for w in cue.words:
        if runs and runs[-1][-1].speaker == w.speaker:
            runs[-1].append(w)
        else:
            runs.append([w])
    if len(runs) == 1:
        return [(cue, runs[0][0].speaker)]
    pieces = []
    for i, run in enumerate(runs):
        start = cue.start if i == 0 else run[0].start
        end = cue.end if i == len(runs) - 1 else runs[i + 1][0].start
        text = "".join(str(w.raw.get("word", "")) for w in run)
        pieces.append((Cue(start, max(end, start), text, run, cue.raw), run[0].speaker))
    return pieces


def label_transcript(transcript: Transcript, answer: Answer) -> str:
    return write_transcript(transcript, [label_cue(c, answer) for c in transcript.cues])


def parse_start_time(text: str) -> float:
    """Unix seconds, or an ISO 8601 date and time (a time without zone is local)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise LabelError(f"--start-time {text!r}: give Unix seconds (1718000000.5) or ISO 8601 (2024-06-10T09:00:00+02:00)") from None


def add_label_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("events", metavar="EVENTS", help="events file written by `speakerd run --events-out`")
    p.add_argument("transcript", metavar="TRANSCRIPT", help="Whisper-style JSON, SRT or WebVTT")
    p.add_argument("-o", "--output", metavar="OUT", help="where to write the labelled transcript (default: stdout)")
    p.add_argument("--format", choices=FORMATS, help="the transcript's format (default: from its content)")
    p.add_argument("--offset", type=float, default=0.0, metavar="S",
                   help="daemon stream time at the transcript's zero (stream = transcript + S)")
    p.add_argument("--start-time", metavar="T",
                   help="Unix time (or ISO 8601) of the transcript's zero: align on the events' wall_time instead")
    p.add_argument("--session", metavar="ID", help="which daemon session of the events file (default: the only one)")


def main_label(args: argparse.Namespace) -> int:
    events = read_events(Path(args.events))
    try:
        transcript = read_transcript(Path(args.transcript).read_text(encoding="utf-8"), args.format)
    except OSError as e:
        raise LabelError(f"cannot read the transcript: {e}") from None
    start_time = parse_start_time(args.start_time) if args.start_time else None
    answer = timeline_answer(events, offset=args.offset, start_time=start_time, session=args.session)
    text = label_transcript(transcript, answer)
    if args.output and args.output != "-":
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0

