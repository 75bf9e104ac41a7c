"""Before/after figures of the decision layer: eval meetings of seeds 0-2 and the six open-set conversations.

Runs, in-process and at default settings (1.5 s windows), the functions ``speakerd eval`` uses
(``build_meetings``, ``enroll_store``, ``run_file``, ``score_meeting``) for eval seeds 0, 1 and 2
(enrolled and open meetings), and the six open-set conversations of docs/calibration.md (2033 and
3080 enrolled, 2 never-enrolled voices, seeds 0-5, scored with ``tests/test_open_set.py``'s
``open_set_figures``). Prints one table and, with ``--events DIR``, writes every published event
(without the wall-clock fields and status events) as JSON lines, one file per conversation, so two
runs can be diffed exactly::

    PYTHONPATH=daemon .venv/bin/python tools/decision_figures.py ../shared/data/librispeech --events /tmp/ev-before
    diff -r /tmp/ev-before /tmp/ev-after
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from speakerd.bundle import resolve_bundle  # noqa: E402
from speakerd.embedding import backend_for  # noqa: E402
from speakerd.evaluation.conversation import (  # noqa: E402
    ConversationSettings,
    build_conversation,
    librispeech_speakers,
    pick_speakers,
    split_enrollment,
    unknown_pool,
)
from speakerd.evaluation.evaluate import (  # noqa: E402
    EvalSettings,
    Meeting,
    aggregate,
    build_meetings,
    enroll_store,
    score_meeting,
)
from speakerd.evaluation.runner import run_file  # noqa: E402
from speakerd.settings import load_settings  # noqa: E402

EVAL_SEEDS = (0, 1, 2)
OPEN_SET_SEEDS = (0, 1, 2, 3, 4, 5)
OPEN_SET_ENROLLED = ("2033", "3080")
VOLATILE = ("wall_time", "session", "seq")
STORE_ID = re.compile(r'"spk-[0-9a-f]{8}"')


def stable_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Events as a diff should see them: no status (timings), no wall clock, no session id."""
    return [{k: v for k, v in e.items() if k not in VOLATILE} for e in events if e["type"] != "status"]


def dump(events_dir: Path | None, name: str, events: list[dict[str, Any]]) -> None:
    if events_dir is None:
        return
    events_dir.mkdir(parents=True, exist_ok=True)
    # enrolled ids are random per store: the names the events carry beside them identify the speaker
    lines = (STORE_ID.sub('"spk-id"', json.dumps(e, sort_keys=True)) for e in stable_events(events))
    (events_dir / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


def eval_rows(audio: Path, settings: Any, bundle: Any, backend: Any, work: Path, events_dir: Path | None) -> list[dict[str, Any]]:
    rows = []
    for seed in EVAL_SEEDS:
        es = EvalSettings(audio_dir=audio, seed=seed, window_lengths=(settings.windows.length_s,))
        (work / f"eval-{seed}").mkdir(parents=True, exist_ok=True)
        enroll, meetings = build_meetings(es, work / f"eval-{seed}")
        index = enroll_store(work / f"store-{seed}", enroll, settings, bundle, backend)
        by_condition: dict[str, list[Any]] = {}
        for meeting in meetings:
            run = run_file(meeting.wav, settings, bundle=bundle, backend=backend, matcher=index)
            dump(events_dir, f"eval-{seed}-{meeting.condition}-{meeting.index}", run.events)
            score = score_meeting(meeting, run, [mw.embedding for mw in run.windows], index, es, 0.0)
            by_condition.setdefault(meeting.condition, []).append(score)
        for condition, scores in by_condition.items():
            a = aggregate(scores)
            rows.append({"set": f"eval seed {seed} {condition}", "identification": a["identification"],
                         "change_f1": a["change_boundary"]["f1"], "latency_median_s": a["latency_median_s"],
                         "latency_p95_s": a["latency_p95_s"], "unknown_false_accept": a["unknown_false_accept"]})
    return rows


def open_set_rows(audio: Path, settings: Any, bundle: Any, backend: Any, work: Path, events_dir: Path | None) -> list[dict[str, Any]]:
    from test_open_set import open_set_figures

    enroll, rest = split_enrollment(librispeech_speakers(audio), 3)
    chosen = {s: enroll[s] for s in OPEN_SET_ENROLLED}
    names = {s: f"reader-{s}" for s in OPEN_SET_ENROLLED}
    index = enroll_with_names(work / "store-open", chosen, names, settings, bundle, backend)
    es = EvalSettings(audio_dir=audio)
    rows, scores = [], []
    for seed in OPEN_SET_SEEDS:
        guests = pick_speakers(unknown_pool(audio), 2, seed)
        clips = {s: rest[s] for s in OPEN_SET_ENROLLED} | guests
        conv = build_conversation(clips, ConversationSettings(turns=16, seed=seed))
        wav = conv.write(work / f"open-{seed}.wav")
        run = run_file(wav, settings, bundle=bundle, backend=backend, matcher=index)
        dump(events_dir, f"open-set-{seed}", run.events)
        f = open_set_figures(conv, run.events, names)
        score = score_meeting(Meeting("open", seed, conv, wav, names), run, [mw.embedding for mw in run.windows], index, es, 0.0)
        scores.append(score)
        a = aggregate([score])
        rows.append({"set": f"open-set seed {seed}", "identification": f["member_accuracy"], "change_f1": a["change_boundary"]["f1"],
                     "latency_median_s": a["latency_median_s"], "latency_p95_s": a["latency_p95_s"],
                     "guest_provisional": f["guest_provisional"], "guest_named": f["guest_named"],
                     "provisional_speakers": f["provisional_speakers"], "min_purity": min(f["purity"].values(), default=None)})
    a = aggregate(scores)
    slow = sum(1 for s in scores for x in s.detection.latencies if x > 1.0)
    total = sum(len(s.detection.latencies) for s in scores)
    rows.append({"set": "open-set all", "change_f1": a["change_boundary"]["f1"], "latency_median_s": a["latency_median_s"],
                 "latency_p95_s": a["latency_p95_s"], "slow_changes": f"{slow}/{total}"})
    return rows


def enroll_with_names(directory: Path, enroll: dict[str, list[Path]], names: dict[str, str], settings: Any, bundle: Any, backend: Any) -> Any:
    from speakerd.enroll import prepare_enrollment
    from speakerd.matcher import SpeakerIndex
    from speakerd.store import SpeakerStore

    with SpeakerStore(directory, fingerprint=bundle.fingerprint, dim=bundle.embedding_dim) as store:
        for spk, paths in sorted(enroll.items()):
            report = prepare_enrollment(names[spk], paths, settings, bundle.features, backend.embed)
            store.enroll(names[spk], report.embeddings_matrix(), source=",".join(map(str, paths)))
        return SpeakerIndex.from_store(store, settings.matching)


def fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("audio", type=Path, help="LibriSpeech-layout folder (../shared/data/librispeech)")
    parser.add_argument("--events", type=Path, default=None, metavar="DIR", help="write every run's events here")
    parser.add_argument("--only", choices=("eval", "open-set"), default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    settings = load_settings(None, {})
    bundle = resolve_bundle(settings.embedding.model)
    backend = backend_for(bundle, settings.embedding, settings.windows)
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="decision-figures-") as tmp:
            if args.only in (None, "eval"):
                rows += eval_rows(args.audio, settings, bundle, backend, Path(tmp), args.events)
            if args.only in (None, "open-set"):
                rows += open_set_rows(args.audio, settings, bundle, backend, Path(tmp), args.events)
    finally:
        backend.close()
    columns = ["set", "identification", "change_f1", "latency_median_s", "latency_p95_s", "unknown_false_accept",
               "guest_provisional", "guest_named", "provisional_speakers", "min_purity", "slow_changes"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
    print(f"wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
