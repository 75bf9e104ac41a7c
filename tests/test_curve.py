"""CURVE through real sockets: encrypted events reach only authorised subscribers, `speakerd
speakers --curve-keys` (or the config's daemon.curve_keys) reaches a CURVE control socket (and fails
loudly, never silently editing the local store, when its keys are refused or a daemon that is there
does not answer), and endpoints other machines could reach are refused without keys."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import zmq
from daemon_harness import Enrolled, make_conversation, popen_speakerd, read_events, speakerd
from test_control import DIM, FakeDaemon, vec
from test_daemon_live import _free_port, _stop

from speakerd.control import ControlServer, ControlSettings, DaemonUnavailable, local_listener
from speakerd.control_client import ControlClient
from speakerd.control_service import ControlService
from speakerd.matcher import SpeakerIndex
from speakerd.security import CurveClient, CurveServer, SecurityError, generate_keypair, require_curve_to_connect
from speakerd.store import SpeakerStore

CLIENT_TIMEOUT_S = 1.0
"""control.client_timeout_s for the clients here: refused keys must fail within it, not hang."""
CLI_START_S = 10.0
"""Generous bound on starting the CLI (imports); a client that waited on a handshake would exceed it."""


def make_keys(directory: Path, *, authorise: bool = True) -> Path:
    """A server pair and a client pair in ``directory``, the client admitted via ``authorized/``."""
    generate_keypair(directory, "server")
    client_public, _ = generate_keypair(directory, "client")
    if authorise:
        (directory / "authorized").mkdir(mode=0o700)
        shutil.copy(client_public, directory / "authorized" / "client.key")
    return directory


def client_config(tmp_path: Path, timeout_s: float = CLIENT_TIMEOUT_S) -> Path:
    config = tmp_path / "client.toml"
    config.write_text(f"[control]\nclient_timeout_s = {timeout_s}\n")
    return config


@pytest.fixture()
def keys(tmp_path: Path) -> Path:
    return make_keys(tmp_path / "keys")


@contextmanager
def serve_control(store_dir: Path, endpoint: str, keys: Path | None) -> Iterator[tuple[ControlServer, FakeDaemon]]:
    """A real ControlServer over a real store (Alice, Bob) on ``endpoint``; with ``keys``, CURVE
    with the authenticator admitting ``keys/authorized/`` (and the daemon's own key), as ``Daemon``
    sets it up."""
    store = SpeakerStore(store_dir, fingerprint="test-model", dim=DIM)
    store.enroll("Alice", vec(1, 4), source="test")
    store.enroll("Bob", vec(2, 4), source="test")
    owner = FakeDaemon(store, SpeakerIndex.from_store(store))
    context = zmq.Context()
    curve = CurveServer(keys) if keys is not None else None
    try:
        if curve is not None:
            curve.start(context)
        with ControlServer(ControlSettings(endpoint=endpoint), ControlService(owner), context=context, curve=curve) as server:
            yield server, owner
    finally:
        if curve is not None:
            curve.close()
        context.term()
        store.close()


@pytest.fixture()
def curve_control(keys: Path, tmp_path: Path) -> Iterator[tuple[ControlServer, FakeDaemon]]:
    """A CURVE control server on tcp loopback (see serve_control)."""
    with serve_control(tmp_path / "daemon-store", "tcp://127.0.0.1:*", keys) as served:
        yield served


@pytest.mark.slow
def test_only_authorised_subscribers_hear_a_curve_daemon(enrolled: Enrolled, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    generate_keypair(keys, "server")
    client_public, _ = generate_keypair(keys, "client")
    (keys / "authorized").mkdir(mode=0o700)
    shutil.copy(client_public, keys / "authorized" / "client.key")
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    config = tmp_path / "curve.toml"
    config.write_text(
        f'[daemon]\ncurve_keys = "{keys}"\n[publish]\nendpoint = "{endpoint}"\n'
        f'[control]\nendpoint = "ipc://{tmp_path}/ctl/control.sock"\n'
    )
    make_conversation(enrolled, ["1688", "2033"], tmp_path / "m.wav", turns=2, turn_s=(3.0, 3.5), seed=2)

    trusted = popen_speakerd("listen", "--sub", endpoint, "--json", "--curve-keys", str(keys), stdout=subprocess.PIPE)
    # the daemon's own config is enough on its machine: its endpoint, and its keys
    owner = popen_speakerd("listen", "--config", str(config), "--json", stdout=subprocess.PIPE)
    stranger = popen_speakerd("listen", "--sub", endpoint, "--json", stdout=subprocess.PIPE)
    try:
        out = tmp_path / "events.jsonl"
        speakerd("run", "--config", str(config), "--source", f"file:{tmp_path / 'm.wav'}", "--realtime",
                 "--store", str(enrolled.store), "--events-out", str(out))
    finally:
        for proc in (trusted, owner, stranger):
            _stop(proc, signal.SIGINT)
    heard, by_config = ([json.loads(line) for line in p.stdout.read().splitlines() if line.strip()] for p in (trusted, owner))
    overheard = [line for line in stranger.stdout.read().splitlines() if line.strip()]
    assert heard == read_events(out) and len(heard) > 5
    assert by_config == heard
    assert overheard == []


def test_listen_refuses_an_endpoint_other_machines_reach_without_keys(tmp_path: Path) -> None:
    proc = speakerd("listen", "--sub", f"tcp://192.0.2.1:{_free_port()}", "--max-events", "1", check=False)
    assert proc.returncode == 2
    assert "--curve-keys" in proc.stderr and "192.0.2.1" in proc.stderr


@pytest.mark.slow
def test_an_endpoint_other_machines_reach_needs_keys(tmp_path: Path, default_model: Path) -> None:
    sf.write(tmp_path / "quiet.wav", np.zeros(16000, dtype="float32"), 16000)
    proc = speakerd("run", "--source", f"file:{tmp_path / 'quiet.wav'}", "--store", str(tmp_path / "s"),
                    "--pub", f"tcp://0.0.0.0:{_free_port()}", check=False)
    assert proc.returncode == 2
    assert "CURVE" in proc.stderr and "0.0.0.0" in proc.stderr


# -- `speakerd speakers --curve-keys`: the control socket from another machine ---------------------


def run_speakers(*args: str, keys: Path | None, store: Path, config: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    """``speakerd speakers ARGS`` as a user runs it, with its own (never used) store; and how long it took."""
    curve = ("--curve-keys", str(keys)) if keys is not None else ()
    started = time.monotonic()
    proc = speakerd("speakers", *args, *curve, "--store", str(store), "--config", str(config), check=False)
    return proc, time.monotonic() - started


def test_speakers_with_curve_keys_talk_to_a_curve_control_socket(
    curve_control: tuple[ControlServer, FakeDaemon], keys: Path, tmp_path: Path
) -> None:
    server, owner = curve_control
    assert server.endpoint is not None and server.endpoint.startswith("tcp://127.0.0.1:")
    # the socket really is CURVE-only: a plain client gets no answer
    assert not ControlClient(server.endpoint, timeout_s=0.5).daemon_is_up()
    local_store, config = tmp_path / "client-store", client_config(tmp_path)

    listed, _ = run_speakers("list", "--control", server.endpoint, keys=keys, store=local_store, config=config)
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[1] for line in listed.stdout.splitlines()] == ["Alice", "Bob"]

    renamed, _ = run_speakers("rename", "Alice", "Alicia", "--control", server.endpoint, keys=keys, store=local_store, config=config)
    assert renamed.returncode == 0, renamed.stderr
    assert renamed.stdout.startswith("renamed Alice -> Alicia (spk-")
    assert owner.store.get("Alicia") is not None and owner.store.get("Alice") is None  # the daemon's store changed

    status, _ = run_speakers("status", "--control", server.endpoint, keys=keys, store=local_store, config=config)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["enrolled"] == 2
    assert server.requests == 3
    assert not local_store.exists()  # everything went to the daemon


@pytest.mark.parametrize("wrong", ["client key not authorised", "not the daemon's server key"])
def test_refused_curve_keys_time_out_with_a_clear_error_and_no_store_fallback(
    curve_control: tuple[ControlServer, FakeDaemon], keys: Path, tmp_path: Path, wrong: str
) -> None:
    server, owner = curve_control
    other = make_keys(tmp_path / "other", authorise=False)
    if wrong == "client key not authorised":
        shutil.copy(keys / "server.key", other / "server.key")  # right daemon, stranger's client key
    else:
        for name in ("client.key", "client.key_secret"):  # authorised client, another server's key
            shutil.copy(keys / name, other / name)
    local_store = tmp_path / "client-store"

    proc, took = run_speakers("list", "--control", server.endpoint, keys=other, store=local_store, config=client_config(tmp_path))
    assert proc.returncode == 1
    assert f"the daemon on {server.endpoint} did not answer within 1000 ms (control.client_timeout_s)" in proc.stderr
    assert "refused these CURVE keys" in proc.stderr
    assert f"{other}/client.key is in the daemon's <keys>/authorized/" in proc.stderr
    assert CLIENT_TIMEOUT_S <= took < CLIENT_TIMEOUT_S + CLI_START_S
    assert proc.stdout == "" and not local_store.exists()  # no silent fall-back to this machine's store
    assert server.requests == 0 and [s.name for s in owner.store.speakers()] == ["Alice", "Bob"]


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:{port}", "tcp://192.0.2.7:5561", "tcp://speakerd.example.net:5561",
                                      "tcp://localhost.example.net:5561"])
def test_a_non_local_control_endpoint_without_keys_exits_2_at_once(tmp_path: Path, endpoint: str) -> None:
    endpoint = endpoint.format(port=_free_port())
    local_store = tmp_path / "client-store"
    config = client_config(tmp_path, timeout_s=60.0)  # a client that tried to connect would wait a minute
    proc, took = run_speakers("list", "--control", endpoint, keys=None, store=local_store, config=config)
    assert proc.returncode == 2
    assert f"the control endpoint {endpoint} is not loopback or ipc" in proc.stderr
    assert "pass --curve-keys DIR" in proc.stderr
    assert took < CLI_START_S and proc.stdout == "" and not local_store.exists()


def test_a_non_local_control_endpoint_from_the_config_needs_keys_too(tmp_path: Path) -> None:
    config = tmp_path / "remote.toml"
    config.write_text('[control]\nendpoint = "tcp://192.0.2.7:5561"\nclient_timeout_s = 60.0\n')
    proc, took = run_speakers("status", keys=None, store=tmp_path / "client-store", config=config)
    assert proc.returncode == 2 and "tcp://192.0.2.7:5561" in proc.stderr and "--curve-keys DIR" in proc.stderr
    assert took < CLI_START_S


def test_with_keys_an_absent_daemon_is_an_error_not_the_local_store(keys: Path, tmp_path: Path) -> None:
    endpoint = f"tcp://0.0.0.0:{_free_port()}"  # nobody listens; the store must not stand in for it
    local_store = tmp_path / "client-store"
    proc, took = run_speakers("list", "--control", endpoint, keys=keys, store=local_store, config=client_config(tmp_path))
    assert proc.returncode == 1
    assert f"the daemon on {endpoint} did not answer within 1000 ms" in proc.stderr
    assert took < CLIENT_TIMEOUT_S + CLI_START_S
    assert proc.stdout == "" and not local_store.exists()


def test_without_keys_a_silent_local_endpoint_still_falls_back_to_the_store(tmp_path: Path, default_model: Path) -> None:
    local_store = _empty_store(tmp_path / "client-store", default_model)
    proc, _ = run_speakers("list", "--control", f"tcp://127.0.0.1:{_free_port()}", keys=None, store=local_store,
                           config=client_config(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"no speakers enrolled in {local_store}"


def _empty_store(directory: Path, model: Path) -> Path:
    """A store the default model made and nobody enrolled in yet (reading commands never create one)."""
    from speakerd.bundle import load_bundle

    bundle = load_bundle(model)
    SpeakerStore(directory, fingerprint=bundle.fingerprint, dim=bundle.embedding_dim).close()
    return directory


def _break_keys(directory: Path, how: str) -> Path:
    if how == "missing directory":
        return directory / "nowhere"
    if how == "a file, not a directory":
        directory.mkdir()
        (directory / "keys").write_text("")
        return directory / "keys"
    make_keys(directory)
    if how == "no client key":
        (directory / "client.key_secret").unlink()
    elif how == "no server key":
        (directory / "server.key").unlink()
    elif how == "secret key readable by others":
        (directory / "client.key_secret").chmod(0o644)
    elif how == "server key is not a key":
        (directory / "server.key").write_text("this is not a certificate\n")
    return directory


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("missing directory", "CURVE key directory {dir} does not exist"),
        ("a file, not a directory", "CURVE key directory {dir} is not a directory"),
        ("no client key", "no CURVE key {dir}/client.key_secret; create it with `speakerd keys generate --dir {dir} --name client`"),
        ("no server key", "no CURVE key {dir}/server.key; copy the daemon's server.key here"),
        ("secret key readable by others", "CURVE secret key {dir}/client.key_secret is mode 644; it must be 0600"),
        ("server key is not a key", "cannot read CURVE key {dir}/server.key: No public key found"),
    ],
)
def test_unusable_key_directories_exit_2_naming_the_problem(tmp_path: Path, how: str, message: str) -> None:
    bad = _break_keys(tmp_path / "bad", how)
    local_store = tmp_path / "client-store"
    proc, _ = run_speakers("list", "--control", f"tcp://192.0.2.7:{_free_port()}", keys=bad, store=local_store,
                           config=client_config(tmp_path, timeout_s=60.0))
    assert proc.returncode == 2
    assert message.format(dir=bad) in proc.stderr
    assert proc.stdout == "" and not local_store.exists()


def test_listen_and_speakers_load_curve_keys_the_same_way(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    speakers, _ = run_speakers("list", "--control", "tcp://192.0.2.7:5561", keys=missing, store=tmp_path / "s",
                               config=client_config(tmp_path))
    listen = speakerd("listen", "--sub", f"tcp://127.0.0.1:{_free_port()}", "--curve-keys", str(missing), check=False)
    assert speakers.returncode == listen.returncode == 2
    message = f"CURVE key directory {missing} does not exist"
    assert message in speakers.stderr and message in listen.stderr
    assert speakers.stderr.split("speakerd: ", 1)[1] == listen.stderr.split("speakerd: ", 1)[1]


def test_every_speakers_action_takes_curve_keys_and_help_explains_it() -> None:
    from speakerd.cli import build_parser

    parser = build_parser()
    for action in (["list"], ["rename", "A", "B"], ["remove", "A"], ["enroll", "A", "--last", "5"], ["merge", "A", "B"],
                   ["status"], ["reload"]):
        args = parser.parse_args(["speakers", *action, "--control", "tcp://h:1", "--curve-keys", "~/k"])
        assert (args.curve_keys, args.control) == ("~/k", "tcp://h:1")
    shown = " ".join(speakerd("speakers", "list", "--help").stdout.split())
    assert "--curve-keys DIR CURVE key directory holding client.key_secret and the daemon's server.key" in shown
    assert "never a fall-back to the store" in shown


def test_a_client_refuses_a_non_local_endpoint_without_keys_in_code(keys: Path) -> None:
    with pytest.raises(SecurityError, match="--curve-keys DIR"):
        require_curve_to_connect("tcp://10.1.2.3:5561", None, what="control", option="--curve-keys DIR")
    require_curve_to_connect("tcp://10.1.2.3:5561", CurveClient.from_dir(keys), what="control", option="--curve-keys DIR")
    for local in ("ipc:///tmp/x.sock", "tcp://127.0.0.1:5561", "tcp://localhost:5561", "tcp://[::1]:5561"):
        require_curve_to_connect(local, None, what="control", option="--curve-keys DIR")


# -- without --curve-keys: the keys of daemon.curve_keys; a daemon that is there is never bypassed ----


@pytest.fixture()
def run_dir() -> Iterator[Path]:
    """A short private directory for ipc sockets (AF_UNIX paths are limited to about 107 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="sd-ctl-"))
    directory.chmod(0o700)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def speakers_config(
    tmp_path: Path, endpoint: str, *, curve_keys: Path | None = None, timeout_s: float = CLIENT_TIMEOUT_S
) -> Path:
    """What `speakerd run --config` and a plain `speakerd speakers --config` share on one machine."""
    config = tmp_path / "speakerd.toml"
    daemon = f'[daemon]\ncurve_keys = "{curve_keys}"\n' if curve_keys is not None else ""
    config.write_text(f'{daemon}[control]\nendpoint = "{endpoint}"\nclient_timeout_s = {timeout_s}\n')
    return config


def _config_keys(layout: str, daemon_keys: Path, tmp_path: Path) -> Path:
    """The daemon.curve_keys a user's config names, laid out as ``layout`` says."""
    if layout in ("the daemon's key directory (server and client pairs)", "the daemon's server pair alone"):
        return daemon_keys
    client = tmp_path / "client-keys"  # a client's directory: its pair, the daemon's public key, no server secret
    client.mkdir(mode=0o700)
    for name in ("client.key", "client.key_secret", "server.key"):
        shutil.copy(daemon_keys / name, client / name)
    return client


@pytest.mark.parametrize(
    "layout",
    ["the daemon's key directory (server and client pairs)", "the daemon's server pair alone", "a client key directory"],
)
def test_config_keys_reach_a_curve_ipc_control_socket_without_curve_keys(run_dir: Path, tmp_path: Path, layout: str) -> None:
    daemon_keys = tmp_path / "keys"
    if layout == "the daemon's server pair alone":
        generate_keypair(daemon_keys, "server")  # no client key made or authorised: the daemon admits its own
    else:
        make_keys(daemon_keys)
    endpoint = f"ipc://{run_dir}/control.sock"
    with serve_control(tmp_path / "daemon-store", endpoint, daemon_keys) as (server, owner):
        assert not ControlClient(endpoint, timeout_s=0.5).daemon_is_up()  # CURVE really is on
        config = speakers_config(tmp_path, endpoint, curve_keys=_config_keys(layout, daemon_keys, tmp_path), timeout_s=5.0)
        local_store = tmp_path / "client-store"

        renamed, _ = run_speakers("rename", "Alice", "Alicia", keys=None, store=local_store, config=config)
        assert renamed.returncode == 0, renamed.stderr
        assert renamed.stdout.startswith("renamed Alice -> Alicia (spk-")
        assert owner.store.get("Alicia") is not None and owner.store.get("Alice") is None  # the daemon's store
        [(old, new, _)] = owner.relabels  # what makes the daemon publish speaker.renamed
        assert (old.name, new.name, old.id) == ("Alice", "Alicia", new.id)

        listed, _ = run_speakers("list", keys=None, store=local_store, config=config)
        assert listed.returncode == 0, listed.stderr
        assert [line.split()[1] for line in listed.stdout.splitlines()] == ["Alicia", "Bob"]
        assert server.requests >= 2 and not local_store.exists()  # nothing went to this command's store


@contextmanager
def hung_socket(endpoint: str) -> Iterator[None]:
    """Something that accepts connections on ``endpoint`` and reads requests but never answers."""
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    try:
        yield
    finally:
        sock.close()
        context.term()


@pytest.mark.parametrize("why", ["CURVE on, asked without keys", "CURVE on, config keys of another daemon", "hung"])
def test_a_daemon_that_is_there_but_silent_is_an_error_never_the_store(run_dir: Path, tmp_path: Path, why: str) -> None:
    endpoint = f"ipc://{run_dir}/control.sock"
    local_store = tmp_path / "client-store"
    config_keys = None
    if why == "CURVE on, config keys of another daemon":
        config_keys = tmp_path / "other"
        generate_keypair(config_keys, "server")
    config = speakers_config(tmp_path, endpoint, curve_keys=config_keys)
    if why == "hung":
        with hung_socket(endpoint):
            proc, took = run_speakers("rename", "Alice", "Alicia", keys=None, store=local_store, config=config)
        owner = None
    else:
        with serve_control(tmp_path / "daemon-store", endpoint, make_keys(tmp_path / "keys")) as (server, owner):
            proc, took = run_speakers("rename", "Alice", "Alicia", keys=None, store=local_store, config=config)
            assert server.requests == 0 and [s.name for s in owner.store.speakers()] == ["Alice", "Bob"]
            assert owner.relabels == []
    assert proc.returncode == 1, proc.stderr
    assert (
        f"a daemon seems to be running on {endpoint} (its socket accepts connections) but it did not answer "
        "within 1000 ms (control.client_timeout_s)"
    ) in proc.stderr
    assert "The store was left alone" in proc.stderr
    if config_keys is None:
        assert "pass the daemon's --config (its daemon.curve_keys is then used), or --curve-keys DIR" in proc.stderr
    else:
        assert f"with the CURVE keys of daemon.curve_keys ({config_keys})" in proc.stderr
    assert took < 2 * CLIENT_TIMEOUT_S + CLI_START_S
    assert proc.stdout == "" and not local_store.exists()  # the store was not opened, let alone edited


@pytest.mark.parametrize("config_keys", [None, "missing"], ids=["no keys", "daemon.curve_keys set"])
@pytest.mark.parametrize("socket_file", ["stale (bound, then closed)", "absent"])
def test_no_daemon_on_the_ipc_endpoint_falls_back_to_the_store(
    run_dir: Path, tmp_path: Path, default_model: Path, socket_file: str, config_keys: str | None
) -> None:
    endpoint = f"ipc://{run_dir}/control.sock"
    if socket_file.startswith("stale"):  # what a daemon that crashed leaves behind
        context = zmq.Context()
        with context.socket(zmq.REP) as sock:
            sock.bind(endpoint)
        context.term()
        assert (run_dir / "control.sock").exists()
    assert local_listener(endpoint) is False
    # the keys are read only when a daemon is there: a crashed daemon's config still works offline
    keys = tmp_path / "no-such-keys" if config_keys else None
    config = speakers_config(tmp_path, endpoint, curve_keys=keys, timeout_s=60.0)  # no waiting on a dead socket
    local_store = _empty_store(tmp_path / "client-store", default_model)
    proc, took = run_speakers("list", keys=None, store=local_store, config=config)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"no speakers enrolled in {local_store}"
    assert took < CLI_START_S


def test_local_listener_tells_a_live_socket_from_a_stale_or_absent_one(run_dir: Path) -> None:
    endpoint = f"ipc://{run_dir}/live.sock"
    assert local_listener(endpoint) is False  # no file
    with hung_socket(endpoint):
        assert local_listener(endpoint) is True
    assert local_listener(endpoint) is False  # the file is left behind, nobody listens
    port = _free_port()
    assert local_listener(f"tcp://127.0.0.1:{port}") is False
    with hung_socket(f"tcp://127.0.0.1:{port}"):
        assert local_listener(f"tcp://127.0.0.1:{port}") is True
    assert local_listener("inproc://x") is None


def test_a_second_server_on_a_curve_daemons_live_ipc_socket_is_refused(keys: Path, run_dir: Path, tmp_path: Path) -> None:
    """A CURVE daemon never answers a plain status request; it must not look stale to a second one."""
    from speakerd.errors import SpeakerdError

    endpoint = f"ipc://{run_dir}/control.sock"
    with serve_control(tmp_path / "store", endpoint, keys) as (server, owner):
        with pytest.raises(SpeakerdError, match="another speakerd listens"):
            ControlServer(ControlSettings(endpoint=endpoint), ControlService(owner)).start()
        assert local_listener(endpoint) is True, "the first daemon keeps its socket"
    # once it is gone, its socket file is stale and a new server may take the endpoint
    with serve_control(tmp_path / "store2", endpoint, keys):
        assert local_listener(endpoint) is True


def test_daemon_keys_authenticate_the_local_client_as_the_daemon(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    generate_keypair(keys, "server")
    client = CurveClient.for_daemon_keys(keys)
    server = CurveServer(keys)
    assert client.name == "server" and client.public == client.server_public == server.public
    assert "daemon.curve_keys" in client.rejection_hint()
    only_public = tmp_path / "public"
    only_public.mkdir(mode=0o700)
    shutil.copy(keys / "server.key", only_public / "server.key")
    with pytest.raises(SecurityError, match="holds neither the daemon's server.key_secret .* nor a client.key_secret"):
        CurveClient.for_daemon_keys(only_public)


@pytest.mark.slow
def test_speakers_reach_a_real_curve_daemon_over_tcp(enrolled: Enrolled, tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys")
    control = f"tcp://127.0.0.1:{_free_port()}"
    config = tmp_path / "daemon.toml"
    config.write_text(
        f'[daemon]\ncurve_keys = "{keys}"\n[publish]\nendpoint = "tcp://127.0.0.1:{_free_port()}"\n'
        f'[control]\nendpoint = "{control}"\n'
    )
    sf.write(tmp_path / "quiet.wav", np.zeros(180 * 16000, dtype="int16"), 16000)  # keeps the daemon up
    log = tmp_path / "daemon.log"
    with log.open("w") as err:
        daemon = popen_speakerd("run", "--config", str(config), "--source", f"file:{tmp_path / 'quiet.wav'}", "--realtime",
                                "--store", str(enrolled.store), stdout=subprocess.DEVNULL, stderr=err)
    try:
        probe = ControlClient(control, timeout_s=1.0, curve=CurveClient.from_dir(keys))
        deadline = time.monotonic() + 120.0
        while True:
            try:
                probe.request("status")
                break
            except DaemonUnavailable:
                assert daemon.poll() is None, log.read_text()[-4000:]
                assert time.monotonic() < deadline, "the daemon's control socket never answered"

        local_store = tmp_path / "client-store"
        listed, _ = run_speakers("list", "--control", control, keys=keys, store=local_store, config=client_config(tmp_path, 10.0))
        assert listed.returncode == 0, listed.stderr
        assert sorted(line.split()[1] for line in listed.stdout.splitlines()) == sorted(enrolled.names.values())

        stranger = make_keys(tmp_path / "stranger", authorise=False)
        shutil.copy(keys / "server.key", stranger / "server.key")
        refused, _ = run_speakers("list", "--control", control, keys=stranger, store=local_store, config=client_config(tmp_path))
        assert refused.returncode == 1 and "did not answer within 1000 ms" in refused.stderr and refused.stdout == ""
        assert not local_store.exists()
    finally:
        code, _ = _stop(daemon)
    assert code == 0, log.read_text()[-4000:]


def test_a_curve_control_socket_binds_ipv6_loopback(keys: Path, tmp_path: Path) -> None:
    """Issue 18: `[::1]` failed to bind although the docs call it local (ZeroMQ needs zmq.IPV6)."""
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback here")
    with serve_control(tmp_path / "daemon-store", "tcp://[::1]:*", keys) as (server, _owner):
        assert server.endpoint is not None and server.endpoint.startswith("tcp://[::1]:")
        client = ControlClient(server.endpoint, timeout_s=5.0, curve=CurveClient.from_dir(keys))
        assert client.request("status")["enrolled"] == 2
