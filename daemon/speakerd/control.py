"""The control socket: list, name, rename, merge and forget speakers while the daemon runs.

ZeroMQ REP on a loopback or ipc endpoint (default: ``ipc://`` in the 0700 runtime directory), one
JSON object each way, versioned by ``v``. Requests: ``{"v": 1, "op": "...", ...arguments}``;
replies: ``{"v": 1, "ok": true, "result": {...}}`` or ``{"v": 1, "ok": false, "error": {"code":
"...", "message": "..."}}``. Every request gets a reply; a malformed or unknown one gets an error
reply and touches nothing else (see docs/control.md).

The server thread owns its socket and calls a ``ControlHandler``; ``control_service.ControlService``
is the handler over a ``SpeakerPort`` (the running daemon); ``control_client.ControlClient`` is what
``speakerd speakers`` uses.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import zmq

from .errors import SpeakerdError, check
from .guard import Gate, why_not_bound
from .meters import RequestMeter
from .paths import runtime_dir

if TYPE_CHECKING:
    from .security import CurveServer

logger = logging.getLogger(__name__)

CONTROL_VERSION = 1
OPS = ("list", "status", "enroll", "rename", "merge", "forget", "reload")
START_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 64
"""Control clients connected at once (the REP socket answers one at a time); more are refused."""
STALE_CHECK_S = 0.3
"""How long start() waits for an answer on an existing ipc socket file before taking it over."""


def default_control_endpoint() -> str:
    """``ipc://`` in the per-user runtime directory (made 0700 when the server binds)."""
    return f"ipc://{runtime_dir() / 'control.sock'}"


@dataclass(frozen=True)
class ControlSettings:
    endpoint: str | None = None
    """Control socket; unset is ipc://<runtime dir>/control.sock. tcp endpoints other than loopback
    need CURVE keys (see security.py)."""
    history_s: float = 120.0
    """Seconds of recent speech windows kept for "the last N seconds were Alice"."""
    max_request_bytes: int = 65536
    """A request (all its frames together) larger than this closes its connection before the rest
    is read (see guard.py)."""
    client_timeout_s: float = 3.0
    """How long ``speakerd speakers`` waits for the daemon's reply."""

    def __post_init__(self) -> None:
        from .publisher import is_valid_endpoint

        check(
            self.endpoint is None or is_valid_endpoint(self.endpoint),
            "control.endpoint",
            self.endpoint,
            "must look like tcp://host:port or ipc://path, or be unset",
        )
        check(10.0 <= self.history_s <= 3600.0, "control.history_s", self.history_s, "must be within 10 to 3600 s")
        check(
            1024 <= self.max_request_bytes <= 16 * 1024 * 1024,
            "control.max_request_bytes",
            self.max_request_bytes,
            "must be within 1 KiB and 16 MiB",
        )
        check(0.1 <= self.client_timeout_s <= 120.0, "control.client_timeout_s", self.client_timeout_s, "must be within 0.1 to 120 s")

    @property
    def resolved_endpoint(self) -> str:
        return self.endpoint or default_control_endpoint()


class ControlError(SpeakerdError):
    """A request the daemon refused; ``code`` is machine-readable, the message is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class DaemonUnavailable(SpeakerdError):
    """No daemon answered on the control endpoint."""


class ControlHandler(Protocol):
    """What the control socket can ask of the daemon; each returns a JSON-able dict."""

    def list(self) -> dict[str, Any]: ...

    def status(self) -> dict[str, Any]: ...

    def enroll(self, name: str, *, last_s: float | None = None, speaker: str | None = None) -> dict[str, Any]: ...

    def rename(self, speaker: str, name: str) -> dict[str, Any]: ...

    def merge(self, source: str, target: str) -> dict[str, Any]: ...

    def forget(self, speaker: str) -> dict[str, Any]: ...

    def reload(self) -> dict[str, Any]: ...


# -- protocol ------------------------------------------------------------------------------------


def _name(req: Mapping[str, Any], key: str = "name") -> str:
    """A new speaker name: the one rule of names.py, refused as a bad request."""
    from .names import BadName, check_name

    try:
        return check_name(_arg(req, key, str))
    except BadName as e:
        raise ControlError("bad_request", str(e)) from None


def _arg(req: Mapping[str, Any], key: str, kind: type, *, required: bool = True) -> Any:
    value = req.get(key)
    if value is None:
        if required:
            raise ControlError("bad_request", f"{req.get('op')} needs {key!r}")
        return None
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok or (kind is str and not value):
        raise ControlError("bad_request", f"{key!r} must be a non-empty {kind.__name__}, got {value!r}")
    return value


def _dispatch(handler: ControlHandler, req: Mapping[str, Any]) -> dict[str, Any]:
    op = req.get("op")
    if op not in OPS:
        raise ControlError("unknown_op", f"unknown op {op!r}; ops are {', '.join(OPS)}")
    if op == "list":
        return handler.list()
    if op == "status":
        return handler.status()
    if op == "reload":
        return handler.reload()
    if op == "enroll":
        last_s, speaker = _arg(req, "last_s", float, required=False), _arg(req, "speaker", str, required=False)
        if (last_s is None) == (speaker is None):
            raise ControlError("bad_request", "enroll needs exactly one of 'last_s' (seconds) or 'speaker' (an id)")
        if last_s is not None and not 0 < last_s <= 3600:
            raise ControlError("bad_request", f"'last_s' must be within 0 and 3600, got {last_s}")
        return handler.enroll(_name(req), last_s=last_s, speaker=speaker)
    if op == "rename":
        return handler.rename(_arg(req, "speaker", str), _name(req))
    if op == "merge":
        return handler.merge(_arg(req, "source", str), _arg(req, "target", str))
    return handler.forget(_arg(req, "speaker", str))


def error_reply(code: str, message: str) -> dict[str, Any]:
    return {"v": CONTROL_VERSION, "ok": False, "error": {"code": code, "message": message}}


def parse_request(data: bytes) -> dict[str, Any]:
    """The request object in ``data``; ControlError ``bad_request``/``bad_version`` for anything
    else: not UTF-8 JSON, nested too deeply to parse, strings no UTF-8 can carry (lone surrogates
    such as ``"\\ud800"``), not an object, or ``v`` other than the integer 1 (``true`` and ``1.0``
    compare equal to 1 in Python; they are not the version)."""
    try:
        req = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ControlError("bad_request", f"request is not UTF-8 JSON: {e}") from None
    except RecursionError:
        raise ControlError("bad_request", "request is nested too deeply; send a flat JSON object") from None
    if not isinstance(req, dict):
        raise ControlError("bad_request", f"request must be a JSON object, got {type(req).__name__}")
    try:
        encode(req)
    except UnicodeEncodeError as e:
        raise ControlError(
            "bad_request", f"request holds a lone surrogate ({e.object[e.start:e.end]!r}); send text as UTF-8"
        ) from None
    except RecursionError:
        raise ControlError("bad_request", "request is nested too deeply; send a flat JSON object") from None
    except ValueError:
        raise ControlError("bad_request", "request holds NaN or Infinity, which JSON does not allow") from None
    v = req.get("v")
    if type(v) is not int or v != CONTROL_VERSION:
        raise ControlError("bad_version", f"request v must be the integer {CONTROL_VERSION}, got {v!r}")
    return req


def handle_request(handler: ControlHandler, data: bytes) -> dict[str, Any]:
    """One request's reply. Never raises: every failure is an error reply, logged, nothing else."""
    try:
        req = parse_request(data)
        result = _dispatch(handler, req)
        return {"v": CONTROL_VERSION, "ok": True, "result": result}
    except ControlError as e:
        logger.info("control request refused (%s): %s", e.code, e)
        return error_reply(e.code, str(e))
    except SpeakerdError as e:
        logger.info("control request failed: %s", e)
        return error_reply("refused", str(e))
    except Exception as e:  # noqa: BLE001 - a bug in one request must not take the daemon down
        logger.exception("control request failed")
        return error_reply("internal", f"{type(e).__name__}: {e}")


def encode(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


# -- server ----------------------------------------------------------------------------------------


class ControlServer:
    """A REP socket on its own thread, answering with ``handler``. Use as a context manager."""

    def __init__(
        self,
        settings: ControlSettings,
        handler: ControlHandler,
        *,
        context: zmq.Context | None = None,
        curve: CurveServer | None = None,
    ) -> None:
        self.settings = settings
        self.handler = handler
        self._context = context
        self._own_context = context is None
        self._curve = curve
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._gate: Gate | None = None
        self.endpoint: str | None = None
        self.requests = 0
        self._wake_r, self._wake_w = socket.socketpair()
        """The server thread sleeps in one poll on the REP socket and ``_wake_r``; ``close()`` writes
        a byte. A 0.1 s poll timeout woke an idle daemon 10 times a second for its stop flag."""
        self._polls = 0
        """Times the server thread waited (tests check an idle server stays asleep)."""

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def start(self) -> None:
        from .security import prepare_control_endpoint

        endpoint = self.settings.resolved_endpoint
        prepare_control_endpoint(endpoint, self._curve)
        if endpoint.startswith("ipc://") and local_listener(endpoint, STALE_CHECK_S):
            # binding ipc over a live socket file would silently steal it from the other daemon; the
            # operating system is asked, since a CURVE daemon never answers a plain status request
            raise SpeakerdError(f"another speakerd listens on the control socket {endpoint}")
        bind = endpoint
        if not endpoint.startswith("inproc://"):  # in-process callers need no gate
            limit = self.settings.max_request_bytes
            self._gate = Gate(endpoint, lambda: RequestMeter(limit), max_connections=MAX_CONNECTIONS, what="control")
            try:
                self._gate.bind()
            except OSError as e:
                self._gate = None
                raise SpeakerdError(f"cannot open the control socket {endpoint}: {why_not_bound(e)}") from None
            bind = self._gate.inner_endpoint
        if self._context is None:
            self._context = zmq.Context()
        ready: Future[str] = Future()
        self._thread = threading.Thread(target=self._run, args=(bind, ready), name="speakerd-control", daemon=True)
        self._thread.start()
        try:
            self.endpoint = ready.result(timeout=START_TIMEOUT_S)
        except BaseException:
            self._thread.join(START_TIMEOUT_S)
            self._thread = None
            self._close_gate()
            self._term()
            raise
        if self._gate is not None:
            self._gate.start()
            self.endpoint = self._gate.endpoint
        logger.info("control socket on %s", self.endpoint)

    @property
    def gate(self) -> Gate | None:
        """The gate clients connect through (None for inproc)."""
        return self._gate

    def _close_gate(self) -> None:
        if self._gate is not None:
            self._gate.close()
            self._gate = None

    def close(self) -> None:
        self._close_gate()  # first: no new request gets in
        if not self._stop.is_set():
            self._stop.set()
            self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(START_TIMEOUT_S)
            if self._thread.is_alive():
                logger.error("control thread did not stop")
                return
            self._thread = None
        self._term()
        for s in (self._wake_r, self._wake_w):
            s.close()

    def _term(self) -> None:
        if self._own_context and self._context is not None:
            self._context.term()
            self._context = None

    def _run(self, endpoint: str, ready: Future[str]) -> None:
        assert self._context is not None
        sock = self._context.socket(zmq.REP)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, self.settings.max_request_bytes)
            # per client: a request or two wait, no queue of them (1 stalls CURVE: the handshake
            # leaves a credential message in the pipe that counts against it)
            sock.setsockopt(zmq.RCVHWM, 2)
            sock.setsockopt(zmq.BACKLOG, MAX_CONNECTIONS)  # the gate may connect them all at once
            if self._curve is not None:
                self._curve.apply_server(sock)
            try:
                sock.bind(endpoint)
            except zmq.ZMQError as e:
                hint = " (is another speakerd running?)" if e.errno == zmq.EADDRINUSE else ""
                ready.set_exception(SpeakerdError(f"cannot open the control socket {endpoint}: {e.strerror}{hint}"))
                return
            ready.set_result(sock.getsockopt_string(zmq.LAST_ENDPOINT) or endpoint)
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(self._wake_r, zmq.POLLIN)
            while not self._stop.is_set():
                self._polls += 1
                if sock not in dict(poller.poll()):
                    continue
                frames = sock.recv_multipart()
                reply = (
                    handle_request(self.handler, frames[0])
                    if len(frames) == 1
                    else error_reply("bad_request", f"expected one frame, got {len(frames)}")
                )
                self.requests += 1
                sock.send(encode(reply))
        finally:
            sock.close(linger=0)
            if endpoint.startswith("ipc://"):
                Path(endpoint[len("ipc://") :]).unlink(missing_ok=True)


# -- endpoints ---------------------------------------------------------------------------------------


def local_listener(endpoint: str, timeout_s: float = 1.0) -> bool | None:
    """Whether anything accepts connections on a local endpoint, asked of the operating system
    rather than of ZeroMQ (whose connect "succeeds" on a stale file and never tells a client that
    a CURVE handshake failed).

    ipc: False if the socket file is absent, or is stale (left by a daemon that died: a plain
    AF_UNIX connect is refused); True if a connect succeeds. tcp on loopback: False if the
    connection is refused, True if it is accepted. None when it cannot be told (inproc, an
    unparsable address, permission denied, ...)."""
    import errno
    import socket

    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://") :]
        if path.startswith("@"):  # Linux abstract namespace: no file to look at
            family, address = socket.AF_UNIX, "\0" + path[1:]
        elif not Path(path).exists():
            return False
        else:
            family, address = socket.AF_UNIX, path
    elif endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://") :].rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not host or not port.isdigit():
            return None
        try:
            with socket.create_connection((host, int(port)), timeout=timeout_s):
                return True
        except ConnectionRefusedError:
            return False
        except OSError:
            return None
    else:
        return None
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(timeout_s)
        try:
            probe.connect(address)
        except OSError as e:
            return False if e.errno in (errno.ECONNREFUSED, errno.ENOENT) else None
    return True
