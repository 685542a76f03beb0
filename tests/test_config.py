"""Config validation: every refusal names the key; the daemon exits 2 with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent import config as config_mod
from agent.errors import ConfigError
from tests.harness import agent_env

BAD = [
    ("unknown key", "version = 1\n[node]\nnmae = 'x'\n", "node.nmae: unknown key"),
    ("unknown section", "version = 1\n[bogus]\nx = 1\n", "bogus: unknown key"),
    (
        "wrong type",
        "version = 1\n[enforcement]\ninterval_ms = 'fast'\n",
        "enforcement.interval_ms: Expected 'int', got 'str'",
    ),
    (
        "bad enum",
        "version = 1\n[enforcement]\nmemory_action = 'nuke'\n",
        "enforcement.memory_action: Invalid enum value 'nuke'",
    ),
    (
        "bad size",
        "version = 1\n[backends.mock]\ndevices = [{ memory_mib = '12XB' }]\n",
        "backends.mock.devices[0].memory_mib: '12XB' is not",
    ),
    (
        "bad step",
        "version = 1\n[slicing]\ncompute_step_pct = 7\n",
        "slicing.compute_step_pct: 7 must be 1..100 and divide 100",
    ),
    ("unknown version", "version = 2\n", "version: unknown version 2"),
    ("no version", "[node]\nname = 'a'\n", "version: required"),
    (
        "bad backend",
        "version = 1\n[backends]\nenabled = ['cuda']\n",
        "backends.enabled[0]: Invalid enum value 'cuda'",
    ),
    ("bad url", "version = 1\n[mqtt]\nurl = 'http://broker'\n", "mqtt.url:"),
    ("not toml", "version = = 1\n", "not valid TOML"),
    (
        "relative hami path",
        "version = 1\n[enforcement.nvidia]\nhami_core = 'libvgpu.so'\n",
        "enforcement.nvidia.hami_core: must be an absolute path",
    ),
    (
        "launcher placeholder",
        "version = 1\n[pool]\nlauncher = ['ssh', '{host}']\n",
        "pool.launcher: '{host}': only {address} and {node}",
    ),
    ("empty launcher", "version = 1\n[pool]\nlauncher = []\n", "pool.launcher: must be"),
    ("bad grace", "version = 1\n[pool]\nborrower_grace_s = 'soon'\n", "pool.borrower_grace_s:"),
    ("bad address", "version = 1\n[node]\naddress = 'a b'\n", "node.address:"),
]


@pytest.mark.parametrize(("name", "text", "message"), BAD, ids=[b[0] for b in BAD])
def test_refusal_names_the_key(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config_mod.load(path)
    assert message in str(info.value)


@pytest.mark.parametrize(("name", "text", "message"), BAD[:5], ids=[b[0] for b in BAD[:5]])
def test_daemon_exits_2_with_one_line(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli.daemon_main", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env=agent_env(),
        check=False,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "config error" in line]
    assert len(errors) == 1
    assert message in errors[0]


def test_defaults_match_design() -> None:
    config = config_mod.from_mapping({"version": 1})
    assert config.paths.socket == "/run/xpu-agent/agent.sock"
    assert config.slicing.compute_step_pct == 10
    assert config.slicing.max_slices_per_device == 10
    assert config.enforcement.interval_ms == 500
    assert config.enforcement.memory_action == "term"
    assert config.mqtt.topic_root == "xpu/v1"
    assert config.pool.peer_ttl_s == 90
    assert sum(c.count for c in config.backends.mock.devices) == 8


def test_dev_paths_go_under_dot_run(tmp_path: Path) -> None:
    config = config_mod.with_dev_paths(config_mod.from_mapping({"version": 1}), tmp_path / ".run")
    assert config.paths.socket == str(tmp_path / ".run" / "agent.sock")
    assert config.ledger_path.parent == tmp_path / ".run" / "state"


def test_mock_cards_parse_sizes() -> None:
    config = config_mod.from_mapping(
        {
            "version": 1,
            "backends": {"mock": {"devices": [{"model": "X", "memory_mib": "8GiB", "count": 2}]}},
        }
    )
    assert [(c.model, c.memory_mib) for c in config_mod.mock_cards(config)] == [("X", 8192)] * 2
