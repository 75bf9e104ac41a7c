"""``speakerd calibrate``: thresholds from measurement, not guesses.

Given recordings of people to enroll (``--known``, one folder or file-name prefix per person) and of
people who are never enrolled (``--unknown``), it enrolls the first ``--enroll-clips`` clips of each
known person in memory, cuts every other clip into the daemon's own windows (same VAD, windows and
model) and prints false-accept / false-reject tables:

* per window, for ``matching.threshold``: a false accept is a never-enrolled window whose best
  enrolled score reaches the threshold; a false reject is a known window not given its own name;
* per group of neighbouring windows, for ``provisional.fold_threshold`` (the centroid of a few
  windows is compared with enrolled speakers before an unknown voice becomes a provisional one).

It picks the lowest threshold whose false-accept rate is at most ``--max-false-accept`` and, with
``--write-bundle NAME``, writes them into the model bundle's decision values (where the daemon
takes them from), or with ``--write FILE`` as a TOML ``[decision]`` section for ``speakerd run
--config``. Why it matters: a badly
chosen cosine threshold rejected the true speaker 71 % of the time in one sherpa-onnx app, and the
placeholder 0.6 here named a never-enrolled voice as someone enrolled 63 % of the time.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import SpeakerdError

if TYPE_CHECKING:
    from .bundle import ModelBundle

logger = logging.getLogger(__name__)

THRESHOLDS = tuple(round(0.50 + 0.02 * i, 2) for i in range(21))
"""Thresholds tabulated (0.50 to 0.90)."""
GROUP_WINDOWS = (1, 2, 3, 4)
"""Sizes of the neighbouring-window groups whose centroids are scored for the fold threshold."""
FOLD_GROUP = 2
"""The group size the fold threshold is chosen for: ``provisional.fold_min_windows``."""


class CalibrationError(SpeakerdError):
    exit_code = 2


@dataclass(frozen=True)
class Scores:
    """Scores of known (genuine) and never-enrolled (impostor) windows against the enrolled set."""

    genuine: np.ndarray
    """Score of each known window for its own speaker."""
    genuine_named: np.ndarray
    """Whether that speaker is the best-scoring one (bool)."""
    impostor: np.ndarray
    """Best enrolled score of each never-enrolled window."""


@dataclass(frozen=True)
class Row:
    threshold: float
    false_accept: float
    false_reject: float


def table(scores: Scores, thresholds: Sequence[float] = THRESHOLDS) -> list[Row]:
    return [
        Row(
            t,
            float(np.mean(scores.impostor >= t)) if len(scores.impostor) else float("nan"),
            float(np.mean(~(scores.genuine_named & (scores.genuine >= t)))) if len(scores.genuine) else float("nan"),
        )
        for t in thresholds
    ]


def choose(rows: Sequence[Row], max_false_accept: float) -> Row:
    """The lowest threshold (fewest false rejects) whose false-accept rate is within the bound."""
    for row in rows:
        if row.false_accept <= max_false_accept:
            return row
    raise CalibrationError(
        f"no threshold up to {rows[-1].threshold} keeps false accepts at or below {max_false_accept:.2%}; "
        f"the model cannot tell these voices apart"
    )


def score_groups(
    known: dict[str, list[np.ndarray]],
    unknown: list[np.ndarray],
    centroid_score: Callable[[np.ndarray], tuple[str, float, dict[str, float]]],
    group: int,
) -> Scores:
    """Scores of the centroids of ``group`` neighbouring windows (1: single windows).

    ``known``: speaker -> per-clip (n, dim) window embeddings not used for enrollment; ``unknown``:
    per-clip embeddings of never-enrolled voices. ``centroid_score(v)`` returns (best speaker, its
    score, every speaker's score)."""
    genuine, named, impostor = [], [], []
    for speaker, clips in known.items():
        for embs in clips:
            for i in range(len(embs) - group + 1):
                best, _, every = centroid_score(embs[i : i + group].mean(axis=0))
                genuine.append(every[speaker])
                named.append(best == speaker)
    for embs in unknown:
        for i in range(len(embs) - group + 1):
            impostor.append(centroid_score(embs[i : i + group].mean(axis=0))[1])
    return Scores(np.array(genuine), np.array(named, dtype=bool), np.array(impostor))


def format_table(title: str, rows: Sequence[Row], chosen: Row | None, scores: Scores) -> str:
    lines = [
        f"{title} ({len(scores.genuine)} known, {len(scores.impostor)} never-enrolled)",
        "| threshold | false accept | false reject |",
        "|---:|---:|---:|",
    ]
    for r in rows:
        mark = "  <- chosen" if r is chosen else ""
        lines.append(f"| {r.threshold:.2f} | {r.false_accept:6.2%} | {r.false_reject:6.2%} |{mark}")
    return "\n".join(lines)


# -- running it on audio ----------------------------------------------------------------------------


def _clip_windows(paths: Sequence[Path], settings, features, embed) -> list[np.ndarray]:  # noqa: ANN001
    from .enroll import embed_windows, file_windows

    out = []
    for path in paths:
        windows, _ = file_windows(Path(path), settings, features)
        if windows:
            out.append(embed_windows(windows, embed))
    return out


def calibrate(
    known_dir: Path,
    unknown_dir: Path,
    *,
    settings,  # noqa: ANN001
    bundle,  # noqa: ANN001
    embed: Callable[[np.ndarray], np.ndarray],
    enroll_clips: int = 3,
    max_clips: int | None = None,
) -> dict[int, Scores]:
    """Scores per group size (1 = single windows) for the known and unknown voices under the dirs."""
    from .evaluation.conversation import librispeech_speakers
    from .matcher import SpeakerIndex

    known_clips = librispeech_speakers(Path(known_dir), "")
    unknown_clips = librispeech_speakers(Path(unknown_dir), "")
    if len(known_clips) < 2 or not unknown_clips:
        raise CalibrationError(
            f"need recordings of at least 2 known people under {known_dir} and of never-enrolled people under "
            f"{unknown_dir} (FLAC files named <speaker>-..., as in LibriSpeech)"
        )
    index = SpeakerIndex(bundle.embedding_dim, settings.matching)
    held_out: dict[str, list[np.ndarray]] = {}
    for speaker, paths in sorted(known_clips.items()):
        if len(paths) <= enroll_clips:
            raise CalibrationError(f"{speaker}: {len(paths)} clip(s); need more than --enroll-clips {enroll_clips}")
        enroll = _clip_windows(paths[:enroll_clips], settings, bundle.features, embed)
        index.add(speaker, speaker, np.concatenate(enroll))
        held_out[speaker] = _clip_windows(paths[enroll_clips:][:max_clips], settings, bundle.features, embed)
        logger.info("calibrate: %s enrolled from %d clips, %d clips held out", speaker, enroll_clips, len(held_out[speaker]))
    unknown = [e for paths in unknown_clips.values() for e in _clip_windows(paths[:max_clips], settings, bundle.features, embed)]

    def centroid_score(v: np.ndarray) -> tuple[str, float, dict[str, float]]:
        ranked = index.best_matches(v.astype(np.float32), len(index))
        return ranked[0][0], ranked[0][2], {spk: score for spk, _, score in ranked}

    return {g: score_groups(held_out, unknown, centroid_score, g) for g in GROUP_WINDOWS}


def add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--known", required=True, metavar="DIR", help="recordings of people to enroll (<speaker>-*.flac, any depth)")
    p.add_argument("--unknown", required=True, metavar="DIR", help="recordings of people who are never enrolled")
    p.add_argument("--enroll-clips", type=int, default=3, metavar="N", help="clips per known person used to enroll (default 3)")
    p.add_argument("--max-clips", type=int, metavar="N", help="at most N test clips per person (faster)")
    p.add_argument(
        "--max-false-accept", type=float, default=0.035, metavar="RATE",
        help="highest share of never-enrolled windows that may be named (default 0.035; the tracker's "
        "smoothing over several windows and open-set clustering bring the share of never-enrolled "
        "speech named below 2 %%)",
    )
    p.add_argument(
        "--max-fold-false-accept", type=float, default=0.0005, metavar="RATE",
        help="the same for centroids of neighbouring windows (provisional.fold_threshold; default 0.0005: "
        "a wrong fold names a whole group of windows and what joins it later)",
    )
    p.add_argument("--write", metavar="FILE", help="write the chosen thresholds as TOML for `speakerd run --config`")
    p.add_argument(
        "--write-bundle", metavar="NAME",
        help="calibrate model bundle NAME (a name under models/ or a directory) and write the chosen values into "
        "its manifest's decision values, filling any it lacks relative to the chosen threshold",
    )


def main_calibrate(args: argparse.Namespace, settings, bundle, embed: Callable[[np.ndarray], np.ndarray]) -> int:  # noqa: ANN001
    by_group = calibrate(
        Path(args.known), Path(args.unknown), settings=settings, bundle=bundle, embed=embed,
        enroll_clips=args.enroll_clips, max_clips=args.max_clips,
    )
    window_rows = table(by_group[1])
    threshold = choose(window_rows, args.max_false_accept)
    print(format_table(f"Per window, matching.threshold, model {bundle.name}", window_rows, threshold, by_group[1]))
    fold_rows = table(by_group[FOLD_GROUP])
    fold = choose(fold_rows, args.max_fold_false_accept)
    for g in GROUP_WINDOWS[1:]:
        rows = fold_rows if g == FOLD_GROUP else table(by_group[g])
        print()
        print(format_table(f"Centroid of {g} neighbouring windows", rows, fold if g == FOLD_GROUP else None, by_group[g]))
    fold_threshold = max(fold.threshold, threshold.threshold)
    print(
        f"\nchosen: decision.threshold = {threshold.threshold:.2f} (false accept {threshold.false_accept:.2%}, "
        f"false reject {threshold.false_reject:.2%}); decision.fold_threshold = {fold_threshold:.2f}"
    )
    if args.write_bundle:
        written, derived = write_bundle_values(bundle, threshold.threshold, fold_threshold)
        print(f"wrote the decision values of {written.name} into {written.path / 'manifest.json'}")
        if derived:
            print(
                f"not measured here, carried over from {REFERENCE_MODEL} relative to the threshold (check them with "
                f"`speakerd eval`): {', '.join(derived)}"
            )
    if args.write:
        Path(args.write).write_text(
            f"# written by `speakerd calibrate` for model {bundle.name} ({bundle.fingerprint})\n"
            f"# known: {args.known}; never enrolled: {args.unknown}; max false accept {args.max_false_accept} "
            f"(windows), {args.max_fold_false_accept} (centroids)\n"
            f"[decision]\n# false accept {threshold.false_accept:.4f}, false reject {threshold.false_reject:.4f} per window\n"
            f"threshold = {threshold.threshold:.2f}\n"
            f"# centroid of {FOLD_GROUP} windows: false accept {fold.false_accept:.4f}, "
            f"false reject {fold.false_reject:.4f}\nfold_threshold = {fold_threshold:.2f}\n"
        )
        print(f"wrote {args.write}")
    return 0


REFERENCE_MODEL = "ge2e-resemblyzer"
"""The model whose full set of decision values fills what a calibration does not measure."""


def write_bundle_values(bundle: ModelBundle, threshold: float, fold_threshold: float) -> tuple[ModelBundle, list[str]]:
    """Write the measured ``threshold`` and ``fold_threshold`` into ``bundle``'s manifest, keeping
    its other decision values; any required one it lacks is the reference model's, moved with the
    threshold (cosines keep their distance from it, margins stay). The optional room values (the
    cohort's, adaptation's) are never carried over: they are measured per model, and off until
    they are. Returns the bundle and what was filled."""
    import dataclasses

    from .bundle import write_manifest
    from .decisions.values import MARGINS, OPTIONAL
    from .models.build import GE2E_DECISION

    values = {**bundle.decision, "threshold": round(threshold, 4), "fold_threshold": round(fold_threshold, 4)}
    derived = [k for k in GE2E_DECISION if k not in values and k not in OPTIONAL]
    shift = threshold - GE2E_DECISION["threshold"]
    for key in derived:
        ref = GE2E_DECISION[key]
        values[key] = ref if key in MARGINS else round(min(1.0, max(-1.0, ref + shift)), 4)
    written = dataclasses.replace(bundle, decision={k: values[k] for k in GE2E_DECISION if k in values})
    write_manifest(written)
    return written, derived
