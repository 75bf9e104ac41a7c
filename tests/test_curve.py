"""CURVE through the real daemon: encrypted events reach only authorised subscribers, and an
endpoint other machines could reach is refused without keys."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from daemon_harness import Enrolled, make_conversation, popen_speakerd, read_events, speakerd
from test_daemon_live import _free_port, _stop

from speakerd.security import generate_keypair

pytestmark = pytest.mark.slow


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
    stranger = popen_speakerd("listen", "--sub", endpoint, "--json", stdout=subprocess.PIPE)
    try:
        out = tmp_path / "events.jsonl"
        speakerd("run", "--config", str(config), "--source", f"file:{tmp_path / 'm.wav'}", "--realtime",
                 "--store", str(enrolled.store), "--events-out", str(out))
    finally:
        _stop(trusted, signal.SIGINT)
        _stop(stranger, signal.SIGINT)
    heard = [json.loads(line) for line in trusted.stdout.read().splitlines() if line.strip()]
    overheard = [line for line in stranger.stdout.read().splitlines() if line.strip()]
    assert heard == read_events(out) and len(heard) > 5
    assert overheard == []


def test_an_endpoint_other_machines_reach_needs_keys(tmp_path: Path, default_model: Path) -> None:
    import numpy as np
    import soundfile as sf

    sf.write(tmp_path / "quiet.wav", np.zeros(16000, dtype="float32"), 16000)
    proc = speakerd("run", "--source", f"file:{tmp_path / 'quiet.wav'}", "--store", str(tmp_path / "s"),
                    "--pub", f"tcp://0.0.0.0:{_free_port()}", check=False)
    assert proc.returncode == 2
    assert "CURVE" in proc.stderr and "0.0.0.0" in proc.stderr
