"""`speakers recover` on synthetic voices: what comes back, what is said to be lost, what is kept aside."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from speakerd.recover import MAX_UNITS, RecoverSettings, embedding_ids_by_name as owners, group_by_voice, recover_store
from speakerd.store import DB_NAME, INDEX_NAME, STAMP_NAME, SpeakerStore, StoreUnusable
from speakerd.storelock import RUN_COMMAND, StoreBusy
from store_helpers import lock_held

DIM = 32
FP = "test-model:0123456789abcdef"
NOISE = 0.1
"""Per-dimension spread of a window around its speaker's voice: same-speaker windows then average
cosine 0.76, as GE2E windows of one reader do; different speakers about 0."""


def voices(rng: np.random.Generator, people: int) -> np.ndarray:
    c = rng.standard_normal((people, DIM))
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def windows(rng: np.random.Generator, voice: np.ndarray, n: int) -> np.ndarray:
    return (voice + NOISE * rng.standard_normal((n, DIM))).astype(np.float32)


def open_store(directory: Path, fingerprint: str = FP) -> SpeakerStore:
    return SpeakerStore(directory, fingerprint=fingerprint, dim=DIM)




@pytest.fixture
def store(tmp_path: Path) -> Path:
    """alice and bob enrolled twice each (interleaved), carol once, dave enrolled then forgotten."""
    rng = np.random.default_rng(5)
    v = voices(rng, 4)
    directory = tmp_path / "store"
    with open_store(directory) as st:
        for name, i, n in (("alice", 0, 30), ("bob", 1, 25), ("dave", 3, 10), ("alice", 0, 12), ("carol", 2, 40), ("bob", 1, 9)):
            st.enroll(name, windows(rng, v[i], n), source=f"{name}.wav")
        st.remove("dave")
    return directory


def recover(directory: Path, fingerprint: str = FP):  # noqa: ANN201
    return recover_store(directory, fingerprint=fingerprint, dim=DIM)


def test_a_lost_database_comes_back_from_the_index_grouped_by_voice(store: Path) -> None:
    truth = owners(store)
    index = (store / INDEX_NAME).read_bytes()
    (store / DB_NAME).unlink()
    report = recover(store)
    assert report is not None and report.embeddings == sum(map(len, truth.values())) == 116
    got = owners(store)
    assert sorted(got) == ["recovered-1", "recovered-2", "recovered-3"], "in enrollment order"
    assert [got[f"recovered-{i}"] for i in (1, 2, 3)] == [truth["alice"], truth["bob"], truth["carol"]]
    assert report.placeholders == {"recovered-1": 42, "recovered-2": 34, "recovered-3": 40} and report.named == {}
    text = "\n".join(report.lines())
    assert "name LOST" in text and "speakers rename recovered-N NAME" in text and str(report.aside) in text
    assert (report.aside / INDEX_NAME).read_bytes() == index and (report.aside / STAMP_NAME).exists()
    assert (store / INDEX_NAME).read_bytes() == index, "the index matches the new database: adopted, not rewritten"
    with open_store(store) as st:
        assert (st.index_loads, st.index_rebuilds) == (1, 0)
        st.enroll("erin", windows(np.random.default_rng(9), voices(np.random.default_rng(9), 1)[0], 5), source="x")
        assert min(st.embeddings()[0][-5:]) > max(max(ids) for ids in truth.values()), "ids are never reused"
    assert recover(store) is None, "a store that opens is left alone"


def test_what_a_damaged_database_still_yields_is_kept(store: Path) -> None:
    truth = owners(store)
    db_bytes = (store / DB_NAME).read_bytes()
    middle = len(db_bytes) // 2 // 4096 * 4096
    (store / DB_NAME).write_bytes(db_bytes[:middle] + os.urandom(4096) + db_bytes[middle + 4096 :])
    with pytest.raises(StoreUnusable, match="not a usable speaker store"):
        open_store(store)
    report = recover(store)
    assert report is not None
    got = owners(store)
    assert sorted(i for ids in got.values() for i in ids) == sorted(i for ids in truth.values() for i in ids)
    assert set(report.named) <= {"alice", "bob", "carol"}
    for name in report.named:  # a name the damaged file still gave is on that speaker's own embeddings
        assert got[name] == truth[name]
    for name, ids in got.items():
        assert any(ids <= t for t in truth.values()), f"{name} mixes voices"
    assert (report.aside / DB_NAME).read_bytes()[:middle] == db_bytes[:middle], "the damaged file is kept as it was"


def test_embeddings_whose_owner_is_known_but_not_its_name_stay_one_speaker(store: Path) -> None:
    from speakerd.recover import _recover

    truth = owners(store)
    with sqlite3.connect(store / DB_NAME) as db:
        db.execute("PRAGMA foreign_keys = OFF")
        db.execute("DELETE FROM speakers WHERE name = 'bob'")
    db.close()
    report = _recover(store, FP, DIM, RecoverSettings(same_voice=2.0))  # voices never joined: owners only
    assert report.named == {"alice": 42, "carol": 40}
    assert report.placeholders == {"recovered-1": 34}
    assert owners(store) == {"alice": truth["alice"], "carol": truth["carol"], "recovered-1": truth["bob"]}


def test_nothing_to_recover_is_said_and_nothing_changes(store: Path) -> None:
    (store / INDEX_NAME).unlink()
    (store / STAMP_NAME).unlink()
    (store / DB_NAME).write_bytes(b"garbage!" * 4096)
    with pytest.raises(StoreUnusable, match="nothing to recover.*index.faiss is missing"):
        recover(store)
    assert (store / DB_NAME).read_bytes() == b"garbage!" * 4096 and not list(store.glob("before-recover-*"))


def test_nothing_to_recover_and_a_daemon_in_the_way(tmp_path: Path, store: Path) -> None:
    with pytest.raises(StoreUnusable, match="no speaker store"):
        recover(tmp_path / "typo")
    assert not (tmp_path / "typo").exists()
    (store / DB_NAME).unlink()
    with lock_held(store, RUN_COMMAND) as holder:
        with pytest.raises(StoreBusy, match=f"pid {holder.pid}"):
            recover(store)
    assert not (store / DB_NAME).exists() and not list(store.glob("before-recover-*"))


def test_the_voiceprints_model_is_kept_and_named(store: Path) -> None:
    (store / DB_NAME).unlink()
    report = recover(store, fingerprint="another-model:fedcba9876543210")
    assert report is not None and report.fingerprint == FP
    assert any("from model 'test-model:0123456789abcdef'" in n and "--model" in n for n in report.notes)
    with open_store(store) as st:
        assert len(st.speakers()) == 3


def test_grouping_many_vectors_stays_pure() -> None:
    rng = np.random.default_rng(2)
    v = voices(rng, 5)
    n = MAX_UNITS * 2 + 7
    who = np.repeat(np.arange(5), -(-n // 5))[:n]
    ids = np.arange(1, n + 1, dtype=np.int64)
    groups = group_by_voice(ids, np.stack([windows(rng, v[w], 1)[0] for w in who]), RecoverSettings())
    assert sorted(map(len, groups), reverse=True)[:5] == sorted(np.bincount(who).tolist(), reverse=True)
    for g in groups:
        assert len(set(who[g - 1].tolist())) == 1
    assert sum(map(len, groups)) == n


def test_a_damaged_stamps_room_version_runs_only_mark_rows_that_exist() -> None:
    """The stamp lists room versions as [first, last] runs; a damaged or hostile one (a run over
    10^15 ids, junk entries) marks the rows inside its runs and costs no more than the rows."""
    from speakerd.recover import _room_version_ids
    from speakerd.store import ROOM_VERSION

    rows = {i: (None, b"", "a.wav", 0.0) for i in (1, 2, 7, 9)} | {12: (None, b"", ROOM_VERSION + "a.wav", 0.0)}
    stamp = {"room_versions": [[2, 10**15], "junk", [1], [None, 3]]}
    assert _room_version_ids(stamp, rows) == {2, 7, 9, 12}
    assert _room_version_ids({"room_versions": "junk"}, rows) == {12}
