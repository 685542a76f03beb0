"""The packaging sources agree with the code (no root, no build): versions, the shipped
configuration, the files the package lists, and man pages that cover every command."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from agent import __version__
from agent.cli import daemon_main, xpuctl
from agent.config import from_mapping
from tests.harness import REPO

DEBIAN = REPO / "packaging" / "debian"
MAN = REPO / "packaging" / "man"


def test_versions_agree() -> None:
    changelog = (DEBIAN / "changelog").read_text().splitlines()[0]
    match = re.match(r"^xpu-agent \((?P<version>[^)]+)\) \S+; urgency=\w+$", changelog)
    assert match, changelog
    assert match["version"] == __version__
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == __version__


def test_shipped_config_is_valid_and_matches_the_socket_unit() -> None:
    config = from_mapping(tomllib.loads((REPO / "packaging" / "agent.toml").read_text()))
    socket_unit = (REPO / "systemd" / "xpu-agent.socket").read_text()
    listen = re.search(r"^ListenStream=(\S+)$", socket_unit, re.M)
    assert listen and config.paths.socket == listen[1]
    assert config.api.socket_group in socket_unit  # SocketGroup=
    # The documented defaults in the file are the code's defaults.
    defaults = from_mapping({"version": 1})
    assert config.enforcement == defaults.enforcement
    assert config.metrics == defaults.metrics


def test_files_the_package_lists_exist() -> None:
    for name in ("xpu-agent.install", "xpu-agent.manpages", "xpu-agent.docs"):
        for line in (DEBIAN / name).read_text().splitlines():
            source = line.split()[0]
            assert list(REPO.glob(source)), f"{name}: {source} matches nothing"
    assert (DEBIAN / "rules").stat().st_mode & 0o111
    assert (REPO / "packaging" / "build-deb.sh").stat().st_mode & 0o111
    for unit in ("sysusers", "tmpfiles"):
        assert f"systemd/xpu-agent.{unit}" in (DEBIAN / "rules").read_text()


def _subcommands(parser: argparse.ArgumentParser) -> list[str]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(actions[0].choices) if actions else []


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return sorted(
        s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"
    )


def _man_text(page: Path) -> str:
    """The page's words with roff escapes undone (``\\-`` is a hyphen)."""
    return page.read_text().replace("\\-", "-").replace("\\fB", "").replace("\\fI", "")


def test_man_pages_cover_every_command_and_option() -> None:
    ctl = _man_text(MAN / "xpuctl.1")
    commands = _subcommands(xpuctl.build_parser())
    assert "top" in commands
    for command in commands:
        assert re.search(rf"^\.B[IR]? \"?{re.escape(command)}\b", ctl, re.M), (
            f"xpuctl.1 does not document `xpuctl {command}`"
        )
    for option in _options(xpuctl.build_parser()):
        assert option in ctl, f"xpuctl.1 does not document {option}"
    agent = _man_text(MAN / "xpu-agent.8")
    for option in _options(daemon_main.build_parser()):
        assert option in agent, f"xpu-agent.8 does not document {option}"
    for command in _subcommands(daemon_main.build_parser()):
        assert f"xpu-agent {command}" in agent, f"xpu-agent.8 does not document {command}"
    for page, text in (("xpuctl.1", ctl), ("xpu-agent.8", agent)):
        assert f'"xpu-agent {__version__}"' in text, f"{page}: version in .TH"


@pytest.mark.skipif(shutil.which("man") is None, reason="man-db not installed")
@pytest.mark.parametrize("page", ["xpuctl.1", "xpu-agent.8"])
def test_man_pages_render_without_warnings(page: str) -> None:
    result = subprocess.run(
        ["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(MAN / page)],
        capture_output=True,
        text=True,
        check=False,
        env={"LC_ALL": "C.UTF-8", "MANWIDTH": "80", "PATH": "/usr/bin:/bin"},
        timeout=30,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
