"""The ZeroMQ publisher and the reference subscriber, on real sockets over loopback / ipc / inproc.

No sleep() synchronises anything: subscriptions are confirmed by a handshake (publish until the
subscriber has seen one event), and every wait is for a condition under a deadline.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import threading
import time
from collections.abc import Callable, Iterator

import jsonschema
import pytest
import zmq

from speakerd.errors import ConfigError, SpeakerdError
from speakerd.events import (
    EventError,
    SpeakerChange,
    SpeakerRef,
    SpeakerSegment,
    SpeechEnd,
    SpeechStart,
    Status,
    encode_event,
    load_schema,
    make_event,
    parse_event,
)
from speakerd.listen import SeqTracker, add_listen_arguments, format_event, listen, listen_target, main_listen
from speakerd.publisher import EventPublisher, PublishError, PublishSettings

DEADLINE_S = 10.0
"""Every wait in this file gives up after this long; on a healthy machine each takes milliseconds."""
ANY_PORT = "tcp://127.0.0.1:*"

ALICE = SpeakerRef("spk-alice", "Alice", True)
BOB = SpeakerRef("spk-bob", "Bob", True)
CHANGE = SpeakerChange(speaker=ALICE, previous=BOB, score=0.82, margin=0.21, at=12.1)
SEGMENT = SpeakerSegment(start=10.2, end=15.0, speaker=ALICE, score=0.79, windows=9)
STATUS = Status(uptime_s=60.0, backend="onnx", model="ecapa", counters={"windows": 3}, queue_depth={"audio": 0})
MIXED = [SpeechStart(10.2), CHANGE, SpeechEnd(10.2, 15.0), SEGMENT, STATUS]


@pytest.fixture(autouse=True)
def no_thread_at_all_left_running() -> Iterator[None]:
    """Stricter than conftest's check: the publisher thread is a daemon thread, so count those too."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before]
    for t in leaked:
        t.join(timeout=DEADLINE_S)
    assert not [t.name for t in leaked if t.is_alive()]


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.term()


def settings(**kw) -> PublishSettings:
    return PublishSettings(endpoint=kw.pop("endpoint", ANY_PORT), **kw)


def sub_socket(ctx: zmq.Context, endpoint: str, *topics: str, rcvhwm: int | None = None) -> zmq.Socket:
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    if rcvhwm is not None:
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
        sock.setsockopt(zmq.RCVBUF, 4096)  # a small kernel buffer too, so the HWM is reached quickly
    for t in topics or ("",):
        sock.setsockopt(zmq.SUBSCRIBE, t.encode())
    sock.connect(endpoint)
    return sock


@functools.cache
def validator(event_type: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(load_schema(event_type))


def recv(sock: zmq.Socket) -> dict:
    assert sock.poll(int(DEADLINE_S * 1000)), "no event within the deadline"
    topic, data = sock.recv_multipart()
    event = parse_event(topic, data)
    validator(event["type"]).validate(event)
    return event


def handshake(pub: EventPublisher, sock: zmq.Socket, payload=STATUS) -> int:
    """Publish ``payload`` until ``sock`` receives one, proving the subscription is live.

    Returns the last seq published; stragglers up to it may still arrive and are skipped by callers.
    """
    deadline = time.monotonic() + DEADLINE_S
    seq = 0
    while time.monotonic() < deadline:
        pub.publish(payload, stream_time=0.0, wall_time=time.time())
        seq += 1
        if sock.poll(20):
            sock.recv_multipart()
            return seq
    pytest.fail("subscriber never received the handshake")


def recv_after(sock: zmq.Socket, seq: int, n: int) -> list[dict]:
    """The next ``n`` events with seq above ``seq`` (skipping handshake stragglers)."""
    out: list[dict] = []
    while len(out) < n:
        event = recv(sock)
        if event["seq"] > seq:
            out.append(event)
    return out


# --- settings ---


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"endpoint": "127.0.0.1:5560"}, "publish.endpoint"),
        ({"endpoint": "tcp://127.0.0.1"}, "publish.endpoint"),
        ({"endpoint": "tcp://127.0.0.1:99999"}, "publish.endpoint"),
        ({"endpoint": "udp://127.0.0.1:5560"}, "publish.endpoint"),
        ({"hwm": 0}, "publish.hwm"),
        ({"queue_events": 0}, "publish.queue_events"),
        ({"linger_ms": -1}, "publish.linger_ms"),
        ({"events_out": ""}, "publish.events_out"),
    ],
)
def test_settings_are_validated(kw, key):
    with pytest.raises(ConfigError) as info:
        PublishSettings(**kw)
    assert info.value.key == key


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:5560", "tcp://*:5560", "tcp://[::1]:0", "ipc:///tmp/s", "inproc://x"])
def test_settings_accept_endpoints(endpoint):
    assert PublishSettings(endpoint=endpoint).endpoint == endpoint


def test_default_endpoint_is_loopback_only():
    assert PublishSettings().endpoint.startswith("tcp://127.0.0.1:")


# --- publishing over real sockets ---


def test_pub_sub_delivers_every_event_in_order_with_contiguous_seq(ctx):
    n = 500
    with EventPublisher(settings(), session="sess1") as pub:
        assert pub.bound_endpoint.startswith("tcp://127.0.0.1:") and not pub.bound_endpoint.endswith(":*")
        with sub_socket(ctx, pub.bound_endpoint) as sock:
            last = handshake(pub, sock)
            for i in range(n):
                pub.publish(MIXED[i % len(MIXED)], stream_time=20.0 + i / 100, wall_time=1_718_000_000.0 + i)
            events = recv_after(sock, last, n)
    assert [e["seq"] for e in events] == list(range(last + 1, last + 1 + n))
    assert [e["type"] for e in events] == [MIXED[i % len(MIXED)].TOPIC for i in range(n)]
    assert {e["session"] for e in events} == {"sess1"}
    assert events[1]["stream_time"] == 20.01 and events[1]["speaker"]["name"] == "Alice"
    stats = pub.stats()
    assert stats == {"published": last + n, "dropped_events": 0, "queue_depth": 0}


def test_topic_prefix_filtering(ctx):
    with EventPublisher(settings()) as pub:
        with sub_socket(ctx, pub.bound_endpoint, "speaker.") as sock:
            last = handshake(pub, sock, payload=SEGMENT)
            for payload in [STATUS, SpeechStart(1.0), CHANGE, SpeechEnd(1.0, 2.0), SEGMENT, STATUS, CHANGE]:
                pub.publish(payload, stream_time=2.0, wall_time=1.0)
            events = recv_after(sock, last, 3)  # in-order delivery: a leaked status would show up here
    assert [e["type"] for e in events] == ["speaker.change", "speaker.segment", "speaker.change"]
    # The filtered-out events still used seqs: prefix subscribers see gaps that are not losses.
    assert [e["seq"] - last for e in events] == [3, 5, 7]


def test_subscriber_that_never_reads_never_blocks_the_publisher(ctx):
    total = 100_000
    with EventPublisher(settings(hwm=10)) as pub:
        with sub_socket(ctx, pub.bound_endpoint, rcvhwm=10) as sock:
            last = handshake(pub, sock)
            started = time.monotonic()
            for _ in range(total):
                pub.publish(CHANGE, stream_time=1.0, wall_time=2.0)
            elapsed = time.monotonic() - started
            pub.close()
            stats = pub.stats()
            # Only now read what reached the subscriber: ZeroMQ dropped the rest at the HWM.
            seqs = []
            while sock.poll(300):
                seqs.append(json.loads(sock.recv_multipart()[1])["seq"])
    assert elapsed < DEADLINE_S, f"publishing {total} events took {elapsed:.1f} s"
    # Every seq is accounted for by the publisher: sent to ZeroMQ or counted as dropped.
    assert stats["published"] + stats["dropped_events"] == total + last
    assert stats["queue_depth"] == 0
    received = [s for s in seqs if s > last]
    assert 0 < len(received) < total / 2
    assert received == sorted(received) and received[-1] - received[0] + 1 > len(received)  # a seq gap


def test_a_full_queue_drops_and_counts_and_leaves_a_seq_gap(tmp_path):
    """Deterministic queue overflow: events published before start() wait in the bounded queue."""
    out = tmp_path / "events.jsonl"
    pub = EventPublisher(settings(queue_events=5, events_out=str(out)))
    for i in range(8):
        pub.publish(SpeechStart(float(i)), stream_time=float(i), wall_time=1.0)
    assert pub.stats() == {"published": 0, "dropped_events": 3, "queue_depth": 5}
    with pub:
        # the queue is still full until the socket thread has taken the five: wait for room
        deadline = time.monotonic() + 10.0
        while pub.stats()["queue_depth"] and time.monotonic() < deadline:
            time.sleep(0.01)
        pub.publish(SpeechStart(9.0), stream_time=9.0, wall_time=1.0)
    lines = out.read_text().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [1, 2, 3, 4, 5, 9]
    assert pub.stats() == {"published": 6, "dropped_events": 3, "queue_depth": 0}


def test_events_out_writes_one_valid_json_line_per_event(tmp_path):
    out = tmp_path / "events.jsonl"
    n = 250
    with EventPublisher(settings(events_out=str(out)), session="filesess") as pub:
        for i in range(n):
            pub.publish(MIXED[i % len(MIXED)], stream_time=float(i), wall_time=1_718_000_000.0 + i)
    text = out.read_text(encoding="utf-8")
    assert text.endswith("\n")
    lines = text.split("\n")[:-1]
    assert len(lines) == n
    for i, line in enumerate(lines):
        event = json.loads(line)
        validator(event["type"]).validate(event)
        assert (event["seq"], event["session"], event["stream_time"]) == (i + 1, "filesess", float(i))
    assert pub.stats()["published"] == n


def test_events_out_appends_across_runs(tmp_path):
    out = tmp_path / "events.jsonl"
    for session in ("run1", "run2"):
        with EventPublisher(settings(events_out=str(out)), session=session) as pub:
            pub.publish(STATUS, stream_time=0.0, wall_time=1.0)
    assert [json.loads(line)["session"] for line in out.read_text().splitlines()] == ["run1", "run2"]


def test_events_out_dash_is_stdout(capsys):
    with EventPublisher(settings(endpoint="inproc://stdout-test", events_out="-")) as pub:
        pub.publish(CHANGE, stream_time=1.0, wall_time=2.0)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["type"] == "speaker.change"


def test_inproc_with_a_shared_context(ctx):
    with EventPublisher(settings(endpoint="inproc://speakerd-events"), context=ctx) as pub:
        assert pub.bound_endpoint == "inproc://speakerd-events"
        with sub_socket(ctx, pub.bound_endpoint) as sock:
            last = handshake(pub, sock)
            pub.publish(CHANGE, stream_time=1.0, wall_time=2.0)
            (event,) = recv_after(sock, last, 1)
    assert event["type"] == "speaker.change"
    assert not ctx.closed  # a context passed in belongs to the caller


def test_ipc_endpoint(ctx, tmp_path):
    with EventPublisher(settings(endpoint=f"ipc://{tmp_path}/events.sock")) as pub:
        with sub_socket(ctx, pub.bound_endpoint) as sock:
            last = handshake(pub, sock)
            pub.publish(SEGMENT, stream_time=15.1, wall_time=2.0)
            (event,) = recv_after(sock, last, 1)
    assert event["end"] == 15.0


def test_close_drains_what_is_queued(tmp_path):
    out = tmp_path / "events.jsonl"
    pub = EventPublisher(settings(events_out=str(out)))
    pub.start()
    for i in range(2000):
        pub.publish(SpeechStart(float(i)), stream_time=float(i), wall_time=1.0)
    pub.close(timeout=DEADLINE_S)
    assert len(out.read_text().splitlines()) == 2000
    assert pub.stats() == {"published": 2000, "dropped_events": 0, "queue_depth": 0}


def test_close_is_idempotent_and_later_publishes_are_counted_drops():
    pub = EventPublisher(settings())
    pub.start()
    pub.close()
    pub.close()
    pub.publish(STATUS, stream_time=0.0, wall_time=1.0)
    assert pub.stats()["dropped_events"] == 1
    with pytest.raises(RuntimeError):
        pub.start()


def test_close_without_start_counts_queued_events_as_dropped():
    pub = EventPublisher(settings())
    pub.publish(STATUS, stream_time=0.0, wall_time=1.0)
    pub.close()
    assert pub.stats() == {"published": 0, "dropped_events": 1, "queue_depth": 0}
    with pytest.raises(RuntimeError, match="not started"):
        pub.bound_endpoint  # noqa: B018


def test_publish_rejects_non_payloads_and_nan_times_without_using_a_seq(tmp_path):
    out = tmp_path / "events.jsonl"
    with EventPublisher(settings(events_out=str(out))) as pub:
        with pytest.raises(TypeError):
            pub.publish({"start": 1.0}, stream_time=1.0, wall_time=1.0)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            pub.publish(STATUS, stream_time=float("nan"), wall_time=1.0)
        pub.publish(STATUS, stream_time=1.0, wall_time=1.0)
    assert json.loads(out.read_text())["seq"] == 1


def test_bind_failure_is_a_clear_error_from_start(ctx):
    with ctx.socket(zmq.PUB) as taken:
        taken.setsockopt(zmq.LINGER, 0)
        taken.bind(ANY_PORT)
        endpoint = taken.getsockopt_string(zmq.LAST_ENDPOINT)
        pub = EventPublisher(PublishSettings(endpoint=endpoint))
        with pytest.raises(PublishError, match=r"cannot publish events on tcp://127\.0\.0\.1:\d+: .*in use.*another speakerd"):
            pub.start()
        assert isinstance(PublishError("x"), SpeakerdError)
        pub.close()  # harmless after a failed start


def test_unbindable_endpoint_and_unwritable_events_out_fail_start(tmp_path):
    with pytest.raises(PublishError, match="cannot publish events on tcp://192.0.2.1:5560"):
        EventPublisher(PublishSettings(endpoint="tcp://192.0.2.1:5560")).start()  # TEST-NET: not ours to bind
    with pytest.raises(PublishError, match="cannot open events_out"):
        EventPublisher(settings(events_out=str(tmp_path / "missing-dir" / "e.jsonl"))).start()


def test_publish_is_thread_safe_and_seq_is_unique(tmp_path):
    out = tmp_path / "events.jsonl"
    per_thread, threads = 500, 4
    with EventPublisher(settings(events_out=str(out), queue_events=per_thread * threads)) as pub:
        workers = [
            threading.Thread(target=lambda: [pub.publish(STATUS, stream_time=0.0, wall_time=1.0) for _ in range(per_thread)])
            for _ in range(threads)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join(DEADLINE_S)
    seqs = [json.loads(line)["seq"] for line in out.read_text().splitlines()]
    assert seqs == list(range(1, per_thread * threads + 1))


# --- the reference subscriber ---


class Lines(io.TextIOBase):
    """A text sink another thread writes to, with a wait for a condition on what was written."""

    def __init__(self) -> None:
        self._text = ""
        self._cond = threading.Condition()

    def write(self, s: str) -> int:
        with self._cond:
            self._text += s
            self._cond.notify_all()
        return len(s)

    def lines(self) -> list[str]:
        with self._cond:
            return self._text.splitlines()

    def wait_for_write(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait(timeout)

    def wait_for(self, pred: Callable[[list[str]], bool], what: str) -> list[str]:
        with self._cond:
            ok = self._cond.wait_for(lambda: pred(self._text.splitlines()), timeout=DEADLINE_S)
            assert ok, f"timed out waiting for {what}; got {self._text!r}"
            return self._text.splitlines()


class Listener:
    """listen() in a thread, stopped and joined on exit."""

    def __init__(self, endpoint: str, **kw) -> None:
        self.out, self.err, self.stop = Lines(), Lines(), threading.Event()
        self.rc: int | None = None

        def run() -> None:
            self.rc = listen(endpoint, out=self.out, err=self.err, stop=self.stop, **kw)

        self.thread = threading.Thread(target=run, name="listen")

    def __enter__(self) -> Listener:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(DEADLINE_S)
        assert not self.thread.is_alive()


def listen_handshake(send: Callable[[], None], out: Lines) -> None:
    """Send until the listener has printed something: its subscription is then live."""
    deadline = time.monotonic() + DEADLINE_S
    while not out.lines():
        assert time.monotonic() < deadline, "listener never received the handshake"
        send()
        out.wait_for_write(0.02)


def test_listen_prints_readable_lines_from_a_real_publisher():
    with EventPublisher(settings()) as pub, Listener(pub.bound_endpoint, as_json=False, verbose=True) as lis:
        listen_handshake(lambda: pub.publish(STATUS, stream_time=0.0, wall_time=1.0), lis.out)
        pub.publish(CHANGE, stream_time=12.34, wall_time=2.0)
        pub.publish(SEGMENT, stream_time=15.1, wall_time=2.0)
        lines = lis.out.wait_for(lambda ls: any("segment" in line for line in ls), "the segment line")
    assert lis.rc == 0
    assert "  12.34s  speaker.change  Alice (score 0.82, margin 0.21) <- Bob" in lines
    assert "  15.10s  segment  Alice  10.20-15.00s  (score 0.79, 9 windows)" in lines
    assert lines[0].startswith("   0.00s  status  up 60s  onnx/ecapa  windows=3")
    assert lis.err.lines() == [f"listening to {pub.bound_endpoint} for all events (Ctrl-C to stop)"]


def raw_event(payload, seq: int, session: str = "rawsess") -> list[bytes]:
    return [payload.TOPIC.encode(), encode_event(make_event(payload, seq=seq, session=session, stream_time=1.0, wall_time=2.0))]


@pytest.mark.parametrize("as_json", [False, True])
def test_listen_reports_seq_gaps_and_survives_malformed_messages(ctx, as_json):
    with ctx.socket(zmq.PUB) as raw:
        raw.setsockopt(zmq.LINGER, 0)
        raw.bind(ANY_PORT)
        endpoint = raw.getsockopt_string(zmq.LAST_ENDPOINT)
        seq = 0

        def send_next() -> None:
            nonlocal seq
            seq += 1
            raw.send_multipart(raw_event(STATUS, seq))

        with Listener(endpoint, as_json=as_json, verbose=True) as lis:
            listen_handshake(send_next, lis.out)
            raw.send_multipart([b"speaker.change", b"{not json"])
            raw.send_multipart([b"speaker.change"])
            raw.send_multipart(raw_event(CHANGE, seq + 4)[:1] + [raw_event(CHANGE, seq + 4)[1].replace(b'"score":0.82', b'"score":"x"')])
            raw.send_multipart(raw_event(CHANGE, seq + 5))  # seq+1..seq+4 never arrive: lost 4
            raw.send_multipart(raw_event(SEGMENT, 1, session="newsess"))  # the daemon restarted
            lis.out.wait_for(lambda ls: any("segment" in line or "newsess" in line for line in ls), "the last event")
            err = lis.err.wait_for(lambda ls: any("new session" in line for line in ls), "the restart note")
    malformed = [line for line in err if line.startswith("malformed event skipped: ")]
    assert len(malformed) == 3, err
    assert "not JSON" in malformed[0] and "expected 2 frames" in malformed[1]
    assert "'score' must be a finite number" in malformed[2]
    assert f"lost 4 events (seq {seq + 1}-{seq + 4})" in err
    assert "new session newsess (daemon restarted)" in err
    out = lis.out.lines()
    if as_json:
        events = [json.loads(line) for line in out]  # stdout stays pure JSON lines
        assert [e["seq"] for e in events if e["type"] != "status"] == [seq + 5, 1]
        assert lis.err.lines()[0].startswith("malformed")  # no banner in JSON mode
    else:
        assert out[-2:] == ["   1.00s  speaker.change  Alice (score 0.82, margin 0.21) <- Bob", "   1.00s  segment  Alice  10.20-15.00s  (score 0.79, 9 windows)"]


def test_listen_with_a_prefix_does_not_call_filtered_events_lost():
    with EventPublisher(settings()) as pub, Listener(pub.bound_endpoint, as_json=True, topics=("speaker.",)) as lis:
        listen_handshake(lambda: pub.publish(SEGMENT, stream_time=0.0, wall_time=1.0), lis.out)
        for payload in (STATUS, SpeechStart(1.0), CHANGE, STATUS, CHANGE):
            pub.publish(payload, stream_time=1.0, wall_time=2.0)
        lines = lis.out.wait_for(lambda ls: sum('"speaker.change"' in line for line in ls) == 2, "two changes")
    assert {json.loads(line)["type"] for line in lines} == {"speaker.change", "speaker.segment"}
    assert lis.err.lines() == []


def test_listen_returns_after_max_events_and_main_listen_wires_the_cli(capsys):
    with EventPublisher(settings()) as pub:
        parser = argparse.ArgumentParser()
        add_listen_arguments(parser)
        args = parser.parse_args(["--sub", pub.bound_endpoint, "--json", "--max-events", "3"])
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(main_listen(args)))
        thread.start()
        deadline = time.monotonic() + DEADLINE_S
        while thread.is_alive() and time.monotonic() < deadline:
            pub.publish(STATUS, stream_time=0.0, wall_time=1.0)
            thread.join(0.02)
        assert result == [0]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(json.loads(line)["type"] == "status" for line in lines)


def test_listen_arguments_defaults(tmp_path):
    parser = argparse.ArgumentParser()
    add_listen_arguments(parser)
    args = parser.parse_args([])
    assert (args.json, args.topic, args.max_events) == (False, None, None)
    assert listen_target(args) == (PublishSettings().endpoint, None)
    config = tmp_path / "d.toml"
    config.write_text('[publish]\nendpoint = "tcp://127.0.0.1:6001"\n')
    assert listen_target(parser.parse_args(["--config", str(config)])) == ("tcp://127.0.0.1:6001", None)
    assert listen_target(parser.parse_args(["--config", str(config), "--sub", "ipc:///tmp/x"])) == ("ipc:///tmp/x", None)


def test_listen_rejects_a_bad_endpoint():
    with pytest.raises(ConfigError, match="listen.sub"):
        listen("localhost:5560", as_json=False, max_events=1)


def test_format_event_for_every_type():
    def fmt(payload) -> str:
        return format_event(make_event(payload, seq=1, session="s", stream_time=3.0, wall_time=1.0))

    assert fmt(SpeechStart(2.8)) == "   3.00s  speech.start  2.80s"
    assert fmt(SpeechEnd(2.8, 5.1)) == "   3.00s  speech.end  2.80-5.10s"
    unknown = SpeakerChange(speaker=SpeakerRef.unknown(), previous=None, score=0.3, margin=0.05, at=2.9, tentative=True)
    assert fmt(unknown) == "   3.00s  speaker.change  unknown (score 0.30, margin 0.05)  [tentative]"
    newer = {"v": 1, "type": "speaker.rename", "seq": 1, "session": "s", "stream_time": 3.0, "wall_time": 1.0, "to": "Al"}
    assert format_event(newer) == '   3.00s  speaker.rename  {"to":"Al"}'
    bad = make_event(SpeechStart(1.0), seq=1, session="s", stream_time=3.0, wall_time=1.0) | {"start": None}
    with pytest.raises(EventError):
        format_event(bad)


def test_seq_tracker():
    t = SeqTracker()
    assert t.see("a", 5) is None  # joining mid-session is not loss
    assert t.see("a", 6) is None
    assert t.see("a", 9) == "lost 2 events (seq 7-8)"
    assert t.see("a", 8) == "seq went back from 9 to 8"
    assert t.see("b", 1) == "new session b (daemon restarted)"
