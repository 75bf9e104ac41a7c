"""Event schema v1: what speakerd tells subscribers, as typed payloads plus a flat JSON envelope.

Each event travels as a ZeroMQ multipart ``[topic, json]`` whose topic is the event ``type``, so a
subscriber filters by prefix (``speaker.``). The JSON is one flat object: the envelope fields
(``v``, ``type``, ``seq``, ``session``, ``stream_time``, ``wall_time``) beside the payload fields.
The pipeline builds payloads; the publisher adds the envelope (see ``make_event``). The JSON Schema
of every type ships in ``speakerd/schemas`` so subscribers in any language can check what they get.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, ClassVar, Mapping

from .errors import SpeakerdError

SCHEMA_VERSION = 1
"""The envelope's ``v``. Renaming or removing a field bumps it; adding a field does not."""

ENVELOPE_FIELDS = ("v", "type", "seq", "session", "stream_time", "wall_time")
FIRST_SEQ = 1
"""Seq of a session's first event: a subscriber that sees seq 1 knows it missed nothing before it."""

TIME_DECIMALS = 3
"""Stream times (seconds on the sample clock) are rounded to the millisecond in JSON."""
WALL_TIME_DECIMALS = 6
SCORE_DECIMALS = 4


class EventError(SpeakerdError):
    """An event on the wire that does not follow the schema; the message says what is wrong."""


def new_session_id() -> str:
    """A random id per daemon run, so subscribers can tell a restart (seq back to 1) from loss."""
    return uuid.uuid4().hex[:12]


# --- field helpers: from_dict must reject bad input with EventError, never KeyError/TypeError ---


def _get(d: Mapping[str, Any], key: str) -> Any:
    try:
        return d[key]
    except KeyError:
        raise EventError(f"missing field {key!r}") from None
    except TypeError:
        raise EventError(f"expected an object, got {type(d).__name__}") from None


def _num(d: Mapping[str, Any], key: str) -> float:
    value = _get(d, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EventError(f"field {key!r} must be a finite number, got {value!r}")
    return float(value)


def _int(d: Mapping[str, Any], key: str) -> int:
    value = _get(d, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise EventError(f"field {key!r} must be an integer, got {value!r}")
    return value


def _bool(d: Mapping[str, Any], key: str) -> bool:
    value = _get(d, key)
    if not isinstance(value, bool):
        raise EventError(f"field {key!r} must be true or false, got {value!r}")
    return value


def _str(d: Mapping[str, Any], key: str, *, nullable: bool = False) -> Any:
    value = _get(d, key)
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        raise EventError(f"field {key!r} must be a string, got {value!r}")
    return value


def _counts(d: Mapping[str, Any], key: str) -> dict[str, int]:
    value = _get(d, key)
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in value.items()
    ):
        raise EventError(f"field {key!r} must map names to integers, got {value!r}")
    return dict(value)


def _finite(cls: type, **values: float) -> None:
    """Payloads refuse NaN/inf at construction: the bug is upstream, and JSON cannot carry them."""
    for name, value in values.items():
        if not math.isfinite(value):
            raise ValueError(f"{cls.__name__}.{name} must be finite, got {value!r}")


def _t(x: float) -> float:
    return round(float(x), TIME_DECIMALS)


def _s(x: float) -> float:
    return round(float(x), SCORE_DECIMALS)


# --- payloads ---


@dataclass(frozen=True)
class SpeakerRef:
    """Who: an enrolled speaker (known, with id and name), a provisional speaker (an unknown voice
    clustered in this session: ``id`` like ``unknown-3``, no name, known False), or unknown speech
    not yet clustered (all None, known False). ``known`` implies an ``id``.
    """

    id: str | None
    name: str | None
    known: bool

    def __post_init__(self) -> None:
        if self.known and self.id is None:
            raise ValueError("a known speaker needs an id")
        if self.id is not None and not self.id:
            raise ValueError("speaker id must be None or a non-empty string")

    @classmethod
    def unknown(cls) -> SpeakerRef:
        return cls(None, None, False)

    @property
    def label(self) -> str:
        """What a human reads: the name, else the id, else 'unknown'."""
        return self.name or self.id or "unknown"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "known": self.known}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpeakerRef:
        try:
            return cls(_str(d, "id", nullable=True), _str(d, "name", nullable=True), _bool(d, "known"))
        except ValueError as e:
            raise EventError(f"bad speaker: {e}") from None


def _ref(d: Mapping[str, Any], key: str, *, nullable: bool = False) -> SpeakerRef | None:
    value = _get(d, key)
    if value is None and nullable:
        return None
    if not isinstance(value, dict):
        raise EventError(f"field {key!r} must be a speaker object, got {value!r}")
    return SpeakerRef.from_dict(value)


def _build(cls: type, **kwargs: Any) -> Any:
    """Construct a payload from wire values, turning its own checks into EventError."""
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise EventError(f"bad {cls.TOPIC} event: {e}") from None


@dataclass(frozen=True)
class SpeechStart:
    """Voice activity began at ``start`` (stream seconds); it is decided a little later."""

    TOPIC: ClassVar[str] = "speech.start"
    start: float

    def __post_init__(self) -> None:
        _finite(type(self), start=self.start)

    def to_dict(self) -> dict[str, Any]:
        return {"start": _t(self.start)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpeechStart:
        return _build(cls, start=_num(d, "start"))


@dataclass(frozen=True)
class SpeechEnd:
    """A stretch of speech ``start``-``end`` (stream seconds) has ended."""

    TOPIC: ClassVar[str] = "speech.end"
    start: float
    end: float

    def __post_init__(self) -> None:
        _finite(type(self), start=self.start, end=self.end)
        if self.end < self.start:
            raise ValueError(f"speech end {self.end} before start {self.start}")

    def to_dict(self) -> dict[str, Any]:
        return {"start": _t(self.start), "end": _t(self.end)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpeechEnd:
        return _build(cls, start=_num(d, "start"), end=_num(d, "end"))


@dataclass(frozen=True)
class SpeakerChange:
    """The current speaker changed. ``at`` estimates when (stream seconds), often before the event.

    ``tentative`` marks a decision from a single window; a confirmed change (same or different
    speaker) may follow, so a transcriber can show it early but should let a later one override it.
    """

    TOPIC: ClassVar[str] = "speaker.change"
    speaker: SpeakerRef
    previous: SpeakerRef | None
    score: float
    margin: float
    at: float
    tentative: bool = False

    def __post_init__(self) -> None:
        _finite(type(self), score=self.score, margin=self.margin, at=self.at)

    def to_dict(self) -> dict[str, Any]:
        return {
            "speaker": self.speaker.to_dict(),
            "previous": None if self.previous is None else self.previous.to_dict(),
            "score": _s(self.score),
            "margin": _s(self.margin),
            "at": _t(self.at),
            "tentative": bool(self.tentative),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpeakerChange:
        return _build(
            cls,
            speaker=_ref(d, "speaker"),
            previous=_ref(d, "previous", nullable=True),
            score=_num(d, "score"),
            margin=_num(d, "margin"),
            at=_num(d, "at"),
            tentative=_bool(d, "tentative"),
        )


@dataclass(frozen=True)
class SpeakerSegment:
    """A finished turn: ``speaker`` spoke ``start``-``end``; ``score`` is the mean over its windows."""

    TOPIC: ClassVar[str] = "speaker.segment"
    start: float
    end: float
    speaker: SpeakerRef
    score: float
    windows: int

    def __post_init__(self) -> None:
        _finite(type(self), start=self.start, end=self.end, score=self.score)
        if self.end < self.start:
            raise ValueError(f"segment end {self.end} before start {self.start}")
        if self.windows < 1:
            raise ValueError(f"a segment has at least one window, got {self.windows}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "start": _t(self.start),
            "end": _t(self.end),
            "speaker": self.speaker.to_dict(),
            "score": _s(self.score),
            "windows": int(self.windows),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpeakerSegment:
        return _build(
            cls,
            start=_num(d, "start"),
            end=_num(d, "end"),
            speaker=_ref(d, "speaker"),
            score=_num(d, "score"),
            windows=_int(d, "windows"),
        )


@dataclass(frozen=True)
class Status:
    """Periodic health: counters (windows, embedded, dropped_windows, overflows, published,
    dropped_events, ...) and queue depths, so a subscriber can tell a quiet room from a stuck daemon."""

    TOPIC: ClassVar[str] = "status"
    uptime_s: float
    backend: str
    model: str
    counters: dict[str, int] = field(default_factory=dict)
    queue_depth: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _finite(type(self), uptime_s=self.uptime_s)
        # Own copies: the publisher may encode later than the caller mutates its counters.
        object.__setattr__(self, "counters", {str(k): int(v) for k, v in self.counters.items()})
        object.__setattr__(self, "queue_depth", {str(k): int(v) for k, v in self.queue_depth.items()})

    def to_dict(self) -> dict[str, Any]:
        return {
            "uptime_s": _t(self.uptime_s),
            "backend": self.backend,
            "model": self.model,
            "counters": dict(self.counters),
            "queue_depth": dict(self.queue_depth),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Status:
        return _build(
            cls,
            uptime_s=_num(d, "uptime_s"),
            backend=_str(d, "backend"),
            model=_str(d, "model"),
            counters=_counts(d, "counters"),
            queue_depth=_counts(d, "queue_depth"),
        )


MERGE_CAUSES = ("clustering", "enrolled_match", "control")


@dataclass(frozen=True)
class SpeakerRenamed:
    """Earlier events' ``old`` speaker is ``new``: rewrite them (a name given or changed; a
    provisional speaker enrolled under a new name gets an enrolled id). Later events carry ``new``."""

    TOPIC: ClassVar[str] = "speaker.renamed"
    old: SpeakerRef
    new: SpeakerRef

    def to_dict(self) -> dict[str, Any]:
        return {"old": self.old.to_dict(), "new": self.new.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpeakerRenamed:
        return _build(cls, old=_ref(d, "old"), new=_ref(d, "new"))


@dataclass(frozen=True)
class SpeakerMerged:
    """Speaker ``old`` was the same voice as ``new``: rewrite earlier events; ``old.id`` is not used
    again. ``cause``: ``clustering`` (two provisional speakers), ``enrolled_match`` (a provisional
    speaker matched an enrolled one) or ``control`` (a user said so)."""

    TOPIC: ClassVar[str] = "speaker.merged"
    old: SpeakerRef
    new: SpeakerRef
    cause: str

    def __post_init__(self) -> None:
        if self.cause not in MERGE_CAUSES:
            raise ValueError(f"cause must be one of {', '.join(MERGE_CAUSES)}, got {self.cause!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"old": self.old.to_dict(), "new": self.new.to_dict(), "cause": self.cause}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpeakerMerged:
        return _build(cls, old=_ref(d, "old"), new=_ref(d, "new"), cause=_str(d, "cause"))


@dataclass(frozen=True)
class Heartbeat:
    """Sent on the wall clock after ``interval_s`` without any other event (while anyone subscribes),
    so a subscriber can tell a dead daemon from a quiet room within about two intervals. ``subscriptions`` is how many topic
    subscriptions the daemon sees (XPUB; a subscriber to two prefixes counts twice)."""

    TOPIC: ClassVar[str] = "heartbeat"
    interval_s: float
    uptime_s: float
    subscriptions: int

    def __post_init__(self) -> None:
        _finite(type(self), interval_s=self.interval_s, uptime_s=self.uptime_s)

    def to_dict(self) -> dict[str, Any]:
        return {"interval_s": _t(self.interval_s), "uptime_s": _t(self.uptime_s), "subscriptions": int(self.subscriptions)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Heartbeat:
        return _build(
            cls, interval_s=_num(d, "interval_s"), uptime_s=_num(d, "uptime_s"), subscriptions=_int(d, "subscriptions")
        )


Payload = SpeechStart | SpeechEnd | SpeakerChange | SpeakerSegment | Status | SpeakerRenamed | SpeakerMerged | Heartbeat
PAYLOAD_TYPES: dict[str, type[Payload]] = {
    cls.TOPIC: cls
    for cls in (SpeechStart, SpeechEnd, SpeakerChange, SpeakerSegment, Status, SpeakerRenamed, SpeakerMerged, Heartbeat)
}


# --- envelope ---


def make_event(payload: Payload, *, seq: int, session: str, stream_time: float, wall_time: float) -> dict[str, Any]:
    """The flat wire object: envelope fields first, then the payload's.

    ``stream_time`` is the audio position (seconds since the session began, by sample count) at which
    the event was decided; ``wall_time`` the Unix time at which that sample was captured.
    """
    if type(payload) not in PAYLOAD_TYPES.values():
        raise TypeError(f"not an event payload: {payload!r}")
    if not (math.isfinite(stream_time) and math.isfinite(wall_time)):
        raise ValueError(f"event times must be finite, got stream_time={stream_time}, wall_time={wall_time}")
    return {
        "v": SCHEMA_VERSION,
        "type": payload.TOPIC,
        "seq": seq,
        "session": session,
        "stream_time": round(float(stream_time), TIME_DECIMALS),
        "wall_time": round(float(wall_time), WALL_TIME_DECIMALS),
        **payload.to_dict(),
    }


def encode_event(event: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON on one line (names stay readable; JSON lines never contain a raw newline)."""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def parse_event(topic: bytes | str, data: bytes | str) -> dict[str, Any]:
    """Decode one received ``[topic, json]`` and check its envelope; raise EventError if malformed.

    Unknown types pass (a newer daemon may add some); use ``decode_payload`` for the typed payload.
    """
    try:
        topic_s = topic.decode("utf-8") if isinstance(topic, bytes) else topic
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as e:
        raise EventError(f"event is not UTF-8: {e}") from None
    try:
        event = json.loads(text)
    except json.JSONDecodeError as e:
        raise EventError(f"event is not JSON: {e}") from None
    if not isinstance(event, dict):
        raise EventError(f"event must be a JSON object, got {type(event).__name__}")
    v = _int(event, "v")
    if v != SCHEMA_VERSION:
        raise EventError(f"unsupported event schema version {v} (this subscriber reads v{SCHEMA_VERSION})")
    etype = _str(event, "type")
    if etype != topic_s:
        raise EventError(f"topic {topic_s!r} does not match event type {etype!r}")
    if _int(event, "seq") < FIRST_SEQ:
        raise EventError(f"seq must be >= {FIRST_SEQ}, got {event['seq']}")
    if not _str(event, "session"):
        raise EventError("session must not be empty")
    if _num(event, "stream_time") < 0:
        raise EventError(f"stream_time must be >= 0, got {event['stream_time']}")
    _num(event, "wall_time")
    return event


def decode_payload(event: Mapping[str, Any]) -> Payload:
    """The typed payload of a parsed event; EventError for an unknown type or bad payload fields."""
    etype = _str(event, "type")
    cls = PAYLOAD_TYPES.get(etype)
    if cls is None:
        raise EventError(f"unknown event type {etype!r}")
    return cls.from_dict(event)


# --- JSON Schema ---

SCHEMA_NAMES = ("envelope", *PAYLOAD_TYPES)


def load_schema(name: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of an event type, or of the bare envelope (``"envelope"``)."""
    if name not in SCHEMA_NAMES:
        raise EventError(f"no schema for {name!r}; known: {', '.join(SCHEMA_NAMES)}")
    text = resources.files(__package__).joinpath("schemas", f"{name}.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def validate_event(event: Mapping[str, Any]) -> None:
    """Check a whole event against its type's schema; needs ``jsonschema`` (a dev/subscriber extra)."""
    try:
        import jsonschema
    except ImportError:
        raise SpeakerdError("validating events needs jsonschema: pip install 'speakerd[dev]'") from None
    etype = _str(event, "type")
    validator = jsonschema.Draft202012Validator(load_schema(etype if etype in PAYLOAD_TYPES else "envelope"))
    errors = sorted(validator.iter_errors(dict(event)), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(event)"
        raise EventError(f"{etype} event invalid at {where}: {first.message}")
