"""The control plane's meaning of each request, over a ``SpeakerPort`` (the running daemon).

``ControlService`` decides which speaker an id names, which windows a stream enrollment takes and
which relabel follows a change; the port (``daemon.Daemon``, or a test double) carries it out. The
socket, the wire protocol and request parsing are ``control.py``'s.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .audio import SAMPLE_RATE
from .control import ControlError
from .decisions.clustering import ProvisionalSpeakers, is_provisional_id
from .decisions.evidence import MatchedWindow
from .events import SpeakerRef

if TYPE_CHECKING:
    from .lifecycle import ReloadResult
    from .store import Speaker

MIN_STREAM_ENROLL_S = 2.0
"""Speech a stream enrollment needs: fewer windows than this make a poor voiceprint."""
MAJORITY = 0.8
"""Share of the labelled windows one provisional speaker must hold to be promoted with them (and
at least half the windows must be labelled)."""


class SpeakerPort(Protocol):
    """What the control plane needs of a running daemon. ``daemon.Daemon`` implements it; so does
    the tests' double. Enrolled speakers change in the store first (the truth), then in the matcher."""

    @property
    def provisional(self) -> ProvisionalSpeakers: ...

    def speakers(self) -> list[Speaker]: ...

    def speaker(self, who: str) -> Speaker | None:
        """An enrolled speaker by name or id."""
        ...

    def enroll(self, name: str, embeddings: np.ndarray, source: str) -> Speaker:
        """Store ``embeddings`` for ``name`` (new or existing) and match against them from now on."""
        ...

    def rename(self, speaker_id: str, name: str) -> Speaker: ...

    def merge(self, source_id: str, target_id: str) -> int:
        """Move every embedding of enrolled ``source_id`` to ``target_id`` and forget the source;
        how many moved."""
        ...

    def forget(self, speaker_id: str) -> Speaker: ...

    def recent_windows(self, seconds_back: float) -> list[MatchedWindow]: ...

    def relabel(self, old: SpeakerRef, new: SpeakerRef, cause: str | None = None) -> None:
        """Publish ``speaker.renamed`` (``cause`` None) or ``speaker.merged``; later events use ``new``."""
        ...

    def status(self) -> dict[str, Any]: ...

    def reload(self) -> ReloadResult: ...


class ControlService:
    """``ControlHandler`` over a ``SpeakerPort``: what each request means (which speaker an id is,
    which windows a stream enrollment takes, which relabel follows); the port carries it out.

    Every change to a speaker is followed by ``speaker.renamed``/``speaker.merged`` through the
    port, so every later event carries the new name.
    """

    def __init__(self, port: SpeakerPort) -> None:
        self.port = port
        self._lock = threading.Lock()
        """One request at a time changes speakers (the REP socket serialises them anyway)."""

    # -- lookups --

    def _enrolled(self, who: str) -> Speaker:
        speaker = self.port.speaker(who)
        if speaker is None:
            raise ControlError("not_found", f"no speaker {who!r} (neither enrolled nor provisional in this session)")
        return speaker

    @staticmethod
    def _ref(speaker: Speaker) -> SpeakerRef:
        return SpeakerRef(speaker.id, speaker.name, True)

    def _provisional(self, who: str) -> SpeakerRef | None:
        """The provisional speaker ``who`` as it is now (None if ``who`` is not a provisional id)."""
        if not is_provisional_id(who):
            return None
        now = self.port.provisional.resolve(who)
        if now is None:
            raise ControlError("not_found", f"no provisional speaker {who!r} in this session")
        return now

    # -- ops --

    def list(self) -> dict[str, Any]:
        enrolled = [{"id": s.id, "name": s.name, "embeddings": s.num_embeddings} for s in self.port.speakers()]
        provisional = [
            {
                "id": p.id,
                "windows": p.windows,
                "speech_s": round(p.speech_s, 2),
                "first_s": round(p.first_s, 3),
                "last_s": round(p.last_s, 3),
                "now": None if p.alias is None else p.alias.to_dict(),
            }
            for p in self.port.provisional.speakers()
        ]
        return {"enrolled": enrolled, "provisional": provisional}

    def status(self) -> dict[str, Any]:
        return self.port.status()

    def enroll(self, name: str, *, last_s: float | None = None, speaker: str | None = None) -> dict[str, Any]:
        with self._lock:
            if speaker is not None:
                return self._name_provisional(speaker, name)
            assert last_s is not None
            return self._enroll_recent(name, last_s)

    def _enroll_recent(self, name: str, last_s: float) -> dict[str, Any]:
        windows = [w for w in self.port.recent_windows(last_s) if w.embedding is not None]
        spans: list[tuple[int, int]] = []
        for w in windows:
            if spans and w.window.start <= spans[-1][1]:
                spans[-1] = (spans[-1][0], max(spans[-1][1], w.window.end))
            else:
                spans.append((w.window.start, w.window.end))
        speech_s = sum(b - a for a, b in spans) / SAMPLE_RATE
        if speech_s < MIN_STREAM_ENROLL_S:
            raise ControlError(
                "too_little_speech",
                f"only {speech_s:.1f} s of speech in the last {last_s:g} s; need {MIN_STREAM_ENROLL_S:g} s",
            )
        labels = [w.ref.id for w in windows]
        named = [x for x in labels if x is not None]  # anonymous windows: not yet clustered, no vote
        top = max(set(named), key=named.count) if named else None
        ref, existed = self._store_enroll(name, np.stack([w.embedding for w in windows]), f"stream:last {last_s:g} s")
        promoted = None
        if top is not None and is_provisional_id(top) and named.count(top) >= MAJORITY * len(named) >= MAJORITY * len(labels) / 2:
            promoted = top
            self._promote(top, ref, existed)
        return {
            "speaker": ref.to_dict(),
            "windows": len(windows),
            "speech_s": round(speech_s, 2),
            "promoted": promoted,
            "matched": {str(k): labels.count(k) for k in set(labels)},
        }

    def _name_provisional(self, speaker: str, name: str) -> dict[str, Any]:
        now = self._provisional(speaker)
        if now is None:
            raise ControlError("bad_request", f"{speaker!r} is not a provisional speaker id (unknown-N)")
        if now.known:
            raise ControlError("conflict", f"{speaker} is already {now.name} ({now.id})")
        embeddings = self.port.provisional.embeddings(speaker)
        if len(embeddings) == 0:
            raise ControlError("not_found", f"{speaker} was forgotten")
        ref, existed = self._store_enroll(name, embeddings, f"stream:{speaker}")
        self._promote(speaker, ref, existed)
        return {"speaker": ref.to_dict(), "windows": len(embeddings), "promoted": speaker}

    def _store_enroll(self, name: str, embeddings: np.ndarray, source: str) -> tuple[SpeakerRef, bool]:
        existed = self.port.speaker(name) is not None
        return self._ref(self.port.enroll(name, embeddings, source)), existed

    def _promote(self, provisional_id: str, ref: SpeakerRef, existed: bool) -> None:
        relabel = self.port.provisional.promote(provisional_id, ref)
        self.port.relabel(relabel.old, ref, cause="control" if existed else None)

    def rename(self, speaker: str, name: str) -> dict[str, Any]:
        with self._lock:
            if self._provisional(speaker) is not None:
                return self._name_provisional(speaker, name)
            old = self._enrolled(speaker)
            renamed = self.port.rename(old.id, name)
            self.port.relabel(self._ref(old), self._ref(renamed))
            return {"speaker": self._ref(renamed).to_dict(), "previous": self._ref(old).to_dict()}

    def merge(self, source: str, target: str) -> dict[str, Any]:
        with self._lock:
            src_prov, dst_prov = self._provisional(source), self._provisional(target)
            if src_prov is not None and dst_prov is not None and not dst_prov.known:
                relabel = self.port.provisional.merge(source, target)
                self.port.relabel(relabel.old, relabel.new, cause="control")
                return {"speaker": relabel.new.to_dict(), "merged": relabel.old.to_dict()}
            if src_prov is not None:
                dest = self._enrolled(dst_prov.id if dst_prov is not None else target)  # type: ignore[union-attr,arg-type]
                return self._name_provisional(source, dest.name)
            if dst_prov is not None and not dst_prov.known:
                raise ControlError("bad_request", "merge a provisional speaker into an enrolled one, not the other way")
            src = self._enrolled(source)
            dst = self._enrolled(dst_prov.id if dst_prov is not None else target)  # type: ignore[union-attr,arg-type]
            if src.id == dst.id:
                raise ControlError("bad_request", f"{source!r} and {target!r} are the same speaker")
            moved = self.port.merge(src.id, dst.id)
            self.port.relabel(self._ref(src), self._ref(dst), cause="control")
            return {"speaker": self._ref(dst).to_dict(), "merged": self._ref(src).to_dict(), "embeddings": moved}

    def forget(self, speaker: str) -> dict[str, Any]:
        with self._lock:
            if self._provisional(speaker) is not None:
                self.port.provisional.forget(speaker)
                return {"forgotten": speaker}
            gone = self.port.forget(self._enrolled(speaker).id)
            return {"forgotten": gone.id, "name": gone.name, "embeddings": gone.num_embeddings}

    def reload(self) -> dict[str, Any]:
        with self._lock:
            result = self.port.reload()
            if not result.ok:
                raise ControlError("reload_failed", str(result.error))
            return dataclasses.asdict(result)
