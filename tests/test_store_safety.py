"""The store never loses voiceprints to a careless open: a lost or damaged database is refused with
nothing written, reading never creates, only abandoned temp files are cleaned, one owner at a time."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from speakerd.store import DB_NAME, INDEX_NAME, STAMP_NAME, TEMP_PREFIX, SpeakerStore, StoreError
from speakerd.storelock import RUN_COMMAND, StoreBusy, StoreLock, daemon_holding
from store_helpers import lock_held, reap

DIM = 16
FP = "test-model:0123456789abcdef"
CHILD_TIMEOUT_S = 30.0


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def open_store(directory: Path, create: bool = True) -> SpeakerStore:
    if create:  # (the default; this spelling also runs against the store before ``create`` existed)
        return SpeakerStore(directory, fingerprint=FP, dim=DIM)
    return SpeakerStore(directory, fingerprint=FP, dim=DIM, create=False)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def enrolled(tmp_path: Path) -> Path:
    rng = np.random.default_rng(7)
    directory = tmp_path / "store"
    with open_store(directory) as store:
        for name in ("alice", "bob", "carol"):
            store.enroll(name, unit(rng, 40), source="test")
    return directory


def _lose_missing(d: Path) -> None:
    (d / DB_NAME).unlink()


def _lose_empty(d: Path) -> None:
    (d / DB_NAME).write_bytes(b"")


def _lose_tables(d: Path) -> None:
    (d / DB_NAME).unlink()
    conn = sqlite3.connect(d / DB_NAME)  # a valid SQLite file without a table
    conn.execute("PRAGMA user_version = 1")
    conn.close()


@pytest.mark.parametrize("lose", [_lose_missing, _lose_empty, _lose_tables], ids=["missing", "empty", "no-tables"])
def test_a_lost_database_beside_an_index_is_refused_and_nothing_is_written(enrolled: Path, lose) -> None:
    lose(enrolled)
    before = {p.name: digest(p) for p in enrolled.iterdir() if p.is_file()}
    with pytest.raises(StoreError) as info:
        open_store(enrolled)
    message = str(info.value)
    assert info.value.exit_code == 2
    assert "lost its database" in message and INDEX_NAME in message
    assert f"speakerd speakers recover --store {enrolled}" in message
    after = {p.name: digest(p) for p in enrolled.iterdir() if p.is_file()}
    for name in (INDEX_NAME, STAMP_NAME):
        assert after[name] == before[name], f"{name}, the last copy of the vectors, is intact"
    if lose is not _lose_tables:  # (opening an SQLite file may set its journal mode; no data in it)
        assert after == before, "refusing wrote nothing, created nothing"


def test_a_never_used_store_whose_database_was_deleted_starts_afresh(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    open_store(directory).close()  # an empty index: nothing to lose
    (directory / DB_NAME).unlink()
    with open_store(directory) as store:
        assert store.speakers() == []


def test_reading_never_creates_a_store(tmp_path: Path) -> None:
    typo = tmp_path / "typo" / "dir"
    with pytest.raises(StoreError, match="there is no speaker store in .*check --store") as info:
        open_store(typo, create=False)
    assert info.value.exit_code == 2
    assert not typo.exists() and not typo.parent.exists()
    typo.mkdir(parents=True)
    with pytest.raises(StoreError, match="no speaker store"):
        open_store(typo, create=False)
    assert list(typo.iterdir()) == []


def test_garbage_in_the_middle_of_the_database_is_a_clear_refusal(enrolled: Path) -> None:
    db = enrolled / DB_NAME
    size = db.stat().st_size
    assert size >= 8 * 4096, "enough pages that the damage is mid-file, past the schema page"
    with db.open("r+b") as fh:
        fh.seek(size // 2 // 4096 * 4096)
        fh.write(np.random.default_rng(3).bytes(4096))
    before = digest(db)
    with pytest.raises(StoreError) as info:
        open_store(enrolled)
    assert info.value.exit_code == 2
    assert "not a usable speaker store" in str(info.value) and "speakers recover" in str(info.value)
    assert digest(db) == before


# ---------------------------------------------------------------- index temp files

WRITER = textwrap.dedent(
    """
    import fcntl, os, sys, tempfile
    fd, path = tempfile.mkstemp(prefix=sys.argv[2], suffix=".tmp", dir=sys.argv[1])
    fcntl.flock(fd, fcntl.LOCK_EX)  # as the store's writer holds its temp file
    os.write(fd, b"\\0" * (25 << 20))
    print(path, flush=True)
    sys.stdin.read()  # "still writing" until the test closes stdin or kills it
    """
)


def start_writer(directory: Path) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(directory), TEMP_PREFIX],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_only_abandoned_index_temp_files_are_cleaned_up(enrolled: Path) -> None:
    live, live_tmp = start_writer(enrolled)
    dead, dead_tmp = start_writer(enrolled)
    try:
        dead.send_signal(signal.SIGKILL)
        assert dead.wait(CHILD_TIMEOUT_S) == -signal.SIGKILL
        an_hour_ago = time.time() - 3600
        os.utime(live_tmp, (an_hour_ago, an_hour_ago))  # old, but its writer is alive
        five_s_ago = time.time() - 5
        os.utime(dead_tmp, (five_s_ago, five_s_ago))  # its writer was killed 5 s ago
        with open_store(enrolled) as store:
            assert store.speakers()
        assert live_tmp.exists(), "a file another process is writing is never deleted"
        assert live_tmp.stat().st_size == 25 << 20
        assert not dead_tmp.exists(), "a killed writer's 25 MB temp file does not linger"
    finally:
        reap(live)
        reap(dead)
    with open_store(enrolled):
        pass
    assert not live_tmp.exists(), "once its writer is gone, it is cleaned up too"


# ---------------------------------------------------------------- the store lock

def test_a_daemon_holds_the_store_until_it_dies_even_by_kill_9(enrolled: Path) -> None:
    with lock_held(enrolled, RUN_COMMAND) as holder:
        assert daemon_holding(enrolled) is not None and daemon_holding(enrolled).pid == holder.pid
        t0 = time.monotonic()
        with pytest.raises(StoreBusy) as info:
            StoreLock(enrolled, RUN_COMMAND).acquire(wait_s=5.0)
        assert time.monotonic() - t0 < 1.0, "a daemon holds it for its life: refused at once, not waited for"
        assert info.value.exit_code == 2 and f"pid {holder.pid}" in str(info.value)
        assert "--store" in str(info.value)
        with pytest.raises(StoreBusy, match=f"speakerd run` \\(pid {holder.pid}\\).*behind"):
            StoreLock(enrolled, "speakerd speakers remove").acquire()
        holder.send_signal(signal.SIGKILL)
        assert holder.wait(CHILD_TIMEOUT_S) == -signal.SIGKILL
    assert daemon_holding(enrolled) is None
    with StoreLock(enrolled, RUN_COMMAND) as lock:
        assert lock.path.read_text() == f'{{"pid": {os.getpid()}, "command": "speakerd run"}}'


def test_a_short_holder_is_waited_for(enrolled: Path) -> None:
    with lock_held(enrolled, "speakerd speakers rename") as holder:
        with pytest.raises(StoreBusy, match=f"pid {holder.pid}.*try again"):
            StoreLock(enrolled, RUN_COMMAND).acquire(wait_s=0.2)
        assert holder.stdin is not None
        holder.stdin.close()  # the edit finishes
        holder.wait(CHILD_TIMEOUT_S)
        with StoreLock(enrolled, RUN_COMMAND).acquire(wait_s=5.0):
            pass
