"""EmbeddingWorker with fake embed functions: order, batching, dropping, blocking, errors, shutdown."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from speakerd.embedding.worker import EmbeddedWindow, EmbeddingSettings, EmbeddingWorker
from speakerd.errors import ConfigError
from speakerd.vad import SpeechEnd, SpeechStart
from speakerd.windows import Window

WAIT = 10.0
"""Upper bound on every wait; a healthy run never comes near it."""
BINS = 4


def win(ident: int, frames: int = 98) -> Window:
    """A window whose features carry its id, so a fake embedding can say which window it came from."""
    feats = np.full((frames, BINS), float(ident), dtype=np.float32)
    return Window(start=ident * 8000, end=ident * 8000 + 16000, feats=feats, speech_fraction=1.0,
                  wall_time=float(ident), region_start=0, first_in_region=False)


def ident_of(item: Any) -> Any:
    if isinstance(item, EmbeddedWindow):
        assert int(item.embedding[0]) == int(item.window.feats[0, 0])  # each window got its own embedding
        return int(item.window.feats[0, 0])
    return item


class Recorder:
    """on_output: keeps what arrives and signals each arrival."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.calls: list[int] = []
        self.arrived = threading.Condition()

    def __call__(self, items: Sequence[Any]) -> None:
        with self.arrived:
            self.items.extend(items)
            self.calls.append(len(items))
            self.arrived.notify_all()

    def wait_for(self, count: int) -> None:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.items) >= count, WAIT), (len(self.items), count)

    def idents(self) -> list[Any]:
        return [ident_of(i) for i in self.items]


class GatedEmbed:
    """embed(feats): records each batch; blocks on ``gate`` (under a timeout) until a test opens it."""

    def __init__(self, *, open_: bool = False, fail: dict[int, type[Exception]] | None = None) -> None:
        self.gate = threading.Event()
        if open_:
            self.gate.set()
        self.entered = threading.Event()
        self.batches: list[tuple[int, ...]] = []
        self.frames: list[int] = []
        self.fail = fail or {}

    def __call__(self, feats: np.ndarray) -> np.ndarray:
        ids = tuple(int(x) for x in feats[:, 0, 0])
        self.batches.append(ids)
        self.frames.append(feats.shape[1])
        self.entered.set()
        assert self.gate.wait(WAIT), "test never opened the gate"
        for i in ids:
            if i in self.fail:
                raise self.fail[i](f"cannot embed window {i}")
        return np.stack([np.array([i, feats.shape[1]], dtype=np.float32) for i in ids])


def started(embed: Any, rec: Recorder, **kwargs: Any) -> EmbeddingWorker:
    worker = EmbeddingWorker(embed, rec, **kwargs)
    worker.start()
    return worker


def embed_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "speakerd-embed"]


def test_outputs_keep_submission_order_with_markers() -> None:
    rec = Recorder()
    worker = started(GatedEmbed(open_=True), rec, batch_max=4, queue_windows=16, drop_oldest=False)
    start, end = SpeechStart(0, 0.0), SpeechEnd(99, 1.0)
    submitted: list[Any] = [start, *[win(i) for i in range(5)], end, SpeechStart(100, 2.0), win(5), win(6, 148), win(7)]
    for item in submitted:
        worker.submit(item)
    assert worker.close(WAIT)
    expected = [ident_of(x) if not isinstance(x, Window) else int(x.feats[0, 0]) for x in submitted]
    assert rec.idents() == expected
    assert [o.window for o in rec.items if isinstance(o, EmbeddedWindow)] == [x for x in submitted if isinstance(x, Window)]
    assert worker.counters == {"embedded": 8, "batches": worker.counters["batches"], "dropped_windows": 0, "embed_errors": 0}
    assert not embed_threads()


def test_a_backlog_batches_across_lengths_one_call_per_length_in_stream_order() -> None:
    """Regular windows and probes alternate; a backlog of both is one batch, split by length."""
    embed, rec = GatedEmbed(), Recorder()
    worker = started(embed, rec, batch_max=8, queue_windows=64, drop_oldest=False)
    worker.submit(win(0))
    assert embed.entered.wait(WAIT)  # the worker is busy with window 0: the rest queue up behind it
    frames = [148, 78, 78, 78, 148, 78, 78, 78, 148, 78, 98]  # windows 1-11: regular, probes, ...
    for i, f in enumerate(frames, start=1):
        worker.submit(win(i, f))
    worker.submit(SpeechEnd(1, 1.0))
    worker.submit(win(12))
    assert worker.queue_depth() == 12
    embed.gate.set()
    rec.wait_for(14)
    assert worker.close(WAIT)
    # window 0 alone; then windows 1-8 (one batch, two lengths), 9-11 (three lengths), 12 after the marker
    assert embed.batches == [(0,), (1, 5), (2, 3, 4, 6, 7, 8), (9,), (10,), (11,), (12,)]
    assert embed.frames == [98, 148, 78, 148, 78, 98, 98]
    assert rec.calls == [1, 8, 3, 1, 1]
    assert rec.idents() == list(range(12)) + [SpeechEnd(1, 1.0), 12]
    assert worker.counters["batches"] == 7 and worker.counters["embedded"] == 13


def test_a_failing_length_costs_only_its_own_windows() -> None:
    embed, rec = GatedEmbed(fail={2: RuntimeError}), Recorder()
    worker = started(embed, rec, batch_max=8, queue_windows=64, drop_oldest=False)
    worker.submit(win(0))
    assert embed.entered.wait(WAIT)
    for i, f in enumerate([148, 78, 148, 78], start=1):
        worker.submit(win(i, f))
    embed.gate.set()
    rec.wait_for(3)
    assert worker.close(WAIT)
    assert rec.idents() == [0, 1, 3]  # the 78-frame group held window 2 and went; 148 went out
    assert worker.counters["embed_errors"] == 2


def test_no_backlog_means_no_batching() -> None:
    embed, rec = GatedEmbed(open_=True), Recorder()
    worker = started(embed, rec, batch_max=8, queue_windows=64, drop_oldest=False)
    for i in range(6):
        worker.submit(win(i))
        rec.wait_for(i + 1)  # the worker was idle when each window arrived
    assert worker.close(WAIT)
    assert [len(b) for b in embed.batches] == [1] * 6
    assert rec.calls == [1] * 6


def test_drop_oldest_drops_windows_never_markers_and_never_blocks() -> None:
    embed, rec = GatedEmbed(), Recorder()
    worker = started(embed, rec, batch_max=2, queue_windows=4, drop_oldest=True)
    worker.submit(win(0))
    assert embed.entered.wait(WAIT)
    markers = [SpeechStart(i, float(i)) for i in range(1, 11)]

    def produce() -> None:
        for i, marker in zip(range(1, 11), markers):
            worker.submit(marker)
            worker.submit(win(i))

    producer = threading.Thread(target=produce, name="producer")
    producer.start()
    producer.join(WAIT)
    assert not producer.is_alive(), "submit blocked with drop_oldest"
    assert not embed.gate.is_set()  # it got through while the worker was still stuck on window 0
    assert worker.queue_depth() == 4
    assert worker.counters["dropped_windows"] == 6
    embed.gate.set()
    assert worker.close(WAIT)
    assert rec.idents() == [0, *markers[:6], *[x for pair in zip(markers[6:], [7, 8, 9, 10]) for x in pair]]
    assert worker.counters["embedded"] == 5


def test_without_drop_oldest_submit_waits_for_space() -> None:
    embed, rec = GatedEmbed(), Recorder()
    worker = started(embed, rec, batch_max=1, queue_windows=2, drop_oldest=False)
    worker.submit(win(0))
    assert embed.entered.wait(WAIT)
    done: list[int] = []

    def produce() -> None:
        for i in range(1, 5):
            worker.submit(win(i))
            done.append(i)

    producer = threading.Thread(target=produce, name="producer")
    producer.start()
    producer.join(0.5)
    assert producer.is_alive(), "submit did not wait for space"
    assert done == [1, 2] and worker.queue_depth() == 2
    embed.gate.set()
    producer.join(WAIT)
    assert not producer.is_alive()
    assert worker.close(WAIT)
    assert rec.idents() == [0, 1, 2, 3, 4]
    assert worker.counters["dropped_windows"] == 0


def test_embed_errors_cost_their_windows_only(caplog: pytest.LogCaptureFixture) -> None:
    embed = GatedEmbed(open_=True, fail={2: ValueError, 3: ValueError, 5: RuntimeError, 6: ValueError})
    rec = Recorder()
    worker = started(embed, rec, batch_max=1, queue_windows=8, drop_oldest=False)
    with caplog.at_level(logging.ERROR, logger="speakerd.embedding.worker"):
        for i in range(8):
            worker.submit(win(i))
            worker.submit(SpeechEnd(i, float(i)))
        assert worker.close(WAIT)
    assert rec.idents() == [x for i in range(8) for x in ([SpeechEnd(i, float(i))] if i in (2, 3, 5, 6) else [i, SpeechEnd(i, float(i))])]
    assert worker.counters["embed_errors"] == 4
    assert worker.counters["embedded"] == 4
    errors = [r for r in caplog.records if r.name == "speakerd.embedding.worker"]
    assert len(errors) == 2  # once per exception type
    assert "cannot embed window 2" in errors[0].getMessage() and "ValueError" in errors[0].getMessage()
    assert "cannot embed window 5" in errors[1].getMessage()


def test_an_embed_returning_the_wrong_shape_costs_its_windows_not_the_worker() -> None:
    """A backend that squeezes a batch of one to 1-D must not kill the worker thread."""
    rec = Recorder()
    calls: list[int] = []

    def squeezing(feats: np.ndarray) -> np.ndarray:
        calls.append(len(feats))
        embs = np.stack([np.array([f[0, 0], 0.0], dtype=np.float32) for f in feats])
        return embs.squeeze() if len(feats) == 1 and feats[0, 0, 0] == 0 else embs  # only window 0 alone

    worker = started(squeezing, rec, batch_max=4, queue_windows=8, drop_oldest=False)
    worker.submit(win(0))
    worker.submit(SpeechEnd(0, 0.0))
    rec.wait_for(1)
    assert worker.counters["embed_errors"] == 1
    worker.submit(win(1))
    worker.submit(win(2))
    assert worker.close(WAIT)
    assert rec.idents() == [SpeechEnd(0, 0.0), 1, 2]
    assert (worker.counters["embed_errors"], worker.counters["embedded"]) == (1, 2)


def test_a_failing_consumer_does_not_stop_the_worker(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[Any] = []

    def consumer(items: Sequence[Any]) -> None:
        seen.extend(items)
        if any(isinstance(i, SpeechEnd) for i in items):
            raise RuntimeError("consumer bug")

    worker = started(GatedEmbed(open_=True), consumer, batch_max=1, queue_windows=4, drop_oldest=False)
    with caplog.at_level(logging.ERROR, logger="speakerd.embedding.worker"):
        for item in (win(0), SpeechEnd(0, 0.0), win(1)):
            worker.submit(item)
        assert worker.close(WAIT)
    assert [ident_of(i) for i in seen] == [0, SpeechEnd(0, 0.0), 1]
    assert any("window consumer failed" in r.getMessage() for r in caplog.records)


def test_close_drains_then_joins() -> None:
    embed, rec = GatedEmbed(), Recorder()
    worker = started(embed, rec, batch_max=3, queue_windows=16, drop_oldest=False)
    for i in range(10):
        worker.submit(win(i))
    assert embed_threads()
    embed.gate.set()
    assert worker.close(WAIT) is True
    assert rec.idents() == list(range(10))
    assert not embed_threads()
    assert worker.close(WAIT) is True  # closing twice is harmless
    assert EmbeddingWorker(embed, rec).close() is True  # never started


def test_close_gives_up_after_its_timeout_and_still_stops_the_thread() -> None:
    embed, rec = GatedEmbed(), Recorder()
    worker = started(embed, rec, batch_max=1, queue_windows=16, drop_oldest=False)
    for i in range(5):
        worker.submit(win(i))
    assert embed.entered.wait(WAIT)
    opener = threading.Timer(0.3, embed.gate.set)  # the stuck embed returns only after close gave up
    opener.start()
    assert worker.close(timeout=0.1) is False
    opener.join(WAIT)
    assert not embed_threads()
    assert rec.idents() == [0]  # the window in flight finished; the queued rest was dropped


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"backend": "cuda"}, "embedding.backend"),
        ({"threads": -1}, "embedding.threads"),
        ({"batch_max": 0}, "embedding.batch_max"),
        ({"batch_max": 16, "queue_windows": 8}, "embedding.queue_windows"),
        ({"coreml_compute_units": "GPU"}, "embedding.coreml_compute_units"),
    ],
)
def test_embedding_settings_validation_names_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        EmbeddingSettings(**kwargs)
    assert err.value.key == key
