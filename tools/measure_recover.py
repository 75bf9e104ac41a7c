#!/usr/bin/env python3
"""How well `speakerd speakers recover` regroups voiceprints whose database was lost.

Enrolls 20 LibriSpeech readers into a scratch store (the 5 test-other readers from 3 clips each, and
15 train-clean-100 readers from one clip of 12 s or more, starting at --offset), deletes the
database, recovers it from the index and compares the groups with the enrolled readers: how many
groups there are, how many are exactly one reader's embeddings, and purity (the share of embeddings
in a group whose majority reader is theirs; below 1.000 a group mixes two readers).

  PYTHONPATH=daemon python tools/measure_recover.py                      # offsets 0, 15, 30 at 0.65
  PYTHONPATH=daemon python tools/measure_recover.py --same-voice 0.6 --offset 0
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import soundfile as sf

from speakerd.bundle import resolve_bundle
from speakerd.embedding import backend_for
from speakerd.enroll import EnrollError, prepare_enrollment
from speakerd.recover import RecoverSettings, embedding_ids_by_name as owners, recover_store
from speakerd.settings import load_settings
from speakerd.store import DB_NAME, SpeakerStore

LIBRISPEECH = Path(os.environ.get("SPEAKERD_LIBRISPEECH", Path(__file__).resolve().parents[2] / "shared" / "data" / "librispeech"))
READERS = 15
MIN_CLIP_S = 12.0




def measure(offset: int, same_voice: float) -> str:
    settings = load_settings(None, {})
    bundle = resolve_bundle(settings.embedding.model)
    backend = backend_for(bundle, settings.embedding, settings.windows)
    people = {f"r{d.name}": sorted(d.glob("*.flac"))[:3] for d in sorted((LIBRISPEECH / "test-other").iterdir()) if d.is_dir()}
    long = [p for p in sorted((LIBRISPEECH / "train-clean-100").glob("*.flac")) if sf.info(p).duration >= MIN_CLIP_S]
    people.update({f"t{p.name.split('-')[0]}": [p] for p in long[offset : offset + READERS]})
    with tempfile.TemporaryDirectory() as scratch:
        store = Path(scratch) / "store"
        with SpeakerStore(store, fingerprint=bundle.fingerprint, dim=bundle.embedding_dim) as st:
            for name, clips in people.items():
                try:
                    report = prepare_enrollment(name, clips, settings, bundle.features, backend.embed)
                except EnrollError:
                    continue
                st.enroll(name, report.embeddings_matrix(), source="measure")
        truth = owners(store)
        (store / DB_NAME).unlink()
        t0 = time.perf_counter()
        recover_store(store, fingerprint=bundle.fingerprint, dim=bundle.embedding_dim, settings=RecoverSettings(same_voice=same_voice))
        took = time.perf_counter() - t0
        groups = owners(store)
    backend.close()
    reader_of = {i: name for name, ids in truth.items() for i in ids}
    n = len(reader_of)
    exact = sum(1 for g in groups.values() if g in truth.values())
    pure = sum(max(sum(1 for i in g if reader_of[i] == r) for r in truth) for g in groups.values())
    return (f"offset {offset}, same_voice {same_voice}: {len(truth)} readers, {n} embeddings -> {len(groups)} groups, "
            f"{exact} exactly one reader's; purity {pure / n:.3f}; recover took {took:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offset", type=int, action="append", help="first train-clean-100 reader (repeatable)")
    parser.add_argument("--same-voice", type=float, default=RecoverSettings().same_voice)
    args = parser.parse_args()
    for offset in args.offset or [0, 15, 30]:
        print(measure(offset, args.same_voice), flush=True)


if __name__ == "__main__":
    main()
