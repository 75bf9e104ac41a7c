"""A gate in front of the control socket that measures each request while it arrives.

ZeroMQ caps a single frame (``MAXMSGSIZE``) but not a message: it buffers every frame of a
multi-frame message until the last one arrives, so one request of 5,000 frames of 60 KiB is read
whole into memory before the REP socket sees any of it. So the daemon accepts control connections
itself and relays their bytes to the REP socket on a private ipc path, following the ZMTP 3 framing
of what each client sends: a connection whose message in progress passes ``limit`` bytes is closed
before the rest is read, and ZeroMQ drops the incomplete message. At most ``MAX_CONNECTIONS``
clients are relayed at once. Replies pass through untouched.

With CURVE every frame is encrypted on its own, so the gate sees frames rather than messages; only
authorised clients get past the handshake there, and ZeroMQ's ``MAXMSGSIZE`` still caps each frame.
"""

from __future__ import annotations

import errno
import logging
import selectors
import shutil
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path

from .errors import SpeakerdError

logger = logging.getLogger(__name__)

MAX_CONNECTIONS = 64
"""Clients relayed at once; more are closed as they arrive (the REP socket answers one at a time)."""
GREETING_BYTES = 64
"""A ZMTP 3 greeting; byte 0 is 0xFF and byte 10 the major version."""
FRAME_SLACK = 64
"""Bytes of a request beyond its payload: the empty delimiter frame and the frame headers."""
_MORE, _LONG, _COMMAND = 1, 2, 4
_CHUNK = 65536
_POLL_S = 0.1
_CONNECT_TIMEOUT_S = 1.0
_LOG_EVERY_S = 60.0


class Meter:
    """Follows the ZMTP 3 frames one client sends and says when to cut it off.

    ``feed`` returns None while every message stays within ``limit`` bytes of frames, otherwise
    why the connection must close."""

    def __init__(self, limit: int) -> None:
        self.limit = limit + FRAME_SLACK
        self._greeting = 0
        self._header = bytearray()
        self._body_left = 0
        self._message = 0
        """Bytes of frames (headers included) of the message in progress."""

    def feed(self, data: bytes) -> str | None:
        i, n = 0, len(data)
        while i < n:
            if self._greeting < GREETING_BYTES:
                take = min(GREETING_BYTES - self._greeting, n - i)
                why = self._check_greeting(data[i : i + take])
                if why:
                    return why
                i += take
            elif self._body_left:
                take = min(self._body_left, n - i)
                self._body_left -= take
                i += take
            else:
                self._header.append(data[i])
                i += 1
                why = self._header_done()
                if why:
                    return why
        return None

    def _check_greeting(self, part: bytes) -> str | None:
        for b in part:
            if self._greeting == 0 and b != 0xFF or self._greeting == 10 and b < 3:
                return "it does not speak ZMTP 3 (libzmq 4 or later)"
            self._greeting += 1
        return None

    def _header_done(self) -> str | None:
        flags = self._header[0]
        size_bytes = 8 if flags & _LONG else 1
        if len(self._header) < 1 + size_bytes:
            return None
        size = int.from_bytes(self._header[1:], "big")
        self._header.clear()
        self._body_left = size
        if flags & _COMMAND:  # handshake, ping: ZeroMQ's MAXMSGSIZE caps them
            return None
        self._message += 1 + size_bytes + size
        if self._message > self.limit:
            return f"its request passed {self.limit - FRAME_SLACK} bytes (control.max_request_bytes)"
        if not flags & _MORE:
            self._message = 0
        return None


class _Relay:
    """One client connection and its connection to the REP socket."""

    def __init__(self, client: socket.socket, inner: socket.socket, limit: int) -> None:
        self.client, self.inner = client, inner
        self.meter = Meter(limit)
        self.up = b""
        """Read from the client, not yet written to the REP socket (read only when empty)."""
        self.down = b""
        self.cut: str | None = None
        self.closed = False

    def pump(self, sock: socket.socket, mask: int) -> None:
        src_is_client = sock is self.client
        if mask & selectors.EVENT_READ:
            data = sock.recv(_CHUNK)
            if not data:
                self.closed = True
                return
            if src_is_client:
                self.cut = self.meter.feed(data)
                if self.cut:
                    self.closed = True
                    return
                self.up = data
            else:
                self.down = data
        self.up = _send_some(self.inner, self.up)
        self.down = _send_some(self.client, self.down)

    def interest(self, sock: socket.socket) -> int:
        pending_in, pending_out = (self.up, self.down) if sock is self.client else (self.down, self.up)
        return (0 if pending_in else selectors.EVENT_READ) | (selectors.EVENT_WRITE if pending_out else 0)

    def close(self) -> None:
        for s in (self.client, self.inner):
            s.close()


def _send_some(sock: socket.socket, data: bytes) -> bytes:
    if not data:
        return data
    try:
        return data[sock.send(data) :]
    except BlockingIOError:
        return data


def listen_on(endpoint: str) -> tuple[socket.socket, str]:
    """A listening socket for a tcp or ipc endpoint, and the endpoint as bound (a tcp ``*`` port
    resolved). A tcp host is an address or a name (IPv4, as ZeroMQ resolves it), ``*`` for all."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://") :]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if path.startswith("@"):
            address = "\0" + path[1:]
        else:
            address = str(Path(path).expanduser())
            with_file = Path(address)
            if with_file.exists() and stat.S_ISSOCK(with_file.lstat().st_mode):
                with_file.unlink()  # a stale socket: the caller made sure nothing answers on it
        try:
            sock.bind(address)
        except OSError:
            sock.close()
            raise
        sock.listen(MAX_CONNECTIONS)
        return sock, endpoint
    host, _, port = endpoint[len("tcp://") :].rpartition(":")
    family, address = socket.AF_INET, host
    if host.startswith("["):
        family, address = socket.AF_INET6, host[1:-1]
    elif host == "*":
        address = "0.0.0.0"
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, 0 if port == "*" else int(port)))
    except (OSError, UnicodeError):
        sock.close()
        raise
    sock.listen(MAX_CONNECTIONS)
    bound = sock.getsockname()[1]
    shown = "0.0.0.0" if host == "*" else host
    return sock, f"tcp://{shown}:{bound}"


class RequestGuard:
    """Relays a public tcp or ipc control endpoint to ``inner_endpoint``, where the REP socket
    binds. ``bind()`` first (errors surface before anything starts), then ``start()``; ``close()``."""

    def __init__(self, endpoint: str, limit: int) -> None:
        self.endpoint = endpoint
        self.limit = limit
        self._dir = Path(tempfile.mkdtemp(prefix="speakerd-control-"))  # 0700: only this user gets in
        self._inner_path = str(self._dir / "rep.sock")
        self.inner_endpoint = f"ipc://{self._inner_path}"
        self._listener: socket.socket | None = None
        self._relays: dict[socket.socket, _Relay] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sel = selectors.DefaultSelector()
        self.cut = 0
        """Connections closed for an oversized request (for tests and the log)."""
        self.refused = 0
        self._last_log = -_LOG_EVERY_S

    def bind(self) -> str:
        """Listen on the public endpoint; SpeakerdError if it cannot be bound. Returns it as bound."""
        try:
            self._listener, bound = listen_on(self.endpoint)
        except (OSError, UnicodeError, ValueError) as e:
            shutil.rmtree(self._dir, ignore_errors=True)
            reason = getattr(e, "strerror", None) or str(e)
            hint = " (is another speakerd running?)" if getattr(e, "errno", None) == errno.EADDRINUSE else ""
            raise SpeakerdError(f"cannot open the control socket {self.endpoint}: {reason}{hint}") from None
        self._listener.setblocking(False)
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self.endpoint = bound
        return bound

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="speakerd-control-guard", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
        for relay in {id(r): r for r in self._relays.values()}.values():
            relay.close()
        self._relays.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            if self.endpoint.startswith("ipc://") and not self.endpoint.startswith("ipc://@"):
                Path(self.endpoint[len("ipc://") :]).expanduser().unlink(missing_ok=True)
        self._sel.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- the relay thread --

    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, mask in self._sel.select(timeout=_POLL_S):
                if key.data is None:
                    self._accept()
                    continue
                relay: _Relay = key.data
                if relay.closed:
                    continue
                try:
                    relay.pump(key.fileobj, mask)  # type: ignore[arg-type]
                except OSError:
                    relay.closed = True
                if relay.closed:
                    self._drop(relay)
                else:
                    for s in (relay.client, relay.inner):
                        self._watch(s, relay)

    def _watch(self, sock: socket.socket, relay: _Relay) -> None:
        events = relay.interest(sock)
        registered = sock in self._relays
        if events and registered:
            self._sel.modify(sock, events, relay)
        elif events:
            self._sel.register(sock, events, relay)
            self._relays[sock] = relay
        elif registered:
            self._sel.unregister(sock)
            del self._relays[sock]

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            client, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # out of file descriptors, ...
            self._log(f"cannot accept a control connection: {e.strerror}")
            return
        if len({id(r) for r in self._relays.values()}) >= MAX_CONNECTIONS:
            client.close()
            self.refused += 1
            self._log(f"{MAX_CONNECTIONS} control connections are open; refused another ({self.refused} so far)")
            return
        inner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            inner.settimeout(_CONNECT_TIMEOUT_S)
            inner.connect(self._inner_path)
        except OSError as e:
            client.close()
            inner.close()
            self._log(f"cannot reach the control socket: {e}")
            return
        if client.family in (socket.AF_INET, socket.AF_INET6):
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for s in (client, inner):
            s.setblocking(False)
        relay = _Relay(client, inner, self.limit)
        for s in (client, inner):
            self._watch(s, relay)

    def _drop(self, relay: _Relay) -> None:
        for s in (relay.client, relay.inner):
            if s in self._relays:
                self._sel.unregister(s)
                del self._relays[s]
        relay.close()
        if relay.cut:
            self.cut += 1
            self._log(f"closed a control connection: {relay.cut} ({self.cut} so far)")

    def _log(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            logger.warning("%s", message)
