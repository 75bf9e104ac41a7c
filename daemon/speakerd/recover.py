"""``speakerd speakers recover``: rebuild a lost or damaged store database from what is left of it.

What lives where: SQLite holds the names, the speaker ids, which embedding belongs to whom and the
vectors as the model produced them. The faiss index (``index.faiss``) holds every embedding's vector,
normalised (all matching uses), under its SQLite row id; its stamp (``index.json``) holds the model
fingerprint and dimension. So the index alone brings the voiceprints back but neither the names nor
who is who: those vectors are regrouped by voice similarity under placeholder names. Whatever rows a
damaged database still yields (names, owners, raw vectors) are used first.

Nothing is deleted or overwritten: the old database and its side files are moved, and the index and
stamp copied, into ``before-recover-<UTC time>/`` in the store folder; the new database is built under
a temporary name and renamed into place only when complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import tempfile
import time
from contextlib import closing, suppress
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from .store import (
    DB_NAME,
    FILE_MODE,
    INDEX_NAME,
    ROOM_VERSION,
    SCHEMA,
    SCHEMA_VERSION,
    SPEAKER_ID_PREFIX,
    STAMP_NAME,
    SpeakerStore,
    StoreUnusable,
    fsync_dir,
)
from .storelock import StoreLock

logger = logging.getLogger(__name__)

PLACEHOLDER_PREFIX = "recovered-"
ASIDE_PREFIX = "before-recover-"
FROM_INDEX = "recovered from index.faiss"
"""Source of an embedding the database lost and the index kept."""
COMMAND = "speakerd speakers recover"
LOCK_WAIT_S = 10.0
MAX_UNITS = 4_000
"""Clustering is quadratic in memory: above this many vectors, runs of consecutive ids (one
enrollment writes its windows under consecutive ids) are clustered by their mean instead."""


@dataclass(frozen=True)
class RecoverSettings:
    same_run: float = 0.8
    """See ``_runs``: the mean voices of ``run_context`` windows either side of a point inside one
    enrollment; below it, a new recording starts."""
    run_context: int = 4
    same_voice: float = 0.65
    """Mean cosine between the windows of two groups at or above which they are one speaker. GE2E
    windows of one LibriSpeech reader average 0.75 among themselves, of two readers 0.47. On three
    sets of 20 readers (574-604 embeddings; tools/measure_recover.py) 0.65 regrouped 19, 20 and 20 of
    them exactly and never put two readers in one group; 0.60 mixed two readers, 0.70 split seven.
    A split is undone with `speakers merge`, a mix only by enrolling again."""


@dataclass(frozen=True)
class Salvage:
    """What a damaged (or missing) database still yields."""

    meta: dict[str, str] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    """speaker id -> name."""
    rows: dict[int, tuple[str | None, bytes, str, float]] = field(default_factory=dict)
    """embedding id -> (speaker id, vector as stored, source, created)."""
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class RecoveryReport:
    directory: Path
    aside: Path | None
    fingerprint: str
    embeddings: int
    named: dict[str, int]
    """Speakers restored under their own names -> embeddings."""
    placeholders: dict[str, int]
    """Speakers whose names were lost -> embeddings."""
    lost: tuple[str, ...]
    notes: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        out = [f"recovered {self.embeddings} voiceprint embeddings into {self.directory / DB_NAME}"]
        for name, n in sorted(self.named.items()):
            out.append(f"  {name}: {n} embeddings, name kept")
        for name, n in self.placeholders.items():
            out.append(f"  {name}: {n} embeddings, name LOST")
        if self.placeholders:
            out.append(
                "names were kept only in the lost database: the placeholders above are voices regrouped "
                "by similarity, under new speaker ids; name each with `speakerd speakers rename "
                "recovered-N NAME`, and re-enroll anyone whose placeholder mixes two people"
            )
        out.extend(f"lost: {what}" for what in self.lost)
        out.extend(f"note: {what}" for what in self.notes)
        if self.aside is not None:
            out.append(f"the previous files are kept in {self.aside}")
        return out


def embedding_ids_by_name(directory: Path) -> dict[str, set[int]]:
    """Speaker name -> its embedding ids, straight from the store's database (to check a recovery)."""
    with closing(sqlite3.connect(Path(directory) / DB_NAME)) as db:
        rows = db.execute("SELECT s.name, e.id FROM speakers s JOIN embeddings e ON e.speaker_id = s.id").fetchall()
    out: dict[str, set[int]] = {}
    for name, emb_id in rows:
        out.setdefault(name, set()).add(int(emb_id))
    return out


def read_index(directory: Path) -> tuple[np.ndarray, np.ndarray, dict[str, object]] | str:
    """(ids, normalised vectors, stamp) from ``index.faiss``, or why it cannot be read."""
    try:
        data = np.fromfile(directory / INDEX_NAME, dtype=np.uint8)
    except OSError as exc:
        return f"{INDEX_NAME} cannot be read ({exc.strerror or exc})"
    try:
        index = faiss.deserialize_index(data)
    except RuntimeError as exc:
        return f"{INDEX_NAME} is unreadable ({str(exc).splitlines()[0]})"
    if not isinstance(index, faiss.IndexIDMap2):
        return f"{INDEX_NAME} is not an id-mapped index"
    ids = np.asarray(faiss.vector_to_array(index.id_map), dtype=np.int64)
    vectors = index.index.reconstruct_n(0, index.ntotal) if index.ntotal else np.zeros((0, index.d), np.float32)
    try:
        stamp = json.loads((directory / STAMP_NAME).read_text())
    except (OSError, ValueError):
        stamp = {}
    stamp = stamp if isinstance(stamp, dict) else {}
    stamp.setdefault("dim", index.d)
    return ids, np.asarray(vectors, dtype=np.float32), stamp


def salvage_database(db: Path) -> Salvage:
    """Every row a (possibly damaged) database still yields, read from a scratch copy of it and its
    ``-wal``, so the original is never written (opening replays a WAL)."""
    if not db.exists() or db.stat().st_size == 0:
        return Salvage()
    meta: dict[str, str] = {}
    names: dict[str, str] = {}
    rows: dict[int, tuple[str | None, bytes, str, float]] = {}
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="speakerd-recover-") as scratch:
        copy = Path(scratch) / DB_NAME
        shutil.copyfile(db, copy)
        wal = db.with_name(db.name + "-wal")
        if wal.exists():
            shutil.copyfile(wal, copy.with_name(copy.name + "-wal"))
        queries = (
            ("meta", "SELECT key, value FROM meta", lambda r: meta.__setitem__(str(r[0]), str(r[1]))),
            ("speakers", "SELECT id, name FROM speakers", lambda r: names.__setitem__(r[0], r[1])),
            (
                "embeddings",
                "SELECT id, speaker_id, vector, source, created FROM embeddings",
                lambda r: rows.__setitem__(int(r[0]), (r[1], bytes(r[2] or b""), str(r[3] or ""), float(r[4] or 0))),
            ),
        )
        try:
            conn = sqlite3.connect(copy)
        except sqlite3.Error as exc:
            return Salvage(problems=(f"the old database cannot be opened ({exc})",))
        with closing(conn):
            for table, sql, keep in queries:
                try:
                    for row in conn.execute(sql):  # rows before a damaged page still arrive
                        keep(row)
                except sqlite3.Error as exc:
                    problems.append(f"the old database's {table} table is damaged ({exc})")
    return Salvage(meta, names, rows, tuple(problems))


def _unit(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.maximum(np.linalg.norm(matrix, axis=-1, keepdims=True), 1e-12)


def _runs(ids: np.ndarray, vectors: np.ndarray, settings: RecoverSettings) -> list[np.ndarray]:
    """Split id order into runs that are one recording: an enrollment writes its windows under
    consecutive ids, so a run ends at a gap in the ids or where the voice changes (the mean of the
    ``run_context`` windows before a point and after it are less alike than ``same_run``)."""
    k = settings.run_context
    cuts = [
        i
        for i in range(1, len(ids))
        if ids[i] != ids[i - 1] + 1
        or float(_unit(vectors[max(0, i - k) : i].mean(axis=0)) @ _unit(vectors[i : i + k].mean(axis=0))) < settings.same_run
    ]
    return np.split(np.arange(len(ids)), cuts)


def _average_linkage(similarity: np.ndarray, runs: list[np.ndarray], threshold: float) -> list[list[int]]:
    """Agglomerate runs while the closest two clusters' mean window-pair similarity is >= threshold."""
    sums = np.add.reduceat(np.add.reduceat(similarity[np.concatenate(runs)][:, np.concatenate(runs)],
                                           np.cumsum([0] + [len(r) for r in runs[:-1]]), axis=0),
                           np.cumsum([0] + [len(r) for r in runs[:-1]]), axis=1)
    sizes = np.asarray([len(r) for r in runs], dtype=np.float64)
    members = [list(r) for r in runs]
    alive = np.ones(len(runs), dtype=bool)
    while alive.sum() > 1:
        mean = sums / np.outer(sizes, sizes)
        mean[~alive] = -np.inf
        mean[:, ~alive] = -np.inf
        np.fill_diagonal(mean, -np.inf)
        a, b = np.unravel_index(int(np.argmax(mean)), mean.shape)
        if mean[a, b] < threshold:
            break
        sums[a] += sums[b]
        sums[:, a] += sums[:, b]
        sizes[a] += sizes[b]
        members[a] += members[b]
        alive[b] = False
    return [members[i] for i in np.flatnonzero(alive)]


def group_by_voice(ids: np.ndarray, vectors: np.ndarray, settings: RecoverSettings) -> list[np.ndarray]:
    """Ids grouped by voice: runs of one recording, joined by average linkage on cosine; each group
    in id order, the groups in order of their first id (enrollment order)."""
    if len(ids) == 0:
        return []
    order = np.argsort(ids)
    ids, vectors = ids[order], _unit(np.asarray(vectors[order], dtype=np.float64))
    step = -(-len(ids) // MAX_UNITS)  # consecutive vectors averaged together when there are many
    starts = np.arange(0, len(ids), step)
    units = _unit(np.add.reduceat(vectors, starts, axis=0))
    runs = _runs(ids if step == 1 else np.arange(len(starts)), units, settings)  # (no id gaps between averages)
    groups = []
    for members in _average_linkage(units @ units.T, runs, settings.same_voice):
        rows = np.concatenate([np.arange(starts[m], min(starts[m] + step, len(ids))) for m in sorted(members)])
        groups.append(ids[rows])
    return sorted(groups, key=lambda g: int(g[0]))


def _room_version_ids(stamp: dict[str, object], rows: dict[int, tuple[str | None, bytes, str, float]]) -> set[int]:
    """Ids of room-version embeddings (multi-condition enrollment): marked in their source where the
    database kept it, else listed by the index's stamp (``store.id_runs``)."""
    out = {i for i, r in rows.items() if r[2].startswith(ROOM_VERSION)}
    runs = stamp.get("room_versions")
    if isinstance(runs, list):  # a damaged stamp's runs may be anything: only the rows there are are looked up
        pairs = (r for r in runs if isinstance(r, list) and len(r) == 2)
        valid = [(a, b) for a, b in pairs if isinstance(a, int) and isinstance(b, int)]
        out.update(i for i in rows if any(a <= i <= b for a, b in valid))
    return out


def _with_room_versions(groups: list[np.ndarray], room_ids: list[int]) -> list[np.ndarray]:
    """Each room-version embedding joined to the group of the nearest id before it: one enrollment
    writes its recordings' windows and then their room versions under consecutive ids, so that is
    the same voice (regrouping them by similarity split one voice into its clean and room halves)."""
    if not room_ids or not groups:
        return groups
    firsts = sorted((int(i), g) for g, group in enumerate(groups) for i in group.tolist())
    keys = [i for i, _ in firsts]
    extra: dict[int, list[int]] = {}
    for i in room_ids:
        k = max(0, int(np.searchsorted(keys, i)) - 1)
        extra.setdefault(firsts[k][1], []).append(i)
    return [np.asarray(sorted([*group.tolist(), *extra.get(g, [])]), dtype=np.int64) for g, group in enumerate(groups)]


def _move_aside(directory: Path) -> Path:
    aside = directory / (ASIDE_PREFIX + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    suffix = 1
    while aside.exists():
        aside = aside.with_name(f"{aside.name.split('.')[0]}.{suffix}")
        suffix += 1
    aside.mkdir(mode=0o700)
    for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", DB_NAME + "-journal"):
        with suppress(FileNotFoundError):
            os.replace(directory / name, aside / name)
    for name in (INDEX_NAME, STAMP_NAME):
        with suppress(FileNotFoundError):
            shutil.copy2(directory / name, aside / name)
            os.chmod(aside / name, FILE_MODE)
    return aside


def _install_database(directory: Path, meta: dict[str, str], speakers: dict[str, str],
                      rows: dict[int, tuple[str, bytes, str, float]], dim: int) -> Path:
    """Build the new database under a temporary name; only once it is complete, move the old files
    aside and rename it into place (a kill before that leaves the old files where they were, for a
    second attempt). Returns the folder the old files are kept in."""
    tmp = directory / f".recover-{os.getpid()}.sqlite3"
    os.close(os.open(tmp, os.O_CREAT | os.O_RDWR | os.O_TRUNC, FILE_MODE))
    now = time.time()
    try:
        with closing(sqlite3.connect(tmp)) as conn:
            with conn:
                for statement in filter(str.strip, SCHEMA.split(";")):
                    conn.execute(statement)
                conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", sorted(meta.items()))
                conn.executemany(
                    "INSERT INTO speakers(id, name, created, updated) VALUES (?, ?, ?, ?)",
                    [(sid, name, now, now) for sid, name in speakers.items()],
                )
                conn.executemany(
                    "INSERT INTO embeddings(id, speaker_id, model_fingerprint, dim, vector, source, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(i, sid, meta["model_fingerprint"], dim, blob, src, t) for i, (sid, blob, src, t) in sorted(rows.items())],
                )
        aside = _move_aside(directory)
        os.replace(tmp, directory / DB_NAME)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(directory)
    return aside


def recover_store(directory: Path, *, fingerprint: str, dim: int, settings: RecoverSettings | None = None) -> RecoveryReport | None:
    """Rebuild the database of the store in ``directory``; None when it opens fine (nothing to do).

    ``fingerprint``/``dim`` are the current model's, used only when neither the old database nor the
    index stamp says which model the voiceprints came from.
    """
    settings = settings or RecoverSettings()
    directory = Path(directory).expanduser()
    if not any((directory / name).exists() for name in (DB_NAME, INDEX_NAME, STAMP_NAME)):
        raise StoreUnusable(f"there is no speaker store in {directory} (no {DB_NAME}, no {INDEX_NAME}); check --store")
    with StoreLock(directory, COMMAND).acquire(wait_s=LOCK_WAIT_S):
        try:
            SpeakerStore(directory, fingerprint=fingerprint, dim=dim, create=False).close()
            return None
        except StoreUnusable:
            pass
        return _recover(directory, fingerprint, dim, settings)


def _recover(directory: Path, fingerprint: str, dim: int, settings: RecoverSettings) -> RecoveryReport:
    salvage = salvage_database(directory / DB_NAME)
    indexed = read_index(directory) if (directory / INDEX_NAME).exists() else f"{INDEX_NAME} is missing"
    if isinstance(indexed, str) and not salvage.rows:
        raise StoreUnusable(
            f"nothing to recover in {directory}: {indexed}, and the database yields no voiceprints"
            + (f" ({'; '.join(salvage.problems)})" if salvage.problems else "")
            + "; move the folder aside and enroll again"
        )
    lost = list(salvage.problems)
    stamp: dict[str, object] = {} if isinstance(indexed, str) else indexed[2]
    data_fp = salvage.meta.get("model_fingerprint") or str(stamp.get("model_fingerprint") or "") or fingerprint
    data_dim = int(salvage.meta.get("dim") or stamp.get("dim") or dim)
    if isinstance(indexed, str):
        lost.append(f"the index ({indexed}); only the database's own rows were used")
        ids, vectors = np.zeros(0, np.int64), np.zeros((0, data_dim), np.float32)
    else:
        ids, vectors = indexed[0], indexed[1]
        if vectors.shape[1] != data_dim:
            raise StoreUnusable(f"{INDEX_NAME} holds {vectors.shape[1]}-d vectors but the store is {data_dim}-d; nothing was changed")
    from_index = dict(zip(ids.tolist(), vectors, strict=True))
    rows: dict[int, tuple[str | None, bytes, str, float]] = {}
    for i in sorted(set(from_index) | set(salvage.rows)):
        owner, blob, source, created = salvage.rows.get(i, (None, b"", "", 0.0))
        if len(blob) != 4 * data_dim:  # not in the database, or damaged there: the index's copy
            if i not in from_index:
                continue
            blob, source = from_index[i].astype("<f4").tobytes(), source or FROM_INDEX
        rows[i] = (owner, blob, source, created or time.time())
    speakers = {sid: name for sid, name in salvage.names.items() if any(r[0] == sid for r in rows.values())}
    # rows whose owner is known but whose name was lost stay together; the rest are grouped by voice
    groups = [np.asarray(sorted(i for i, r in rows.items() if r[0] == sid)) for sid in
              sorted({r[0] for r in rows.values() if r[0] is not None and r[0] not in speakers})]
    in_rooms = _room_version_ids(stamp, rows)
    for i in in_rooms:  # the database's mark, or the stamp's for what only the index kept
        if not rows[i][2].startswith(ROOM_VERSION):
            rows[i] = (rows[i][0], rows[i][1], ROOM_VERSION + rows[i][2], rows[i][3])
    orphans = np.asarray([i for i, r in rows.items() if r[0] is None and i not in in_rooms], dtype=np.int64)
    if len(orphans):
        matrix = np.stack([np.frombuffer(rows[i][1], dtype="<f4") for i in orphans.tolist()])
        groups += group_by_voice(orphans, matrix, settings)
    groups = _with_room_versions(groups, sorted(i for i in in_rooms if rows[i][0] is None))
    placeholders: dict[str, int] = {}
    taken = set(speakers.values())
    counter = 0
    for group in sorted(groups, key=lambda g: int(g[0])):
        counter += 1
        while f"{PLACEHOLDER_PREFIX}{counter}" in taken:
            counter += 1
        name = f"{PLACEHOLDER_PREFIX}{counter}"
        known = rows[int(group[0])][0]
        sid = known if known is not None else f"{SPEAKER_ID_PREFIX}{os.urandom(4).hex()}"
        while sid in speakers:
            sid = f"{SPEAKER_ID_PREFIX}{os.urandom(4).hex()}"
        speakers[sid] = name
        placeholders[name] = len(group)
        for i in group.tolist():
            rows[i] = (sid, *rows[i][1:])
    if not isinstance(indexed, str):
        missing = sorted(set(salvage.rows) - set(from_index))
        if salvage.rows and missing:
            lost.append(f"{len(missing)} embeddings were in the database but not the index (restored from the database)")
    meta = {
        "schema_version": str(SCHEMA_VERSION),
        "model_fingerprint": data_fp,
        "dim": str(data_dim),
        "created": salvage.meta.get("created", repr(time.time())),
        "recovered": repr(time.time()),
    }
    aside = _install_database(directory, meta, speakers, rows, data_dim)  # type: ignore[arg-type]
    with SpeakerStore(directory, fingerprint=data_fp, dim=data_dim) as store:
        restored = len(store.embeddings()[0])
    notes = []
    if data_fp != fingerprint:
        notes.append(f"the voiceprints are from model {data_fp!r}, not the current one: run this store with it (--model)")
    named = {name: sum(1 for r in rows.values() if r[0] == sid) for sid, name in speakers.items() if name not in placeholders}
    logger.info("recovered %d embeddings in %s (%d placeholders)", restored, directory, len(placeholders))
    return RecoveryReport(directory, aside, data_fp, restored, named, placeholders, tuple(lost), tuple(notes))
