"""The suite and the user's own speakerd never meet (issue 18: with the service the README installs
running, three tests failed with "another speakerd listens on the control socket")."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import USER_DIRS
from daemon_harness import OWN_PUB, REPO, isolated, read_events, speakerd
from speakerd.control import default_control_endpoint
from speakerd.control_client import ControlClient
from speakerd.paths import data_dir, runtime_dir
from speakerd.security import default_keys_dir
from speakerd.store import default_store_dir

START_TIMEOUT_S = 60.0


def test_every_default_location_is_the_sessions_own(own_user_dirs: Path) -> None:
    for name in USER_DIRS:
        assert Path(os.environ[name]).is_relative_to(own_user_dirs), name
    for where in (data_dir(), runtime_dir(), default_store_dir(), default_keys_dir(), Path.home()):
        assert where.is_relative_to(own_user_dirs), where
    assert default_control_endpoint() == f"ipc://{own_user_dirs / 'xdg_runtime_dir' / 'speakerd' / 'control.sock'}"


def test_a_test_daemon_gets_an_ephemeral_publish_endpoint(tmp_path: Path) -> None:
    assert isolated(("run", "--source", "mic")) == ["run", "--source", "mic", "--pub", OWN_PUB]
    assert isolated(("run", "--pub", "tcp://127.0.0.1:7000")) == ["run", "--pub", "tcp://127.0.0.1:7000"]
    assert isolated(("enroll", "A", "a.wav")) == ["enroll", "A", "a.wav"]
    with_endpoint, without = tmp_path / "a.toml", tmp_path / "b.toml"
    with_endpoint.write_text('[publish]\nendpoint = "tcp://127.0.0.1:7001"\n')
    without.write_text("[daemon]\nstatus_interval_s = 2.0\n")
    assert isolated(("run", "--config", str(with_endpoint))) == ["run", "--config", str(with_endpoint)]
    assert isolated(("run", "--config", str(without))) == ["run", "--config", str(without), "--pub", OWN_PUB]


def test_a_test_daemon_on_its_defaults(default_model: Path, tmp_path: Path) -> None:
    """A daemon as most tests start one: no --control, so the default control socket. The test below
    runs this one in a session beside a user's daemon that holds the user's default socket."""
    sf.write(tmp_path / "quiet.wav", np.zeros(16000, dtype=np.float32), 16000)
    out = tmp_path / "events.jsonl"
    speakerd("run", "--source", f"file:{tmp_path / 'quiet.wav'}", "--no-realtime", "--store", str(tmp_path / "s"),
             "--events-out", str(out), timeout=120)
    assert read_events(out)[-1]["type"] == "status"


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.mark.slow
def test_the_suite_passes_beside_a_users_daemon_on_its_defaults(default_model: Path, request: pytest.FixtureRequest) -> None:
    """A user (HOME of their own, no XDG variables) runs speakerd on its default control socket and
    store; the suite run from that user's shell keeps to its own."""
    home = Path(tempfile.mkdtemp(prefix="sd-user-"))  # short: an ipc path must fit in 107 bytes
    request.addfinalizer(lambda: shutil.rmtree(home, ignore_errors=True))
    user_env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_") and k != "PYTEST_ADDOPTS"}
    user_env.update(HOME=str(home), PYTHONPATH=str(REPO / "daemon"))
    sf.write(home / "quiet.wav", np.zeros(300 * 16000, dtype=np.int16), 16000)  # keeps the daemon up
    socket_file = home / ".local" / "share" / "speakerd" / "run" / "control.sock"
    # its publish endpoint is not what is at stake (it comes from no folder): an ephemeral one, so
    # the test never takes a real user's 5560
    user = subprocess.Popen([sys.executable, "-m", "speakerd.cli", "run", "--source", f"file:{home / 'quiet.wav'}",
                             "--realtime", "--pub", OWN_PUB], env=user_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        client = ControlClient(f"ipc://{socket_file}", timeout_s=1.0)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not client.daemon_is_up():
            assert user.poll() is None, user.stderr.read() if user.stderr else ""
            assert time.monotonic() < deadline, "the user's daemon never answered on its control socket"
            time.sleep(0.2)
        session = client.request("status")["session"]
        before = _files(home)
        suite = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             f"{Path(__file__).name}::test_a_test_daemon_on_its_defaults"],
            cwd=REPO / "tests", env=user_env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert suite.returncode == 0, suite.stdout[-3000:]
        assert user.poll() is None, "the user's daemon stopped"
        assert client.request("status")["session"] == session, "the user's daemon was replaced"
        assert _files(home) == before, "the suite wrote into the user's folders"
    finally:
        user.send_signal(signal.SIGTERM)
        user.wait(timeout=30)
