"""The publisher's XPUB side: it sees subscribers, can wait for the first, beats, and uses CURVE off loopback."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest
import zmq

from speakerd.events import SpeechStart, validate_event
from speakerd.publisher import EventPublisher, PublishError, PublishSettings
from speakerd.security import AUTHORIZED, CurveClient, CurveServer, generate_keypair, load_keypair

WAIT_S = 10.0


def sub_socket(ctx: zmq.Context, endpoint: str, curve: CurveClient | None = None) -> zmq.Socket:
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        curve.apply_client(sock)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(endpoint)
    return sock


def receive(sock: zmq.Socket, n: int, timeout_s: float = WAIT_S) -> list[dict]:
    out: list[dict] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        if sock.poll(100):
            out.append(json.loads(sock.recv_multipart()[1]))
    return out


def test_waiting_for_the_first_subscriber_means_no_event_is_missed() -> None:
    ctx = zmq.Context()
    try:
        with EventPublisher(PublishSettings(endpoint="tcp://127.0.0.1:*", heartbeat_s=0), context=ctx) as pub:
            assert pub.wait_for_subscriber(0.2) is False and pub.subscribers == 0
            sock = sub_socket(ctx, pub.bound_endpoint)
            assert pub.wait_for_subscriber(WAIT_S) is True and pub.subscribers == 1
            for i in range(5):  # at once, no sleep: the subscription is known to be in place
                pub.publish(SpeechStart(float(i)), stream_time=float(i), wall_time=1.0)
            assert [e["seq"] for e in receive(sock, 5)] == [1, 2, 3, 4, 5]
            sock.close(0)
            deadline = time.monotonic() + WAIT_S
            while pub.subscribers and time.monotonic() < deadline:
                pub.wait_for_subscriber(0.05)  # the unsubscription arrives when the pipe closes
            assert pub.subscribers == 0
    finally:
        ctx.term()


def test_heartbeats_go_out_on_the_wall_clock_with_the_subscription_count() -> None:
    ctx = zmq.Context()
    try:
        with EventPublisher(PublishSettings(endpoint="tcp://127.0.0.1:*", heartbeat_s=0.2), context=ctx) as pub:
            sock = sub_socket(ctx, pub.bound_endpoint)
            assert pub.wait_for_subscriber(WAIT_S)
            pub.publish(SpeechStart(4.0), stream_time=4.5, wall_time=1.0)
            started = time.monotonic()
            beats = [e for e in receive(sock, 5) if e["type"] == "heartbeat"]
            assert len(beats) >= 3 and time.monotonic() - started < 3.0
            for b in beats:
                validate_event(b)
            assert all(b["subscriptions"] == 1 and b["interval_s"] == 0.2 for b in beats)
            assert [b["stream_time"] for b in beats[-2:]] == [4.5, 4.5]  # the last audio position: monotone
            sock.close(0)
    finally:
        ctx.term()


def test_an_idle_publisher_sleeps_until_an_event_or_a_subscription() -> None:
    """No periodic wake-ups: the socket thread polled 20 times a second and its gate 10 (0.4 and
    0.07 % of a core in bench's live run)."""
    ctx = zmq.Context()
    try:
        with EventPublisher(PublishSettings(endpoint="tcp://127.0.0.1:*", heartbeat_s=0), context=ctx) as pub:
            sock = sub_socket(ctx, pub.bound_endpoint)
            assert pub.wait_for_subscriber(WAIT_S)
            pub.publish(SpeechStart(1.0), stream_time=1.0, wall_time=1.0)
            assert [e["seq"] for e in receive(sock, 1)] == [1]
            assert pub.gate is not None
            before, gate_before = pub._polls, pub.gate._selects
            time.sleep(0.5)  # idle: at 20 and 10 wake-ups a second this was 10 polls and 5 selects
            assert pub._polls - before <= 1 and pub.gate._selects - gate_before <= 1
            pub.publish(SpeechStart(2.0), stream_time=2.0, wall_time=1.0)
            assert [e["seq"] for e in receive(sock, 1)] == [2]  # an event still wakes it at once
            sock.close(0)
    finally:
        ctx.term()


def test_curve_keys_are_private_and_required_off_loopback(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    public, secret = generate_keypair(keys, "server")
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and stat.S_IMODE(public.stat().st_mode) == 0o600
    client_pub, _ = generate_keypair(tmp_path / "client-keys", "client")
    (keys / AUTHORIZED).mkdir(mode=0o700)
    client_pub.replace(keys / AUTHORIZED / "client.key")
    stranger_dir = tmp_path / "stranger"
    generate_keypair(stranger_dir, "client")

    with pytest.raises(PublishError, match="CURVE"):
        EventPublisher(PublishSettings(endpoint="tcp://0.0.0.0:*")).start()

    ctx = zmq.Context()
    server = CurveServer(keys)
    server.start(ctx)
    try:
        settings = PublishSettings(endpoint="tcp://0.0.0.0:*", heartbeat_s=0)
        with EventPublisher(settings, context=ctx, curve=server) as pub:
            port = pub.bound_endpoint.rsplit(":", 1)[1]
            endpoint = f"tcp://127.0.0.1:{port}"
            server_public, _ = load_keypair(keys, "server")
            friend = CurveClient(*load_keypair(tmp_path / "client-keys", "client"), server_public)
            stranger = CurveClient(*load_keypair(stranger_dir, "client"), server_public)
            bad = sub_socket(ctx, endpoint, stranger)
            good = sub_socket(ctx, endpoint, friend)
            assert pub.wait_for_subscriber(WAIT_S)
            pub.publish(SpeechStart(1.0), stream_time=1.0, wall_time=1.0)
            assert [e["type"] for e in receive(good, 1)] == ["speech.start"]
            assert receive(bad, 1, timeout_s=0.5) == []  # its key is not authorised: nothing gets through
            assert pub.subscribers == 1
            good.close(0)
            bad.close(0)
    finally:
        server.close()
        ctx.term()
