"""The Debian package as an operator meets it: build it, lint it, ``apt-get install`` it,
look at what it put where, run the installed commands, purge it and look again.

Installing a package changes the machine, so this needs root (CI runs as root) and the
build tools (``make deps`` installs them). ``XPU_TEST_DEB=0`` switches it off for quick
local runs. The build fetches Python dependencies with pip; when the index cannot be
reached the test skips and says so.
"""

from __future__ import annotations

import grp
import os
import re
import shutil
import signal
import subprocess
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent import __version__
from agent.config import from_mapping
from tests.harness import REPO, api, short_tmpdir, wait_for

PACKAGING = REPO / "packaging"
VENV = Path("/opt/venvs/xpu-agent")
TOOLS = ("dpkg-buildpackage", "dh", "dh_virtualenv", "lintian", "apt-get", "systemd-analyze")
#: pip's words when the package index cannot be reached (then the test skips, not fails).
OFFLINE = re.compile(
    r"NewConnectionError|Temporary failure in name resolution|Network is unreachable|"
    r"No matching distribution found|Could not find a version that satisfies"
)
# What the package creates outside its own file list, all gone after a purge.
SCRIPT_MADE = (
    Path("/var/lib/xpu-agent"),
    Path("/etc/xpu-agent"),
    Path("/etc/systemd/system/multi-user.target.wants/xpu-agent.service"),
    Path("/etc/systemd/system/sockets.target.wants/xpu-agent.socket"),
    VENV,
)


def _skip_reason() -> str | None:
    if os.environ.get("XPU_TEST_DEB", "1") == "0":
        return "XPU_TEST_DEB=0: the Debian package test is switched off"
    if os.geteuid() != 0:
        return "installing a .deb needs root (CI runs as root)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)}: as root run `make deps`"
    if _installed():
        return "xpu-agent is already installed on this machine; the test will not touch it"
    return None


def _installed() -> bool:
    query = _run(["dpkg-query", "-W", "-f=${Status}", "xpu-agent"], check=False)
    return "install ok installed" in query.stdout or "config-files" in query.stdout


def _clean_env() -> dict[str, str]:
    """A root shell's environment: none of this repository or its virtualenv."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"} and not k.startswith("XPU_")
    }
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    env["DEBIAN_FRONTEND"] = "noninteractive"
    return env


def _run(
    cmd: list[str], check: bool = True, timeout: float = 120, cwd: Path | str = "/"
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_clean_env(),
        check=False,
        cwd=cwd,
    )
    if check:
        assert result.returncode == 0, (
            f"{cmd}: exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


pytestmark = [
    pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or ""),
    # Whichever test comes first builds the package in its fixture: about a minute, more
    # on a cold pip cache.
    pytest.mark.timeout(600),
]


@dataclass
class Installed:
    deb: Path
    group_existed: bool
    files: list[Path] = field(default_factory=list)
    dirs_before: set[Path] = field(default_factory=set)


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    started = time.monotonic()
    build = subprocess.run(
        [str(PACKAGING / "build-deb.sh"), str(out)],
        capture_output=True,
        text=True,
        timeout=540,
        env=_clean_env(),
        check=False,
    )
    log = build.stdout + build.stderr
    if build.returncode != 0 and OFFLINE.search(log):
        pytest.skip(f"the Python package index is unreachable, cannot build:\n{log[-1500:]}")
    assert build.returncode == 0, log[-5000:]
    debs = list(out.glob("xpu-agent_*.deb"))
    assert len(debs) == 1, debs
    print(f"built {debs[0].name} in {time.monotonic() - started:.0f}s")
    return debs[0]


@pytest.fixture(scope="module")
def installed(deb: Path) -> Iterator[Installed]:
    state = Installed(deb=deb, group_existed=_group_exists("xpu"))
    listing = _run(["dpkg-deb", "-c", str(deb)]).stdout.splitlines()
    paths = [Path("/" + line.split()[5].removeprefix("./")) for line in listing]
    state.dirs_before = {p for p in paths if p.is_dir()}
    result = _run(["apt-get", "install", "-y", "--no-install-recommends", str(deb)], timeout=300)
    assert "Setting up xpu-agent" in result.stdout
    state.files = sorted(Path(p) for p in _run(["dpkg", "-L", "xpu-agent"]).stdout.split())
    yield state
    if _installed():
        _run(["apt-get", "purge", "-y", "xpu-agent"], check=False, timeout=300)
    # Leave the machine as found: the package keeps the group on purge, the test does not.
    if not state.group_existed and _group_exists("xpu"):
        _run(["groupdel", "xpu"], check=False)


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


# -- the build ------------------------------------------------------------------------------


def test_lintian_clean_apart_from_documented_overrides(deb: Path) -> None:
    result = _run(["lintian", "--fail-on", "error,warning", "--display-info", str(deb)])
    tags = [line for line in result.stdout.splitlines() if re.match(r"^[EWI]: ", line)]
    assert tags == [], "\n".join(tags)
    overrides = (PACKAGING / "debian" / "xpu-agent.lintian-overrides").read_text()
    for line in overrides.splitlines():
        if line and not line.startswith("#"):
            assert line.startswith("xpu-agent: "), line
    # No byte-code in the package: postinst compiles it on the target.
    assert ".pyc" not in _run(["dpkg-deb", "-c", str(deb)]).stdout
    control = _run(["dpkg-deb", "-f", str(deb), "Depends", "Version"]).stdout
    assert "python3 (>= 3.11)" in control and "python3 (<< 3.12)" in control
    assert f"Version: {__version__}" in control


# -- installed ------------------------------------------------------------------------------


def test_installed_files_permissions_and_group(installed: Installed) -> None:
    assert Path("/usr/sbin/xpu-agent").resolve() == VENV / "bin" / "xpu-agent"
    assert Path("/usr/bin/xpuctl").resolve() == VENV / "bin" / "xpuctl"
    assert (VENV / "bin" / "python3").resolve().name.startswith("python3.11")
    assert any(VENV.rglob("*.pyc")), "postinst byte-compiles the environment"
    for unit in ("xpu-agent.service", "xpu-agent.socket"):
        assert (Path("/lib/systemd/system") / unit).read_text() == (
            REPO / "systemd" / unit
        ).read_text()
    assert (
        Path("/usr/lib/sysusers.d/xpu-agent.conf").read_text()
        == (REPO / "systemd" / "xpu-agent.sysusers").read_text()
    )
    assert Path("/usr/lib/tmpfiles.d/xpu-agent.conf").exists()
    conffiles = _run(["dpkg-query", "-W", "-f=${Conffiles}", "xpu-agent"]).stdout
    assert "/etc/xpu-agent/agent.toml" in conffiles and "/etc/default/xpu-agent" in conffiles
    config = Path("/etc/xpu-agent/agent.toml")
    assert oct(config.stat().st_mode & 0o777) == "0o644" and config.stat().st_uid == 0
    assert from_mapping(tomllib.loads(config.read_text())).paths.socket == "/run/xpu-agent.sock"
    state_dir = Path("/var/lib/xpu-agent")
    assert state_dir.is_dir() and oct(state_dir.stat().st_mode & 0o777) == "0o750"
    assert _group_exists("xpu"), "sysusers created the socket's group"
    for wants in SCRIPT_MADE[2:4]:
        assert wants.is_symlink(), f"{wants}: the units are enabled"
    for page in ("man1/xpuctl.1.gz", "man8/xpu-agent.8.gz"):
        assert (Path("/usr/share/man") / page).exists()
    # The unit's Documentation= points here, uncompressed.
    assert Path("/usr/share/doc/xpu-agent/README.md").exists()
    assert Path("/usr/share/doc/xpu-agent/grafana-dashboard.json").exists()
    completions = REPO / "packaging" / "completions"
    assert (
        Path("/usr/share/bash-completion/completions/xpuctl").read_text()
        == (completions / "xpuctl.bash").read_text()
    )
    assert Path("/usr/share/zsh/vendor-completions/_xpuctl").exists()


def test_installed_environment_is_the_runtime_lock(installed: Installed) -> None:
    """The package's virtual environment holds exactly requirements/runtime.lock (less the
    build tools the rules remove) and nothing else but the agent."""
    from tests.test_lock import RUNTIME_LOCK, read_lock

    listed = _run(
        [
            str(VENV / "bin" / "python3"),
            "-c",
            "import importlib.metadata as m\n"
            "for d in m.distributions(): print(d.metadata['Name'], d.version)",
        ]
    ).stdout.split("\n")
    installed_versions = {
        name.lower().replace("_", "-"): version
        for name, version in (line.split() for line in listed if line.strip())
    }
    expected = {
        name: pin.version
        for name, pin in read_lock(RUNTIME_LOCK).items()
        if pin.applies() and name not in {"setuptools", "pip"}
    }
    expected["xpu-agent"] = __version__
    assert installed_versions == expected


def test_installed_units_verify(installed: Installed) -> None:
    result = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            "--man=no",
            "/lib/systemd/system/xpu-agent.service",
            "/lib/systemd/system/xpu-agent.socket",
        ],
        capture_output=True,
        text=True,
        check=False,
        env={**_clean_env(), "SYSTEMD_LOG_LEVEL": "notice"},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "xpu-agent" in line] == []


def test_installed_commands_run(installed: Installed) -> None:
    version = _run(["/usr/sbin/xpu-agent", "--version"])
    assert version.stdout.strip() == f"xpu-agent {__version__}"
    helped = _run(["/usr/bin/xpuctl", "--help"])
    assert "top" in helped.stdout and "alloc" in helped.stdout
    # The installed environment is complete: the daemon runs on mock cards and answers.
    work = short_tmpdir()
    config = work / "agent.toml"
    config.write_text(
        'version = 1\n[backends]\nenabled = ["mock"]\n'
        f'[paths]\nstate_dir = "{work}/state"\nsocket = "{work}/agent.sock"\n'
    )
    log = (work / "log").open("w")
    daemon = subprocess.Popen(
        ["/usr/sbin/xpu-agent", "--config", str(config)],
        env=_clean_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=work,
    )
    try:
        wait_for(lambda: _answers(work / "agent.sock"), 30)
        status = _run(["/usr/bin/xpuctl", "--socket", str(work / "agent.sock"), "status"])
        assert "standalone" in status.stdout
        code, text, _ = api(work / "agent.sock", "GET", "/metrics")
        assert code == 200 and "xpu_agent_build_info{" in text and __version__ in text
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0, (work / "log").read_text()
        log.close()
        shutil.rmtree(work, ignore_errors=True)


def _answers(path: Path) -> bool:
    try:
        return api(path, "GET", "/v1/health")[0] == 200
    except OSError:
        return False


def test_purge_leaves_only_what_policy_keeps(installed: Installed) -> None:
    _run(["apt-get", "purge", "-y", "xpu-agent"], timeout=300)
    assert not _installed()
    left = [p for p in installed.files if p.exists() and p not in installed.dirs_before]
    assert left == [], left
    assert [p for p in SCRIPT_MADE if p.exists() or p.is_symlink()] == []
    helper = Path("/var/lib/systemd/deb-systemd-helper-enabled")
    assert list(helper.rglob("*xpu-agent*")) == [], "deb-systemd-helper forgot the units"
    # Policy: system groups are never removed (files may still carry the gid).
    assert _group_exists("xpu")
