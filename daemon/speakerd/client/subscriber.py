"""``Subscriber``: a SUB socket on a running daemon that feeds a ``SpeakerTimeline``.

It connects where ``speakerd listen`` would (``from_config``: the config's ``publish.endpoint``
and CURVE keys, resolved by the same code), checks each event's envelope, reports lost events
(``seq`` gaps, which a new ``session`` is not), and survives the daemon's restarts: ZeroMQ
reconnects by itself, and after ``silence_s`` without any event (heartbeats come every 2 s while
anyone subscribes) the socket is made anew. It runs as an iterator or in its own thread; waiting
is a blocking ``poll`` with a short timeout, so ``stop()`` is honoured promptly and nothing spins.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import zmq

from ..events import EventError, PAYLOAD_TYPES, decode_payload, parse_event
from ..security import wants_ipv6
from .timeline import SpeakerTimeline

logger = logging.getLogger(__name__)

POLL_MS = 100
"""How long one wait for an event blocks before ``stop`` is looked at again."""
SILENCE_S = 6.0
"""Three heartbeat intervals without any event: the daemon is gone, or the connection is stuck."""
STOP_TIMEOUT_S = 5.0


class CurveKeys(Protocol):
    """What a SUB socket needs to talk to a CURVE daemon (``speakerd.security.CurveClient``)."""

    def apply_client(self, sock: zmq.Socket) -> None: ...


@dataclass(frozen=True)
class Gap:
    """Events ``first``-``last`` (seq) of ``session`` never arrived (the daemon's or this
    subscriber's queue was full): the timeline may lack a change or a segment there."""

    session: str
    first: int
    last: int

    @property
    def count(self) -> int:
        return self.last - self.first + 1


@dataclass
class SubscriberStats:
    received: int = 0
    lost: int = 0
    malformed: int = 0
    restarts: int = 0
    reconnects: int = 0


class Subscriber:
    """Receive the daemon's events, feed ``timeline``, and yield them (``events()``) or hand them
    to ``on_event`` from a thread (``start()``/``stop()``, or ``with``)."""

    def __init__(
        self,
        endpoint: str,
        *,
        curve: CurveKeys | None = None,
        timeline: SpeakerTimeline | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        on_gap: Callable[[Gap], None] | None = None,
        on_restart: Callable[[str], None] | None = None,
        silence_s: float = SILENCE_S,
        context: zmq.Context | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.curve = curve
        self.timeline = timeline if timeline is not None else SpeakerTimeline()
        self.on_event = on_event
        self.on_gap = on_gap
        self.on_restart = on_restart
        self.silence_s = silence_s
        self.stats = SubscriberStats()
        self._context = context
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._session: str | None = None
        self._last_seq = 0

    @classmethod
    def from_config(
        cls, config: str | Path | None = None, *, endpoint: str | None = None, curve_keys: str | Path | None = None, **kwargs: Any
    ) -> Subscriber:
        """Where ``speakerd listen --config F [--sub E] [--curve-keys DIR]`` would connect."""
        from ..listen import subscribe_target

        target, curve = subscribe_target(config, endpoint, curve_keys)
        return cls(target, curve=curve, **kwargs)

    # -- receiving -------------------------------------------------------------------------------

    def events(self, idle_timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Yield each event (already applied to the timeline) until ``stop()``, or until
        ``idle_timeout`` seconds pass without one (then return)."""
        ctx = self._context if self._context is not None else zmq.Context()
        sock = self._connect(ctx)
        last = time.monotonic()
        warned = False
        try:
            while not self._stop.is_set():
                if not sock.poll(POLL_MS):
                    quiet = time.monotonic() - last
                    if idle_timeout is not None and quiet >= idle_timeout:
                        return
                    if quiet >= self.silence_s:
                        if not warned:
                            logger.warning("no event from %s for %.0f s: reconnecting until the daemon is back", self.endpoint, quiet)
                            warned = True
                        sock.close(0)
                        sock = self._connect(ctx)
                        self.stats.reconnects += 1
                        last = time.monotonic()
                    continue
                frames = sock.recv_multipart(zmq.NOBLOCK)
                last, warned = time.monotonic(), False
                event = self._accept(frames)
                if event is not None:
                    yield event
        finally:
            sock.close(0)
            if self._context is None:
                ctx.term()

    __iter__ = events

    def _connect(self, ctx: zmq.Context) -> zmq.Socket:
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")  # everything: seq gaps then mean loss
        if wants_ipv6(self.endpoint):
            sock.setsockopt(zmq.IPV6, 1)  # the daemon binds tcp://[::1] (docs call it local)
        if self.curve is not None:
            self.curve.apply_client(sock)
        sock.connect(self.endpoint)
        return sock

    def _accept(self, frames: Sequence[bytes]) -> dict[str, Any] | None:
        try:
            if len(frames) != 2:
                raise EventError(f"expected 2 frames [topic, json], got {len(frames)}")
            event = parse_event(frames[0], frames[1])
            if event["type"] in PAYLOAD_TYPES:
                decode_payload(event)
        except EventError as e:
            self.stats.malformed += 1
            logger.warning("malformed event skipped: %s", e)
            return None
        self._sequence(event["session"], event["seq"])
        self.timeline.feed(event)
        self.stats.received += 1
        return event

    def _sequence(self, session: str, seq: int) -> None:
        if session != self._session:
            if self._session is not None:
                self.stats.restarts += 1
                logger.info("daemon restarted: session %s", session)
                if self.on_restart is not None:
                    self.on_restart(session)
            self._session, self._last_seq = session, seq
            return
        if seq > self._last_seq + 1:
            gap = Gap(session, self._last_seq + 1, seq - 1)
            self.stats.lost += gap.count
            logger.warning("lost %d events (seq %d-%d of session %s)", gap.count, gap.first, gap.last, session)
            if self.on_gap is not None:
                self.on_gap(gap)
        self._last_seq = max(self._last_seq, seq)

    # -- in a thread -----------------------------------------------------------------------------

    def start(self) -> Subscriber:
        if self._thread is not None:
            raise RuntimeError("this subscriber is already running")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="speakerd-subscriber")
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            for event in self.events():
                if self.on_event is not None:
                    self.on_event(event)
        except BaseException as e:  # handed to stop(): a callback's bug must not vanish with the thread
            logger.exception("subscriber stopped by an error")
            self._error = e

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop receiving (from any thread) and wait for the thread; re-raises what ended it."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                raise RuntimeError(f"subscriber thread did not stop within {timeout} s")
        error, self._error = self._error, None
        if error is not None:
            raise error

    def __enter__(self) -> Subscriber:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
