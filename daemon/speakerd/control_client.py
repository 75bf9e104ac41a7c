"""The control socket's client side: ``ControlClient``, and ``speakerd speakers`` through a running daemon."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import zmq

from .control import CONTROL_VERSION, ControlError, DaemonUnavailable, encode, local_listener
from .security import wants_ipv6

if TYPE_CHECKING:
    from .security import CurveClient


class ControlClient:
    """Requests to a running daemon. ``request`` raises DaemonUnavailable when nobody answers."""

    def __init__(
        self, endpoint: str, *, timeout_s: float = 3.0, curve: CurveClient | None = None, context: zmq.Context | None = None
    ) -> None:
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



# -- ``speakerd speakers`` through a running daemon --------------------------------------------------

DAEMON_ONLY_ACTIONS = ("enroll", "merge", "status", "reload")
"""What only a running daemon can do (stream history, provisional speakers, its live state)."""

def speakers_client(
    endpoint: str, *, timeout_s: float, curve: CurveClient | None = None, config_keys: Path | str | None = None
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

    def config_curve() -> CurveClient | None:
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


def speakers_via_daemon(client: ControlClient, args: argparse.Namespace, out: TextIO | None = None) -> int:
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
