"""``speakerd service``: the launchd agent and systemd unit it renders, and what install/uninstall do.

Commands run through an injected runner, and HOME is a temporary folder, so nothing here touches the
real launchd or systemd.
"""

from __future__ import annotations

import argparse
import configparser
import plistlib
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from speakerd import cli
from speakerd.service import (
    AGENT_KEYS,
    LABEL,
    ServiceError,
    ServiceSpec,
    build_spec,
    check_launchd,
    execute,
    main_service,
    plan,
    render_launchd,
    render_systemd,
)

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "launchd" / f"{LABEL}.plist"
UID = 501


class Runner:
    """Records commands; fails the ones listed in ``fail`` with exit code 5."""

    def __init__(self, fail: Sequence[str] = ()) -> None:
        self.commands: list[tuple[str, ...]] = []
        self._fail = set(fail)

    def __call__(self, cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.commands.append(tuple(cmd))
        code = 5 if cmd[1] in self._fail or (len(cmd) > 2 and cmd[2] in self._fail) else 0
        return subprocess.CompletedProcess(list(cmd), code, stdout="state = running\n", stderr="boom" if code else "")


@pytest.fixture
def spec(tmp_path: Path) -> ServiceSpec:
    return ServiceSpec(program=("/opt/speakerd/bin/speakerd", "run", "--config", "/Users/a b/speakerd.toml"),
                       home=tmp_path / "home", environment={"PYTHONUNBUFFERED": "1"})


def test_launchd_agent_restarts_after_a_crash_only_and_logs_under_library_logs(spec: ServiceSpec) -> None:
    plist = plistlib.loads(render_launchd(spec))
    assert plist["Label"] == LABEL
    assert plist["ProgramArguments"] == ["/opt/speakerd/bin/speakerd", "run", "--config", "/Users/a b/speakerd.toml"]
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ProcessType"] == "Interactive"
    assert plist["ThrottleInterval"] == 10
    logs = spec.home / "Library" / "Logs" / "speakerd"
    assert plist["StandardOutPath"] == str(logs / "speakerd.out.log")
    assert plist["StandardErrorPath"] == str(logs / "speakerd.err.log")
    assert plist["EnvironmentVariables"] == {"PYTHONUNBUFFERED": "1"}
    assert spec.plist_path == spec.home / "Library" / "LaunchAgents" / f"{LABEL}.plist"


def test_checked_in_template_is_the_same_agent() -> None:
    template = check_launchd(TEMPLATE.read_bytes())
    assert {k: template[k] for k in AGENT_KEYS} == AGENT_KEYS
    assert template["Label"] == LABEL and template["ProgramArguments"][1:] == ["run"]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"KeepAlive": True}, "KeepAlive must be {SuccessfulExit = false}"),
        ({"ProgramArguments": ["speakerd", "run"]}, "absolute path"),
        ({"ProcessType": "Background"}, "Interactive"),
        ({"StandardErrorPath": "~/Library/Logs/x.log"}, "StandardErrorPath must be an absolute path"),
    ],
)
def test_a_wrong_agent_is_refused(spec: ServiceSpec, change: dict[str, object], problem: str) -> None:
    plist = plistlib.loads(render_launchd(spec)) | change
    with pytest.raises(ServiceError, match=problem.replace("{", r"\{").replace("}", r"\}")):
        check_launchd(plistlib.dumps(plist))
    with pytest.raises(ServiceError, match="not a valid plist"):
        check_launchd(b"<plist><dict><key>Label</key>")


def test_systemd_unit_has_the_same_semantics(spec: ServiceSpec) -> None:
    unit = configparser.ConfigParser(interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(render_systemd(spec))
    service = unit["Service"]
    assert service["ExecStart"] == '/opt/speakerd/bin/speakerd run --config "/Users/a b/speakerd.toml"'
    assert service["Restart"] == "on-failure" and service["RestartSec"] == "10"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert int(service["TimeoutStopSec"]) >= 2
    assert service["Environment"] == "PYTHONUNBUFFERED=1"
    assert unit["Install"]["WantedBy"] == "default.target"
    assert spec.unit_path == spec.home / ".config" / "systemd" / "user" / "speakerd.service"


def test_launchd_install_writes_the_agent_and_bootstraps_it_then_uninstall_boots_it_out(spec: ServiceSpec) -> None:
    runner = Runner(fail=["bootout"])  # not loaded yet: bootout fails, harmlessly
    execute(plan("install", "launchd", spec, UID), runner)
    assert check_launchd(spec.plist_path.read_bytes())["ProgramArguments"][0] == "/opt/speakerd/bin/speakerd"
    assert spec.log_dir.is_dir(), "launchd does not create the log folder itself"
    target = f"gui/{UID}/{LABEL}"
    assert runner.commands == [
        ("launchctl", "bootout", target),
        ("launchctl", "enable", target),
        ("launchctl", "bootstrap", f"gui/{UID}", str(spec.plist_path)),
    ]
    runner = Runner()
    execute(plan("uninstall", "launchd", spec, UID), runner)
    assert runner.commands == [("launchctl", "bootout", target)]
    assert not spec.plist_path.exists()


def test_a_failing_bootstrap_is_reported(spec: ServiceSpec) -> None:
    with pytest.raises(ServiceError, match=r"launchctl bootstrap .* failed \(5\): boom"):
        execute(plan("install", "launchd", spec, UID), Runner(fail=["bootstrap"]))


def test_systemd_install_and_uninstall(spec: ServiceSpec) -> None:
    runner = Runner()
    execute(plan("install", "systemd", spec, UID), runner)
    assert "Restart=on-failure" in spec.unit_path.read_text()
    assert runner.commands == [("systemctl", "--user", "daemon-reload"),
                               ("systemctl", "--user", "enable", "--now", "speakerd.service")]
    runner = Runner(fail=["disable"])  # already stopped: tolerated
    execute(plan("uninstall", "systemd", spec, UID), runner)
    assert not spec.unit_path.exists()
    assert runner.commands[-1] == ("systemctl", "--user", "daemon-reload")


def test_missing_service_manager_is_named(spec: ServiceSpec) -> None:
    def absent(cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
        raise FileNotFoundError(cmd[0])

    with pytest.raises(ServiceError, match="launchctl not found"):
        execute(plan("status", "launchd", spec, UID), absent)


def test_status_prints_the_managers_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    args = argparse.Namespace(action="status", kind="systemd", dry_run=False, config=None, program="/usr/bin/true")
    assert main_service(args, Runner()) == 0
    assert "state = running" in capsys.readouterr().out


def test_dry_run_prints_and_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = tmp_path / "speakerd.toml"
    cfg.write_text("")
    for kind in ("launchd", "systemd"):
        assert cli.main(["service", "install", "--dry-run", "--kind", kind, "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "<key>KeepAlive</key>" in out and f"--config</string>" in out and str(cfg) in out
    assert f"run launchctl bootstrap gui/" in out and "run systemctl --user enable --now speakerd.service" in out
    assert list(tmp_path.iterdir()) == [cfg], "a dry run writes nothing"


def test_the_program_is_absolute_and_a_missing_config_is_refused(tmp_path: Path) -> None:
    spec = build_spec(None, None, home=tmp_path)
    assert Path(spec.program[0]).is_absolute() and spec.program[-1] == "run"
    with pytest.raises(ServiceError, match="--config .*nowhere.toml: no such file"):
        build_spec(str(tmp_path / "nowhere.toml"), None, home=tmp_path)


def _exec_start(unit: str) -> tuple[list[str], dict[str, str]]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit)
    env = dict(line.strip('"').split("=", 1) for line in parser["Service"].get("Environment", "").splitlines() if line)
    return shlex.split(parser["Service"]["ExecStart"]), env


def test_a_venv_speakerd_run_without_activating_the_venv_installs_itself(tmp_path: Path) -> None:
    """Issue 18: `.venv/bin/speakerd service install` with the venv not on PATH wrote the base
    interpreter (python3.11 -m speakerd.cli), which cannot import speakerd's dependencies."""
    venv_bin = Path(sys.executable).absolute().parent
    if not (venv_bin / "speakerd").is_file():
        pytest.skip(f"no speakerd entry point in {venv_bin} (pip install -e . makes it)")
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO / "daemon")}
    proc = subprocess.run([str(venv_bin / "speakerd"), "service", "install", "--dry-run", "--kind", "systemd"],
                          capture_output=True, text=True, env=env, timeout=60, check=True)
    unit = proc.stdout.split("write ", 1)[1].split(":\n", 1)[1]
    command, unit_env = _exec_start("\n".join(line[4:] for line in unit.splitlines() if line.startswith("    ")))
    assert command[1:] == ["run"] and Path(command[0]).name == "speakerd"
    assert Path(command[0]).parent.resolve() == venv_bin.resolve()  # the venv's own entry point
    # what the service manager will start, in the environment the unit gives it, can import speakerd
    # and its dependencies (numpy, through the model list)
    check = subprocess.run([command[0], "models", "list"], capture_output=True, text=True, timeout=60,
                           env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", **unit_env})
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith("ge2e-resemblyzer")


def test_without_an_entry_point_the_venv_interpreter_is_kept_unresolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    venv_python = tmp_path / "venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.symlink_to(Path(sys.executable).resolve())
    monkeypatch.setattr(sys, "executable", str(venv_python))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    spec = build_spec(None, None, home=tmp_path)
    assert spec.program == (str(venv_python), "-m", "speakerd.cli", "run")
