"""Enrollment: audio files -> window embeddings through the daemon's own stages -> the store.

Enrollment uses exactly the VAD, windows and features of ``speakerd run``, so a voiceprint is made of
the same kind of windows it will later be matched against.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .audio import SAMPLE_RATE, seconds
from .bundle import ModelBundle
from .errors import SpeakerdError, check
from .room_responses import RoomResponses, bundle_responses
from .rooms import MultiConditionSettings
from .settings import Settings
from .sources import FileSource
from .store import Speaker, SpeakerStore
from .storelock import Holder, StoreBusy, StoreLock
from .speechcheck import SpeechCheckSettings, speech_evidence
from .vad import SpeechAudio, SpeechEnd, SpeechStart, VadSegmenter
from .windows import SpeechWindower, Window

logger = logging.getLogger(__name__)

LOCK_WAIT_S = 10.0
"""How long an enrollment waits for a short offline edit of the same store to finish."""


@dataclass(frozen=True)
class EnrollSettings:
    min_speech_s: float = 6.0
    """Speech needed across all files of one enrollment."""
    min_file_speech_s: float = 1.0
    """Speech needed in every single file, so a silent or broken file is named, not averaged away."""
    inconsistent_below: float = 0.6
    """A file whose voice is less similar than this to the rest is reported as inconsistent."""
    speech_check: SpeechCheckSettings = field(default_factory=SpeechCheckSettings)
    """What tells a voice from noise, hum or music that the VAD let through (speechcheck.py)."""

    def __post_init__(self) -> None:
        check(self.min_speech_s >= 1.0, "enroll.min_speech_s", self.min_speech_s, "must be at least 1 s")
        check(self.min_file_speech_s >= 0.5, "enroll.min_file_speech_s", self.min_file_speech_s, "must be at least 0.5 s")


class EnrollError(SpeakerdError):
    exit_code = 2


@dataclass(frozen=True)
class FileEmbeddings:
    path: Path
    embeddings: np.ndarray
    speech_s: float
    windows: list[Window]
    in_rooms: np.ndarray | None = None
    """The file's windows heard through simulated rooms (``add_room_versions``), if any."""


def file_windows(path: Path, settings: Settings, features) -> tuple[list[Window], float]:  # noqa: ANN001
    """Windows of a file and its seconds of speech, through the same VAD and windower as the daemon.
    Probes are left out: they serve only the tracker's early guesses, and enrolling from them too
    moved the calibrated threshold (docs/calibration.md) for a p95 latency gain within noise."""
    windows, speech_s, _ = file_speech(path, settings, features)
    return windows, speech_s


def file_speech(path: Path, settings: Settings, features) -> tuple[list[Window], float, np.ndarray]:  # noqa: ANN001
    """As ``file_windows``, and the audio the VAD kept (for the speech check)."""
    source = FileSource(path, settings.audio, realtime=False)
    vad = VadSegmenter(settings.vad)
    windower = SpeechWindower(settings.windows, features)
    windows: list[Window] = []
    kept: list[np.ndarray] = []
    speech = 0
    region_start = 0

    def take(events) -> None:  # noqa: ANN001
        nonlocal speech, region_start
        for event in events:
            if isinstance(event, SpeechAudio):
                kept.append(event.chunk.samples)
            for item in windower.process(event):
                if isinstance(item, Window):
                    if not item.probe:
                        windows.append(item)
                elif isinstance(item, SpeechStart):
                    region_start = item.sample
                elif isinstance(item, SpeechEnd):
                    speech += item.sample - region_start

    with source:
        while not source.finished:
            chunk = source.read(1.0)
            if chunk is not None:
                take(vad.process(chunk))
    take(vad.flush())
    return windows, seconds(speech), np.concatenate(kept) if kept else np.zeros(0, dtype=np.float32)


def embed_windows(windows: Sequence[Window], embed: Callable[[np.ndarray], np.ndarray], batch: int = 16) -> np.ndarray:
    """Embed windows in batches of equal length, keeping their order."""
    out: list[np.ndarray | None] = [None] * len(windows)
    by_len: dict[int, list[int]] = {}
    for i, w in enumerate(windows):
        by_len.setdefault(w.num_frames, []).append(i)
    for idx in by_len.values():
        for k in range(0, len(idx), batch):
            part = idx[k : k + batch]
            embs = embed(np.stack([windows[i].feats for i in part]))
            for i, e in zip(part, embs, strict=True):
                out[i] = e
    return np.stack(out) if out else np.zeros((0, 0), dtype=np.float32)  # type: ignore[arg-type]


@dataclass(frozen=True)
class EnrollReport:
    name: str
    files: list[FileEmbeddings]
    consistency: list[float]
    """Each file's cosine between its mean voice and the mean voice of the other files."""
    total_speech_s: float

    @property
    def num_embeddings(self) -> int:
        return sum(len(f.embeddings) for f in self.files)

    def embeddings_matrix(self) -> np.ndarray:
        return np.concatenate([f.embeddings for f in self.files])

    def rooms_matrix(self) -> np.ndarray | None:
        """Every file's room versions' embeddings, or None without multi-condition enrollment."""
        found = [f.in_rooms for f in self.files if f.in_rooms is not None and len(f.in_rooms)]
        return np.concatenate(found) if found else None


def _centroid(embs: np.ndarray) -> np.ndarray:
    c = embs.mean(axis=0)
    return c / max(float(np.linalg.norm(c)), 1e-12)


def prepare_enrollment(
    name: str,
    paths: Sequence[Path],
    settings: Settings,
    features,  # noqa: ANN001
    embed: Callable[[np.ndarray], np.ndarray],
    enroll_settings: EnrollSettings | None = None,
    progress: Callable[[Path], None] | None = None,
) -> EnrollReport:
    """Embed every file; refuse, naming the file, when there is too little speech."""
    es = enroll_settings or EnrollSettings()
    files: list[FileEmbeddings] = []
    for path in paths:
        windows, speech_s, audio = file_speech(Path(path), settings, features)
        if speech_s < es.min_file_speech_s:
            raise EnrollError(
                f"{path}: only {speech_s:.2f} s of speech found; each file needs at least "
                f"{es.min_file_speech_s:.2f} s of clear speech (a few sentences make a better voiceprint)"
            )
        if not windows:
            raise EnrollError(
                f"{path}: {speech_s:.2f} s of speech found, but no stretch of it is long enough to embed: "
                f"each file needs at least one stretch of {settings.windows.first_length_s:.2f} s of speech "
                f"without a pause"
            )
        embeddings = embed_windows(windows, embed)
        refusal = speech_evidence(audio, embeddings, es.speech_check).refusal(es.speech_check)
        if refusal is not None:
            raise EnrollError(f"{path} does not sound like a person speaking: {refusal}. Nothing was enrolled; "
                              f"use a recording of {name} talking alone")
        files.append(FileEmbeddings(Path(path), embeddings, speech_s, windows))
        if progress is not None:
            progress(Path(path))
    total = sum(f.speech_s for f in files)
    if total < es.min_speech_s:
        raise EnrollError(
            f"{name}: {total:.1f} s of speech in {len(files)} file(s); enrollment needs at least "
            f"{es.min_speech_s:.1f} s. Add more recordings of {name}."
        )
    consistency: list[float] = []
    if len(files) > 1:
        centroids = np.stack([_centroid(f.embeddings) for f in files])
        for i in range(len(files)):
            rest = _centroid(np.delete(centroids, i, axis=0))
            consistency.append(float(centroids[i] @ rest))
    else:  # one file: compare its halves
        embs = files[0].embeddings
        if len(embs) >= 4:
            half = len(embs) // 2
            consistency.append(float(_centroid(embs[:half]) @ _centroid(embs[half:])))
    return EnrollReport(name=name, files=files, consistency=consistency, total_speech_s=total)


def enroll_beside_daemon(store: SpeakerStore, name: str, embeddings: np.ndarray, source: str,
                         in_rooms: np.ndarray | None = None) -> tuple[Speaker, Holder | None]:
    """Write an enrollment (and its room versions' embeddings) so that a daemon serving the store sees
    it; returns the speaker and that daemon.

    With no daemon, under the store lock (a daemon starting meanwhile waits, then reads it). With a
    daemon holding the store, beside it (SQLite takes a second writer) and then SIGHUP to that
    daemon, which re-reads its speakers: an addition is safe to make beside a daemon, unlike a
    rename or a forget, which go through its control socket.
    """
    lock = StoreLock(store.directory, "speakerd enroll")
    try:
        lock.acquire(wait_s=LOCK_WAIT_S)
    except StoreBusy as busy:
        if busy.holder is None or not busy.holder.is_daemon:
            raise
        speaker = store.enroll(name, embeddings, source, in_rooms)
        try:
            os.kill(busy.holder.pid, signal.SIGHUP)
        except OSError as exc:
            raise EnrollError(
                f"enrolled {name}, but could not ask {busy.holder} to reload ({exc}); run `speakerd "
                f"speakers reload` so it names {name}"
            ) from None
        return speaker, busy.holder
    with lock:
        return store.enroll(name, embeddings, source, in_rooms), None


def enrollment_rooms(bundle: ModelBundle, multi: MultiConditionSettings, asked: bool) -> tuple[MultiConditionSettings, RoomResponses | None]:
    """The rooms multi-condition enrollment puts recordings through: the bundle's room responses, else
    rooms simulated anew. A bundle without responses (built before them) and no pyroomacoustics:
    the error that says how to get them when ``asked`` for (``--room-versions``), else clean
    recordings only, with a warning, as enrollment was before rooms came in by default."""
    if multi.versions == 0:
        return multi, None
    responses = bundle_responses(bundle)
    if responses is not None:
        return multi, responses
    from . import rooms

    try:
        rooms.pyroomacoustics()
    except rooms.RoomError:
        if asked:
            raise
        logger.warning("model %s has no room responses and pyroomacoustics is not installed: enrolling from the clean "
                       "recordings only, which match less well across a room (rebuild the model with `speakerd models "
                       "build %s`, or pip install 'speakerd[rooms]')", bundle.name, bundle.name)
        return dataclasses.replace(multi, versions=0), None
    return multi, None


def add_room_versions(
    report: EnrollReport,
    settings: Settings,
    features,  # noqa: ANN001
    embed: Callable[[np.ndarray], np.ndarray],
    multi: MultiConditionSettings,
    responses: RoomResponses | None = None,
) -> EnrollReport:
    """Multi-condition enrollment: every recording also through ``multi.versions`` simulated rooms.

    A voiceprint from a clean file alone scores low through a table microphone across a room; its
    windows heard through rooms and noise (``FileEmbeddings.in_rooms``, a voiceprint of their own
    beside the clean one) make it match there. Each version goes through the same VAD and windows
    as the file itself. The rooms are ``responses`` (the model bundle's), or simulated anew without
    them (needs pyroomacoustics).
    """
    if multi.versions == 0:
        return report
    import tempfile
    import zlib

    import soundfile as sf

    from . import rooms

    if responses is None:
        rooms.pyroomacoustics()  # say what is missing before any work
    files: list[FileEmbeddings] = []
    with tempfile.TemporaryDirectory(prefix="speakerd-rooms-") as tmp:
        for f in report.files:
            audio = _read_16k(f.path, settings)
            extra: list[np.ndarray] = []
            drawn = None if responses is None else responses.responses
            versions = rooms.room_versions(audio, multi, zlib.crc32(f.path.name.encode()), drawn)
            for k, version in enumerate(versions):
                wav = Path(tmp) / f"version-{k}.wav"
                sf.write(str(wav), version, SAMPLE_RATE, subtype="FLOAT")
                windows, _ = file_windows(wav, settings, features)
                if windows:
                    extra.append(embed_windows(windows, embed))
            logger.info("%s: %d room versions, %d embeddings beside %d clean", f.path.name, multi.versions,
                        sum(map(len, extra)), len(f.embeddings))
            files.append(dataclasses.replace(f, in_rooms=np.concatenate(extra) if extra else None))
    return dataclasses.replace(report, files=files)


def _read_16k(path: Path, settings: Settings) -> np.ndarray:
    """A file's audio as the daemon hears it (16 kHz mono), through the same file source."""
    chunks: list[np.ndarray] = []
    with FileSource(path, settings.audio, realtime=False) as source:
        while not source.finished:
            chunk = source.read(1.0)
            if chunk is not None:
                chunks.append(np.asarray(chunk.samples, dtype=np.float32))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
