"""A gate in front of the daemon's sockets that reads what each client sends while it arrives.

ZeroMQ caps a single frame (``MAXMSGSIZE``) but nothing else a peer sends. It buffers every frame of
a multi-frame message until the last one arrives, so one control request of 5,000 frames of 60 KiB
is read whole before the REP socket sees any of it; and an XPUB takes in every subscription a peer
sends (each costs about 50 bytes of memory per byte of topic) in one unbounded loop, before the
application can count them. So the daemon accepts connections itself and relays their bytes to the
ZeroMQ socket on a private ipc path, and a meter (meters.py) follows what each client sends and
says when to close its connection, before ZeroMQ reads the rest. At most ``max_connections``
clients are relayed at once. What the daemon sends passes untouched.
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
from collections.abc import Callable
from pathlib import Path

from .meters import FrameMeter

logger = logging.getLogger(__name__)

_CHUNK = 65536
_CONNECT_TIMEOUT_S = 1.0
_LOG_EVERY_S = 60.0


class _Relay:
    """One client connection and its connection to the REP socket."""

    def __init__(self, client: socket.socket, inner: socket.socket, meter: FrameMeter) -> None:
        self.client, self.inner = client, inner
        self.meter = meter
        self.up = b""
        """Read from the client, not yet written to the REP socket (read only when empty)."""
        self.down = b""
        self.cut: str | None = None
        self.ended = False
        """The ZeroMQ side closed (e.g. the daemon stopping): deliver what it sent, then close."""
        self.closed = False

    def pump(self, sock: socket.socket, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            data = sock.recv(_CHUNK)
            if sock is self.client:
                self.cut = self.meter.feed(data) if data else None
                if not data or self.cut:
                    self.closed = True
                    return
                self.up = data
            elif data:
                self.down = data
            else:
                self.ended, self.up = True, b""
        if not self.ended:
            self.up = _send_some(self.inner, self.up)
        self.down = _send_some(self.client, self.down)
        self.closed = self.ended and not self.down

    def interest(self, sock: socket.socket) -> int:
        if self.ended:
            return selectors.EVENT_WRITE if sock is self.client and self.down else 0
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


def why_not_bound(e: OSError) -> str:
    """What a user reads when an endpoint cannot be bound."""
    hint = " (is another speakerd running?)" if e.errno == errno.EADDRINUSE else ""
    return f"{e.strerror or e}{hint}"


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
        sock.listen(socket.SOMAXCONN)
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
    except (OSError, UnicodeError) as e:
        sock.close()
        raise e if isinstance(e, OSError) else OSError(errno.EINVAL, f"cannot bind host {host!r}") from None
    sock.listen(socket.SOMAXCONN)
    bound = sock.getsockname()[1]
    shown = "0.0.0.0" if host == "*" else host
    return sock, f"tcp://{shown}:{bound}"


class Gate:
    """Relays a public tcp or ipc endpoint to ``inner_endpoint``, where the ZeroMQ socket binds,
    judging each client with a fresh ``meter()``. ``bind()`` first (errors surface before anything
    starts), then ``start()``; ``close()``."""

    def __init__(self, endpoint: str, meter: Callable[[], FrameMeter], *, max_connections: int, what: str) -> None:
        self.endpoint = endpoint
        self.meter = meter
        self.max_connections = max_connections
        self.what = what
        self._dir = Path(tempfile.mkdtemp(prefix=f"speakerd-{what}-"))  # 0700: only this user gets in
        self._inner_path = str(self._dir / "zmq.sock")
        self.inner_endpoint = f"ipc://{self._inner_path}"
        self._listener: socket.socket | None = None
        self._relays: dict[socket.socket, _Relay] = {}
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()  # close() wakes the thread at once
        self._thread: threading.Thread | None = None
        self._sel = selectors.DefaultSelector()
        self.cut = 0
        """Connections its meter closed (for tests and the log)."""
        self.refused = 0
        self._last_log = -_LOG_EVERY_S
        self._selects = 0
        """Times the relay thread waited (tests check an idle gate stays asleep)."""

    def bind(self) -> str:
        """Listen on the public endpoint and return it as bound; OSError (``why_not_bound``
        words it) if it cannot be bound."""
        try:
            self._listener, bound = listen_on(self.endpoint)
        except OSError:
            self._release()
            raise
        self._listener.setblocking(False)
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self.endpoint = bound
        return bound

    def start(self) -> None:
        self._sel.register(self._wake_r, selectors.EVENT_READ, self)
        self._thread = threading.Thread(target=self._serve, name=f"speakerd-{self.what}-gate", daemon=True)
        self._thread.start()

    def close(self, drain_s: float = 0.0) -> None:
        """Stop. With ``drain_s``, first give the relays that long to deliver what the ZeroMQ
        socket sent before it closed (the last events of a stopping daemon). Idempotent."""
        if self._stop.is_set():
            return
        if drain_s > 0 and self._thread is not None:
            deadline = time.monotonic() + drain_s
            while self._relays and time.monotonic() < deadline:
                time.sleep(0.01)
        self._stop.set()
        self._wake_w.send(b"x")
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
        self._release()

    def _release(self) -> None:
        self._sel.close()
        for s in (self._wake_r, self._wake_w):
            s.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- the relay thread --

    def _serve(self) -> None:
        """Sleeps until a socket is ready; ``close()`` wakes it through ``_wake_r``. A 0.1 s timeout
        here cost an idle daemon 10 wake-ups a second per gate for nothing."""
        while not self._stop.is_set():
            self._selects += 1
            for key, mask in self._sel.select(timeout=None):
                if key.data is self:
                    return
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
            self._log(f"cannot accept a {self.what} connection: {e.strerror}")
            return
        if len({id(r) for r in self._relays.values()}) >= self.max_connections:
            client.close()
            self.refused += 1
            self._log(f"{self.max_connections} {self.what} connections are open; refused another ({self.refused} so far)")
            return
        inner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            inner.settimeout(_CONNECT_TIMEOUT_S)
            inner.connect(self._inner_path)
        except OSError as e:
            client.close()
            inner.close()
            self._log(f"cannot reach the {self.what} socket: {e}")
            return
        if client.family in (socket.AF_INET, socket.AF_INET6):
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for s in (client, inner):
            s.setblocking(False)
        relay = _Relay(client, inner, self.meter())
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
            self._log(f"closed a {self.what} connection: {relay.cut} ({self.cut} so far)")

    def _log(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            logger.warning("%s", message)
