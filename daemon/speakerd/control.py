"""The control socket: list, name, rename, merge and forget speakers while the daemon runs.

ZeroMQ REP on a loopback or ipc endpoint (default: ``ipc://`` in the 0700 runtime directory), one
JSON object each way, versioned by ``v``. Requests: ``{"v": 1, "op": "...", ...arguments}``;
replies: ``{"v": 1, "ok": true, "result": {...}}`` or ``{"v": 1, "ok": false, "error": {"code":
"...", "message": "..."}}``. Every request gets a reply; a malformed or unknown one gets an error
reply and touches nothing else (see docs/control.md).

The server thread owns its socket and calls a ``ControlHandler``; ``ControlService`` is the handler
over the daemon's store, index and pipeline. ``ControlClient`` is what ``speakerd speakers`` uses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import numpy as np
import zmq

from .errors import SpeakerdError, check
from .events import SpeakerRef
from .guard import Gate, why_not_bound
from .meters import RequestMeter
from .paths import runtime_dir
from .provisional import is_provisional_id
from .security import wants_ipv6

logger = logging.getLogger(__name__)

CONTROL_VERSION = 1
OPS = ("list", "status", "enroll", "rename", "merge", "forget", "reload")
POLL_MS = 100
"""How often the server loop looks at its stop flag."""
START_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 64
"""Control clients connected at once (the REP socket answers one at a time); more are refused."""
STALE_CHECK_S = 0.3
"""How long start() waits for an answer on an existing ipc socket file before taking it over."""
MIN_STREAM_ENROLL_S = 2.0
"""Speech a stream enrollment needs: fewer windows than this make a poor voiceprint."""
MAJORITY = 0.8
"""Share of the labelled windows one provisional speaker must hold to be promoted with them (and
at least half the windows must be labelled)."""


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
        curve: Any = None,
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
        self._stop.set()
        if self._thread is not None:
            self._thread.join(START_TIMEOUT_S)
            if self._thread.is_alive():
                logger.error("control thread did not stop")
                return
            self._thread = None
        self._term()

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
            while not self._stop.is_set():
                if not sock.poll(POLL_MS):
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


# -- client ----------------------------------------------------------------------------------------


class ControlClient:
    """Requests to a running daemon. ``request`` raises DaemonUnavailable when nobody answers."""

    def __init__(self, endpoint: str, *, timeout_s: float = 3.0, curve: Any = None, context: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._curve = curve
        self._context = context

    def daemon_is_up(self, timeout_s: float = 0.5) -> bool:
        """Whether a daemon accepts connections (a stale ipc file or a closed port does not)."""
        if self.endpoint.startswith("ipc://") and not Path(self.endpoint[len("ipc://") :]).exists():
            return False
        try:
            self.request("status", timeout_s=timeout_s)
        except DaemonUnavailable:
            return False
        return True

    def request(self, op: str, *, timeout_s: float | None = None, **args: Any) -> dict[str, Any]:
        """Send one request; the ``result`` of an ok reply, ControlError for an error reply."""
        reply = self.send_raw(encode({"v": CONTROL_VERSION, "op": op, **args}), timeout_s=timeout_s)
        if not isinstance(reply, dict) or "ok" not in reply:
            raise ControlError("bad_reply", f"unexpected reply from the daemon: {reply!r}")
        if not reply["ok"]:
            err = reply.get("error") or {}
            raise ControlError(str(err.get("code", "error")), str(err.get("message", "request failed")))
        result = reply.get("result")
        return result if isinstance(result, dict) else {}

    def _unavailable(self, message: str, timeout_ms: int) -> DaemonUnavailable:
        if self._curve is None:
            return DaemonUnavailable(message)
        # a refused CURVE handshake never completes the connection, so it ends here as a timeout
        return DaemonUnavailable(
            f"the daemon on {self.endpoint} did not answer within {timeout_ms} ms (control.client_timeout_s): "
            f"{self._curve.rejection_hint()}"
        )

    def send_raw(self, data: bytes, *, timeout_s: float | None = None) -> Any:
        """Send bytes as they are (tests send malformed requests this way); the decoded reply."""
        timeout_ms = int(1000 * (self.timeout_s if timeout_s is None else timeout_s))
        ctx = self._context if self._context is not None else zmq.Context()
        try:
            with ctx.socket(zmq.REQ) as sock:
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing for a daemon that is not there
                if wants_ipv6(self.endpoint):
                    sock.setsockopt(zmq.IPV6, 1)
                if self._curve is not None:
                    self._curve.apply_client(sock)
                sock.connect(self.endpoint)
                if not sock.poll(timeout_ms, zmq.POLLOUT):  # with CURVE: until the handshake succeeds
                    raise self._unavailable(f"no speakerd daemon is listening on {self.endpoint}", timeout_ms)
                sock.send(data)
                if not sock.poll(timeout_ms, zmq.POLLIN):
                    raise self._unavailable(f"the daemon on {self.endpoint} did not answer within {timeout_ms} ms", timeout_ms)
                return json.loads(sock.recv().decode("utf-8"))
        finally:
            if self._context is None:
                ctx.term()


# -- the daemon's handler --------------------------------------------------------------------------


class ControlService:
    """``ControlHandler`` over a running daemon: ``owner`` has ``store``, ``index``, ``pipeline`` and
    ``publisher`` attributes (read per request, since a reload swaps the index), and may have
    ``enroll(name, embeddings, source)`` and ``reload()`` (``daemon.Daemon`` has both).

    Enrolled speakers change in the store first (the truth), then in the matcher, then the pipeline
    publishes ``speaker.renamed``/``speaker.merged`` and relabels its open turn, so every later
    event carries the new name.
    """

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self._lock = threading.Lock()
        """One request at a time changes speakers (the REP socket serialises them anyway)."""

    @property
    def store(self) -> Any:
        return self.owner.store

    @property
    def index(self) -> Any:
        return self.owner.index

    @property
    def pipeline(self) -> Any:
        return self.owner.pipeline

    # -- lookups --

    def _enrolled(self, who: str) -> Any:
        speaker = self.store.get(who)
        if speaker is None:
            raise ControlError("not_found", f"no speaker {who!r} (neither enrolled nor provisional in this session)")
        return speaker

    @staticmethod
    def _ref(speaker: Any) -> SpeakerRef:
        return SpeakerRef(speaker.id, speaker.name, True)

    def _provisional(self, who: str) -> SpeakerRef | None:
        """The provisional speaker ``who`` as it is now (None if ``who`` is not a provisional id)."""
        if not is_provisional_id(who):
            return None
        now = self.pipeline.provisional.resolve(who)
        if now is None:
            raise ControlError("not_found", f"no provisional speaker {who!r} in this session")
        return now

    # -- ops --

    def list(self) -> dict[str, Any]:
        enrolled = [{"id": s.id, "name": s.name, "embeddings": s.num_embeddings} for s in self.store.speakers()]
        provisional = [
            {
                "id": p.id,
                "windows": p.windows,
                "speech_s": round(p.speech_s, 2),
                "first_s": round(p.first_s, 3),
                "last_s": round(p.last_s, 3),
                "now": None if p.alias is None else p.alias.to_dict(),
            }
            for p in self.pipeline.provisional.speakers()
        ]
        return {"enrolled": enrolled, "provisional": provisional}

    def status(self) -> dict[str, Any]:
        status = self.pipeline.status().to_dict()
        status["enrolled"] = len(self.index.speakers)
        status["provisional"] = len(self.pipeline.provisional.speakers())
        publisher = getattr(self.owner, "publisher", None)
        if publisher is not None:
            status["session"] = publisher.session
            status["subscriptions"] = getattr(publisher, "subscribers", 0)
        return status

    def enroll(self, name: str, *, last_s: float | None = None, speaker: str | None = None) -> dict[str, Any]:
        with self._lock:
            if speaker is not None:
                return self._name_provisional(speaker, name)
            assert last_s is not None
            return self._enroll_recent(name, last_s)

    def _enroll_recent(self, name: str, last_s: float) -> dict[str, Any]:
        windows = [w for w in self.pipeline.recent_windows(last_s) if w.embedding is not None]
        spans: list[tuple[int, int]] = []
        for w in windows:
            if spans and w.window.start <= spans[-1][1]:
                spans[-1] = (spans[-1][0], max(spans[-1][1], w.window.end))
            else:
                spans.append((w.window.start, w.window.end))
        from .audio import SAMPLE_RATE

        speech_s = sum(b - a for a, b in spans) / SAMPLE_RATE
        if speech_s < MIN_STREAM_ENROLL_S:
            raise ControlError(
                "too_little_speech",
                f"only {speech_s:.1f} s of speech in the last {last_s:g} s; need {MIN_STREAM_ENROLL_S:g} s",
            )
        labels = [w.ref.id for w in windows]
        named = [x for x in labels if x is not None]  # anonymous windows: not yet clustered, no vote
        top = max(set(named), key=named.count) if named else None
        ref, existed = self._store_enroll(name, np.stack([w.embedding for w in windows]), f"stream:last {last_s:g} s")
        promoted = None
        if top is not None and is_provisional_id(top) and named.count(top) >= MAJORITY * len(named) >= MAJORITY * len(labels) / 2:
            promoted = top
            self._promote(top, ref, existed)
        return {
            "speaker": ref.to_dict(),
            "windows": len(windows),
            "speech_s": round(speech_s, 2),
            "promoted": promoted,
            "matched": {str(k): labels.count(k) for k in set(labels)},
        }

    def _name_provisional(self, speaker: str, name: str) -> dict[str, Any]:
        now = self._provisional(speaker)
        if now is None:
            raise ControlError("bad_request", f"{speaker!r} is not a provisional speaker id (unknown-N)")
        if now.known:
            raise ControlError("conflict", f"{speaker} is already {now.name} ({now.id})")
        embeddings = self.pipeline.provisional.embeddings(speaker)
        if len(embeddings) == 0:
            raise ControlError("not_found", f"{speaker} was forgotten")
        ref, existed = self._store_enroll(name, embeddings, f"stream:{speaker}")
        self._promote(speaker, ref, existed)
        return {"speaker": ref.to_dict(), "windows": len(embeddings), "promoted": speaker}

    def _store_enroll(self, name: str, embeddings: np.ndarray, source: str) -> tuple[SpeakerRef, bool]:
        existed = self.store.get(name) is not None
        if hasattr(self.owner, "enroll"):
            speaker = self.owner.enroll(name, embeddings, source)  # stores, then reloads its matcher
        else:
            speaker = self.store.enroll(name, embeddings, source=source)
            self.index.add(speaker.id, speaker.name, embeddings)
        return self._ref(speaker), existed

    def _promote(self, provisional_id: str, ref: SpeakerRef, existed: bool) -> None:
        relabel = self.pipeline.provisional.promote(provisional_id, ref)
        self.pipeline.relabel(relabel.old, ref, cause="control" if existed else None)

    def rename(self, speaker: str, name: str) -> dict[str, Any]:
        with self._lock:
            if self._provisional(speaker) is not None:
                return self._name_provisional(speaker, name)
            old = self._enrolled(speaker)
            renamed = self.store.rename(old.id, name)
            self.index.rename(old.id, renamed.name)
            self.pipeline.relabel(self._ref(old), self._ref(renamed))
            return {"speaker": self._ref(renamed).to_dict(), "previous": self._ref(old).to_dict()}

    def merge(self, source: str, target: str) -> dict[str, Any]:
        with self._lock:
            src_prov, dst_prov = self._provisional(source), self._provisional(target)
            if src_prov is not None and dst_prov is not None and not dst_prov.known:
                relabel = self.pipeline.provisional.merge(source, target)
                self.pipeline.relabel(relabel.old, relabel.new, cause="control")
                return {"speaker": relabel.new.to_dict(), "merged": relabel.old.to_dict()}
            if src_prov is not None:
                dest = self._enrolled(dst_prov.id if dst_prov is not None else target)  # type: ignore[union-attr,arg-type]
                return self._name_provisional(source, dest.name)
            if dst_prov is not None and not dst_prov.known:
                raise ControlError("bad_request", "merge a provisional speaker into an enrolled one, not the other way")
            src = self._enrolled(source)
            dst = self._enrolled(dst_prov.id if dst_prov is not None else target)  # type: ignore[union-attr,arg-type]
            if src.id == dst.id:
                raise ControlError("bad_request", f"{source!r} and {target!r} are the same speaker")
            row_ids, owners, vectors = self.store.embeddings()
            mine = np.array([o == src.id for o in owners], dtype=bool)
            self._store_enroll(dst.name, vectors[mine], f"merge:{src.id}")
            self.store.remove(src.id)
            self.index.remove(src.id)
            self.pipeline.relabel(self._ref(src), self._ref(dst), cause="control")
            return {"speaker": self._ref(dst).to_dict(), "merged": self._ref(src).to_dict(), "embeddings": int(mine.sum())}

    def forget(self, speaker: str) -> dict[str, Any]:
        with self._lock:
            if self._provisional(speaker) is not None:
                self.pipeline.provisional.forget(speaker)
                return {"forgotten": speaker}
            gone = self.store.remove(self._enrolled(speaker).id)
            self.index.remove(gone.id)
            return {"forgotten": gone.id, "name": gone.name, "embeddings": gone.num_embeddings}

    def reload(self) -> dict[str, Any]:
        with self._lock:
            if hasattr(self.owner, "reload"):
                result = self.owner.reload()
                out = dataclasses.asdict(result) if dataclasses.is_dataclass(result) else dict(result)
                if not out.get("ok", True):
                    raise ControlError("reload_failed", str(out.get("error")))
                return out
            from .matcher import SpeakerIndex

            fresh = SpeakerIndex.from_store(self.store, self.index.settings)
            self.pipeline.swap_matcher(fresh)
            self.owner.index = fresh
            return {"ok": True, "speakers": len(fresh.speakers)}


# -- ``speakerd speakers`` through a running daemon --------------------------------------------------

DAEMON_ONLY_ACTIONS = ("enroll", "merge", "status", "reload")
"""What only a running daemon can do (stream history, provisional speakers, its live state)."""


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


def speakers_client(
    endpoint: str, *, timeout_s: float, curve: Any = None, config_keys: Path | str | None = None
) -> ControlClient | None:
    """The client ``speakerd speakers`` talks through, or None to use the store directly.

    ``curve`` is what ``--curve-keys DIR`` loaded; ``config_keys`` is ``daemon.curve_keys`` from the
    settings, used (``CurveClient.for_daemon_keys``) when no ``--curve-keys`` was given.

    - A non-local endpoint needs keys (``--curve-keys`` or ``daemon.curve_keys``); without them it
      is refused before connecting (SecurityError, exit 2), since the daemon binds one only with
      CURVE. With ``--curve-keys``, or on a non-local endpoint, the user means one particular
      daemon: the client is returned as is and no answer is DaemonUnavailable (exit 1), never the
      store.
    - A local endpoint otherwise falls back to the store only when no daemon is there: the ipc
      socket file is absent or stale (nothing accepts connections on it), or the loopback port
      refuses connections. When something does listen but does not answer within ``timeout_s``
      (a daemon with CURVE on, asked without keys or with keys it refuses; a daemon that hangs),
      DaemonUnavailable (exit 1) says so: editing the store behind a running daemon's back would
      go unseen by it and publish no ``speaker.renamed``.
    """
    from .security import CurveClient, is_local_endpoint, require_curve_to_connect

    if curve is not None:
        return ControlClient(endpoint, timeout_s=timeout_s, curve=curve)

    def config_curve() -> Any:
        return CurveClient.for_daemon_keys(Path(config_keys).expanduser()) if config_keys else None

    if not is_local_endpoint(endpoint):
        curve = config_curve()
        require_curve_to_connect(endpoint, curve, what="control", option="--curve-keys DIR")
        return ControlClient(endpoint, timeout_s=timeout_s, curve=curve)
    listening = local_listener(endpoint, timeout_s=min(timeout_s, 1.0))
    if listening is False:
        return None  # no daemon on this machine: the store is the only copy
    curve = config_curve()  # loaded only now: a daemon may be there, and it runs with these keys
    client = ControlClient(endpoint, timeout_s=timeout_s, curve=curve)
    if listening is None:  # cannot tell (inproc, permission denied, ...): a short probe, as before
        return client if client.daemon_is_up() else None
    if client.daemon_is_up(timeout_s):
        return client
    ms = int(1000 * timeout_s)
    if curve is None:
        why = (
            "if it runs with daemon.curve_keys, its control socket admits only CURVE clients: pass "
            "the daemon's --config (its daemon.curve_keys is then used), or --curve-keys DIR (a "
            "directory with client.key_secret and the daemon's server.key)"
        )
    else:
        why = f"with the CURVE keys of daemon.curve_keys ({curve.keys_dir}): {curve.rejection_hint()}"
    raise DaemonUnavailable(
        f"a daemon seems to be running on {endpoint} (its socket accepts connections) but it did not "
        f"answer within {ms} ms (control.client_timeout_s); {why}. The store was left alone: a change "
        "made behind the daemon's back would not reach it (`--offline` edits the store anyway)"
    )


def speakers_via_daemon(client: ControlClient, args: Any, out: Any = None) -> int:
    """Run one ``speakerd speakers`` action against the daemon and print the outcome."""
    import sys

    out = sys.stdout if out is None else out
    action = args.action
    if action == "list":
        result = client.request("list")
        for s in result["enrolled"]:
            print(f"{s['id']}  {s['name']:<24} {s['embeddings']:5d} embeddings", file=out)
        for p in result["provisional"]:
            now = f"  -> {p['now']['name'] or p['now']['id']}" if p["now"] else ""
            print(f"{p['id']:<12}  {'(provisional)':<24} {p['speech_s']:5.1f} s in {p['windows']} windows{now}", file=out)
        if not result["enrolled"] and not result["provisional"]:
            print("no speakers enrolled, none heard yet", file=out)
        return 0
    if action == "rename":
        result = client.request("rename", speaker=args.old, name=args.new)
        print(f"renamed {args.old} -> {result['speaker']['name']} ({result['speaker']['id']})", file=out)
    elif action == "remove":
        result = client.request("forget", speaker=args.name)
        print(f"forgot {args.name} ({result['forgotten']})", file=out)
    elif action == "enroll":
        if args.source_id:
            result = client.request("enroll", name=args.name, speaker=args.source_id)
        else:
            result = client.request("enroll", name=args.name, last_s=float(args.last))
        promoted = f"; {result['promoted']} is now {result['speaker']['name']}" if result.get("promoted") else ""
        print(f"enrolled {result['speaker']['name']} ({result['speaker']['id']}) from {result['windows']} windows{promoted}", file=out)
    elif action == "merge":
        result = client.request("merge", source=args.source, target=args.target)
        print(f"merged {args.source} into {result['speaker']['name'] or result['speaker']['id']}", file=out)
    else:  # status, reload
        print(json.dumps(client.request(action), indent=1, ensure_ascii=False), file=out)
    return 0
