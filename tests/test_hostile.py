"""A hostile local process against the daemon's sockets (issue 18), on loopback and ipc only.

Sizes are small next to the issue's (20 MB subscription, 100k subscriptions, 1 GB request; see
``tests/hostile.py`` for measuring those against a real daemon) but each is one that today's code
reads whole: the assertions are about what the daemon read and kept, not about timing luck.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import zmq
from daemon_harness import popen_speakerd
from hostile import MB, SubscriptionFlood, multiframe_request, oversized_subscription, rss_mb, sample_rss
from test_control import FakeDaemon, owner  # noqa: F401 - the fixture
from test_xpub import receive, sub_socket

from speakerd.control import MAX_CONNECTIONS, ControlServer, ControlSettings
from speakerd.control_client import ControlClient
from speakerd.control_service import ControlService
from speakerd.events import SpeechStart
from speakerd.guard import Gate
from speakerd.publisher import (
    MAX_SUBSCRIBERS,
    MAX_SUBSCRIPTIONS_PER_CONNECTION,
    MAX_TOPIC_BYTES,
    EventPublisher,
    PublishSettings,
)

WAIT_S = 10.0
RSS_SLACK_MB = 40.0
"""What a test may add to this process's memory; today's code adds ~200 MB (4 MB subscription) and
the request's full size (control)."""


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture()
def publisher(run_dir: Path):
    ctx = zmq.Context()
    with EventPublisher(PublishSettings(endpoint=f"ipc://{run_dir}/pub.sock", heartbeat_s=0), context=ctx) as pub:
        yield pub, ctx
    ctx.term()


def still_served(pub: EventPublisher, sock: zmq.Socket, stream_time: float) -> bool:
    pub.publish(SpeechStart(stream_time), stream_time=stream_time, wall_time=1.0)
    return [e["type"] for e in receive(sock, 1)] == ["speech.start"]


# -- the PUB socket --------------------------------------------------------------------------------


def test_an_oversized_subscription_is_cut_off_before_it_is_read(publisher: tuple[EventPublisher, zmq.Context]) -> None:
    pub, ctx = publisher
    friend = sub_socket(ctx, pub.bound_endpoint)
    assert pub.wait_for_subscriber(WAIT_S)
    before = rss_mb()
    outcome = oversized_subscription(pub.bound_endpoint, 4 * MB, timeout_s=WAIT_S)
    assert outcome.cut and outcome.sent_bytes < 1 * MB, outcome
    assert rss_mb() - before < RSS_SLACK_MB
    assert pub.subscribers == 1 and still_served(pub, friend, 1.0)
    friend.close(0)


def test_a_subscription_flood_is_cut_per_connection_and_others_keep_receiving(
    publisher: tuple[EventPublisher, zmq.Context],
) -> None:
    pub, ctx = publisher
    friend = sub_socket(ctx, pub.bound_endpoint)
    assert pub.wait_for_subscriber(WAIT_S)
    most = 0
    with SubscriptionFlood(pub.bound_endpoint, 5000) as flood:
        deadline = time.monotonic() + WAIT_S
        while (flood.sent < 5000 or pub.gate.cut < 3) and time.monotonic() < deadline:
            most = max(most, pub.subscribers)
            time.sleep(0.005)
        assert pub.gate is not None and pub.gate.cut >= 3  # cut, reconnected, resubscribed, cut again
    assert most <= MAX_SUBSCRIPTIONS_PER_CONNECTION + 1
    assert still_served(pub, friend, 2.0)
    friend.close(0)


def test_a_topic_longer_than_any_event_topic_is_refused(publisher: tuple[EventPublisher, zmq.Context]) -> None:
    pub, ctx = publisher
    ok = ctx.socket(zmq.SUB)
    ok.setsockopt(zmq.SUBSCRIBE, b"speaker.renamed".ljust(MAX_TOPIC_BYTES, b"-"))
    ok.connect(pub.bound_endpoint)
    assert pub.wait_for_subscriber(WAIT_S)
    long_topic = ctx.socket(zmq.SUB)
    long_topic.setsockopt(zmq.SUBSCRIBE, b"x" * (MAX_TOPIC_BYTES + 1))
    long_topic.connect(pub.bound_endpoint)
    deadline = time.monotonic() + WAIT_S
    while pub.gate.cut < 1 and time.monotonic() < deadline:
        long_topic.poll(20)
    assert pub.gate.cut >= 1 and pub.subscribers == 1
    for s in (ok, long_topic):
        s.close(0)


def refused_beyond(gate: Gate | None, endpoint: str, cap: int, extra: int) -> int:
    """Open ``cap + extra`` idle connections to an ipc endpoint; how many the gate refused."""
    assert gate is not None
    held = []
    try:
        for _ in range(cap + extra):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(endpoint[len("ipc://") :])
            held.append(s)
        deadline = time.monotonic() + WAIT_S
        while gate.refused < extra and time.monotonic() < deadline:
            time.sleep(0.02)
        return gate.refused
    finally:
        for s in held:
            s.close()


def test_subscriber_connections_beyond_the_cap_are_refused(publisher: tuple[EventPublisher, zmq.Context]) -> None:
    pub, ctx = publisher
    assert refused_beyond(pub.gate, pub.bound_endpoint, MAX_SUBSCRIBERS, 3) == 3
    friend = sub_socket(ctx, pub.bound_endpoint)
    assert pub.wait_for_subscriber(WAIT_S) and still_served(pub, friend, 3.0)
    friend.close(0)


def test_close_keeps_its_time_under_a_subscription_flood(run_dir: Path) -> None:
    pub = EventPublisher(PublishSettings(endpoint=f"ipc://{run_dir}/pub.sock", heartbeat_s=0))
    pub.start()
    with SubscriptionFlood(pub.bound_endpoint, 100_000):
        time.sleep(0.5)
        started = time.monotonic()
        pub.close(timeout=0.5)
        took = time.monotonic() - started
    assert took < 1.5


def test_events_out_is_created_readable_by_its_owner_only(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    with EventPublisher(PublishSettings(endpoint=f"ipc://{run_dir}/pub.sock", events_out=str(out))) as pub:
        pub.publish(SpeechStart(1.0), stream_time=1.0, wall_time=1.0)
    assert out.stat().st_mode & 0o777 == 0o600
    assert json.loads(out.read_text().splitlines()[0])["type"] == "speech.start"


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_loopback_binds_as_the_docs_say() -> None:
    ctx = zmq.Context()
    try:
        with EventPublisher(PublishSettings(endpoint="tcp://[::1]:*", heartbeat_s=0), context=ctx) as pub:
            assert pub.bound_endpoint.startswith("tcp://[::1]:")
            sock = ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.IPV6, 1)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.connect(pub.bound_endpoint)
            assert pub.wait_for_subscriber(WAIT_S) and still_served(pub, sock, 1.0)
            sock.close(0)
    finally:
        ctx.term()


# -- the control socket ----------------------------------------------------------------------------


@pytest.fixture()
def control(owner: FakeDaemon, run_dir: Path):
    with ControlServer(ControlSettings(endpoint=f"ipc://{run_dir}/control.sock"), ControlService(owner)) as srv:
        yield srv


def test_a_multi_frame_request_is_cut_off_before_it_is_read(control: ControlServer) -> None:
    assert control.endpoint is not None
    before = rss_mb()
    outcome = multiframe_request(control.endpoint, 64 * MB, timeout_s=WAIT_S)
    assert outcome.cut and outcome.sent_bytes < 1 * MB, outcome
    assert rss_mb() - before < RSS_SLACK_MB
    assert ControlClient(control.endpoint, timeout_s=5.0).request("status")["enrolled"] == 2


def test_a_request_in_frames_within_the_limit_still_gets_an_answer(control: ControlServer) -> None:
    ctx = zmq.Context()
    try:
        with ctx.socket(zmq.REQ) as sock:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(control.endpoint)
            sock.send_multipart([b"{}"] * 100)  # 100 small frames: read, refused with a reason
            assert sock.poll(5000)
            reply = json.loads(sock.recv())
            assert reply["error"]["code"] == "bad_request" and "one frame, got 100" in reply["error"]["message"]
    finally:
        ctx.term()


def test_control_connections_beyond_the_cap_are_refused(control: ControlServer) -> None:
    assert control.endpoint is not None
    assert refused_beyond(control.gate, control.endpoint, MAX_CONNECTIONS, 2) == 2
    assert ControlClient(control.endpoint, timeout_s=5.0).request("status")["enrolled"] == 2


# -- a real daemon ---------------------------------------------------------------------------------


def test_a_real_daemon_stays_small_and_stops_in_time_under_attack(default_model: Path, tmp_path: Path) -> None:
    """``speakerd run`` on a quiet file, own store and endpoints: an oversized subscription, a
    subscription flood and a multi-frame request, then SIGTERM during a flood."""
    work = tmp_path / "w"
    work.mkdir(mode=0o700)
    sf.write(work / "quiet.wav", np.zeros(120 * 16000, dtype="int16"), 16000)
    pub, control = f"ipc://{work}/pub.sock", f"ipc://{work}/control.sock"
    log = (tmp_path / "daemon.log").open("w")
    daemon = popen_speakerd("run", "--source", f"file:{work / 'quiet.wav'}", "--realtime", "--store", str(work / "store"),
                            "--pub", pub, "--control", control, stdout=subprocess.DEVNULL, stderr=log)
    peak = [0.0]
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 120
        while not ControlClient(control, timeout_s=0.5).daemon_is_up():
            assert daemon.poll() is None and time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()[-3000:]
        sampler = threading.Thread(target=sample_rss, args=(daemon.pid, stop, peak), daemon=True)
        sampler.start()
        assert oversized_subscription(pub, 8 * MB, timeout_s=WAIT_S).cut
        assert multiframe_request(control, 128 * MB, timeout_s=WAIT_S).cut
        with SubscriptionFlood(pub, 20_000):
            time.sleep(1.0)
            started = time.monotonic()
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(30)
            took = time.monotonic() - started
    finally:
        stop.set()
        if daemon.poll() is None:
            daemon.kill()
        log.close()
    assert code == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    assert took < 2.0 and peak[0] < 400, (took, peak[0])


# -- the meters, frame by frame --------------------------------------------------------------------

GREETING = b"\xff" + bytes(8) + b"\x7f\x03\x01" + b"NULL".ljust(20, b"\x00") + bytes(32)


def frame(body: bytes, *, more: bool = False, command: bool = False) -> bytes:
    flags = (1 if more else 0) | (4 if command else 0)
    if len(body) > 255:
        return bytes([flags | 2]) + len(body).to_bytes(8, "big") + body
    return bytes([flags, len(body)]) + body


def fed_in_pieces(meter, data: bytes, piece: int = 7) -> str | None:
    """Feed ``data`` a few bytes at a time, as the network may deliver it."""
    for i in range(0, len(data), piece):
        why = meter.feed(data[i : i + piece])
        if why:
            return why
    return None


@pytest.mark.parametrize("as_command", [False, True])
def test_the_subscription_meter_counts_held_subscriptions_and_topic_sizes(as_command: bool) -> None:
    from speakerd.meters import SubscriptionMeter

    def sub(topic: bytes, on: bool = True) -> bytes:
        if as_command:
            return frame((b"\x09SUBSCRIBE" if on else b"\x06CANCEL") + topic, command=True)
        return frame((b"\x01" if on else b"\x00") + topic)

    churn = b"".join(sub(b"speaker.") + sub(b"speaker.", on=False) for _ in range(500))
    assert fed_in_pieces(SubscriptionMeter(64, 64), GREETING + churn) is None  # held at most 1 at once
    many = b"".join(sub(b"t%03d" % i) for i in range(65))
    assert "more than 64 subscriptions" in fed_in_pieces(SubscriptionMeter(64, 64), GREETING + many)
    assert "topic of 65 bytes" in fed_in_pieces(SubscriptionMeter(64, 64), GREETING + sub(b"x" * 65))
    assert fed_in_pieces(SubscriptionMeter(64, 64), GREETING + sub(b"x" * 64)) is None


def test_the_request_meter_bounds_a_message_not_a_frame_or_a_connection() -> None:
    from speakerd.meters import RequestMeter

    delimiter = frame(b"", more=True)
    request = delimiter + frame(b"{" + b" " * 40_000 + b"}")
    assert fed_in_pieces(RequestMeter(65536), GREETING + request * 20, piece=4096) is None  # 20 requests of 40 kB
    split = delimiter + frame(b"x" * 30_000, more=True) * 2 + frame(b"x" * 30_000)
    assert "passed 65536 bytes" in fed_in_pieces(RequestMeter(65536), GREETING + split, piece=4096)
    pings = frame(b"\x04PING" + bytes(6), command=True) * 1000  # commands are ZeroMQ's to cap
    assert fed_in_pieces(RequestMeter(65536), GREETING + pings + request) is None
    assert "ZMTP 3" in RequestMeter(65536).feed(b"\x00\x05hello")
