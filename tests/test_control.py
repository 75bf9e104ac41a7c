"""The control socket over real ZeroMQ sockets: every op, refusals, and malformed requests."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from decision_values import GE2E

from speakerd import events as ev
from speakerd.control import CONTROL_VERSION, ControlError, ControlServer, ControlSettings, DaemonUnavailable
from speakerd.control_client import ControlClient
from speakerd.control_service import ControlService, SpeakerPort
from speakerd.decisions.clustering import ProvisionalSettings, ProvisionalSpeakers
from speakerd.decisions.evidence import Match, MatchedWindow
from speakerd.lifecycle import ReloadResult
from speakerd.matcher import SpeakerIndex
from speakerd.security import SecurityError
from speakerd.store import Speaker, SpeakerStore
from speakerd.windows import Window

DIM = 16
SR = 16000


def vec(seed: int, n: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=DIM)
    return (base + 0.1 * rng.normal(size=(n, DIM))).astype(np.float32)


@dataclass
class FakeDaemon:
    """The control plane's port over a real store and index, with no pipeline: relabels are
    recorded as the daemon would publish them, and recent windows are whatever a test puts there."""

    store: SpeakerStore
    index: SpeakerIndex
    provisional: ProvisionalSpeakers = field(default_factory=lambda: ProvisionalSpeakers(ProvisionalSettings(), GE2E, DIM))
    relabels: list[tuple[ev.SpeakerRef, ev.SpeakerRef, str | None]] = field(default_factory=list)
    recent: list[MatchedWindow] = field(default_factory=list)

    def speakers(self) -> list[Speaker]:
        return self.store.speakers()

    def speaker(self, who: str) -> Speaker | None:
        return self.store.get(who)

    def enroll(self, name: str, embeddings: np.ndarray, source: str) -> Speaker:
        speaker = self.store.enroll(name, embeddings, source=source)
        self.index.add(speaker.id, speaker.name, embeddings)
        return speaker

    def rename(self, speaker_id: str, name: str) -> Speaker:
        renamed = self.store.rename(speaker_id, name)
        self.index.rename(speaker_id, renamed.name)
        return renamed

    def merge(self, source_id: str, target_id: str) -> int:
        _, owners, vectors = self.store.embeddings()
        mine = np.array([o == source_id for o in owners], dtype=bool)
        self.enroll(self.store.get(target_id).name, vectors[mine], f"merge:{source_id}")
        self.forget(source_id)
        return int(mine.sum())

    def forget(self, speaker_id: str) -> Speaker:
        gone = self.store.remove(speaker_id)
        self.index.remove(gone.id)
        return gone

    def recent_windows(self, seconds_back: float) -> list[MatchedWindow]:
        return list(self.recent)

    def relabel(self, old: ev.SpeakerRef, new: ev.SpeakerRef, cause: str | None = None) -> None:
        self.relabels.append((old, new, cause))

    def status(self) -> dict[str, Any]:
        status = ev.Status(uptime_s=1.0, backend="fake", model="fake", counters={"windows": 3}).to_dict()
        return {**status, "enrolled": len(self.index.speakers), "provisional": len(self.provisional.speakers())}

    def reload(self) -> ReloadResult:
        before = self.index.speakers
        self.index = SpeakerIndex.from_store(self.store, self.index.settings)
        added = tuple(sorted(n for i, n in self.index.speakers.items() if i not in before))
        return ReloadResult(True, len(self.index.speakers), added=added)


def test_the_double_is_a_speaker_port(owner: FakeDaemon) -> None:
    port: SpeakerPort = owner  # mypy checks the double against the daemon's port
    assert port.speaker("Alice") is not None


@pytest.fixture()
def owner(tmp_path: Path):
    store = SpeakerStore(tmp_path / "store", fingerprint="test-model", dim=DIM)
    store.enroll("Alice", vec(1, 4), source="test")
    store.enroll("Bob", vec(2, 4), source="test")
    yield FakeDaemon(store, SpeakerIndex.from_store(store))
    store.close()


@pytest.fixture()
def server(owner: FakeDaemon, tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    with ControlServer(ControlSettings(endpoint=f"ipc://{run}/control.sock"), ControlService(owner)) as srv:
        yield srv


@pytest.fixture()
def client(server: ControlServer) -> ControlClient:
    return ControlClient(server.endpoint, timeout_s=5.0)


def unknown_window(emb: np.ndarray, start: int, label: ev.SpeakerRef | None) -> MatchedWindow:
    """A window as the pipeline remembers it: unmatched, with the label clustering gave it."""
    w = Window(start, start + 3 * SR // 2, np.zeros((1, 1), np.float32), 1.0, 0.0, 0, False)
    return MatchedWindow(w, Match(None, None, 0.3, 0.1, None, False, None), emb, label=label)


def make_provisional(owner: FakeDaemon, seed: int = 5) -> str:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=DIM)
    label = None
    for k in range(6):
        e = base + 0.05 * rng.normal(size=DIM)
        label = owner.provisional.observe(e, k * SR // 2, k * SR // 2 + 3 * SR // 2).label
        owner.recent.append(unknown_window(e.astype(np.float32), k * SR // 2, label))
    assert label is not None
    return label.id


def test_list_and_status(client: ControlClient, owner: FakeDaemon) -> None:
    pid = make_provisional(owner)
    listed = client.request("list")
    assert [s["name"] for s in listed["enrolled"]] == ["Alice", "Bob"]
    assert [(p["id"], p["windows"], p["now"]) for p in listed["provisional"]] == [(pid, 6, None)]
    status = client.request("status")
    assert status["counters"]["windows"] == 3 and status["enrolled"] == 2 and status["provisional"] == 1


def test_an_idle_server_sleeps_until_a_request(server: ControlServer, client: ControlClient) -> None:
    """No periodic wake-ups for the stop flag: the server and its gate polled 10 times a second each."""
    assert client.request("list")["enrolled"]
    assert server.gate is not None
    before, gate_before = server._polls, server.gate._selects
    time.sleep(0.5)  # idle: this was 5 polls and 5 selects
    assert server._polls - before <= 1 and server.gate._selects - gate_before <= 1
    assert client.request("status")["enrolled"] == 2  # a request still wakes it at once


def test_rename_enrolled_changes_store_index_and_relabels(client: ControlClient, owner: FakeDaemon) -> None:
    alice = owner.store.get("Alice")
    result = client.request("rename", speaker="Alice", name="Alicia")
    assert result["speaker"] == {"id": alice.id, "name": "Alicia", "known": True}
    assert owner.store.get("Alicia").id == alice.id and owner.index.name_of(alice.id) == "Alicia"
    assert owner.relabels == [
        (ev.SpeakerRef(alice.id, "Alice", True), ev.SpeakerRef(alice.id, "Alicia", True), None)
    ]


def test_naming_a_provisional_speaker_enrolls_its_windows(client: ControlClient, owner: FakeDaemon) -> None:
    pid = make_provisional(owner)
    result = client.request("enroll", name="Carol", speaker=pid)
    carol = owner.store.get("Carol")
    assert carol.num_embeddings == 6 and result["promoted"] == pid
    assert carol.id in owner.index.speakers
    assert owner.relabels == [(ev.SpeakerRef(pid, None, False), ev.SpeakerRef(carol.id, "Carol", True), None)]
    assert owner.provisional.resolve(pid).name == "Carol"
    # "unknown-N is Alice" for an existing name is a merge into Alice
    pid2 = make_provisional(owner, seed=9)
    client.request("rename", speaker=pid2, name="Alice")
    assert owner.relabels[-1][2] == "control" and owner.relabels[-1][1].name == "Alice"


def test_enroll_the_last_seconds_of_speech(client: ControlClient, owner: FakeDaemon) -> None:
    pid = make_provisional(owner)
    result = client.request("enroll", name="Dave", last_s=10)
    # the 3 windows before the voice became a provisional speaker do not vote
    assert result["windows"] == 6 and result["speech_s"] == pytest.approx(4.0) and result["promoted"] == pid
    assert result["matched"] == {"None": 3, pid: 3} and owner.store.get("Dave").num_embeddings == 6
    owner.recent = owner.recent[:1]
    with pytest.raises(ControlError) as err:
        client.request("enroll", name="Eve", last_s=10)
    assert err.value.code == "too_little_speech" and owner.store.get("Eve") is None


def test_merge_and_forget(client: ControlClient, owner: FakeDaemon) -> None:
    a, b = make_provisional(owner, 5), make_provisional(owner, 6)
    assert a != b
    client.request("merge", source=b, target=a)
    assert owner.provisional.resolve(b).id == a
    alice, bob = owner.store.get("Alice"), owner.store.get("Bob")
    result = client.request("merge", source="Bob", target="Alice")
    assert result["embeddings"] == 4 and owner.store.get("Bob") is None
    assert owner.store.get("Alice").num_embeddings == 8 and bob.id not in owner.index.speakers
    assert owner.relabels[-1] == (ev.SpeakerRef(bob.id, "Bob", True), ev.SpeakerRef(alice.id, "Alice", True), "control")
    assert client.request("forget", speaker="Alice")["forgotten"] == alice.id
    assert owner.store.speakers() == [] and len(owner.index) == 0
    assert client.request("forget", speaker=a) == {"forgotten": a}


def test_reload_rebuilds_the_matcher_from_the_store(client: ControlClient, owner: FakeDaemon) -> None:
    owner.store.enroll("Frank", vec(3, 2), source="elsewhere")  # e.g. `speakerd enroll` while running
    reply = client.request("reload")
    assert (reply["ok"], reply["speakers"], reply["added"]) == (True, 3, ["Frank"])
    assert "Frank" in owner.index.speakers.values()


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"\xff\xfe", "bad_request"),
        (b"not json", "bad_request"),
        (b"[1, 2]", "bad_request"),
        (json.dumps({"op": "list"}).encode(), "bad_version"),
        (json.dumps({"v": 99, "op": "list"}).encode(), "bad_version"),
        (json.dumps({"v": CONTROL_VERSION, "op": "explode"}).encode(), "unknown_op"),
        (json.dumps({"v": CONTROL_VERSION, "op": "rename", "speaker": "Alice"}).encode(), "bad_request"),
        (json.dumps({"v": CONTROL_VERSION, "op": "rename", "speaker": "Alice", "name": 7}).encode(), "bad_request"),
        (json.dumps({"v": CONTROL_VERSION, "op": "enroll", "name": "X"}).encode(), "bad_request"),
        (json.dumps({"v": CONTROL_VERSION, "op": "enroll", "name": "X", "last_s": -1}).encode(), "bad_request"),
        (json.dumps({"v": CONTROL_VERSION, "op": "rename", "speaker": "Nobody", "name": "X"}).encode(), "not_found"),
        (json.dumps({"v": CONTROL_VERSION, "op": "rename", "speaker": "Alice", "name": "Bob"}).encode(), "refused"),
        (json.dumps({"v": CONTROL_VERSION, "op": "forget", "speaker": "unknown-42"}).encode(), "not_found"),
        # issue 18: these were `internal` (RecursionError, UnicodeEncodeError) or accepted as version 1
        (b"[" * 30_000 + b"]" * 30_000, "bad_request"),
        (b'{"v": 1, "op": "rename", "speaker": "Alice", "name": ' + b"[" * 5000 + b"]" * 5000 + b"}", "bad_request"),
        (b'{"v": 1, "op": "rename", "speaker": "Alice", "name": "\\ud800x"}', "bad_request"),
        (b'{"v": 1, "op": "rename", "speaker": "\\udfff", "name": "Carol"}', "bad_request"),
        (b'{"v": 1, "op": "list", "x": NaN}', "bad_request"),
        (json.dumps({"v": True, "op": "list"}).encode(), "bad_version"),
        (json.dumps({"v": 1.0, "op": "list"}).encode(), "bad_version"),
        (json.dumps({"v": CONTROL_VERSION, "op": "rename", "speaker": "Alice", "name": "Al\u202eecila"}).encode(), "bad_request"),
        (json.dumps({"v": CONTROL_VERSION, "op": "rename", "speaker": "Alice", "name": "Al\u2066ice"}).encode(), "bad_request"),
        (json.dumps({"v": CONTROL_VERSION, "op": "rename", "speaker": "Alice", "name": "Al\u0085ice"}).encode(), "bad_request"),
        (json.dumps({"v": CONTROL_VERSION, "op": "enroll", "name": "E\u200fve", "last_s": 5}).encode(), "bad_request"),
    ],
)
def test_malformed_or_unknown_requests_get_an_error_and_change_nothing(
    client: ControlClient, owner: FakeDaemon, raw: bytes, code: str
) -> None:
    before = [(s.id, s.name, s.num_embeddings) for s in owner.store.speakers()]
    reply = client.send_raw(raw)
    assert reply["v"] == CONTROL_VERSION and reply["ok"] is False and reply["error"]["code"] == code, reply
    assert [(s.id, s.name, s.num_embeddings) for s in owner.store.speakers()] == before
    assert owner.relabels == []
    assert client.request("status")["enrolled"] == 2  # and the server still answers


def test_a_multipart_request_is_refused_and_the_server_keeps_serving(server: ControlServer, client: ControlClient) -> None:
    ctx = zmq.Context()
    try:
        with ctx.socket(zmq.REQ) as sock:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(server.endpoint)
            sock.send_multipart([b"{}", b"{}"])
            assert sock.poll(5000)
            assert json.loads(sock.recv())["error"]["code"] == "bad_request"
    finally:
        ctx.term()
    assert client.request("list")["enrolled"]


def test_concurrent_clients_are_all_answered(client: ControlClient) -> None:
    results: list[int] = []

    def ask() -> None:
        results.append(len(ControlClient(client.endpoint, timeout_s=10.0).request("list")["enrolled"]))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15.0)
    assert results == [2] * 8


def test_no_daemon_is_reported_quickly(tmp_path: Path) -> None:
    client = ControlClient(f"ipc://{tmp_path}/nothing.sock", timeout_s=0.3)
    assert not client.daemon_is_up()
    with pytest.raises(DaemonUnavailable):
        ControlClient("tcp://127.0.0.1:1", timeout_s=0.3).request("list")


def test_endpoints_that_would_expose_the_control_plane_are_refused(owner: FakeDaemon, tmp_path: Path) -> None:
    with pytest.raises(SecurityError, match="CURVE"):
        ControlServer(ControlSettings(endpoint="tcp://0.0.0.0:5599"), ControlService(owner)).start()
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(SecurityError, match="0700"):
        ControlServer(ControlSettings(endpoint=f"ipc://{shared}/c.sock"), ControlService(owner)).start()
    fresh = tmp_path / "fresh" / "run"
    with ControlServer(ControlSettings(endpoint=f"ipc://{fresh}/c.sock"), ControlService(owner)):
        assert (fresh.stat().st_mode & 0o777) == 0o700


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:*", "tcp://localhost:*", "tcp://[::1]:*", "ipc://@speakerd-test-control"])
def test_endpoints_every_local_user_reaches_need_curve_for_control(owner: FakeDaemon, endpoint: str) -> None:
    """Issue 18: another uid forgot a speaker through loopback tcp and through an abstract ipc name
    (whose "directory" check looked at the working directory). Without CURVE both are refused."""
    with pytest.raises(SecurityError, match="every local user can connect to .*daemon.curve_keys"):
        ControlServer(ControlSettings(endpoint=endpoint), ControlService(owner)).start()


def test_a_second_server_on_a_live_ipc_socket_is_refused(server: ControlServer, owner: FakeDaemon) -> None:
    from speakerd.errors import SpeakerdError

    with pytest.raises(SpeakerdError, match="another speakerd listens"):
        ControlServer(ControlSettings(endpoint=server.endpoint), ControlService(owner)).start()
