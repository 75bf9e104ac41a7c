"""What a new user meets first: help that starts at once, models that say how to get them, errors
that say what to do, and an exit code of 2 for anything they can fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from daemon_harness import REPO, speakerd

HELP_BUDGET_S = 0.3
"""`speakerd run --help`, best of 5 (issue 18: it took 0.7 s while the parser imported scipy.optimize)."""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "daemon") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_run_help_imports_no_command_module_and_starts_at_once() -> None:
    probe = (
        "import sys\nfrom speakerd.cli import main\ntry:\n    main(['run', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('MODULES', ' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('scipy', 'numpy', 'zmq') "
        "or m.startswith(('speakerd.evaluation', 'speakerd.bench', 'speakerd.listen')))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=_env(), timeout=60, check=True)
    assert "--no-realtime" in out.stdout
    assert out.stdout.split("MODULES")[-1].split() == []
    walls = []
    for _ in range(5):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "speakerd.cli", "run", "--help"], capture_output=True, env=_env(), timeout=60, check=True)
        walls.append(time.perf_counter() - start)
    assert min(walls) < HELP_BUDGET_S, f"speakerd run --help took {min(walls):.3f} s at best"


def test_python_dash_m_speakerd_is_the_console_script() -> None:
    out = subprocess.run([sys.executable, "-m", "speakerd", "models", "--help"], capture_output=True, text=True, env=_env(), timeout=60)
    assert out.returncode == 0 and "usage: speakerd models" in out.stdout, out.stderr
    bad = subprocess.run([sys.executable, "-m", "speakerd", "no-such-command"], capture_output=True, text=True, env=_env(), timeout=60)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc (numpy's BLAS is OpenBLAS on Linux)")
@pytest.mark.parametrize("command", ["run", "bench"])
def test_the_daemon_and_its_bench_run_numpy_on_one_blas_thread(command: str) -> None:
    """OpenBLAS's extra thread busy-waits after a product it split (0.5-0.9 % of a core in bench's live run)."""
    probe = (
        f"import os\nfrom speakerd.cli import main\ntry:\n    main(['{command}', '--help'])\nexcept SystemExit:\n    pass\n"
        "import numpy as np\n"
        "product = np.ones((8, 256), np.float32) @ np.ones((256, 252), np.float32)  # the cohort's shape\n"
        "print('THREADS', len(os.listdir('/proc/self/task')), os.environ['OPENBLAS_NUM_THREADS'])"
    )
    env = {k: v for k, v in _env().items() if k != "OPENBLAS_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60, check=True)
    assert out.stdout.split("THREADS")[-1].split() == ["1", "1"]


@pytest.mark.parametrize("command", ["eval", "bench", "calibrate", "listen", "service"])
def test_each_command_still_gets_its_own_options(command: str) -> None:
    proc = speakerd(command, "--help", timeout=60)
    from speakerd.cli import build_parser

    full = build_parser()
    sub = next(a for a in full._subparsers._group_actions if a.dest == "command").choices[command]  # noqa: SLF001
    options = [o for a in sub._actions for o in a.option_strings if o.startswith("--") and o != "--help"]  # noqa: SLF001
    assert options, command
    for option in options:
        assert option in proc.stdout, f"{command} --help lacks {option}"


# -- models: every known one, its state and how to build it (issue 18) ----------------------------


def _models_env(root: Path) -> dict[str, str]:
    return {**_env(), "SPEAKERD_MODELS": str(root)}


def _cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "speakerd.cli", *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_models_list_shows_every_known_model_and_the_command_that_builds_it(tmp_path: Path) -> None:
    proc = _cli("models", "list", env=_models_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    heads = {line.split()[0]: line for line in lines if not line.startswith(" ")}
    assert set(heads) == {"ge2e-resemblyzer", "ecapa-speechbrain", "wespeaker-resnet34"}
    assert all(" not built" in line for line in heads.values())
    assert "    build: speakerd models build ge2e-resemblyzer" in lines
    assert "    build: speakerd models build ecapa-speechbrain" in lines
    assert any(line.startswith("    build: speakerd models fetch wespeaker-resnet34") and "models convert wespeaker --checkpoint" in line
               for line in lines)


def test_models_list_marks_the_built_default(default_model: Path) -> None:
    proc = _cli("models", "list", env=_models_env(default_model.parent))
    head = next(line for line in proc.stdout.splitlines() if line.startswith("ge2e-resemblyzer"))
    assert head.split()[1] == "built" and "onnx" in head and "(default)" in head
    assert "    rebuild: speakerd models build ge2e-resemblyzer" in proc.stdout


@pytest.mark.parametrize(
    ("model", "says"),
    [
        ("nosuchmodel", "no model 'nosuchmodel': not a directory and not a bundle in {root}; known models: "
                        "ge2e-resemblyzer, ecapa-speechbrain, wespeaker-resnet34"),
        ("wespeaker-resnet34", "model 'wespeaker-resnet34' is not built yet (no bundle in {root}); build it with: "
                               "speakerd models fetch wespeaker-resnet34"),
    ],
)
def test_a_model_that_is_not_there_is_exit_2_and_says_how_to_get_it(tmp_path: Path, model: str, says: str) -> None:
    root = tmp_path / "models"
    root.mkdir()
    proc = _cli("run", "--model", model, "--source", "file:nothing.wav", "--store", str(tmp_path / "s"), env=_models_env(root))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert says.format(root=root) in proc.stderr


def test_a_bundle_without_its_model_file_is_exit_2_and_names_the_build(tmp_path: Path) -> None:
    root = tmp_path / "models"
    (root / "ge2e-resemblyzer").mkdir(parents=True)
    manifest = json.loads((REPO / "models" / "ge2e-resemblyzer" / "manifest.json").read_text())
    (root / "ge2e-resemblyzer" / "manifest.json").write_text(json.dumps(manifest))
    sf.write(tmp_path / "quiet.wav", np.zeros(16000, dtype=np.float32), 16000)
    proc = _cli("run", "--source", f"file:{tmp_path / 'quiet.wav'}", "--pub", "tcp://127.0.0.1:*", "--store", str(tmp_path / "s"), env=_models_env(root))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "run `speakerd models build ge2e-resemblyzer`" in proc.stderr


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path: Path) -> None:
    """`speakerd models list | head -1` (and scripts/setup's grep -q) must not end in BrokenPipeError."""
    proc = subprocess.Popen([sys.executable, "-m", "speakerd.cli", "models", "list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_models_env(tmp_path))
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 0
    assert "Traceback" not in err and "BrokenPipe" not in err, err
