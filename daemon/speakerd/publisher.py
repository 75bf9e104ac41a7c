"""Publishes events on a ZeroMQ XPUB socket without ever making the pipeline wait.

XPUB, not PUB, so the daemon sees subscriptions arrive and leave: it counts them (status,
heartbeat) and can wait for the first one (``wait_for_subscriber``) instead of sleeping to dodge
the slow-joiner problem. While anyone subscribes, a heartbeat fills every silence of
``heartbeat_s`` on the wall clock, so no subscriber goes longer than that without an event.

``publish()`` only assigns a seq, encodes and appends to a bounded in-process queue; a single owner
thread creates, uses and closes the socket. Nothing can block the caller: a full queue drops the
event (counted; the seq gap tells subscribers), and ZeroMQ's PUB socket drops, per subscriber, what a
subscriber that does not read leaves beyond its high-water mark (the seq gap again tells it so).

Any local process can subscribe, and ZeroMQ keeps every subscription in a trie (about 50 bytes of
memory per byte of topic) that it fills in one unbounded loop. So subscribers connect through a
``guard.Gate``: a connection holding more than ``MAX_SUBSCRIPTIONS_PER_CONNECTION`` subscriptions
or subscribing to a topic over ``MAX_TOPIC_BYTES`` is closed (ZeroMQ then frees its subscriptions),
and at most ``MAX_SUBSCRIBERS`` are connected at once; ZeroMQ's ``MAXMSGSIZE`` caps any frame.
Subscription messages are read in bounded batches, so a flood never keeps the socket thread from
noticing ``close()``.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import re
import socket
import stat
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from types import TracebackType
from typing import TextIO

import zmq

from .errors import SpeakerdError, check
from .events import FIRST_SEQ, Heartbeat, Payload, encode_event, make_event, new_session_id
from .guard import Gate, why_not_bound
from .meters import SubscriptionMeter
from .security import wants_ipv6

logger = logging.getLogger(__name__)

_ENDPOINT = re.compile(
    r"""^(?:tcp://(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9*][A-Za-z0-9.*_-]*):(?:\*|[0-9]{1,5})
         |ipc://.+
         |inproc://.+)$""",
    re.VERBOSE,
)
_LOOPBACK_HOSTS = ("127.", "[::1]", "localhost")
_START_TIMEOUT_S = 10.0
"""How long start() waits for the thread to report the bind; binding is local, so this is generous."""
_JOIN_SLACK_S = 1.0
MAX_FRAME_BYTES = 512
"""Largest frame a subscriber may send (a CURVE handshake command is about 300 bytes); ZeroMQ drops
the connection of a peer that sends a larger one, before allocating it."""
MAX_TOPIC_BYTES = 64
"""Longest subscription accepted (the longest topic is 15 bytes, so a longer one matches nothing)."""
MAX_SUBSCRIPTIONS_PER_CONNECTION = 64
MAX_SUBSCRIBERS = 128
"""Subscriber connections at once; with the two limits above, subscriptions cost at most ~30 MB."""
_SUBSCRIPTION_BATCH = 1000
_GATE_DRAIN_S = 0.3
"""At close, how long the gate may take to hand subscribers what the socket flushed last."""
"""Subscription messages read per pass of the socket thread, so a flood cannot hold it."""
EVENTS_OUT_MODE = 0o600
"""Who spoke when is private: a new events_out file is readable by its owner only."""


def _subscription_meter() -> SubscriptionMeter:
    return SubscriptionMeter(MAX_SUBSCRIPTIONS_PER_CONNECTION, MAX_TOPIC_BYTES)


def is_valid_endpoint(endpoint: str) -> bool:
    """tcp://host:port (port may be ``*`` for an ephemeral one), ipc://path or inproc://name."""
    if not isinstance(endpoint, str) or not _ENDPOINT.match(endpoint):
        return False
    if endpoint.startswith("tcp://"):
        port = endpoint.rsplit(":", 1)[1]
        return port == "*" or 0 <= int(port) <= 65535
    return True


class PublishError(SpeakerdError):
    """The publisher cannot start: the endpoint cannot be bound or events_out cannot be opened.

    A set-up problem, found before any audio is read: exit code 2 like any other bad setting."""

    exit_code = 2


@dataclass(frozen=True)
class PublishSettings:
    """Where and how events go out.

    The default endpoint is loopback only: who is speaking is private, so exposing it to the network
    must be a deliberate choice.
    """

    endpoint: str = "tcp://127.0.0.1:5560"
    hwm: int = 1000
    """ZeroMQ send high-water mark (messages queued per subscriber before ZeroMQ drops for it)."""
    queue_events: int = 10000
    """Bound of the in-process queue between publish() and the socket thread."""
    linger_ms: int = 500
    """How long close() lets ZeroMQ flush unsent messages."""
    events_out: str | None = None
    """Also append every event as one JSON line to this path; "-" is stdout."""
    heartbeat_s: float = 2.0
    """While anyone subscribes, a ``heartbeat`` goes out after this many seconds (wall clock)
    without any other event; 0 turns them off."""
    wait_for_subscriber_s: float = 0.0
    """Before audio starts, wait up to this long for a first subscriber (0: do not wait)."""

    def __post_init__(self) -> None:
        check(
            is_valid_endpoint(self.endpoint),
            "publish.endpoint",
            self.endpoint,
            "must look like tcp://host:port, ipc://path or inproc://name",
        )
        check(isinstance(self.hwm, int) and self.hwm >= 1, "publish.hwm", self.hwm, "must be an integer >= 1")
        check(
            isinstance(self.queue_events, int) and self.queue_events >= 1,
            "publish.queue_events",
            self.queue_events,
            "must be an integer >= 1",
        )
        check(
            isinstance(self.linger_ms, int) and self.linger_ms >= 0,
            "publish.linger_ms",
            self.linger_ms,
            "must be an integer >= 0 (a bounded wait at shutdown)",
        )
        check(
            self.events_out is None or (isinstance(self.events_out, str) and self.events_out != ""),
            "publish.events_out",
            self.events_out,
            'must be a file path, "-" for stdout, or unset',
        )
        check(
            self.heartbeat_s == 0 or 0.1 <= self.heartbeat_s <= 3600,
            "publish.heartbeat_s",
            self.heartbeat_s,
            "must be 0 (off) or within 0.1 to 3600 s",
        )
        check(
            0 <= self.wait_for_subscriber_s <= 86400,
            "publish.wait_for_subscriber_s",
            self.wait_for_subscriber_s,
            "must be within 0 and 86400 s",
        )


class EventPublisher:
    """The daemon's one PUB socket, owned by its own thread. Use as a context manager.

    ``publish()`` is thread-safe and never blocks. Events published before ``start()`` wait in the
    queue and go out once the socket is bound.
    """

    def __init__(
        self,
        settings: PublishSettings,
        *,
        session: str | None = None,
        context: zmq.Context | None = None,
        curve: object | None = None,
    ) -> None:
        self.settings = settings
        self.session = session or new_session_id()
        self._context = context
        self._own_context = context is None
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self._next_seq = FIRST_SEQ
        self._published = 0
        self._dropped = 0
        self._closing = False
        self._closed = False
        self._deadline = 0.0
        self._warned_after_close = False
        self._warned_send_error = False
        self._thread: threading.Thread | None = None
        self._endpoint: str | None = None
        self._curve = curve
        self._subscriptions = 0
        self._gate: Gate | None = None
        self._last_stream_time = 0.0
        self._started = time.monotonic()
        self._last_publish = time.monotonic()
        self._in_flight = 0
        self._wake_r, self._wake_w = socket.socketpair()
        """The socket thread sleeps in one poll on the XPUB socket and ``_wake_r``; ``publish`` and
        ``close`` write a byte to wake it. No timeout polling: an idle daemon's publisher thread woke
        20 times a second and cost 0.4 % of a core (bench's live run)."""
        for s in (self._wake_r, self._wake_w):
            s.setblocking(False)
        self._sleeping = False
        """The socket thread is (about to be) in its poll: a new event must wake it."""
        self._polls = 0
        """Times the socket thread went to sleep (tests check an idle publisher stays asleep)."""

    # --- lifecycle ---

    def __enter__(self) -> EventPublisher:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Bind in the owner thread and wait until it reports success; PublishError if it cannot."""
        if self._thread is not None or self._closed:
            raise RuntimeError("EventPublisher.start() called twice or after close()")
        from .security import SecurityError, prepare_endpoint

        try:
            prepare_endpoint(self.settings.endpoint, self._curve, what="publish")
        except SecurityError as e:
            raise PublishError(f"cannot publish events on {self.settings.endpoint}: {e}") from None
        self._started = time.monotonic()
        bind = self.settings.endpoint
        if not bind.startswith("inproc://"):  # in-process subscribers need no gate
            self._gate = Gate(self.settings.endpoint, _subscription_meter, max_connections=MAX_SUBSCRIBERS, what="publish")
            try:
                self._gate.bind()
            except OSError as e:
                self._gate = None
                raise PublishError(f"cannot publish events on {self.settings.endpoint}: {why_not_bound(e)}") from None
            bind = self._gate.inner_endpoint
        if self._context is None:
            self._context = zmq.Context()
        ready: Future[str] = Future()
        self._thread = threading.Thread(target=self._run, args=(bind, ready), name="speakerd-publisher", daemon=True)
        self._thread.start()
        try:
            self._endpoint = ready.result(timeout=_START_TIMEOUT_S)
        except PublishError:
            self._thread.join()
            self._thread = None
            self._closed = True
            self._close_gate()
            self._term_context()
            self._close_wake()
            raise
        if self._gate is not None:
            self._gate.start()
            self._endpoint = self._gate.endpoint
        logger.info("publishing events on %s (session %s)", self._endpoint, self.session)
        if self._endpoint.startswith("tcp://") and not self._endpoint[6:].startswith(_LOOPBACK_HOSTS):
            logger.warning("events are published beyond this machine on %s", self._endpoint)

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued (for at most ``timeout`` s), close the socket with linger, join. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._closing = True
            self._deadline = time.monotonic() + timeout
            self._cond.notify_all()
            self._wake()
        thread = self._thread
        if thread is None:
            # Never started: whatever was queued will never be sent.
            with self._cond:
                self._dropped += len(self._queue)
                self._queue.clear()
        else:
            thread.join(timeout + self.settings.linger_ms / 1000 + _JOIN_SLACK_S)
            if thread.is_alive():
                # Only a blocked events_out write can hold it; the socket is not closed, so keep the context.
                logger.error("publisher thread did not stop within %.1f s", timeout)
                self._close_gate()
                return
        self._close_gate(_GATE_DRAIN_S)  # after the socket: subscribers get the last events first
        self._term_context()
        self._close_wake()
        stats = self.stats()
        logger.info("publisher closed: %d published, %d dropped", stats["published"], stats["dropped_events"])

    def _close_gate(self, drain_s: float = 0.0) -> None:
        if self._gate is not None:
            self._gate.close(drain_s)
            self._gate = None

    def _close_wake(self) -> None:
        for s in (self._wake_r, self._wake_w):
            s.close()

    def _wake(self) -> None:
        """Wake the socket thread from its poll (caller holds ``_cond``); one byte per sleep."""
        if self._sleeping:
            self._sleeping = False
            try:
                self._wake_w.send(b"x")
            except OSError:  # closed, or full: either way the thread is not asleep for long
                pass

    def _term_context(self) -> None:
        if self._own_context and self._context is not None:
            self._context.term()
            self._context = None

    # --- the caller's side ---

    def publish(self, payload: Payload, *, stream_time: float, wall_time: float) -> None:
        """Queue one event; never blocks. A full queue (or a closed publisher) drops and counts it.

        The seq is assigned here, so a drop anywhere after this point shows subscribers a gap.
        """
        with self._cond:
            if isinstance(payload, Heartbeat):
                stream_time = self._last_stream_time  # the wall clock's event: keep stream time monotone
            else:
                self._last_stream_time = max(self._last_stream_time, stream_time)
            event = make_event(
                payload, seq=self._next_seq, session=self.session, stream_time=stream_time, wall_time=wall_time
            )
            self._last_publish = time.monotonic()
            data = encode_event(event)
            self._next_seq += 1
            if self._closing:
                self._dropped += 1
                if not self._warned_after_close:
                    self._warned_after_close = True
                    logger.warning("event published after close() was dropped (seq %d)", event["seq"])
                return
            if len(self._queue) >= self.settings.queue_events:
                self._dropped += 1
                return
            self._queue.append((payload.TOPIC.encode("ascii"), data))
            self._cond.notify()
            self._wake()

    def stats(self) -> dict[str, int]:
        """Counters for the status event: published, dropped_events, queue_depth."""
        with self._cond:
            return {"published": self._published, "dropped_events": self._dropped, "queue_depth": len(self._queue)}

    @property
    def gate(self) -> Gate | None:
        """The gate subscribers connect through (None for inproc)."""
        return self._gate

    @property
    def subscribers(self) -> int:
        """Topic subscriptions currently seen on the XPUB socket."""
        with self._cond:
            return self._subscriptions

    def drain(self, timeout: float) -> bool:
        """Wait until every event published so far has been handed to the socket (True) or
        ``timeout`` s pass (False), so a final status can count them all."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._in_flight or self._closed, timeout=timeout)

    def wait_for_subscriber(self, timeout: float) -> bool:
        """Block until a first subscription arrives (True) or ``timeout`` s pass (False).

        An event published after this returns True reaches that subscriber: no sleep needed."""
        with self._cond:
            return self._cond.wait_for(lambda: self._subscriptions > 0 or self._closing, timeout=timeout) and (
                self._subscriptions > 0
            )

    @property
    def bound_endpoint(self) -> str:
        """The endpoint actually bound (a tcp ``*`` port resolved to the real one)."""
        if self._endpoint is None:
            raise RuntimeError("EventPublisher is not started")
        return self._endpoint

    # --- the owner thread ---

    def _socket(self) -> zmq.Socket:
        assert self._context is not None
        s = self.settings
        sock = self._context.socket(zmq.XPUB)
        sock.setsockopt(zmq.SNDHWM, s.hwm)
        sock.setsockopt(zmq.LINGER, s.linger_ms)
        sock.setsockopt(zmq.XPUB_VERBOSER, 1)  # every subscribe and unsubscribe, so the count is exact
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        sock.setsockopt(zmq.BACKLOG, MAX_SUBSCRIBERS)  # the gate may connect them all at once
        if wants_ipv6(s.endpoint):
            sock.setsockopt(zmq.IPV6, 1)
        if self._curve is not None:
            self._curve.apply_server(sock)  # type: ignore[attr-defined]
        return sock

    def _run(self, bind: str, ready: Future[str]) -> None:
        s = self.settings
        sock = self._socket()
        out: TextIO | None = None
        try:
            try:
                sock.bind(bind)
            except zmq.ZMQError as e:
                hint = " (is another speakerd running?)" if e.errno == zmq.EADDRINUSE else ""
                raise PublishError(f"cannot publish events on {s.endpoint}: {e.strerror}{hint}") from None
            endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT) or s.endpoint
            if s.events_out == "-":
                out = sys.stdout
            elif s.events_out is not None:
                out = open_events_out(s.events_out)
        except PublishError as e:
            sock.close(linger=0)
            ready.set_exception(e)
            return
        ready.set_result(endpoint)
        try:
            out = self._loop(sock, out)
        finally:
            sock.close(linger=s.linger_ms)
            if out is not None and out is not sys.stdout:
                out.close()

    def _loop(self, sock: zmq.Socket, out: TextIO | None) -> TextIO | None:
        """Send until closing and drained (or the drain deadline passes); returns events_out if still open."""
        beat = self.settings.heartbeat_s
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while True:
            self._read_subscriptions(sock)
            if beat and self._quiet_for(beat):
                self.publish(
                    Heartbeat(interval_s=beat, uptime_s=time.monotonic() - self._started, subscriptions=self.subscribers),
                    stream_time=0.0,
                    wall_time=time.time(),
                )
            sleep: float | None = None
            with self._cond:
                idle = not self._queue
                if idle:
                    if self._closing:
                        return out
                    self._sleeping = True
                    sleep = self._until_heartbeat(beat)
            if idle:
                self._polls += 1
                poller.poll(None if sleep is None else max(1, math.ceil(sleep * 1000)))
                with self._cond:
                    self._sleeping = False
                self._drain_wake()
                continue
            with self._cond:
                batch = list(self._queue)
                self._queue.clear()
                self._in_flight = len(batch)
            for i, (topic, data) in enumerate(batch):
                if self._closing and time.monotonic() > self._deadline:
                    with self._cond:
                        late = len(batch) - i + len(self._queue)
                        self._dropped += late
                        self._queue.clear()
                        self._in_flight = 0
                        self._cond.notify_all()
                    logger.warning("close(): %d queued events not sent before the timeout", late)
                    return out
                sent = self._send(sock, topic, data)
                if out is not None:
                    out = self._write_line(out, data)
                with self._cond:
                    if sent:
                        self._published += 1
                    else:
                        self._dropped += 1
                    self._in_flight -= 1
                    if not self._in_flight and not self._queue:
                        self._cond.notify_all()

    def _until_heartbeat(self, beat: float) -> float | None:
        """Seconds until a heartbeat is due, None while none can be (off, or nobody subscribes);
        a subscription wakes the poll anyway. Caller holds ``_cond``."""
        if not beat or self._subscriptions == 0:
            return None
        return max(0.0, beat - (time.monotonic() - self._last_publish))

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(64):
                pass
        except OSError:  # BlockingIOError: drained
            pass

    def _quiet_for(self, seconds: float) -> bool:
        """Time for a heartbeat: someone subscribes and nothing was published for ``seconds``.

        Any event shows the daemon is alive, so heartbeats fill only the silences, and the last
        event of a session stays the pipeline's final status."""
        with self._cond:
            return (
                not self._closing and self._subscriptions > 0 and time.monotonic() - self._last_publish >= seconds
            )

    def _read_subscriptions(self, sock: zmq.Socket) -> None:
        """Count (un)subscriptions: XPUB delivers them as b"\\x01topic" / b"\\x00topic". At most
        ``_SUBSCRIPTION_BATCH`` per call."""
        changed = False
        for _ in range(_SUBSCRIPTION_BATCH):
            try:
                msg = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if msg[:1] == b"\x01":
                delta = 1
            elif msg[:1] == b"\x00":
                delta = -1
            else:
                continue
            with self._cond:
                self._subscriptions = max(0, self._subscriptions + delta)
            changed = True
            logger.debug("%s %r", "subscribed" if delta > 0 else "unsubscribed", msg[1:])
        if changed:
            with self._cond:
                self._cond.notify_all()

    def _send(self, sock: zmq.Socket, topic: bytes, data: bytes) -> bool:
        try:
            sock.send_multipart([topic, data], flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            # PUB drops silently at a subscriber's HWM; Again only comes from socket types that refuse.
            return False
        except zmq.ZMQError as e:
            if not self._warned_send_error:
                self._warned_send_error = True
                logger.error("sending events failed, dropping them: %s", e)
            return False

    def _write_line(self, out: TextIO, data: bytes) -> TextIO | None:
        """One JSON line per event, flushed so a tail -f or a pipe sees it at once. Stop on a write error."""
        try:
            out.write(data.decode("utf-8") + "\n")
            out.flush()
            return out
        except (OSError, ValueError) as e:
            logger.error("events_out %s failed, no longer writing it: %s", self.settings.events_out, e)
            if out is not sys.stdout:
                out.close()
            return None


def open_events_out(path: str) -> TextIO:
    """``path`` for appending JSON lines, created 0600 (who spoke when is private). An existing
    file keeps its mode; if others can read it, say so once."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, EVENTS_OUT_MODE)
    except OSError as e:
        raise PublishError(f"cannot open events_out {path}: {e.strerror}") from None
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    if mode & 0o077:
        logger.warning("events_out %s is mode %o: other users can read who spoke when; chmod 600 it", path, mode)
    return os.fdopen(fd, "a", encoding="utf-8")
