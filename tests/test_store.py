"""The speaker store: SQLite as truth, the faiss index as a checked cache, private files, crash safety."""

from __future__ import annotations

import logging
import os
import random
import select
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import faiss
import numpy as np
import pytest
from speakerd.errors import SpeakerdError
from speakerd.store import (
    INDEX_NAME,
    STAMP_NAME,
    SpeakerStore,
    StoreError,
    default_store_dir,
)

REPO = Path(__file__).resolve().parents[1]
DIM = 16
FP = "test-model:0123456789abcdef"


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def open_store(directory: Path, fingerprint: str = FP, dim: int = DIM) -> SpeakerStore:
    return SpeakerStore(directory, fingerprint=fingerprint, dim=dim)


def assert_private(directory: Path) -> list[str]:
    """Every file in ``directory`` is 0600 and the folder 0700; returns the file names seen."""
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    names = sorted(os.listdir(directory))
    for name in names:
        mode = stat.S_IMODE(os.stat(directory / name).st_mode)
        assert mode == 0o600, f"{name} is {oct(mode)}"
    return names


def index_ids(index: faiss.Index) -> np.ndarray:
    return np.sort(faiss.vector_to_array(index.id_map).astype(np.int64))


def search_all(store: SpeakerStore, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    index = store.load_index()
    return index.search(queries, index.ntotal)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "store"


def test_layout_schema_and_private_modes(store_dir: Path, rng: np.random.Generator) -> None:
    with open_store(store_dir) as store:
        store.enroll("alice", unit(rng, 3), source="test")
        # While open, WAL side files exist; they must be private too.
        names = assert_private(store_dir)
        assert {"speakers.sqlite3", INDEX_NAME, STAMP_NAME} <= set(names)
        assert any(n.endswith("-wal") for n in names)
    assert set(assert_private(store_dir)) == {"speakers.sqlite3", INDEX_NAME, STAMP_NAME}
    conn = sqlite3.connect(store_dir / "speakers.sqlite3")
    meta = dict(conn.execute("SELECT key, value FROM meta"))
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    assert meta["schema_version"] == "1"
    assert meta["model_fingerprint"] == FP
    assert meta["dim"] == str(DIM)
    assert float(meta["created"]) > 0
    assert {"meta", "speakers", "embeddings"} <= tables


def test_loose_modes_are_tightened_on_open(store_dir: Path, rng: np.random.Generator) -> None:
    with open_store(store_dir) as store:
        store.enroll("alice", unit(rng, 2), source="test")
    os.chmod(store_dir, 0o755)
    os.chmod(store_dir / "speakers.sqlite3", 0o644)
    with open_store(store_dir) as store:
        store.enroll("bob", unit(rng, 2), source="test")
        assert_private(store_dir)


def test_enroll_create_append_and_round_trip(store_dir: Path, rng: np.random.Generator) -> None:
    a1, a2, b = rng.standard_normal((3, DIM)).astype(np.float32), unit(rng, 2), unit(rng, 4)
    with open_store(store_dir) as store:
        alice = store.enroll("alice", a1, source="mic")
        assert alice.name == "alice" and alice.num_embeddings == 3
        assert alice.id.startswith("spk-") and len(alice.id) == 12
        again = store.enroll("alice", a2, source="file.wav")
        assert again.id == alice.id and again.num_embeddings == 5 and again.created == alice.created
        bob = store.enroll("bob", b, source="mic")
    with open_store(store_dir) as store:
        assert [(s.name, s.num_embeddings) for s in store.speakers()] == [("alice", 5), ("bob", 4)]
        assert store.get("alice") == again
        assert store.get(bob.id) == bob
        assert store.get("carol") is None
        ids, owners, matrix = store.embeddings()
        assert ids.dtype == np.int64 and matrix.dtype == np.float32 and matrix.shape == (9, DIM)
        assert owners == [alice.id] * 5 + [bob.id] * 4
        # Stored as the model produced them (not normalised), bit for bit.
        np.testing.assert_array_equal(matrix, np.concatenate([a1, a2, b]))
        assert np.all(np.diff(ids) > 0)
        # The index holds the normalised vectors under the same row ids.
        index = store.load_index()
        np.testing.assert_array_equal(index_ids(index), ids)
        assert index.ntotal == 9
        sims, found = index.search(a1[:1] / np.linalg.norm(a1[:1]), 1)
        assert found[0, 0] == ids[0] and sims[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_bad_embeddings_and_names_are_refused(store_dir: Path, rng: np.random.Generator) -> None:
    with open_store(store_dir) as store:
        with pytest.raises(StoreError, match=r"shape \(n, 16\)"):
            store.enroll("alice", unit(rng, 2, dim=DIM + 1), source="test")
        with pytest.raises(StoreError, match="shape"):
            store.enroll("alice", unit(rng, 1)[0], source="test")
        with pytest.raises(StoreError, match="no embeddings"):
            store.enroll("alice", np.zeros((0, DIM), np.float32), source="test")
        bad = unit(rng, 2)
        bad[1, 3] = np.nan
        with pytest.raises(StoreError, match="NaN"):
            store.enroll("alice", bad, source="test")
        with pytest.raises(StoreError, match="all-zero"):
            store.enroll("alice", np.zeros((1, DIM), np.float32), source="test")
        for name in ("", "  ", " alice", "a\nb", "spk-0123abcd"):
            with pytest.raises(StoreError):
                store.enroll(name, unit(rng, 1), source="test")
        assert store.speakers() == []
        assert store.load_index().ntotal == 0


def test_fingerprint_mismatch_names_both_and_says_what_to_do(store_dir: Path, rng: np.random.Generator) -> None:
    with open_store(store_dir) as store:
        store.enroll("alice", unit(rng, 2), source="test")
    other = "other-model:fedcba9876543210"
    with pytest.raises(StoreError) as info:
        open_store(store_dir, fingerprint=other)
    message = str(info.value)
    assert FP in message and other in message
    assert "--store" in message and "original model" in message
    assert isinstance(info.value, SpeakerdError) and info.value.exit_code == 1
    with pytest.raises(StoreError, match="16-dimensional"):
        open_store(store_dir, dim=DIM * 2)
    # Refusing must not have damaged anything.
    with open_store(store_dir) as store:
        assert [s.num_embeddings for s in store.speakers()] == [2]


def test_not_a_store_is_refused(tmp_path: Path) -> None:
    (tmp_path / "speakers.sqlite3").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a usable speaker store"):
        open_store(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    conn = sqlite3.connect(other / "speakers.sqlite3")
    conn.execute("CREATE TABLE notes (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not a speaker store"):
        open_store(other)


def test_rename_and_remove(store_dir: Path, rng: np.random.Generator) -> None:
    with open_store(store_dir) as store:
        alice = store.enroll("alice", unit(rng, 3), source="test")
        bob = store.enroll("bob", unit(rng, 2), source="test")
        with pytest.raises(StoreError, match="already enrolled"):
            store.rename("alice", "bob")
        with pytest.raises(StoreError, match="no enrolled speaker named 'carol'"):
            store.rename("carol", "dave")
        renamed = store.rename(alice.id, "Alice")
        assert (renamed.id, renamed.name, renamed.num_embeddings) == (alice.id, "Alice", 3)
        assert store.get("alice") is None and store.get("Alice") == renamed
        removed = store.remove("bob")
        assert removed == bob
        with pytest.raises(StoreError, match="no enrolled speaker"):
            store.remove("bob")
        assert store.load_index().ntotal == 3
    with open_store(store_dir) as store:
        assert store.index_rebuilds == 0 and store.index_loads == 1
        assert [(s.id, s.name) for s in store.speakers()] == [(alice.id, "Alice")]
        ids, owners, _ = store.embeddings()
        assert owners == [alice.id] * 3
        np.testing.assert_array_equal(index_ids(store.load_index()), ids)
        conn = sqlite3.connect(store_dir / "speakers.sqlite3")
        orphans = conn.execute("SELECT COUNT(*) FROM embeddings WHERE speaker_id = ?", (bob.id,)).fetchone()[0]
        conn.close()
        assert orphans == 0


def test_removed_ids_and_embedding_ids_are_never_reused(
    store_dir: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_store(store_dir) as store:
        first = store.enroll("alice", unit(rng, 2), source="test")
        max_id = int(store.embeddings()[0].max())
        store.remove("alice")
        # Make the next random id collide with the removed one first.
        fixed = iter([uuid.UUID(hex=first.id[4:] + "0" * 24), uuid.UUID(int=0xABCDEF12 << 96)])
        monkeypatch.setattr(uuid, "uuid4", lambda: next(fixed))
        second = store.enroll("alice", unit(rng, 2), source="test")
        assert first.id != second.id == "spk-abcdef12"
        assert int(store.embeddings()[0].min()) > max_id


def test_index_is_loaded_not_rebuilt_on_reopen(
    store_dir: Path, rng: np.random.Generator, caplog: pytest.LogCaptureFixture
) -> None:
    queries = unit(rng, 5)
    with open_store(store_dir) as store:
        for i in range(4):
            store.enroll(f"s{i}", unit(rng, 5), source="test")
        expected = search_all(store, queries)
        stamp_before = (store_dir / STAMP_NAME).read_text()
    with caplog.at_level(logging.DEBUG, logger="speakerd.store"), open_store(store_dir) as store:
        assert (store.index_loads, store.index_rebuilds) == (1, 0)
        got = search_all(store, queries)
    assert not [r for r in caplog.records if "rebuilding" in r.getMessage()]
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[0], expected[0])
    assert (store_dir / STAMP_NAME).read_text() == stamp_before


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda d: (d / INDEX_NAME).write_bytes(b"garbage!" * 64), "does not match its stamp"),
        (lambda d: (d / INDEX_NAME).write_bytes((d / INDEX_NAME).read_bytes()[:-40]), "does not match its stamp"),
        (lambda d: (d / INDEX_NAME).unlink(), "index.faiss is missing"),
        (lambda d: (d / STAMP_NAME).unlink(), "index.json is missing"),
        (lambda d: (d / STAMP_NAME).write_text("{not json"), "unreadable"),
    ],
    ids=["garbage", "truncated", "index-missing", "stamp-missing", "stamp-garbage"],
)
def test_damaged_index_is_rebuilt_and_matches_the_same(
    store_dir: Path, rng: np.random.Generator, caplog: pytest.LogCaptureFixture, damage, reason: str
) -> None:
    queries = unit(rng, 6)
    with open_store(store_dir) as store:
        for i in range(3):
            store.enroll(f"s{i}", unit(rng, 4), source="test")
        expected = search_all(store, queries)
    damage(store_dir)
    with caplog.at_level(logging.WARNING, logger="speakerd.store"), open_store(store_dir) as store:
        assert (store.index_loads, store.index_rebuilds) == (0, 1)
        assert reason in (store.last_rebuild_reason or "")
        got = search_all(store, queries)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and reason in warnings[0]
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_allclose(got[0], expected[0], atol=1e-6)
    with open_store(store_dir) as store:  # the rebuilt index was written back
        assert (store.index_loads, store.index_rebuilds) == (1, 0)


def test_garbage_with_a_matching_stamp_is_caught_by_faiss(store_dir: Path, rng: np.random.Generator) -> None:
    """Even if the stamp is forged to match garbage, faiss refuses it and the index is rebuilt."""
    import hashlib
    import json

    with open_store(store_dir) as store:
        store.enroll("alice", unit(rng, 3), source="test")
    garbage = b"garbage!" * 64
    (store_dir / INDEX_NAME).write_bytes(garbage)
    stamp = json.loads((store_dir / STAMP_NAME).read_text())
    stamp["index_sha256"] = hashlib.sha256(garbage).hexdigest()
    (store_dir / STAMP_NAME).write_text(json.dumps(stamp))
    with open_store(store_dir) as store:
        assert store.index_rebuilds == 1 and "unreadable" in (store.last_rebuild_reason or "")
        assert store.load_index().ntotal == 3


def test_stale_index_after_row_deleted_behind_its_back(store_dir: Path, rng: np.random.Generator) -> None:
    with open_store(store_dir) as store:
        store.enroll("alice", unit(rng, 3), source="test")
        store.enroll("bob", unit(rng, 3), source="test")
        ids_before = store.embeddings()[0]
    conn = sqlite3.connect(store_dir / "speakers.sqlite3")
    with conn:
        conn.execute("DELETE FROM embeddings WHERE id = ?", (int(ids_before[1]),))
    conn.close()
    with open_store(store_dir) as store:
        assert store.index_rebuilds == 1 and "stale" in (store.last_rebuild_reason or "")
        index = store.load_index()
        assert index.ntotal == 5
        np.testing.assert_array_equal(index_ids(index), np.delete(ids_before, 1))


def test_load_index_is_a_copy_and_follows_other_processes(store_dir: Path, rng: np.random.Generator) -> None:
    with open_store(store_dir) as a, open_store(store_dir) as b:
        a.enroll("alice", unit(rng, 3), source="test")
        copy = a.load_index()
        copy.remove_ids(np.asarray(a.embeddings()[0][:1]))
        assert a.load_index().ntotal == 3  # the store's own index is untouched
        # b opened before alice existed; it notices SQLite changed and rebuilds.
        assert b.load_index().ntotal == 3
        assert b.index_rebuilds == 1 and "another process" in (b.last_rebuild_reason or "")
        b.enroll("bob", unit(rng, 2), source="test")
        assert a.load_index().ntotal == 5
    with open_store(store_dir) as c:
        assert (c.index_loads, c.index_rebuilds) == (1, 0)
        assert c.load_index().ntotal == 5


def test_concurrent_threads_share_one_store(store_dir: Path, rng: np.random.Generator) -> None:
    vectors = unit(rng, 40)
    errors: list[BaseException] = []
    with open_store(store_dir) as store:

        def work(t: int) -> None:
            try:
                for i in range(5):
                    store.enroll(f"t{t}", vectors[t * 10 + 2 * i : t * 10 + 2 * i + 2], source="thread")
                    store.speakers()
            except BaseException as exc:  # surfaced by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not errors
        assert sorted((s.name, s.num_embeddings) for s in store.speakers()) == [(f"t{t}", 10) for t in range(4)]
        assert store.load_index().ntotal == 40


def test_default_store_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if sys.platform == "darwin":
        pytest.skip("macOS uses ~/Library/Application Support, not XDG")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_store_dir() == tmp_path / "speakerd" / "store"


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import numpy as np
    from speakerd.store import SpeakerStore

    directory, seed, per = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(seed)
    with SpeakerStore(directory, fingerprint=sys.argv[4], dim=int(sys.argv[5])) as store:
        i = 0
        while True:
            name = f"s{int(rng.integers(0, 12))}"
            store.enroll(name, rng.standard_normal((per, store.dim)).astype("float32"), source=f"{seed}:{i}")
            sys.stdout.write(f"{i}\\n")
            sys.stdout.flush()
            i += 1
    """
)


def _read_lines_until(proc: subprocess.Popen[bytes], count: int, timeout: float) -> int:
    """Read the child's progress lines until ``count`` have arrived; returns how many did."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen, buffer = 0, b""
    fd = proc.stdout.fileno()
    while seen < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"child printed only {seen} of {count} lines in {timeout}s"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 4096)
            assert chunk, f"child exited early with {proc.poll()}"
            buffer += chunk
            seen = buffer.count(b"\n")
    return seen


def test_sigkill_during_enrollment_loses_at_most_the_one_in_progress(tmp_path: Path) -> None:
    per, rounds = 4, 8
    store_dir = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(REPO / "daemon")}
    chooser = random.Random(20240601)
    acknowledged: dict[int, int] = {}
    for seed in range(rounds):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(store_dir), str(seed), str(per), FP, str(DIM)],
            stdout=subprocess.PIPE,
            env=env,
        )
        try:
            acknowledged[seed] = _read_lines_until(proc, chooser.randint(2, 30), timeout=60)
            time.sleep(chooser.uniform(0.0, 0.03))  # a random moment, not a synchronisation
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=10) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            assert proc.stdout is not None
            proc.stdout.close()

        conn = sqlite3.connect(store_dir / "speakers.sqlite3")
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        counts = dict(conn.execute("SELECT source, COUNT(*) FROM embeddings GROUP BY source"))
        per_speaker = [
            n
            for (n,) in conn.execute(
                "SELECT COUNT(e.id) FROM speakers s LEFT JOIN embeddings e ON e.speaker_id = s.id GROUP BY s.id"
            )
        ]
        conn.close()
        # Every committed enrollment is whole, and every acknowledged one is there.
        assert set(counts.values()) == {per}
        assert all(n > 0 and n % per == 0 for n in per_speaker)
        for done_seed, acked in acknowledged.items():
            mine = sorted(int(src.split(":")[1]) for src in counts if int(src.split(":")[0]) == done_seed)
            assert mine == list(range(len(mine))) and acked <= len(mine) <= acked + 1 + 40

        with open_store(store_dir) as store:
            ids, _, _ = store.embeddings()
            assert len(ids) == sum(counts.values())
            np.testing.assert_array_equal(index_ids(store.load_index()), np.sort(ids))
            assert store.index_loads + store.index_rebuilds == 1
            assert_private(store_dir)
    assert sum(acknowledged.values()) >= 2 * rounds
