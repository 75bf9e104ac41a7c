"""The store's safety through the real CLI: lost and damaged databases, `speakers recover`, reading
commands that never create, and one daemon per store (with an isolated store, XDG dirs, endpoints)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from daemon_harness import Enrolled, make_conversation, popen_speakerd, read_events, score_events, speakerd

from speakerd.recover import embedding_ids_by_name as owners
from speakerd.store import DB_NAME, INDEX_NAME, STAMP_NAME
from store_helpers import reap

SPEAKERS = ["1688", "1998", "2033", "3080"]
WAIT_S = 60.0


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No command here may reach the user's store, runtime dir or config."""
    for var, sub in (("XDG_DATA_HOME", "data"), ("XDG_RUNTIME_DIR", "run"), ("XDG_CONFIG_HOME", "config")):
        (tmp_path / sub).mkdir(exist_ok=True)
        monkeypatch.setenv(var, str(tmp_path / sub))


def run_args(tmp_path: Path, store: Path, wav: Path, *extra: str) -> list[str]:
    return ["run", "--source", f"file:{wav}", "--no-realtime", "--store", str(store), "--pub", "tcp://127.0.0.1:*",
            "--events-out", str(tmp_path / "events.jsonl"), "--control", f"ipc://{tmp_path / 'c.sock'}", *extra]




def test_reading_commands_never_create_a_store(tmp_path: Path, default_model: Path) -> None:
    typo = tmp_path / "typo" / "dir"
    for args in (("speakers", "list"), ("speakers", "remove", "Alice"), ("speakers", "rename", "A", "B")):
        proc = speakerd(*args, "--store", str(typo), "--control", f"ipc://{tmp_path / 'none.sock'}", check=False)
        assert proc.returncode == 2, proc.stderr
        assert f"there is no speaker store in {typo}; check --store" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not typo.exists() and not typo.parent.exists()


@pytest.mark.slow
def test_run_refuses_a_store_that_lost_its_database(enrolled: Enrolled, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(enrolled.store, store)
    (store / DB_NAME).unlink()
    index = (store / INDEX_NAME).read_bytes()
    make_conversation(enrolled, SPEAKERS[:2], tmp_path / "m.wav", turns=2, seed=1)
    proc = speakerd(*run_args(tmp_path, store, tmp_path / "m.wav"), check=False, timeout=WAIT_S)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "lost its database" in proc.stderr and f"speakerd speakers recover --store {store}" in proc.stderr
    assert "created speaker store" not in proc.stderr and "Traceback" not in proc.stderr
    assert (store / INDEX_NAME).read_bytes() == index, "the last copy of the voiceprints is untouched"
    assert not (store / DB_NAME).exists()
    assert not (tmp_path / "events.jsonl").exists() or not (tmp_path / "events.jsonl").read_text()


@pytest.mark.slow
def test_recover_regroups_every_voice_and_the_daemon_names_them_again(enrolled: Enrolled, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(enrolled.store, store)
    truth = owners(store)
    (store / DB_NAME).unlink()
    index, stamp = (store / INDEX_NAME).read_bytes(), (store / STAMP_NAME).read_bytes()
    proc = speakerd("speakers", "recover", "--store", str(store))
    out = proc.stdout
    total = sum(len(ids) for ids in truth.values())
    assert f"recovered {total} voiceprint embeddings" in out
    assert "name LOST" in out and "speakerd speakers rename recovered-N NAME" in out
    aside = next(store.glob("before-recover-*"))
    assert (aside / INDEX_NAME).read_bytes() == index and (aside / STAMP_NAME).read_bytes() == stamp
    assert (store / INDEX_NAME).read_bytes() == index, "the index was adopted as it was, not rewritten"
    recovered = owners(store)
    # every recovered group is exactly one enrolled reader's embeddings
    assert sorted(recovered) == [f"recovered-{i}" for i in range(1, len(truth) + 1)]
    matched = {name: next(t for t, ids in truth.items() if ids == group) for name, group in recovered.items()}
    assert sorted(matched.values()) == sorted(truth), (matched, {k: len(v) for k, v in recovered.items()})
    for name, reader in matched.items():
        speakerd("speakers", "rename", name, reader, "--store", str(store), "--control", f"ipc://{tmp_path / 'n.sock'}")
    assert speakerd("speakers", "recover", "--store", str(store)).stdout.startswith("the speaker store in")
    conv = make_conversation(enrolled, SPEAKERS, tmp_path / "m.wav", turns=8, seed=4)
    speakerd(*run_args(tmp_path, store, tmp_path / "m.wav"), timeout=300)
    s = score_events(conv, read_events(tmp_path / "events.jsonl"), enrolled.names)
    assert s.accuracy >= 0.9, s


@pytest.mark.slow
def test_a_damaged_database_is_refused_then_salvaged(enrolled: Enrolled, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(enrolled.store, store)
    truth = owners(store)
    db = store / DB_NAME
    size = db.stat().st_size
    with db.open("r+b") as fh:  # garbage over a page in the middle of the file
        fh.seek(size // 2 // 4096 * 4096)
        fh.write(np.random.default_rng(11).bytes(4096))
    damaged = db.read_bytes()
    make_conversation(enrolled, SPEAKERS[:2], tmp_path / "m.wav", turns=2, seed=1)
    for args in (["speakers", "list", "--offline", "--store", str(store)], run_args(tmp_path, store, tmp_path / "m.wav")):
        proc = speakerd(*args, check=False, timeout=WAIT_S)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "not a usable speaker store" in proc.stderr and "speakers recover" in proc.stderr
        assert "Traceback" not in proc.stderr
    proc = speakerd("speakers", "recover", "--store", str(store))
    aside = next(store.glob("before-recover-*"))
    assert (aside / DB_NAME).read_bytes() == damaged, "the damaged database is kept aside as it was"
    recovered = owners(store)
    assert sorted(i for ids in recovered.values() for i in ids) == sorted(i for ids in truth.values() for i in ids)
    kept = {n for n in recovered if n in truth}
    for name in kept:  # a name the damaged file still gave is on its own embeddings
        assert recovered[name] <= truth[name]
    assert f"recovered {sum(map(len, truth.values()))} voiceprint embeddings" in proc.stdout
    listed = speakerd("speakers", "list", "--offline", "--store", str(store)).stdout
    assert len(listed.splitlines()) == len(recovered)


@pytest.mark.slow
def test_a_second_daemon_on_one_store_is_refused_naming_the_first(enrolled: Enrolled, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(enrolled.store, store)
    make_conversation(enrolled, SPEAKERS, tmp_path / "m.wav", turns=12, seed=6)
    first = popen_speakerd("run", "--source", f"file:{tmp_path / 'm.wav'}", "--realtime", "--store", str(store),
                           "--pub", "tcp://127.0.0.1:*", "--control", f"ipc://{tmp_path / 'a.sock'}",
                           stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + WAIT_S
        while not (tmp_path / "a.sock").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first daemon did not start"
            time.sleep(0.1)  # polling the daemon's socket under a deadline
        second = speakerd("run", "--source", f"file:{tmp_path / 'm.wav'}", "--no-realtime", "--store", str(store),
                          "--pub", "tcp://127.0.0.1:*", "--control", f"ipc://{tmp_path / 'b.sock'}",
                          check=False, timeout=WAIT_S)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"already in use by `speakerd run` (pid {first.pid})" in second.stderr
        # an edit that cannot reach the first daemon (another control endpoint) leaves the store alone
        name = enrolled.names[SPEAKERS[0]]
        edit = speakerd("speakers", "remove", name, "--store", str(store), "--control", f"ipc://{tmp_path / 'b.sock'}",
                        check=False, timeout=WAIT_S)
        assert edit.returncode == 2 and f"(pid {first.pid})" in edit.stderr and "behind" in edit.stderr
        assert name in owners(store)
        first.send_signal(signal.SIGKILL)  # the lock goes with the process, however it ends
        assert first.wait(WAIT_S) == -signal.SIGKILL
    finally:
        reap(first)
    speakerd("speakers", "remove", name, "--store", str(store), "--control", f"ipc://{tmp_path / 'b.sock'}")
    assert name not in owners(store)
    speakerd(*run_args(tmp_path, store, tmp_path / "m.wav"), timeout=300)
