"""Meters that follow the ZMTP 3 frames a client sends, for ``guard.Gate``.

- ``RequestMeter`` (control): a connection whose message in progress passes ``limit`` bytes is
  closed before the rest is read; ZeroMQ drops the incomplete message.
- ``SubscriptionMeter`` (events): a connection that holds more than ``max_subscriptions`` at once,
  or subscribes to a topic over ``max_topic_bytes``, is closed; ZeroMQ then frees its subscriptions.

With CURVE every frame is encrypted on its own, so the meters see frames, not messages or topics;
only authorised clients get past the handshake there, and ``MAXMSGSIZE`` still caps each frame.
"""

from __future__ import annotations

GREETING_BYTES = 64
"""A ZMTP 3 greeting; byte 0 is 0xFF and byte 10 the major version."""
FRAME_SLACK = 64
"""Bytes of a request beyond its payload: the empty delimiter frame and the frame headers."""
_PREFIX_BYTES = 11
"""Body bytes a meter sees of each frame: enough for a command name (``\\x09SUBSCRIBE``)."""
_MORE, _LONG, _COMMAND = 1, 2, 4


class FrameMeter:
    """Follows the ZMTP 3 frames one client sends; ``feed`` returns None while the client may go
    on, otherwise why its connection must close. Subclasses judge each frame in ``frame``."""

    def __init__(self) -> None:
        self._greeting = 0
        self._header = bytearray()
        self._prefix = bytearray()
        self._want_prefix = 0
        self._body_left = 0

    def feed(self, data: bytes) -> str | None:
        i, n = 0, len(data)
        while i < n:
            if self._greeting < GREETING_BYTES:
                why = self._check_greeting(data[i])
                i += 1
            elif self._want_prefix:
                take = min(self._want_prefix, n - i)
                self._prefix += data[i : i + take]
                self._want_prefix -= take
                self._body_left -= take
                i += take
                why = None if self._want_prefix else self._judge()
            elif self._body_left:
                take = min(self._body_left, n - i)
                self._body_left -= take
                i += take
                why = None
            else:
                self._header.append(data[i])
                i += 1
                why = self._header_done()
            if why:
                return why
        return None

    def _check_greeting(self, b: int) -> str | None:
        if self._greeting == 0 and b != 0xFF or self._greeting == 10 and b < 3:
            return "it does not speak ZMTP 3 (libzmq 4 or later)"
        self._greeting += 1
        return None

    def _header_done(self) -> str | None:
        size_bytes = 8 if self._header[0] & _LONG else 1
        if len(self._header) < 1 + size_bytes:
            return None
        self._body_left = int.from_bytes(self._header[1:], "big")
        self._want_prefix = min(self._body_left, _PREFIX_BYTES)
        self._prefix.clear()
        return None if self._want_prefix else self._judge()

    def _judge(self) -> str | None:
        flags, size_bytes = self._header[0], 8 if self._header[0] & _LONG else 1
        size = int.from_bytes(self._header[1:], "big")
        self._header.clear()
        return self.frame(flags, 1 + size_bytes + size, size, bytes(self._prefix))

    def frame(self, flags: int, wire: int, size: int, prefix: bytes) -> str | None:
        """One frame: its flags, bytes on the wire, body size and first body bytes."""
        raise NotImplementedError


class RequestMeter(FrameMeter):
    """Control requests: the frames of one message together stay within ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self._message = 0

    def frame(self, flags: int, wire: int, size: int, prefix: bytes) -> str | None:
        if flags & _COMMAND:  # handshake, ping: ZeroMQ's MAXMSGSIZE caps them
            return None
        self._message += wire
        if self._message > self.limit + FRAME_SLACK:
            return f"its request passed {self.limit} bytes (control.max_request_bytes)"
        if not flags & _MORE:
            self._message = 0
        return None


class SubscriptionMeter(FrameMeter):
    """Subscribers: at most ``max_subscriptions`` held at once, none over ``max_topic_bytes``.

    A subscription is a message whose first byte is 1 (0 cancels it), or, from ZMTP 3.1 peers, a
    SUBSCRIBE (CANCEL) command."""

    def __init__(self, max_subscriptions: int, max_topic_bytes: int) -> None:
        super().__init__()
        self.max_subscriptions, self.max_topic_bytes = max_subscriptions, max_topic_bytes
        self.held = 0
        self._continued = False

    def frame(self, flags: int, wire: int, size: int, prefix: bytes) -> str | None:
        delta, topic = 0, 0
        if flags & _COMMAND:
            if prefix.startswith(b"\x09SUBSCRIBE"):
                delta, topic = 1, size - 10
            elif prefix.startswith(b"\x06CANCEL"):
                delta = -1
        elif not self._continued and prefix[:1] in (b"\x00", b"\x01"):
            delta, topic = (1, size - 1) if prefix[:1] == b"\x01" else (-1, 0)
        if not flags & _COMMAND:
            self._continued = bool(flags & _MORE)
        if topic > self.max_topic_bytes:
            return f"it subscribed to a topic of {topic} bytes (at most {self.max_topic_bytes})"
        self.held = max(0, self.held + delta)
        if self.held > self.max_subscriptions:
            return f"it held more than {self.max_subscriptions} subscriptions"
        return None
