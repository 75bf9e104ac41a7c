"""Transcript files as a transcriber writes them: Whisper-style JSON, SRT and WebVTT.

Read into cues (start, end, text, optional timed words) that keep everything else as it was, so
``speakerd label`` writes the same file back with only the speakers added: a ``speaker`` field
in JSON (on segments and words), ``Name: `` before SRT text, ``<v Name>`` in VTT.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import SpeakerdError

Format = Literal["json", "srt", "vtt"]
FORMATS: tuple[Format, ...] = ("json", "srt", "vtt")


class TranscriptError(SpeakerdError):
    """A transcript this module cannot read; the message names the place and the fix."""

    exit_code = 2


@dataclass
class Word:
    start: float
    end: float
    raw: dict[str, Any]
    speaker: str | None = None


@dataclass
class Cue:
    start: float
    end: float
    text: str
    words: list[Word] = field(default_factory=list)
    raw: dict[str, Any] | None = None
    """The JSON segment as read (JSON only)."""
    head: list[str] = field(default_factory=list)
    """SRT/VTT lines before the text (number or cue id, timing line), written back as they were."""


@dataclass
class Transcript:
    format: Format
    items: list[Cue | str]
    """Cues in order; VTT header, NOTE and STYLE blocks as text between them."""
    root: Any = None
    """JSON: the document as read (a dict with ``segments``, or the bare list)."""

    @property
    def cues(self) -> list[Cue]:
        return [c for c in self.items if isinstance(c, Cue)]


def sniff(text: str) -> Format:
    head = text.lstrip("\ufeff \t\r\n")[:6]
    if head.startswith("WEBVTT"):
        return "vtt"
    if head[:1] in "{[":
        return "json"
    return "srt"


def read_transcript(text: str, fmt: Format | None = None) -> Transcript:
    fmt = fmt or sniff(text)
    if fmt == "json":
        return _read_json(text)
    return _read_cues(text, fmt)


# -- JSON (openai-whisper, faster-whisper) --------------------------------------------------------


def _num(d: dict[str, Any], key: str, where: str) -> float:
    value = d.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TranscriptError(f"{where}: {key!r} must be a number of seconds, got {value!r}")
    return float(value)


def _read_json(text: str) -> Transcript:
    try:
        root = json.loads(text)
    except json.JSONDecodeError as e:
        raise TranscriptError(f"transcript is not JSON: {e}") from None
    segments = root.get("segments") if isinstance(root, dict) else root
    if not isinstance(segments, list):
        raise TranscriptError("a JSON transcript needs a 'segments' list (openai-whisper / faster-whisper output)")
    cues: list[Cue | str] = []
    for i, seg in enumerate(segments):
        where = f"segment {i}"
        if not isinstance(seg, dict):
            raise TranscriptError(f"{where} must be an object with start, end and text")
        words = []
        for j, w in enumerate(seg.get("words") or []):
            if not isinstance(w, dict):
                raise TranscriptError(f"{where} word {j} must be an object with start, end and word")
            words.append(Word(_num(w, "start", f"{where} word {j}"), _num(w, "end", f"{where} word {j}"), w))
        cues.append(Cue(_num(seg, "start", where), _num(seg, "end", where), str(seg.get("text", "")), words, seg))
    return Transcript("json", cues, root)


def _write_json(t: Transcript, pieces: list[list[tuple[Cue, str | None]]]) -> str:
    segments: list[dict[str, Any]] = []
    split = any(len(p) > 1 for p in pieces)
    for cue_pieces in pieces:
        for cue, speaker in cue_pieces:
            seg = copy.deepcopy(cue.raw) if cue.raw is not None else {}
            if len(cue_pieces) > 1:  # a piece of a split segment: its own times, text and words
                seg.pop("tokens", None)
                seg.update(start=round(cue.start, 3), end=round(cue.end, 3), text=cue.text)
            if cue.words:
                seg["words"] = [{**w.raw, "speaker": w.speaker} for w in cue.words]
            seg["speaker"] = speaker
            segments.append(seg)
    if split and all("id" in s for s in segments):
        for i, s in enumerate(segments):
            s["id"] = i
    root = copy.deepcopy(t.root)
    if isinstance(root, dict):
        root["segments"] = segments
    else:
        root = segments
    return json.dumps(root, ensure_ascii=False, indent=2) + "\n"


# -- SRT and WebVTT -------------------------------------------------------------------------------

_TIME = r"(?:(\d+):)?(\d{1,2}):(\d{2})[,.](\d{3})"
_TIMING = re.compile(rf"^\s*{_TIME}\s*-->\s*{_TIME}(.*)$")
_VOICE = re.compile(r"^<v(?:\.[^ >]*)?(?: [^>]*)?>")


def _seconds(h: str | None, m: str, s: str, ms: str) -> float:
    return int(h or 0) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def _read_cues(text: str, fmt: Format) -> Transcript:
    blocks = re.split(r"\r?\n[ \t]*\r?\n", text.lstrip("\ufeff").strip("\r\n"))
    items: list[Cue | str] = []
    for n, block in enumerate(blocks):
        lines = block.splitlines()
        timing = next((i for i, line in enumerate(lines[:3]) if "-->" in line), None)
        if timing is None:
            if fmt == "srt" and block.strip():
                raise TranscriptError(f"SRT block {n + 1} has no 'HH:MM:SS,mmm --> HH:MM:SS,mmm' line: {lines[0]!r}")
            items.append(block)  # WEBVTT header, NOTE, STYLE, REGION
            continue
        m = _TIMING.match(lines[timing])
        if m is None:
            raise TranscriptError(f"{fmt.upper()} block {n + 1}: cannot read the timing line {lines[timing]!r}")
        g = m.groups()
        items.append(Cue(_seconds(*g[0:4]), _seconds(*g[4:8]), "\n".join(lines[timing + 1 :]), head=lines[: timing + 1]))
    return Transcript(fmt, items)


def _write_cues(t: Transcript, pieces: list[list[tuple[Cue, str | None]]]) -> str:
    out: list[str] = []
    labelled = iter(pieces)
    for item in t.items:
        if isinstance(item, str):
            out.append(item)
            continue
        ((cue, speaker),) = next(labelled)
        text = cue.text
        if speaker is not None:
            if t.format == "vtt":
                text = f"<v {speaker}>" + _VOICE.sub("", text)
            else:
                text = f"{speaker}: {text}"
        out.append("\n".join([*cue.head, text]))
    return "\n\n".join(out) + "\n"


def write_transcript(t: Transcript, pieces: list[list[tuple[Cue, str | None]]]) -> str:
    """The transcript again, each cue replaced by its labelled pieces (one per cue for SRT/VTT)."""
    return _write_json(t, pieces) if t.format == "json" else _write_cues(t, pieces)
