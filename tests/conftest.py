"""Shared fixtures: real speech from ../shared, found through one place."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRISPEECH = Path(os.environ.get("SPEAKERD_LIBRISPEECH", REPO.parent / "shared" / "data" / "librispeech"))


@pytest.fixture(scope="session")
def librispeech() -> Path:
    """The LibriSpeech clips beside the repo; tests skip, saying why, only if they are truly absent."""
    if not (LIBRISPEECH / "test-other").is_dir():
        pytest.skip(f"LibriSpeech clips not found at {LIBRISPEECH} (set SPEAKERD_LIBRISPEECH)")
    return LIBRISPEECH


@pytest.fixture(autouse=True)
def no_thread_left_running():
    """Every stage that starts a thread must stop it: a leaked thread fails the test that leaked it."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
    for t in leaked:
        t.join(timeout=2.0)
    still = [t.name for t in leaked if t.is_alive()]
    assert not still, f"threads left running: {still}"


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The default bundle, built once (the README's set-up builds it; offline after the first build)."""
    from speakerd.bundle import resolve_bundle
    from speakerd.models.build import build_model

    bundle = resolve_bundle("ge2e-resemblyzer")
    if bundle.artifact("onnx") is None:
        bundle = build_model("ge2e-resemblyzer", progress=False)
    return bundle.path


@pytest.fixture(scope="session")
def enrolled(librispeech: Path, default_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """Four readers enrolled through the real CLI from clips that no conversation uses."""
    from daemon_harness import enroll_speakers

    store = tmp_path_factory.mktemp("store")
    return enroll_speakers(librispeech, store, ["1688", "1998", "2033", "3080"])
