"""The two pictures of an eval: a timeline of truth against output, and a DET curve.

matplotlib is a dev extra, imported here only, with the Agg backend (no display needed).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

DET_TICKS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4)
DET_LIMITS = (0.0005, 0.5)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_timeline(timeline: Mapping[str, Any], path: Path) -> Path:
    """One lane per speaker; the truth above, the daemon's segments below; changes as ticks."""
    plt = _pyplot()
    ref: Sequence[tuple[float, float, str]] = timeline["reference"]
    hyp: Sequence[tuple[float, float, str]] = timeline["hypothesis"]
    labels = sorted({lab for *_, lab in ref} | {lab for *_, lab in hyp})
    colours = {lab: plt.cm.tab10(i % 10) for i, lab in enumerate(labels)}
    fig, axes = plt.subplots(2, 1, figsize=(14, 1.2 + 0.45 * 2 * len(labels)), sharex=True)
    for ax, items, title in ((axes[0], ref, "truth (speech)"), (axes[1], hyp, "speakerd segments")):
        for a, b, lab in items:
            ax.broken_barh([(a, b - a)], (labels.index(lab) - 0.4, 0.8), color=colours[lab])
        ax.set_yticks(range(len(labels)), labels)
        ax.set_ylim(-0.6, len(labels) - 0.4)
        ax.set_title(title, loc="left", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    for t in timeline.get("true_changes", []):
        for ax in axes:
            ax.axvline(t, color="black", lw=0.6, alpha=0.5)
    for t in timeline.get("decisions", []):
        axes[1].plot([t], [len(labels) - 0.5], marker="v", color="crimson", ms=6)
    axes[1].set_xlabel("stream time (s); black lines: true changes; red marks: when speakerd announced a change")
    axes[1].set_xlim(0, timeline.get("duration", max((b for _, b, _ in ref), default=1.0)))
    fig.suptitle(f"meeting {timeline.get('meeting', '')}, {timeline.get('window_length_s', '')} s windows", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_det(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: Path) -> Path:
    """False reject against false accept on normal-deviate axes, one curve per window length."""
    from scipy.stats import norm

    from .eer import det_points, equal_error_rate

    plt = _pyplot()
    lo, hi = DET_LIMITS
    fig, ax = plt.subplots(figsize=(6, 6))
    for label, (targets, nontargets) in curves.items():
        if not len(targets) or not len(nontargets):
            continue
        far, frr, _ = det_points(targets, nontargets)
        x, y = norm.ppf(np.clip(far, lo, hi)), norm.ppf(np.clip(frr, lo, hi))
        eer = equal_error_rate(targets, nontargets)
        line = ax.plot(x, y, label=f"{label} (EER {100 * eer.eer:.1f} %)")[0]
        e = norm.ppf(np.clip(eer.eer, lo, hi))
        ax.plot([e], [e], "o", color=line.get_color())
    ticks = norm.ppf(DET_TICKS)
    names = [f"{100 * t:g}" for t in DET_TICKS]
    ax.set_xticks(ticks, names)
    ax.set_yticks(ticks, names)
    ax.set_xlim(norm.ppf(lo), norm.ppf(hi))
    ax.set_ylim(norm.ppf(lo), norm.ppf(hi))
    ax.plot([norm.ppf(lo), norm.ppf(hi)], [norm.ppf(lo), norm.ppf(hi)], color="grey", lw=0.5, ls="--")
    ax.set_xlabel("false accept rate (%)")
    ax.set_ylabel("false reject rate (%)")
    ax.set_title("window-level DET")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
