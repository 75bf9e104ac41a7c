"""Running the real ``speakerd`` CLI as a subprocess on conversations built from ../shared speech."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from speakerd.evaluation.conversation import (
    Conversation,
    ConversationSettings,
    build_conversation,
    librispeech_speakers,
    split_enrollment,
)
from speakerd.evaluation.evaluate import reported_changes
from speakerd.evaluation.metrics import Segment, attribution_accuracy, change_scores
from speakerd.evaluation.runner import FileRun

REPO = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 300.0
ENROLL_CLIPS = 3


OWN_PUB = "tcp://127.0.0.1:*"
"""The ephemeral publish endpoint of a test daemon that names none: never the user's 5560."""


def isolated(args: tuple[str, ...]) -> list[str]:
    """``args`` with ``--pub`` set for a ``run`` that sets no publish endpoint (by flag or --config).
    The control socket and store need nothing: their defaults are the session's (conftest)."""
    if args[:1] != ("run",) or "--pub" in args:
        return list(args)
    if "--config" in args:
        config = Path(args[args.index("--config") + 1])
        try:
            if tomllib.loads(config.read_text()).get("publish", {}).get("endpoint"):
                return list(args)
        except (OSError, tomllib.TOMLDecodeError):
            return list(args)  # the daemon reports a bad --config itself, before it binds anything
    return [*args, "--pub", OWN_PUB]


def speakerd(*args: str, timeout: float = CLI_TIMEOUT_S, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it (same interpreter, package from this checkout)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "daemon") + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "speakerd.cli", *isolated(args)], capture_output=True, text=True, timeout=timeout, env=env
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"speakerd {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def popen_speakerd(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "daemon") + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-m", "speakerd.cli", *isolated(args)], text=True, env=env, **kwargs)


@dataclass(frozen=True)
class Enrolled:
    store: Path
    names: dict[str, str]
    """LibriSpeech speaker id -> enrolled name."""
    conversation_clips: dict[str, list[Path]]
    """Clips never used for enrollment, per speaker."""


def enroll_speakers(librispeech: Path, store: Path, speakers: list[str]) -> Enrolled:
    clips = librispeech_speakers(librispeech)
    enroll, rest = split_enrollment(clips, ENROLL_CLIPS)
    names = {}
    for spk in speakers:
        name = f"reader-{spk}"
        speakerd("enroll", name, *map(str, enroll[spk]), "--store", str(store))
        names[spk] = name
    return Enrolled(store, names, rest)


def make_conversation(enrolled: Enrolled, speakers: list[str], path: Path, **settings: Any) -> Conversation:
    conv = build_conversation({s: enrolled.conversation_clips[s] for s in speakers}, ConversationSettings(**settings))
    conv.write(path)
    return conv


def read_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class Scores:
    accuracy: float
    precision: float
    recall: float
    median_latency: float
    """Of confirmed changes."""
    true_changes: int
    reported_changes: int
    median_first: float
    """From the true change to the first announcement, tentative or confirmed (the eval's latency)."""


def score_events(conv: Conversation, events: list[dict[str, Any]], names: dict[str, str], offset: float = 0.0) -> Scores:
    """Identification and change figures; ``offset`` moves event times onto the conversation's clock."""
    segments = [
        Segment(e["start"] - offset, e["end"] - offset, e["speaker"]["name"] or "")
        for e in events
        if e["type"] == "speaker.segment"
    ]
    # confirmed changes: a tentative one is an early announcement that a confirmed one supersedes
    # (and a confirmed change back to the same speaker withdraws a tentative one)
    changes = [
        e["stream_time"] - offset
        for e in events
        if e["type"] == "speaker.change" and e["previous"] is not None and not e["tentative"]
        and e["speaker"] != e["previous"]
    ]
    truth = [t for t, _, _ in conv.changes()]
    cs = change_scores(truth, changes, before=0.5, after=3.0)
    shifted = [{**e, "stream_time": e["stream_time"] - offset, "at": e["at"] - offset} if "at" in e else e for e in events]
    _, decided = reported_changes(FileRun(shifted, [], {}))
    first = change_scores(truth, decided, before=0.5, after=3.0)
    return Scores(
        attribution_accuracy(conv.turns, segments, names, conv.duration),
        cs.precision,
        cs.recall,
        cs.median_latency,
        cs.true_changes,
        cs.reported_changes,
        first.median_latency,
    )
