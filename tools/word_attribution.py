"""Word-level speaker attribution on ``speakerd eval``'s conversations (not a test: minutes of CPU).

For each seed, builds eval's meetings (defaults: 4 enrolled conversations, 4 open ones with two
never-enrolled voices), enrolls eval's readers, runs the real pipeline on each (as ``speakerd
eval`` does), transcribes each with PocketSphinx and names its words through
``speakerd.client.SpeakerTimeline``. Reports:

- enrolled: share of judged words with the right name (words within 0.25 s of a true change and
  words outside every turn not judged), and ``speakerd label``'s share of segment time right on a
  Whisper-style JSON of the truth's turns cut into 2-4 s segments;
- open: share of never-enrolled voices' words carrying a provisional id, and of those, the share
  that ``on_revision`` renames when each provisional id is named (a ``speaker.renamed`` event as
  the daemon sends when a voice is named over the control socket).

    .venv/bin/python tools/word_attribution.py --seeds 0 1 2 --out /tmp/words.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "daemon"), str(REPO / "examples")]

from label_recording import name_words  # noqa: E402
from sphinx_words import transcribe_file  # noqa: E402

from speakerd.bundle import resolve_bundle  # noqa: E402
from speakerd.client import SpeakerTimeline  # noqa: E402
from speakerd.embedding import backend_for  # noqa: E402
from speakerd.evaluation.evaluate import NAME_PREFIX, EvalSettings, build_meetings, enroll_store  # noqa: E402
from speakerd.evaluation.runner import run_file  # noqa: E402
from speakerd.evaluation.words import TimedLabel, segment_time_accuracy, truth_transcript, word_attribution  # noqa: E402
from speakerd.events import SpeakerRef, SpeakerRenamed, make_event  # noqa: E402
from speakerd.label import label_transcript, timeline_answer  # noqa: E402
from speakerd.settings import load_settings  # noqa: E402
from speakerd.transcripts import read_transcript  # noqa: E402

LIBRISPEECH = Path(os.environ.get("SPEAKERD_LIBRISPEECH", REPO.parent / "shared" / "data" / "librispeech"))


def name_every_provisional(timeline: SpeakerTimeline, events: list[dict[str, Any]]) -> None:
    """What naming each provisional voice over the control socket makes the daemon send."""
    last = events[-1]
    ids = sorted({e["speaker"]["id"] for e in events if e["type"] == "speaker.segment"
                  and (e["speaker"]["id"] or "").startswith("unknown-")})
    for n, pid in enumerate(ids):
        renamed = make_event(SpeakerRenamed(old=timeline.resolve(SpeakerRef(pid, None, False)),  # type: ignore[arg-type]
                                            new=SpeakerRef(f"spk-named{n}", f"Named {pid}", True)),
                             seq=last["seq"] + n + 1, session=last["session"], stream_time=last["stream_time"],
                             wall_time=last["wall_time"])
        timeline.feed(renamed)


def measure(seed: int, work: Path, settings: Any, bundle: Any, backend: Any) -> list[dict[str, Any]]:
    es = EvalSettings(LIBRISPEECH, seed=seed)
    enroll, meetings = build_meetings(es, work)
    index = enroll_store(work / "store", enroll, settings, bundle, backend)
    rows = []
    for m in meetings:
        started = time.perf_counter()
        run = run_file(m.wav, settings, bundle=bundle, backend=backend, matcher=index)
        words = transcribe_file(m.wav)
        revised: dict[int, str | None] = {}
        timeline = SpeakerTimeline(on_revision=lambda line, before, after: revised.__setitem__(line.key, after.label))
        timeline.feed_all(run.events)
        named = name_words(words, timeline)
        for i, (w, _) in enumerate(named):
            timeline.label(i, w.start, w.end, reach=0.5)
        score = word_attribution(m.conversation, [TimedLabel(w.start, w.end, who.label) for w, who in named], m.names)
        row: dict[str, Any] = {"seed": seed, "condition": m.condition, "meeting": m.index, "audio_s": round(m.conversation.duration, 1),
                               "words": len(words), "judged": score.judged, "correct": score.correct,
                               "near_change": score.near_change, "outside_turns": score.outside_turns}
        if m.condition == "enrolled":
            answer = timeline_answer(run.events)
            labelled = json.loads(label_transcript(read_transcript(json.dumps(truth_transcript(m.conversation, seed))), answer))
            row["label_time_accuracy"] = segment_time_accuracy(labelled["segments"], m.names)
        else:
            guest = [i for i, truth in score.truths.items() if truth not in m.names]
            provisional = [i for i in guest if (named[i][1].label or "").startswith("unknown-")]
            name_every_provisional(timeline, run.events)
            row.update(guest_words=len(guest), guest_provisional=len(provisional),
                       renamed_by_revision=sum((revised.get(i) or "").startswith("Named unknown-") for i in provisional),
                       enrolled_words_right=sum(c.get(m.names[s], 0) for s, c in score.by_truth.items() if s in m.names),
                       enrolled_words=sum(sum(c.values()) for s, c in score.by_truth.items() if s in m.names))
        row["elapsed_s"] = round(time.perf_counter() - started, 1)
        logging.info("%s", row)
        rows.append(row)
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    enrolled = [r for r in rows if r["condition"] == "enrolled"]
    open_ = [r for r in rows if r["condition"] == "open"]
    out: dict[str, Any] = {
        "enrolled_word_accuracy": sum(r["correct"] for r in enrolled) / max(1, sum(r["judged"] for r in enrolled)),
        "enrolled_word_accuracy_per_meeting_min": min((r["correct"] / r["judged"] for r in enrolled if r["judged"]), default=None),
        "enrolled_words_judged": sum(r["judged"] for r in enrolled),
        "label_time_accuracy_mean": sum(r["label_time_accuracy"] for r in enrolled) / max(1, len(enrolled)),
        "label_time_accuracy_min": min((r["label_time_accuracy"] for r in enrolled), default=None),
    }
    if open_:
        gw = sum(r["guest_words"] for r in open_)
        gp = sum(r["guest_provisional"] for r in open_)
        out.update(open_guest_words=gw, open_guest_provisional_share=gp / max(1, gw),
                   open_renamed_by_revision_share=sum(r["renamed_by_revision"] for r in open_) / max(1, gp),
                   open_enrolled_word_accuracy=sum(r["enrolled_words_right"] for r in open_) / max(1, sum(r["enrolled_words"] for r in open_)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, help="also write rows and summary as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    for name in ("speakerd",):
        logging.getLogger(name).setLevel(logging.WARNING)
    settings = load_settings(None)
    bundle = resolve_bundle(settings.embedding.model)
    backend = backend_for(bundle, settings.embedding, settings.windows)
    rows: list[dict[str, Any]] = []
    try:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory(prefix="speakerd-words-") as tmp:
                rows += measure(seed, Path(tmp), settings, bundle, backend)
    finally:
        backend.close()
    result = {"seeds": args.seeds, "summary": summary(rows), "rows": rows}
    print(json.dumps(result["summary"], indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
