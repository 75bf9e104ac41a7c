"""The persistent speaker store: enrolled voiceprints in SQLite, plus a faiss index derived from them.

SQLite is the source of truth. The faiss index (``index.faiss``) and its stamp (``index.json``) are a
cache: if either is missing, unreadable, corrupt or describes other rows than SQLite holds, it is
rebuilt from SQLite. Every write is one SQLite transaction, so killing the process at any moment loses
at most the enrollment in progress; the index is written after the commit, atomically, so a kill
between the two only leaves a stale stamp, which the next open detects.

Voiceprints are biometric data: the folder is 0700 and every file in it 0600. The database file is
created 0600 before SQLite opens it, and SQLite gives its ``-wal``/``-shm`` files the database's mode;
they are chmod-ed as well in case the folder was made by something else.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import faiss
import numpy as np

from .errors import SpeakerdError
from .names import check_name
from .paths import data_dir, ensure_private_dir

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DB_NAME = "speakers.sqlite3"
INDEX_NAME = "index.faiss"
STAMP_NAME = "index.json"
STAMP_FORMAT = 1
FILE_MODE = 0o600
BUSY_TIMEOUT_MS = 10_000
"""How long a writer waits for another process's transaction before SQLite reports 'locked'."""
TEMP_GRACE_SECONDS = 1.0
"""An index temp file nobody holds locked and older than this is a killed writer's; deleted on open.
(The grace covers the instant between a writer creating its temp file and locking it.)"""
TEMP_PREFIX = ".index-"
SPEAKER_ID_PREFIX = "spk-"
ROOM_VERSION = "room version of "
"""``source`` prefix of an embedding of a recording heard through a simulated room (multi-condition
enrollment): the matcher keeps those as a voiceprint of their own (``matcher.SpeakerIndex``). A
speakerd from before them reads them as ordinary embeddings."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS speakers (
    id TEXT PRIMARY KEY,
    name TEXT UNIQUE NOT NULL,
    created REAL,
    updated REAL
);
CREATE TABLE IF NOT EXISTS embeddings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    speaker_id TEXT REFERENCES speakers(id) ON DELETE CASCADE,
    model_fingerprint TEXT,
    dim INTEGER,
    vector BLOB,
    source TEXT,
    created REAL
);
CREATE INDEX IF NOT EXISTS embeddings_by_speaker ON embeddings(speaker_id);
CREATE TABLE IF NOT EXISTS retired_speakers (id TEXT PRIMARY KEY, removed REAL);
"""
# AUTOINCREMENT and retired_speakers make embedding ids and speaker ids never reused, so an index
# or an event that names an id can never silently point at someone else.


class StoreError(SpeakerdError):
    """A speaker store problem the user can act on (wrong model, unknown name, duplicate name...)."""


class StoreUnusable(StoreError):
    """The store cannot be opened as it is (missing, damaged, or its database lost while its index
    remains). Opening changed nothing; the message says what to do. Exit 2, before anything starts."""

    exit_code = 2


@dataclass(frozen=True)
class Speaker:
    """An enrolled speaker as stored; ``id`` is stable across renames and never reused."""

    id: str
    name: str
    num_embeddings: int
    created: float


def default_store_dir() -> Path:
    """Where the store lives unless ``--store`` says otherwise."""
    return data_dir() / "store"


def id_runs(ids: np.ndarray) -> list[list[int]]:
    """Ascending ids as [first, last] runs of consecutive ids: what the stamp keeps of the room
    versions' ids (one enrollment writes them consecutively), so ``speakers recover`` can tell them
    apart when the database is lost."""
    runs: list[list[int]] = []
    for i in np.asarray(ids, dtype=np.int64).tolist():
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return runs


def _ids_checksum(ids: np.ndarray) -> str:
    """sha256 of the sorted int64 ids: two indexes over the same rows have the same checksum."""
    return hashlib.sha256(np.sort(np.asarray(ids, dtype="<i8")).tobytes()).hexdigest()


def _normalise(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, so inner product is cosine similarity."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.asarray(matrix / np.maximum(norms, np.finfo(np.float32).tiny), dtype=np.float32)


def fsync_dir(path: Path) -> None:
    """Make a rename durable; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(directory: Path, target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` via a 0600 temp file in the same folder, fsync, then rename.

    The temp file is flock-ed until renamed, so a cleaner in another process can tell it from a
    killed writer's leftover (see ``SpeakerStore._remove_abandoned_temps``)."""
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".tmp", dir=directory)  # mkstemp is 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(directory)


class SpeakerStore:
    """Enrolled speakers and their embeddings for one model fingerprint, in ``directory``.

    Opening creates the store if needed (unless ``create`` is False: reading commands never create),
    refuses a store made with another model, and loads (or rebuilds) the faiss index. It refuses,
    changing nothing, a damaged database and a folder whose database is gone but whose index still
    holds voiceprints (``speakerd speakers recover`` restores from it). Methods may be called from
    any thread, one at a time (a lock guards the connection).
    """

    def __init__(self, directory: Path, *, fingerprint: str, dim: int, create: bool = True) -> None:
        if not fingerprint:
            raise ValueError("fingerprint must be non-empty")
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.directory = Path(directory).expanduser()
        self.fingerprint = fingerprint
        self.dim = int(dim)
        self._lock = threading.RLock()
        self.index_loads = 0
        """Times the index was read from ``index.faiss`` (tests and diagnostics)."""
        self.index_rebuilds = 0
        """Times the index was rebuilt from SQLite."""
        self.last_rebuild_reason: str | None = None

        self._refuse_if_lost()
        if not create and not self._has_database():
            raise StoreUnusable(
                f"there is no speaker store in {self.directory}; check --store (or daemon.store), or "
                f"enroll someone first: `speakerd enroll NAME AUDIO...` creates it"
            )
        ensure_private_dir(self.directory)
        self._remove_abandoned_temps()
        self._conn = self._connect()
        try:
            self._init_schema(create)
            self._index = self._open_index()
        except BaseException:
            self._conn.close()
            raise

    # -- paths ------------------------------------------------------------------------------------

    @property
    def db_path(self) -> Path:
        return self.directory / DB_NAME

    @property
    def index_path(self) -> Path:
        return self.directory / INDEX_NAME

    @property
    def stamp_path(self) -> Path:
        return self.directory / STAMP_NAME

    # -- opening ----------------------------------------------------------------------------------

    def _has_database(self) -> bool:
        try:
            return self.db_path.stat().st_size > 0
        except FileNotFoundError:
            return False

    def earlier_data(self) -> list[str]:
        """Files in the folder that show it held voiceprints: an index or stamp that is not empty,
        a non-empty SQLite ``-wal``/``-journal``. What a lost database must not be recreated over."""
        found = []
        for suffix in ("-wal", "-journal"):
            side = self.db_path.with_name(self.db_path.name + suffix)
            with suppress(FileNotFoundError):
                if side.stat().st_size > 0:
                    found.append(side.name)
        if self.index_path.exists():
            try:
                empty = faiss.deserialize_index(np.fromfile(self.index_path, dtype=np.uint8)).ntotal == 0
            except (RuntimeError, OSError):
                empty = False  # unreadable: it may still hold vectors
            if not empty:
                found.append(INDEX_NAME)
        if self.stamp_path.exists():
            try:
                empty = json.loads(self.stamp_path.read_text()).get("count") == 0
            except (OSError, ValueError, AttributeError):
                empty = False
            if not empty:
                found.append(STAMP_NAME)
        return found

    def _lost_database(self, traces: list[str]) -> StoreUnusable:
        return StoreUnusable(
            f"the speaker store in {self.directory} has lost its database ({DB_NAME} is missing or "
            f"empty) but still holds earlier data ({', '.join(traces)}); refusing to start a new, empty "
            f"store over it. `speakerd speakers recover --store {self.directory}` rebuilds the database "
            f"from the index's voiceprints (names are kept only in the database, so it says what is "
            f"lost); to start afresh instead, move the folder aside"
        )

    def _refuse_if_lost(self) -> None:
        if not self._has_database() and (traces := self.earlier_data()):
            raise self._lost_database(traces)

    def _remove_abandoned_temps(self) -> None:
        """Delete index temp files left by a killed writer: only those no live writer holds locked."""
        now = time.time()
        for tmp in self.directory.glob(f"{TEMP_PREFIX}*.tmp"):
            try:
                fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if now - os.fstat(fd).st_mtime > TEMP_GRACE_SECONDS:
                    tmp.unlink()
                    logger.info("removed %s, left by an index write that was interrupted", tmp.name)
            except (BlockingIOError, FileNotFoundError):
                pass  # a live writer holds it, or it has just been renamed into place
            finally:
                os.close(fd)

    def _connect(self) -> sqlite3.Connection:
        db = self.db_path
        # Create the file 0600 ourselves: SQLite then gives -wal/-shm the same mode.
        os.close(os.open(db, os.O_CREAT | os.O_RDWR, FILE_MODE))
        os.chmod(db, FILE_MODE)
        try:
            # Autocommit mode; transactions are explicit (BEGIN IMMEDIATE) in _write().
            conn = sqlite3.connect(db, check_same_thread=False, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")  # readers (the daemon) never block a CLI writer
            conn.execute("PRAGMA synchronous = FULL")  # a committed enrollment survives power loss
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from None
        self._chmod_sidecars()
        return conn

    def _chmod_sidecars(self) -> None:
        for suffix in ("-wal", "-shm", "-journal"):
            side = self.db_path.with_name(self.db_path.name + suffix)
            with suppress(FileNotFoundError):
                os.chmod(side, FILE_MODE)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE takes the write lock before any read-then-write."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _damaged(self, problem: object) -> StoreUnusable:
        return StoreUnusable(
            f"{self.db_path} is not a usable speaker store: {problem}. Nothing was changed. `speakerd "
            f"speakers recover --store {self.directory}` salvages what it can into a new database, "
            f"keeping this one aside"
        )

    def _init_schema(self, create: bool = True) -> None:
        try:
            with self._write() as conn:
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if tables and "meta" not in tables:
                    raise StoreError(f"{self.db_path} is an SQLite database but not a speaker store")
                if not tables and (traces := self.earlier_data()):
                    raise self._lost_database(traces)
                if not tables and not create:
                    raise StoreUnusable(f"{self.db_path} is empty: there is no speaker store in {self.directory}")
                problems = [r[0] for r in conn.execute("PRAGMA quick_check(3)")]
                if problems != ["ok"]:
                    raise self._damaged("; ".join(problems))
                for statement in filter(str.strip, SCHEMA.split(";")):
                    conn.execute(statement)
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
                if not meta:
                    conn.executemany(
                        "INSERT INTO meta(key, value) VALUES (?, ?)",
                        [
                            ("schema_version", str(SCHEMA_VERSION)),
                            ("model_fingerprint", self.fingerprint),
                            ("dim", str(self.dim)),
                            ("created", repr(time.time())),
                        ],
                    )
                    logger.info("created speaker store %s for model %s", self.directory, self.fingerprint)
                    return
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from None
        self._check_meta(meta)

    def _check_meta(self, meta: dict[str, str]) -> None:
        version = int(meta.get("schema_version", "0"))
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the speaker store at {self.directory} has schema version {version}, newer than this "
                f"speakerd understands ({SCHEMA_VERSION}); upgrade speakerd or use another --store"
            )
        stored = meta.get("model_fingerprint")
        if stored != self.fingerprint:
            raise StoreError(
                f"the speaker store at {self.directory} holds voiceprints from model {stored!r}, but the "
                f"current model is {self.fingerprint!r}; embeddings from different models cannot be "
                f"compared. Re-enroll the speakers into a new store (--store DIR), or run with the "
                f"original model {stored!r}."
            )
        stored_dim = int(meta.get("dim", "0"))
        if stored_dim != self.dim:
            raise StoreError(
                f"the speaker store at {self.directory} holds {stored_dim}-dimensional embeddings, but the "
                f"current model produces {self.dim}; re-enroll into a new store (--store DIR)"
            )

    # -- speakers ---------------------------------------------------------------------------------

    _SPEAKER_SQL = (
        "SELECT s.id, s.name, s.created, COUNT(e.id) FROM speakers s "
        "LEFT JOIN embeddings e ON e.speaker_id = s.id "
    )

    @staticmethod
    def _row_to_speaker(row: tuple[str, str, float, int]) -> Speaker:
        return Speaker(id=row[0], name=row[1], num_embeddings=int(row[3]), created=float(row[2]))

    def speakers(self) -> list[Speaker]:
        """All speakers, by name."""
        with self._lock:
            rows = self._conn.execute(self._SPEAKER_SQL + "GROUP BY s.id ORDER BY s.name").fetchall()
        return [self._row_to_speaker(r) for r in rows]

    def get(self, name_or_id: str) -> Speaker | None:
        """The speaker with this id, else with this name, else None."""
        with self._lock:
            return self._get(self._conn, name_or_id)

    def _get(self, conn: sqlite3.Connection, name_or_id: str) -> Speaker | None:
        for column in ("id", "name"):
            row = conn.execute(self._SPEAKER_SQL + f"WHERE s.{column} = ? GROUP BY s.id", (name_or_id,)).fetchone()
            if row is not None:
                return self._row_to_speaker(row)
        return None

    def _require(self, conn: sqlite3.Connection, name_or_id: str) -> Speaker:
        speaker = self._get(conn, name_or_id)
        if speaker is None:
            raise StoreError(f"no enrolled speaker named {name_or_id!r} in {self.directory}")
        return speaker

    @staticmethod
    def _check_name(name: str) -> str:
        return check_name(name, StoreError)

    def _new_speaker_id(self, conn: sqlite3.Connection) -> str:
        while True:
            candidate = SPEAKER_ID_PREFIX + uuid.uuid4().hex[:8]
            taken = conn.execute(
                "SELECT 1 FROM speakers WHERE id = ? UNION ALL SELECT 1 FROM retired_speakers WHERE id = ?",
                (candidate, candidate),
            ).fetchone()
            if taken is None:
                return candidate

    def _check_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        matrix = np.asarray(embeddings)
        if matrix.ndim != 2 or matrix.shape[1] != self.dim:
            raise StoreError(
                f"embeddings must have shape (n, {self.dim}) for model {self.fingerprint}, got {matrix.shape}"
            )
        if matrix.shape[0] == 0:
            raise StoreError("no embeddings to enroll")
        matrix = np.ascontiguousarray(matrix, dtype="<f4")
        if not np.all(np.isfinite(matrix)):
            raise StoreError("embeddings contain NaN or infinite values")
        if np.any(np.linalg.norm(matrix, axis=1) == 0.0):
            raise StoreError("embeddings contain an all-zero vector")
        return matrix

    def enroll(self, name: str, embeddings: np.ndarray, source: str, in_rooms: np.ndarray | None = None) -> Speaker:
        """Create speaker ``name`` or append to it, in one transaction; then update the index.

        ``in_rooms``: embeddings of the same recordings heard through simulated rooms, stored with
        their source marked ``ROOM_VERSION``. Vectors are stored as the model produced them
        (float32); the index holds them normalised.
        """
        matrix = self._check_embeddings(embeddings)
        rooms = self._check_embeddings(in_rooms) if in_rooms is not None and len(in_rooms) else matrix[:0]
        sources = [source] * len(matrix) + [ROOM_VERSION + source] * len(rooms)
        matrix = np.concatenate([matrix, rooms])
        now = time.time()
        with self._lock:
            with self._write() as conn:
                existing = conn.execute("SELECT id FROM speakers WHERE name = ?", (name,)).fetchone()
                if existing is None:
                    self._check_name(name)
                    speaker_id = self._new_speaker_id(conn)
                    conn.execute(
                        "INSERT INTO speakers(id, name, created, updated) VALUES (?, ?, ?, ?)",
                        (speaker_id, name, now, now),
                    )
                else:
                    speaker_id = existing[0]
                    conn.execute("UPDATE speakers SET updated = ? WHERE id = ?", (now, speaker_id))
                new_ids = []
                for row, row_source in zip(matrix, sources, strict=True):
                    cur = conn.execute(
                        "INSERT INTO embeddings(speaker_id, model_fingerprint, dim, vector, source, created) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (speaker_id, self.fingerprint, self.dim, row.tobytes(), row_source, now),
                    )
                    new_ids.append(cur.lastrowid)
                speaker = self._require(conn, speaker_id)
            ids = np.asarray(new_ids, dtype=np.int64)
            self._index.add_with_ids(_normalise(matrix), ids)
            self._after_write()
        logger.info("enrolled %d embeddings for %s (%s) from %s", len(ids), name, speaker_id, source)
        return speaker

    def rename(self, old: str, new: str) -> Speaker:
        """Rename a speaker (by name or id); its id, and so the index, are unchanged."""
        self._check_name(new)
        with self._write() as conn:
            speaker = self._require(conn, old)
            if new == speaker.name:
                return speaker
            if conn.execute("SELECT 1 FROM speakers WHERE name = ?", (new,)).fetchone() is not None:
                raise StoreError(f"cannot rename {speaker.name!r} to {new!r}: that name is already enrolled")
            conn.execute("UPDATE speakers SET name = ?, updated = ? WHERE id = ?", (new, time.time(), speaker.id))
            renamed = self._require(conn, speaker.id)
        logger.info("renamed speaker %s from %r to %r", speaker.id, speaker.name, new)
        return renamed

    def remove(self, name_or_id: str) -> Speaker:
        """Delete a speaker and its embeddings; returns it as it was. Its id is never reused."""
        with self._lock:
            with self._write() as conn:
                speaker = self._require(conn, name_or_id)
                ids = np.asarray(
                    [r[0] for r in conn.execute("SELECT id FROM embeddings WHERE speaker_id = ?", (speaker.id,))],
                    dtype=np.int64,
                )
                conn.execute("DELETE FROM speakers WHERE id = ?", (speaker.id,))  # cascades to embeddings
                conn.execute(
                    "INSERT OR REPLACE INTO retired_speakers(id, removed) VALUES (?, ?)", (speaker.id, time.time())
                )
            if len(ids):
                self._index.remove_ids(ids)
            self._after_write()
        logger.info("removed speaker %s (%s) and %d embeddings", speaker.name, speaker.id, len(ids))
        return speaker

    # -- embeddings -------------------------------------------------------------------------------

    def embeddings(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        """All stored embeddings as (row ids int64, owning speaker ids, (n, dim) float32 as stored)."""
        with self._lock:
            rows = self._conn.execute("SELECT id, speaker_id, dim, vector FROM embeddings ORDER BY id").fetchall()
        matrix = np.zeros((len(rows), self.dim), dtype=np.float32)
        for i, (row_id, _, dim, blob) in enumerate(rows):
            if dim != self.dim or len(blob) != 4 * self.dim:
                raise StoreError(
                    f"embedding {row_id} in {self.db_path} has {len(blob) // 4} values, expected {self.dim}; "
                    f"the store is damaged"
                )
            matrix[i] = np.frombuffer(blob, dtype="<f4")
        ids = np.asarray([r[0] for r in rows], dtype=np.int64)
        return ids, [r[1] for r in rows], matrix

    def embedding_owners(self) -> tuple[np.ndarray, list[str]]:
        """(row ids, owning speaker ids) without the vectors: what a matcher needs beside the index."""
        with self._lock:
            rows = self._conn.execute("SELECT id, speaker_id FROM embeddings ORDER BY id").fetchall()
        return np.asarray([r[0] for r in rows], dtype=np.int64), [r[1] for r in rows]

    def room_version_ids(self) -> np.ndarray:
        """Row ids of the embeddings heard through simulated rooms (``ROOM_VERSION``), ascending."""
        with self._lock:
            rows = self._conn.execute("SELECT id FROM embeddings WHERE substr(source, 1, ?) = ? ORDER BY id",
                                      (len(ROOM_VERSION), ROOM_VERSION)).fetchall()
        return np.asarray([r[0] for r in rows], dtype=np.int64)

    def _sqlite_ids(self) -> np.ndarray:
        with self._lock:
            return np.asarray([r[0] for r in self._conn.execute("SELECT id FROM embeddings")], dtype=np.int64)

    # -- index ------------------------------------------------------------------------------------

    def _new_index(self) -> faiss.IndexIDMap2:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    @staticmethod
    def _index_ids(index: faiss.Index) -> np.ndarray:
        return np.asarray(faiss.vector_to_array(index.id_map), dtype=np.int64)

    def _stamp(self, index: faiss.Index, index_sha256: str) -> dict[str, object]:
        ids = self._index_ids(index)
        return {
            "format": STAMP_FORMAT,
            "model_fingerprint": self.fingerprint,
            "dim": self.dim,
            "count": int(len(ids)),
            "max_id": int(ids.max()) if len(ids) else 0,
            "ids_sha256": _ids_checksum(ids),
            "index_sha256": index_sha256,
            "room_versions": id_runs(self.room_version_ids()),
        }

    def _open_index(self) -> faiss.IndexIDMap2:
        """Load ``index.faiss`` if its stamp matches SQLite, else rebuild and rewrite it."""
        reason = self._try_load_index()
        if isinstance(reason, str):
            return self._rebuild(reason)
        self.index_loads += 1
        logger.debug("loaded speaker index %s (%d vectors)", self.index_path, reason.ntotal)
        return reason

    def _try_load_index(self) -> faiss.IndexIDMap2 | str:
        """The index from disk, or the reason it cannot be used."""
        try:
            stamp = json.loads(self.stamp_path.read_text())
            data = self.index_path.read_bytes()
        except FileNotFoundError as exc:
            return f"{Path(exc.filename).name} is missing"
        except (OSError, ValueError) as exc:
            return f"{self.stamp_path.name} is unreadable ({exc})"
        if not isinstance(stamp, dict) or stamp.get("format") != STAMP_FORMAT:
            return f"{self.stamp_path.name} has an unknown format"
        if stamp.get("index_sha256") != hashlib.sha256(data).hexdigest():
            return f"{self.index_path.name} does not match its stamp (corrupt, or its write was interrupted)"
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as exc:
            return f"{self.index_path.name} is unreadable ({str(exc).splitlines()[0]})"
        if not isinstance(index, faiss.IndexIDMap2) or index.d != self.dim:
            return f"{self.index_path.name} is not an id-mapped {self.dim}-d index"
        actual = self._stamp(index, stamp["index_sha256"])
        if actual != stamp:
            return f"{self.index_path.name} does not match its stamp"
        sqlite_ids = self._sqlite_ids()
        expected = {
            "count": int(len(sqlite_ids)),
            "max_id": int(sqlite_ids.max()) if len(sqlite_ids) else 0,
            "ids_sha256": _ids_checksum(sqlite_ids),
        }
        if any(stamp[k] != v for k, v in expected.items()) or stamp["model_fingerprint"] != self.fingerprint:
            return (
                f"{self.index_path.name} is stale ({stamp['count']} vectors, SQLite has {expected['count']} "
                f"embeddings)"
            )
        return index

    def _rebuild(self, reason: str) -> faiss.IndexIDMap2:
        ids, _, matrix = self.embeddings()
        fresh = len(ids) == 0 and not self.index_path.exists()
        # A brand-new store has no index yet: that is not worth a warning.
        logger.log(
            logging.DEBUG if fresh else logging.WARNING,
            "rebuilding speaker index in %s from SQLite: %s",
            self.directory,
            reason,
        )
        index = self._new_index()
        if len(ids):
            index.add_with_ids(_normalise(matrix), ids)
        self.index_rebuilds += 1
        self.last_rebuild_reason = reason
        self._persist(index)
        return index

    def _persist(self, index: faiss.Index) -> None:
        """Write the index, then its stamp, each atomically. A kill between them leaves a mismatch."""
        data = faiss.serialize_index(index).tobytes()
        stamp = self._stamp(index, hashlib.sha256(data).hexdigest())
        try:
            _atomic_write(self.directory, self.index_path, data)
            _atomic_write(self.directory, self.stamp_path, (json.dumps(stamp, indent=1) + "\n").encode())
        except OSError as exc:
            # SQLite already holds the change; the index is only a cache and will be rebuilt on open.
            logger.warning("could not save the speaker index in %s (%s); it will be rebuilt", self.directory, exc)
        self._chmod_sidecars()

    def _after_write(self) -> None:
        """Persist the updated index, rebuilding first if another process changed SQLite meanwhile."""
        if _ids_checksum(self._index_ids(self._index)) != _ids_checksum(self._sqlite_ids()):
            self._index = self._rebuild("the store was changed by another process")
        else:
            self._persist(self._index)

    def rebuild_index(self) -> None:
        """Rebuild the index from SQLite and rewrite it (e.g. after ``speakerd store repair``)."""
        with self._lock:
            self._index = self._rebuild("requested")

    def load_index(self) -> faiss.Index:
        """A copy of the index, first rebuilt if SQLite was changed (e.g. by another process).

        A copy, so a matcher may update it in memory without desynchronising the store's own index.
        """
        with self._lock:
            if _ids_checksum(self._index_ids(self._index)) != _ids_checksum(self._sqlite_ids()):
                self._index = self._rebuild("the store was changed by another process")
            return faiss.clone_index(self._index)

    # -- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> SpeakerStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
