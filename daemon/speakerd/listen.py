"""``speakerd listen``: the reference subscriber, and a way to watch a running daemon.

Prints who speaks, finished turns and problems (every event with every figure with ``-v``, the raw
JSON with ``--json``), reports lost events (seq gaps) and malformed messages on stderr so JSON
output stays clean, and keeps going after either.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from collections.abc import Sequence
from typing import Any, TextIO

import zmq

from .errors import check
from .events import (
    ENVELOPE_FIELDS,
    PAYLOAD_TYPES,
    EventError,
    Heartbeat,
    SpeakerChange,
    SpeakerMerged,
    SpeakerRenamed,
    SpeakerSegment,
    SpeechEnd,
    SpeechStart,
    Status,
    decode_payload,
    parse_event,
)
from .publisher import PublishSettings, is_valid_endpoint
from .security import wants_ipv6

POLL_MS = 100
"""How often the receive loop looks at ``stop``."""


class SeqTracker:
    """Detects lost events from the envelope's seq; a new session id means a restart, not loss."""

    def __init__(self) -> None:
        self.session: str | None = None
        self.last_seq = 0

    def see(self, session: str, seq: int) -> str | None:
        """Record one event; return a message for the user if something happened between events."""
        if session != self.session:
            note = None if self.session is None else f"new session {session} (daemon restarted)"
            self.session, self.last_seq = session, seq
            return note
        expected = self.last_seq + 1
        self.last_seq = max(self.last_seq, seq)
        if seq > expected:
            return f"lost {seq - expected} events (seq {expected}-{seq - 1})"
        if seq < expected:
            return f"seq went back from {expected - 1} to {seq}"
        return None


def format_event(event: dict[str, Any]) -> str:
    """One readable line; EventError if a known type has a bad payload."""
    t = f"{event['stream_time']:7.2f}s"
    etype = event["type"]
    if etype not in PAYLOAD_TYPES:
        # A newer daemon's event: show its payload as is rather than hide it.
        extra = {k: v for k, v in event.items() if k not in ENVELOPE_FIELDS}
        return f"{t}  {etype}  {json.dumps(extra, separators=(',', ':'), ensure_ascii=False)}"
    payload = decode_payload(event)
    if isinstance(payload, SpeakerChange):
        line = f"{t}  speaker.change  {payload.speaker.label} (score {payload.score:.2f}, margin {payload.margin:.2f})"
        if payload.previous is not None:
            line += f" <- {payload.previous.label}"
        if payload.tentative:
            line += "  [tentative]"
        return line
    if isinstance(payload, SpeakerSegment):
        return (
            f"{t}  segment  {payload.speaker.label}  {payload.start:.2f}-{payload.end:.2f}s"
            f"  (score {payload.score:.2f}, {payload.windows} windows)"
        )
    if isinstance(payload, SpeechStart):
        return f"{t}  speech.start  {payload.start:.2f}s"
    if isinstance(payload, SpeechEnd):
        return f"{t}  speech.end  {payload.start:.2f}-{payload.end:.2f}s"
    if isinstance(payload, SpeakerRenamed):
        return f"{t}  speaker.renamed  {payload.old.label} -> {payload.new.label}"
    if isinstance(payload, SpeakerMerged):
        return f"{t}  speaker.merged  {payload.old.label} -> {payload.new.label} ({payload.cause})"
    if isinstance(payload, Heartbeat):
        return f"{t}  heartbeat  up {payload.uptime_s:.0f}s  {payload.subscriptions} subscription(s)"
    assert isinstance(payload, Status)
    counters = " ".join(f"{k}={v}" for k, v in sorted(payload.counters.items()))
    queues = " ".join(f"{k}={v}" for k, v in sorted(payload.queue_depth.items()))
    return (
        f"{t}  status  up {payload.uptime_s:.0f}s  {payload.backend}/{payload.model}  {counters}"
        + (f"  queues {queues}" if queues else "")
    )


PROBLEM_COUNTERS = (
    "overflows", "dropped_blocks", "dropped_windows", "dropped_events", "embed_errors", "device_errors", "reload_errors",
)  # fmt: skip
"""Status counters whose growth a person watching should see: audio, windows or events lost, errors."""


class Digest:
    """The readable view without ``-v``: who speaks (changes, and tentative ones withdrawn), finished
    turns, renames and merges, and problems (a problem counter that grew since the last status).
    Speech regions, heartbeats and the status counters are for ``-v`` and ``--json``."""

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}
        self._session: str | None = None

    def line(self, event: dict[str, Any]) -> str | None:
        """The line to print for ``event``, or None; EventError if a known type has a bad payload."""
        t = f"{event['stream_time']:7.2f}s"
        if event["type"] not in PAYLOAD_TYPES:
            return format_event(event)
        payload = decode_payload(event)
        if isinstance(payload, SpeakerChange):
            if payload.previous is not None and payload.previous.id == payload.speaker.id:
                return f"{t}  change   withdrawn: still {payload.speaker.label}"
            line = f"{t}  change   {payload.speaker.label}"
            if payload.previous is not None:
                line += f" <- {payload.previous.label}"
            return line + ("  [tentative]" if payload.tentative else "")
        if isinstance(payload, SpeakerSegment):
            return f"{t}  segment  {payload.speaker.label}  {payload.start:.2f}-{payload.end:.2f}s"
        if isinstance(payload, (SpeakerRenamed, SpeakerMerged)):
            return format_event(event)
        if isinstance(payload, Status):
            return self._problems(t, event["session"], payload)
        return None  # speech.start / speech.end / heartbeat

    def _problems(self, t: str, session: str, status: Status) -> str | None:
        if session != self._session:  # a restarted daemon counts from zero again
            self._session, self._seen = session, {}
        grew = []
        for name in PROBLEM_COUNTERS:
            now = status.counters.get(name, 0)
            if now > self._seen.get(name, 0):
                grew.append(f"{name} +{now - self._seen.get(name, 0)} ({now} in all)")
            self._seen[name] = now
        down = status.counters.get("device_down", 0)
        if down != self._seen.get("device_down", 0):
            grew.append("microphone lost, reopening it" if down else "microphone back")
        self._seen["device_down"] = down
        return f"{t}  problem  {', '.join(grew)}" if grew else None


def _json_line(raw: bytes, event: dict[str, Any]) -> str:
    """The raw JSON as received, unless it spans lines (another producer's pretty-printing)."""
    text = raw.decode("utf-8")
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False) if "\n" in text else text


def listen(
    endpoint: str,
    *,
    as_json: bool,
    topics: Sequence[str] = ("",),
    out: TextIO | None = None,
    err: TextIO | None = None,
    stop: threading.Event | None = None,
    max_events: int | None = None,
    context: zmq.Context | None = None,
    curve: Any = None,
    verbose: bool = False,
) -> int:
    """Subscribe to ``endpoint`` and print events until ``stop``, ``max_events`` or Ctrl-C; returns 0.

    Readable output is the :class:`Digest` of the events, or with ``verbose`` one line per event
    with every figure. ``max_events`` counts events received, printed or not. ``out``/``err``
    default to sys.stdout/sys.stderr at call time. Seq gaps are only reported when subscribed to
    every topic: with a prefix filter, the events filtered out leave gaps too.
    """
    check(is_valid_endpoint(endpoint), "listen.sub", endpoint, "must look like tcp://host:port, ipc://path or inproc://name")
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    track_loss = "" in topics
    ctx = context if context is not None else zmq.Context()
    received = 0
    tracker = SeqTracker()
    digest = None if as_json or verbose else Digest()
    try:
        with ctx.socket(zmq.SUB) as sock:
            sock.setsockopt(zmq.LINGER, 0)
            for topic in topics:
                sock.setsockopt(zmq.SUBSCRIBE, topic.encode("utf-8"))
            if wants_ipv6(endpoint):
                sock.setsockopt(zmq.IPV6, 1)  # the daemon binds tcp://[::1] (docs call it local)
            if curve is not None:
                curve.apply_client(sock)
            sock.connect(endpoint)
            if not as_json:
                what = "all events" if track_loss else ", ".join(repr(t) for t in topics)
                print(f"listening to {endpoint} for {what} (Ctrl-C to stop)", file=err, flush=True)
            while (stop is None or not stop.is_set()) and (max_events is None or received < max_events):
                if not sock.poll(POLL_MS):
                    continue
                frames = sock.recv_multipart(zmq.NOBLOCK)
                try:
                    if len(frames) != 2:
                        raise EventError(f"expected 2 frames [topic, json], got {len(frames)}")
                    event = parse_event(frames[0], frames[1])
                    if event["type"] in PAYLOAD_TYPES:
                        decode_payload(event)  # a known type must carry a valid payload, in both modes
                    if as_json:
                        line: str | None = _json_line(frames[1], event)
                    else:
                        line = format_event(event) if digest is None else digest.line(event)
                except EventError as e:
                    print(f"malformed event skipped: {e}", file=err, flush=True)
                    continue
                note = tracker.see(event["session"], event["seq"]) if track_loss else None
                if note:
                    print(note, file=err, flush=True)
                if line is not None:
                    print(line, file=out, flush=True)
                received += 1
    except KeyboardInterrupt:
        pass
    finally:
        if context is None:
            ctx.term()
    return 0


def add_listen_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``speakerd listen``; the CLI owns the sub-command itself."""
    parser.add_argument(
        "--config",
        metavar="F",
        help="the daemon's TOML settings: its publish.endpoint, and the keys of daemon.curve_keys when set",
    )
    parser.add_argument(
        "--sub",
        metavar="ENDPOINT",
        help=f"the daemon's publish endpoint (default: publish.endpoint of --config, else {PublishSettings().endpoint})",
    )
    parser.add_argument("--json", action="store_true", help="print each event as its raw JSON line")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,  # `speakerd -v listen` counts too
        help="one line per event with every figure: scores, margins, speech regions, heartbeats and "
        "status counters (default: changes, segments and problems only)",
    )
    parser.add_argument(
        "--topic",
        action="append",
        metavar="PREFIX",
        help="only events whose type starts with PREFIX, e.g. 'speaker.' (repeatable; default: all)",
    )
    parser.add_argument("--max-events", type=int, metavar="N", help="exit after N events")
    parser.add_argument(
        "--curve-keys",
        metavar="DIR",
        help="CURVE key directory holding client.key_secret and the daemon's server.key, for a daemon with "
        "daemon.curve_keys; without it, the keys in daemon.curve_keys of --config are used, if set",
    )


def listen_target(args: argparse.Namespace) -> tuple[str, Any]:
    """The endpoint and CURVE client keys (or None) the options ask for (see ``subscribe_target``)."""
    return subscribe_target(args.config, args.sub, args.curve_keys)


def subscribe_target(
    config: str | Path | None = None, endpoint: str | None = None, curve_keys: str | Path | None = None
) -> tuple[str, Any]:
    """Where a subscriber connects, and its CURVE client keys (or None): ``endpoint`` and
    ``curve_keys`` first, then ``config``'s ``publish.endpoint`` and ``daemon.curve_keys``.
    Shared by ``speakerd listen`` and ``speakerd.client.Subscriber.from_config``."""
    from .security import CurveClient, require_curve_to_connect
    from .settings import load_settings

    settings = load_settings(Path(config) if config else None)
    endpoint = endpoint or settings.publish.endpoint
    curve = None
    if curve_keys:
        curve = CurveClient.from_dir(Path(curve_keys).expanduser())
    elif settings.daemon.curve_keys:  # as `speakerd speakers` does: the daemon's own keys, or a client's
        curve = CurveClient.for_daemon_keys(Path(settings.daemon.curve_keys).expanduser())
    require_curve_to_connect(endpoint, curve, what="publish", option="--curve-keys DIR")
    return endpoint, curve


def main_listen(args: argparse.Namespace) -> int:
    # Ctrl-C and `kill -INT` stop the listener even when it was started from a script with `&`,
    # whose shell hands background commands an ignored SIGINT (Python then never raises
    # KeyboardInterrupt, and the listener outlived every SIGINT: seen in a CI run started so).
    # Only the main thread may set a handler; a caller running it in a thread stops it its own way.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    endpoint, curve = listen_target(args)
    return listen(endpoint, as_json=args.json, topics=tuple(args.topic or ("",)), max_events=args.max_events, curve=curve,
                  verbose=getattr(args, "verbose", 0) > 0)


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="speakerd listen", description=__doc__)
    add_listen_arguments(_parser)
    sys.exit(main_listen(_parser.parse_args()))
