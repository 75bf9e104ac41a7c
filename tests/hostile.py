"""What a hostile local process does to speakerd's sockets (issue 18), for tests and for measuring.

Loopback and ipc only. The multi-frame request speaks ZMTP 3 over a plain socket, so the attacker
streams any size without holding it in memory and sees exactly how much the daemon read before
closing the connection. ``python tests/hostile.py --help`` measures a real ``speakerd run``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import zmq

MB = 1024 * 1024
_ZMTP_GREETING = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + bytes(31)


def rss_mb(pid: int | None = None) -> float:
    return psutil.Process(pid).memory_info().rss / MB


def _zmtp_command(body: bytes) -> bytes:
    return bytes([0x04, len(body)]) + body


def _zmtp_frame(body: bytes, more: bool) -> bytes:
    if len(body) < 256:
        return bytes([0x01 if more else 0x00, len(body)]) + body
    return bytes([0x03 if more else 0x02]) + len(body).to_bytes(8, "big") + body


def _connect(endpoint: str, timeout_s: float) -> socket.socket:
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://") :]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout_s)
        sock.connect("\0" + path[1:] if path.startswith("@") else path)
        return sock
    host, _, port = endpoint[len("tcp://") :].rpartition(":")
    return socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s)


@dataclass(frozen=True)
class Outcome:
    sent_bytes: int
    """Bytes the daemon accepted before it closed the connection (or all of them)."""
    cut: bool
    """Whether the daemon closed the connection before the request was complete."""
    seconds: float


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise ConnectionResetError("the peer closed the connection during the handshake")
        data += more
    return data


def _read_handshake(sock: socket.socket) -> None:
    """The peer's greeting and its READY command (NULL mechanism)."""
    _recv_exactly(sock, len(_ZMTP_GREETING))
    flags, size = _recv_exactly(sock, 2)
    if flags & 0x02:
        size = int.from_bytes(bytes([size]) + _recv_exactly(sock, 7), "big")
    assert _recv_exactly(sock, size).startswith(b"\x05READY")


def _send_until_cut(endpoint: str, socket_type: bytes, head: bytes, piece: bytes, total_bytes: int, timeout_s: float) -> Outcome:
    """A ZMTP 3 greeting and READY as ``socket_type``, ``head``, then ``piece`` repeated until
    ``total_bytes`` are sent or the peer closes the connection."""
    started = time.monotonic()
    sent = 0
    properties = b"\x0bSocket-Type" + len(socket_type).to_bytes(4, "big") + socket_type
    with _connect(endpoint, timeout_s) as sock:
        try:
            sock.sendall(_ZMTP_GREETING + _zmtp_command(b"\x05READY" + properties))
            _read_handshake(sock)  # data sent before the peer's READY is a protocol error
            sock.sendall(head)
            while sent < total_bytes and time.monotonic() - started < timeout_s:
                sock.sendall(piece)
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            return Outcome(sent, True, time.monotonic() - started)
    return Outcome(sent, False, time.monotonic() - started)


def multiframe_request(endpoint: str, total_bytes: int, frame_bytes: int = 60 * 1024, timeout_s: float = 60.0) -> Outcome:
    """One REQ-style request of ``total_bytes`` in frames of ``frame_bytes``, never completed: the
    daemon must cut it off (ZeroMQ can only buffer it whole otherwise)."""
    frame = _zmtp_frame(b"x" * frame_bytes, more=True)
    return _send_until_cut(endpoint, b"DEALER", _zmtp_frame(b"", more=True), frame, total_bytes, timeout_s)


def oversized_subscription(endpoint: str, nbytes: int, timeout_s: float = 60.0) -> Outcome:
    """Subscribe to a topic of ``nbytes``, streamed as a SUB sends it (a pyzmq XSUB holding one
    that large crashes in its own subscription trie)."""
    head = bytes([0x02]) + (nbytes + 1).to_bytes(8, "big") + b"\x01"
    return _send_until_cut(endpoint, b"SUB", head, b"t" * 65536, nbytes, timeout_s)


class SubscriptionFlood:
    """``count`` distinct subscriptions of ``size`` bytes from one XSUB, resent (as ZeroMQ does)
    every time the publisher drops the connection, until ``stop()``."""

    def __init__(self, endpoint: str, count: int, size: int = 40) -> None:
        self.endpoint, self.count, self.size = endpoint, count, size
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.sent = 0

    def __enter__(self) -> SubscriptionFlood:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10.0)

    def _run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.XSUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.connect(self.endpoint)
        for i in range(self.count):
            if self._stop.is_set():
                break
            sock.send(b"\x01" + f"{i:08d}".encode().ljust(self.size, b"x"))
            self.sent += 1
        while not self._stop.is_set():
            sock.poll(50)  # lets ZeroMQ reconnect and resubscribe
        sock.close(0)
        ctx.term()


# -- measuring a real daemon ------------------------------------------------------------------------


def sample_rss(pid: int, stop: threading.Event, peak: list[float]) -> None:
    while not stop.is_set():
        try:
            peak[0] = max(peak[0], rss_mb(pid))
        except psutil.Error:
            return
        stop.wait(0.05)


def measure(args: argparse.Namespace) -> int:
    """Start ``speakerd run`` on a quiet file with its own store and endpoints, attack it, SIGTERM it."""
    work = Path(tempfile.mkdtemp(prefix="speakerd-hostile-"))
    wav = work / "quiet.wav"
    import numpy as np
    import soundfile as sf

    sf.write(wav, np.zeros(600 * 16000, dtype="int16"), 16000)
    pub, control = f"ipc://{work}/pub.sock", f"ipc://{work}/run/control.sock"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "daemon"), XDG_RUNTIME_DIR=str(work))
    log = (work / "daemon.log").open("w")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "speakerd.cli", "run", "--source", f"file:{wav}", "--realtime", "--store",
         str(work / "store"), "--pub", pub, "--control", control], env=env, stdout=subprocess.DEVNULL, stderr=log,
    )
    try:
        deadline = time.monotonic() + 120
        while not Path(control[len("ipc://") :]).exists():
            if daemon.poll() is not None or time.monotonic() > deadline:
                print((work / "daemon.log").read_text()[-3000:])
                return 1
            time.sleep(0.2)
        time.sleep(1.0)
        base = rss_mb(daemon.pid)
        peak = [base]
        stop = threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(daemon.pid, stop, peak), daemon=True)
        sampler.start()
        print(f"daemon pid {daemon.pid}, RSS at rest {base:.0f} MB")
        t = time.monotonic()
        sub = oversized_subscription(pub, args.subscription_mb * MB)
        print(f"{args.subscription_mb} MB subscription: cut={sub.cut} after {sub.sent_bytes} bytes "
              f"({sub.seconds:.2f} s), peak RSS {peak[0]:.0f} MB")
        with SubscriptionFlood(pub, args.subscriptions, args.topic_bytes) as flood:
            time.sleep(args.flood_s)
        print(f"{flood.sent} subscriptions of {args.topic_bytes} bytes for {args.flood_s:.0f} s: peak RSS {peak[0]:.0f} MB")
        outcome = multiframe_request(control, args.request_mb * MB)
        print(f"{args.request_mb} MB multi-frame request: cut={outcome.cut} after {outcome.sent_bytes} bytes "
              f"({outcome.seconds:.2f} s), peak RSS {peak[0]:.0f} MB")
        if args.sigterm_under_flood:
            flood = SubscriptionFlood(pub, args.subscriptions, args.topic_bytes).__enter__()
            time.sleep(1.0)
        started = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(30)
        took = time.monotonic() - started
        stop.set()
        if args.sigterm_under_flood:
            flood.stop()
        print(f"SIGTERM -> exit {code} in {took:.2f} s; peak RSS over the run {peak[0]:.0f} MB")
        return 0 if code == 0 and took < 2.0 and peak[0] < 400 else 1
    finally:
        if daemon.poll() is None:
            daemon.kill()
        log.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=measure.__doc__)
    p.add_argument("--subscription-mb", type=int, default=20)
    p.add_argument("--subscriptions", type=int, default=100_000)
    p.add_argument("--topic-bytes", type=int, default=40)
    p.add_argument("--flood-s", type=float, default=10.0)
    p.add_argument("--request-mb", type=int, default=1024)
    p.add_argument("--sigterm-under-flood", action="store_true", help="SIGTERM while the subscription flood runs")
    sys.exit(measure(p.parse_args()))
