"""Soak benchmark (not a test): the daemon streaming a long real conversation in real time.

Enrolls four LibriSpeech readers into a fresh store through the CLI, builds a conversation of them
at least ``--minutes`` long, runs ``speakerd run --source file:... --realtime`` as a subprocess under
``nice`` and samples its RSS and CPU every ``--interval`` seconds with psutil. Writes the series as
CSV, a PNG plot and a short markdown summary; the verdict is RSS growth after ``--warmup`` minutes
(pass: at most 5 %).

    nice python tools/soak.py --minutes 30 --out docs/soak
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "daemon"))

from speakerd.evaluation.conversation import (  # noqa: E402
    ConversationSettings,
    build_conversation,
    librispeech_speakers,
    split_enrollment,
)

LIBRISPEECH = Path(os.environ.get("SPEAKERD_LIBRISPEECH", REPO.parent / "shared" / "data" / "librispeech"))
SPEAKERS = ["1688", "1998", "2033", "3080"]
ENROLL_CLIPS = 3
MEAN_TURN_S = 5.0
"""Turns are 3-8 s, with some pauses: this many seconds per turn is a safe under-estimate."""
MAX_RSS_GROWTH = 0.05
STOP_TIMEOUT_S = 30.0
NICE = 10


@dataclass(frozen=True)
class Sample:
    minute: float
    rss_mb: float
    cpu_percent: float
    """Average over the interval before the sample, in % of one core."""
    threads: int
    events: int
    dropped_windows: int
    embed_errors: int


def speakerd_cmd(*args: str) -> list[str]:
    return ["nice", "-n", str(NICE), sys.executable, "-m", "speakerd.cli", *args]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO / "daemon") + os.pathsep + e.get("PYTHONPATH", "")
    return e


def prepare(work: Path, minutes: float) -> tuple[Path, Path, float]:
    """An enrolled store and a conversation at least ``minutes`` long; returns (store, wav, seconds)."""
    clips = librispeech_speakers(LIBRISPEECH)
    enroll, rest = split_enrollment(clips, ENROLL_CLIPS)
    store = work / "store"
    for spk in SPEAKERS:
        subprocess.run(speakerd_cmd("enroll", f"reader-{spk}", *map(str, enroll[spk]), "--store", str(store)),
                       check=True, env=env(), capture_output=True, timeout=600)
    turns = math.ceil(minutes * 60 / MEAN_TURN_S) + 4
    conv = build_conversation({s: rest[s] for s in SPEAKERS}, ConversationSettings(turns=turns, seed=7))
    wav = conv.write(work / "soak.wav")
    return store, wav, conv.duration


def last_status(events_path: Path) -> tuple[int, dict[str, int]]:
    """(events written so far, counters of the last status event)."""
    if not events_path.exists():
        return 0, {}
    lines = events_path.read_text().splitlines()
    for line in reversed(lines):
        if '"type":"status"' in line:
            return len(lines), json.loads(line)["counters"]
    return len(lines), {}


def soak(minutes: float, interval: float, out: Path, warmup: float) -> int:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="speakerd-soak-") as tmp:
        work = Path(tmp)
        store, wav, duration = prepare(work, minutes)
        print(f"conversation: {duration / 60:.1f} min; store {store}", flush=True)
        events = work / "events.jsonl"
        log = (out / "soak-daemon.log").open("w")
        proc = subprocess.Popen(
            speakerd_cmd("run", "--source", f"file:{wav}", "--realtime", "--store", str(store),
                         "--pub", "tcp://127.0.0.1:*", "--events-out", str(events)),
            env=env(), stdout=subprocess.DEVNULL, stderr=log,
        )
        samples: list[Sample] = []
        try:
            ps = psutil.Process(proc.pid)
            ps.cpu_percent(None)
            started = time.monotonic()
            end = started + minutes * 60
            next_at = started + interval  # the first sample after one interval: start-up is not steady state
            while time.monotonic() < end and proc.poll() is None:
                wait = next_at - time.monotonic()
                if wait > 0:
                    try:
                        proc.wait(timeout=wait)  # wakes early only if the daemon dies
                        break
                    except subprocess.TimeoutExpired:
                        pass
                n, counters = last_status(events)
                with ps.oneshot():
                    s = Sample(
                        minute=round((time.monotonic() - started) / 60, 2),
                        rss_mb=round(ps.memory_info().rss / 2**20, 2),
                        cpu_percent=round(ps.cpu_percent(None), 1),
                        threads=ps.num_threads(),
                        events=n,
                        dropped_windows=int(counters.get("dropped_windows", 0)),
                        embed_errors=int(counters.get("embed_errors", 0)),
                    )
                samples.append(s)
                print(json.dumps(asdict(s)), flush=True)
                next_at += interval
        finally:
            stop_started = time.monotonic()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait(5)
            stop_s = time.monotonic() - stop_started
            log.close()
        n, counters = last_status(events)
        last_type = json.loads(events.read_text().splitlines()[-1])["type"] if n else None
    return report(samples, out, warmup, code, stop_s, n, counters, last_type)


def report(samples: list[Sample], out: Path, warmup: float, code: int, stop_s: float, n_events: int,
           counters: dict[str, int], last_type: str | None) -> int:
    with (out / "soak.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(Sample.__dataclass_fields__))
        w.writeheader()
        for s in samples:
            w.writerow(asdict(s))
    after = [s for s in samples if s.minute >= warmup]
    base = after[0].rss_mb if after else float("nan")
    peak = max((s.rss_mb for s in after), default=float("nan"))
    growth = (peak - base) / base if after else float("nan")
    cpu = [s.cpu_percent for s in samples[1:]]
    plot(samples, out / "soak.png", warmup)
    ok = bool(after) and growth <= MAX_RSS_GROWTH and code == 0
    summary = {
        "samples": len(samples),
        "minutes": samples[-1].minute if samples else 0,
        "rss_mb_first": samples[0].rss_mb if samples else None,
        "rss_mb_at_warmup": base,
        "rss_mb_peak_after_warmup": peak,
        "rss_mb_last": samples[-1].rss_mb if samples else None,
        "rss_growth_after_warmup": round(growth, 4),
        "cpu_percent_mean": round(sum(cpu) / len(cpu), 1) if cpu else None,
        "cpu_percent_max": max(cpu) if cpu else None,
        "exit_code": code,
        "sigterm_to_exit_s": round(stop_s, 2),
        "events": n_events,
        "last_event": last_type,
        "final_counters": counters,
        "pass": ok,
    }
    (out / "soak-summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0 if ok else 1


def plot(samples: list[Sample], path: Path, warmup: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.minute for s in samples]
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    a.plot(t, [s.rss_mb for s in samples], marker="o")
    a.set_ylabel("RSS (MiB)")
    a.axvline(warmup, color="grey", linestyle="--", label=f"end of warm-up ({warmup:g} min)")
    a.legend(loc="lower right")
    a.grid(alpha=0.3)
    b.plot(t[1:], [s.cpu_percent for s in samples[1:]], marker="o", color="tab:orange")
    b.set_ylabel("CPU (% of one core)")
    b.set_xlabel("minutes of real-time streaming")
    b.grid(alpha=0.3)
    fig.suptitle("speakerd soak: file source in real time, 4 enrolled speakers")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--interval", type=float, default=60.0, help="seconds between samples")
    p.add_argument("--warmup", type=float, default=5.0, help="minutes excluded from the RSS growth verdict")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "soak")
    a = p.parse_args()
    return soak(a.minutes, a.interval, a.out, a.warmup)


if __name__ == "__main__":
    sys.exit(main())
