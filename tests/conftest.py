"""Shared fixtures: real speech from ../shared, found through one place, and a user environment of
the suite's own, so a speakerd the user runs (the service the README installs) and the daemons the
tests start never meet."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRISPEECH = Path(os.environ.get("SPEAKERD_LIBRISPEECH", REPO.parent / "shared" / "data" / "librispeech"))


USER_DIRS = ("HOME", "XDG_DATA_HOME", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")
"""Where speakerd finds its store, control socket, keys, service files and caches by default."""


@pytest.fixture(scope="session", autouse=True)
def own_user_dirs(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """Point every default location at the session's own folders, for the tests and every daemon they
    start (subprocesses inherit the environment): a test's default store, control socket, keys and
    service files are never the user's. Publish endpoints do not come from these folders: the tests
    give their own (daemon_harness adds an ephemeral one to a `run` that names none)."""
    root = tmp_path_factory.mktemp("user")
    with pytest.MonkeyPatch.context() as mp:
        for name in USER_DIRS:
            folder = root / name.lower()
            folder.mkdir(mode=0o700)
            mp.setenv(name, str(folder))
        yield root


@pytest.fixture(scope="session", autouse=True)
def subprocess_bytecode_cache(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """Let the Python processes the tests start (the speakerd CLI, Resemblyzer, conversions) keep
    their compiled bytecode, in the session's own folder. With PYTHONDONTWRITEBYTECODE set (as on
    this CI machine) and a venv installed with --no-compile, every one of some 150 subprocesses
    compiled torch, numpy, onnxruntime, ... from source again (1.5-10 s each); now the first one does.
    The code each process runs is the same; the installed packages and the repo are not written."""
    if not os.environ.get("PYTHONDONTWRITEBYTECODE"):
        yield None
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PYTHONDONTWRITEBYTECODE")
        prefix = tmp_path_factory.mktemp("pycache")
        mp.setenv("PYTHONPYCACHEPREFIX", str(prefix))
        yield prefix


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
