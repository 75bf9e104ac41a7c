"""Subscriber against a real ZeroMQ socket: feeds the timeline, reports gaps, survives restarts."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq
from test_client_timeline import ALICE, BOB, Stream, change, segment

from speakerd.client import Gap, SpeakerTimeline, Subscriber
from speakerd.events import SpeechStart, encode_event
from speakerd.security import SecurityError

WAIT_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeDaemon:
    """An XPUB socket sending hand-made events, as the daemon's publisher does (seq, session)."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        deadline = time.monotonic() + WAIT_S
        while True:  # the port of a daemon just closed is released by ZeroMQ's I/O thread, a moment later
            try:
                self.sock.bind(endpoint)
                return
            except zmq.ZMQError:
                if time.monotonic() > deadline:
                    self.sock.close(0)
                    raise
                threading.Event().wait(0.05)

    def wait_for_subscriber(self) -> None:
        assert self.sock.poll(int(WAIT_S * 1000)), "no subscriber connected"
        assert self.sock.recv()[:1] == b"\x01"

    def send(self, event: dict[str, Any]) -> None:
        self.sock.send_multipart([event["type"].encode(), encode_event(event)])

    def close(self) -> None:
        self.sock.close(0)


def wait_until(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    done = threading.Event()
    while not predicate():
        assert time.monotonic() < deadline, what
        done.wait(0.02)  # polling a condition under a deadline


def test_feeds_the_timeline_reports_gaps_and_follows_a_restart() -> None:
    ctx = zmq.Context()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    gaps: list[Gap] = []
    restarts: list[str] = []
    seen: list[dict[str, Any]] = []
    daemon = FakeDaemon(ctx, endpoint)
    sub = Subscriber(endpoint, timeline=SpeakerTimeline(), on_gap=gaps.append, on_restart=restarts.append,
                     on_event=seen.append, context=ctx)
    try:
        with sub:
            daemon.wait_for_subscriber()
            ev = Stream("111111111111")
            daemon.send(ev(SpeechStart(0.0), 0.2))
            daemon.send(ev(change(ALICE, None, 0.0), 1.0))
            ev.seq += 3  # three events the subscriber never got
            daemon.send(ev(segment(ALICE, 0.0, 4.0), 4.5))
            wait_until(lambda: len(seen) == 3, "three events")
            assert gaps == [Gap("111111111111", 3, 5)] and sub.stats.lost == 3
            assert sub.timeline.who(0.0, 4.0).label == "Alice"
            # the daemon restarts on the same endpoint: ZeroMQ reconnects, a new session is no loss
            daemon.close()
            daemon = FakeDaemon(ctx, endpoint)
            daemon.wait_for_subscriber()
            ev2 = Stream("222222222222")
            daemon.send(ev2(change(BOB, None, 1.0), 2.0))
            wait_until(lambda: len(seen) == 4, "the restarted daemon's event")
            assert restarts == ["222222222222"] and sub.stats.lost == 3
            assert sub.timeline.session == "222222222222" and sub.timeline.speaker_at(1.5).label == "Bob"
            daemon.sock.send_multipart([b"speaker.change", b"{not json"])  # skipped, counted, nothing stops
            daemon.send(ev2(segment(BOB, 1.0, 3.0), 3.5))
            wait_until(lambda: len(seen) == 5, "the event after a malformed one")
            assert sub.stats.malformed == 1
            started = time.monotonic()
        assert time.monotonic() - started < 1.0, "stop() is prompt"
    finally:
        daemon.close()
        ctx.term()


def test_iterates_and_reconnects_after_silence() -> None:
    ctx = zmq.Context()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    sub = Subscriber(endpoint, silence_s=0.3, context=ctx)
    got: list[dict[str, Any]] = []

    def daemon_later() -> None:
        threading.Event().wait(0.8)  # nobody there yet: the subscriber sits in its silence, reconnecting
        d = FakeDaemon(ctx, endpoint)
        try:
            d.wait_for_subscriber()
            ev = Stream()
            for i in range(3):
                d.send(ev(SpeechStart(float(i)), float(i) + 0.1))
            wait_until(lambda: len(got) == 3, "three events")
        finally:
            d.close()

    thread = threading.Thread(target=daemon_later)
    events = sub.events(idle_timeout=2.0)
    try:
        thread.start()
        for event in events:
            got.append(event)
            if len(got) == 3:
                break
    finally:
        events.close()
        thread.join(WAIT_S)
        ctx.term()
    assert [e["seq"] for e in got] == [1, 2, 3]
    assert sub.stats.reconnects >= 1


def test_from_config_connects_where_listen_would(tmp_path: Path) -> None:
    cfg = tmp_path / "speakerd.toml"
    cfg.write_text('[publish]\nendpoint = "tcp://127.0.0.1:5999"\n')
    assert Subscriber.from_config(cfg).endpoint == "tcp://127.0.0.1:5999"
    assert Subscriber.from_config(cfg, endpoint="ipc:///tmp/x.sock").endpoint == "ipc:///tmp/x.sock"
    with pytest.raises(SecurityError, match="--curve-keys"):
        Subscriber.from_config(cfg, endpoint="tcp://192.0.2.1:5560")


def test_from_config_uses_the_daemons_curve_keys(tmp_path: Path) -> None:
    from speakerd.publisher import EventPublisher, PublishSettings
    from speakerd.security import CurveServer, generate_keypair

    keys = tmp_path / "keys"
    generate_keypair(keys, "server")
    (keys / "authorized").mkdir(mode=0o700)
    ctx = zmq.Context()
    server = CurveServer(keys)
    server.start(ctx)
    try:
        with EventPublisher(PublishSettings(endpoint="tcp://0.0.0.0:*", heartbeat_s=0), context=ctx, curve=server) as pub:
            endpoint = f"tcp://127.0.0.1:{pub.bound_endpoint.rsplit(':', 1)[1]}"
            cfg = tmp_path / "speakerd.toml"
            cfg.write_text(f'[daemon]\ncurve_keys = "{keys}"\n[publish]\nendpoint = "{endpoint}"\n')
            seen: list[dict[str, Any]] = []
            with Subscriber.from_config(cfg, on_event=seen.append, context=ctx):  # the daemon's own keys, as listen
                assert pub.wait_for_subscriber(WAIT_S)
                pub.publish(SpeechStart(1.0), stream_time=1.0, wall_time=1.0)
                wait_until(lambda: len(seen) == 1, "an event through CURVE")
            assert seen[0]["type"] == "speech.start"
    finally:
        server.close()
        ctx.term()


def test_subscribes_to_a_daemon_on_ipv6_loopback() -> None:
    """The docs call tcp://[::1] local and the daemon binds it; ZeroMQ connects there only with IPV6 set."""
    ctx = zmq.Context()
    daemon = FakeDaemon.__new__(FakeDaemon)
    daemon.sock = ctx.socket(zmq.XPUB)
    daemon.sock.setsockopt(zmq.LINGER, 0)
    daemon.sock.setsockopt(zmq.IPV6, 1)
    daemon.sock.bind("tcp://[::1]:*")
    endpoint = daemon.sock.getsockopt_string(zmq.LAST_ENDPOINT)
    seen: list[dict[str, Any]] = []
    try:
        with Subscriber(endpoint, on_event=seen.append, context=ctx):
            daemon.wait_for_subscriber()
            daemon.send(Stream("333333333333")(SpeechStart(0.0), 0.2))
            wait_until(lambda: len(seen) == 1, "the event over IPv6 loopback")
        assert seen[0]["type"] == "speech.start"
    finally:
        daemon.close()
        ctx.term()
