"""xpuctl's command-line habits: shared options in either position, help that names the
accepted forms, tables that fit the terminal, shell completion."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.cli import render
from agent.cli.xpuctl import COMMANDS, build_parser
from tests import sim_peers
from tests.broker import Mosquitto, mqtt_config, topic_root
from tests.harness import PY, REPO, AgentProcess, agent_env, json_out, wait_for

COMPLETIONS = REPO / "packaging" / "completions"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "agent.cli.xpuctl", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**agent_env(env), "PYTHONPATH": str(REPO)},
        check=False,
        cwd="/tmp",
    )


def both_positions(
    sock: Path, command: str, rest: list[str], rest_after: list[str] | None = None
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """``--socket S --json CMD ...`` and ``CMD ... --socket S --json`` (before any ``--``)."""
    flags = ["--socket", str(sock), "--json"]
    before = run_cli(*flags, command, *rest)
    rest = rest if rest_after is None else rest_after
    cut = rest.index("--") if "--" in rest else len(rest)
    after = run_cli(command, *rest[:cut], *flags, *rest[cut:])
    return before, after


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


# -- options in both positions ------------------------------------------------------------


def test_every_command_takes_json_and_socket_before_and_after(agent: AgentProcess) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        alloc = json_out(
            run_cli(
                "--socket",
                str(agent.socket),
                "--json",
                "alloc",
                "--memory",
                "1GiB",
                "--compute",
                "10",
            )
        )
        spares = [
            json_out(
                run_cli(
                    "alloc",
                    "--memory",
                    "1GiB",
                    "--compute",
                    "10",
                    "--json",
                    "--socket",
                    str(agent.socket),
                )
            )
            for _ in range(2)
        ]
        assert alloc["memory_mib"] == spares[0]["memory_mib"] == 1024
        # (command, arguments, expected exit code); the order matters only for free.
        cases: list[tuple[str, list[str], int]] = [
            ("status", [], 0),
            ("devices", [], 0),
            ("slices", ["--all"], 0),
            ("alloc", ["--memory", "1GiB", "--compute", "10", "--request-id", "same"], 0),
            ("attach", [alloc["id"], "--pid", str(sleeper.pid)], 0),
            ("run", ["--memory", "512MiB", "--compute", "10", "--", "true", "--json"], 0),
            ("pool", [], 0),
            ("place", ["--memory", "1GiB", "--compute", "10"], 0),
            ("borrow", ["--memory", "1GiB", "--compute", "10"], 1),  # standalone: no pool
            ("leases", [], 0),
            ("return", ["s-000000000000"], 4),
            ("events", ["--limit", "3"], 0),
            ("top", ["--once"], 0),
            ("free", [spares[0]["id"]], 0),  # and spares[1] after the command
        ]
        assert {c for c, _, _ in cases} == set(subcommands()), "every command is covered"
        for command, rest, code in cases:
            second = [spares[1]["id"]] if command == "free" else None
            before, after = both_positions(agent.socket, command, rest, second)
            for result in (before, after):
                assert result.returncode == code, (command, result.args, result.stderr)
                assert "unrecognized arguments" not in result.stderr
            if command == "run":
                continue  # the command's own output; it got "--json" as its argument
            if code == 0:
                first, second = json.loads(before.stdout), json.loads(after.stdout)
                assert type(first) is type(second), command
                if command in {"devices", "pool", "leases", "place"}:
                    assert len(first) == len(second), command
                if command == "alloc":  # the same request id: the same slice
                    assert first["id"] == second["id"]
            else:
                assert before.stderr == after.stderr, command
    finally:
        sleeper.kill()
        sleeper.wait()


def test_options_after_a_run_separator_belong_to_the_command(agent: AgentProcess) -> None:
    result = run_cli(
        "run",
        "--memory",
        "512MiB",
        "--compute",
        "10",
        "--socket",
        str(agent.socket),
        "--",
        sys.executable,
        "-c",
        "import sys; print(sys.argv[1:])",
        "--json",
        "--socket",
        "x",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['--json', '--socket', 'x']"


# -- help ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_names_accepted_forms_and_ends_with_an_example(command: str) -> None:
    result = run_cli(command, "--help", env={"COLUMNS": "100"})
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.rstrip().splitlines()[-1].strip().startswith(f"xpuctl {command}")
    assert "example:" in text
    for action in subcommands()[command]._actions:
        if action.option_strings and action.help is not argparse.SUPPRESS:
            assert action.help, f"{command} {action.option_strings} has no help"
    forms = {"--memory": "512MiB|8GiB|8G|<MiB>", "--compute": "30|30%", "--ttl": "90s|10m|1h"}
    for option, form in forms.items():
        if any(option in a.option_strings for a in subcommands()[command]._actions):
            assert form in " ".join(text.split()), (command, option)


# -- tables that fit -------------------------------------------------------------------------


def _peer(node: str, models: list[str], state: str = "online") -> dict[str, object]:
    return {
        "node": node,
        "state": state,
        "placeable": state == "online",
        "age_s": 1.5,
        "agent": "0.1.0",
        "devices": [
            {
                "id": f"mock-{i}",
                "model": m,
                "vendor": "mock",
                "health": "ok",
                "memory_total_mib": 81920,
                "memory_free_mib": 81920 - 1024 * i,
                "compute_free_pct": 100 - 10 * i,
                "slices": i,
            }
            for i, m in enumerate(models)
        ],
        "lendable_memory_mib": 4096,
        "lendable_compute_pct": 20,
        "lends": True,
        "address": f"{node}.cluster.example",
    }


def test_pool_table_summarises_each_peer_on_one_line() -> None:
    peers = [
        _peer("b", ["A100"] * 4 + ["H100"] * 4),
        _peer("a", ["A100"] * 2, state="stale"),
    ]
    lines = render.pool_text(peers, 80).splitlines()
    assert [line.split()[0] for line in lines[2:4]] == ["a", "b"]  # sorted by name
    b = lines[3]
    # 8 cards, both models counted, the largest free card (mock-0: 80 GiB, 100 %) and the
    # totals (8 x 80 GiB - (0+1+...+7) GiB = 612 GiB, 800 - 280 = 520 %).
    assert "4x A100, 4x H100" in b and "80.0GiB/100%" in b and "612.0GiB/520%" in b
    assert lines[2].split()[1] == "stale*" and "not placeable" in lines[-1]
    wide = render.pool_text(peers, None, wide=True).splitlines()
    assert len(wide) == 2 + 10  # one line per card
    # --wide names where each peer is reached (run --pool's launcher {address}).
    assert wide[0].split()[-1] == "ADDRESS"
    assert [line.split()[-1] for line in wide if line.startswith(("a ", "b "))] == [
        "a.cluster.example",
        "b.cluster.example",
    ]
    assert render.filter_peers(peers, "h100|V100", None) == [peers[0]]
    assert render.filter_peers(peers, None, "online|offline") == [peers[0]]


def test_narrow_tables_drop_detail_before_cutting_names() -> None:
    slices = [
        {
            "id": "s-0123456789ab",
            "device": "nvidia-GPU-4b2e0d3c-1111-2222-3333-444455556666",
            "memory_mib": 8192,
            "compute_pct": 30,
            "owner_uid": 1000,
            "state": "active",
            "usage": {
                "memory_used_mib": 100.0,
                "compute_used_pct": 12.0,
                "throttled": False,
                "last_action": "continue",
            },
            "processes": [{"pid": 4242, "start_time": 1.0}],
            "expires_at": None,
            "borrower": "",
        }
    ]
    narrow = render.slices_text(slices, 80)
    assert max(len(line) for line in narrow.splitlines()) <= 80
    head = narrow.splitlines()[0].split()
    assert head[:4] == ["ID", "DEVICE", "MEMORY", "COMPUTE"] and "BORROWER" not in head
    assert "s-0123456789ab" in narrow  # ids are never cut
    wide = render.slices_text(slices, None)
    assert "BORROWER" in wide and slices[0]["device"] in wide  # type: ignore[operator]
    assert max(len(line) for line in wide.splitlines()) > 80


def test_pool_of_200_peers_with_8_cards_fits_80_columns(
    broker: Mosquitto, agent_factory: Callable[..., AgentProcess]
) -> None:
    from agent.bus.topics import Topics

    root = topic_root()
    nodes = [f"gpu-{i:04d}.rack{i % 40:02d}.site-a.example.internal" for i in range(200)]
    models = ["NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"]
    client = sim_peers.connect(broker)
    try:
        sim_peers.publish(
            client,
            Topics(root, "z", "sim"),
            nodes,
            lambda i: [models[(i + k) % 2] if i % 3 else models[0] for k in range(8)],
            free_mib=lambda card: sim_peers.CARD_MIB - 4096 * card,
        )
    finally:
        client.loop_stop()
        client.disconnect()
    agent = agent_factory(node="me", config=mqtt_config(broker, root, "me", keepalive_s=30))

    def complete() -> bool:
        status, peers, _ = agent.api("GET", "/v1/pool")
        return status == 200 and sum(len(p["devices"]) == 8 for p in peers) == 200

    wait_for(complete, 30)
    table = agent.xpuctl("pool", env={"COLUMNS": "80"})
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    rows = lines[2:]
    assert len(rows) == 200  # one line per peer
    shown = [row.split()[0] for row in rows]
    assert shown == sorted(shown)
    assert all(row.split()[2] == "8" for row in rows)
    h100 = agent.xpuctl("pool", "--model", "H100", env={"COLUMNS": "80"})
    assert len(h100.stdout.splitlines()) - 2 == sum(1 for i in range(200) if i % 3)
    assert agent.xpuctl("pool", "--state", "offline").stdout.splitlines()[2:] == []
    wide = agent.xpuctl("pool", "--wide")
    assert len(wide.stdout.splitlines()) == 2 + 200 * 8
    assert nodes[0] in wide.stdout and "NVIDIA H100 80GB HBM3" in wide.stdout


# -- completion ------------------------------------------------------------------------------


def test_committed_completion_matches_the_parser() -> None:
    shtab = pytest.importorskip("shtab", reason="shtab is in the test extra and the lock")
    for shell, name in (("bash", "xpuctl.bash"), ("zsh", "_xpuctl")):
        generated = str(shtab.complete(build_parser(), shell=shell))
        assert (COMPLETIONS / name).read_text() == generated, (
            f"packaging/completions/{name} is stale: run `make completions`"
        )


def _bash_complete(words: list[str]) -> list[str]:
    script = (
        f"source {COMPLETIONS / 'xpuctl.bash'}\n"
        f"COMP_WORDS=({' '.join(words)})\n"
        "COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))\n"
        'COMP_LINE="${COMP_WORDS[*]}"; COMP_POINT=${#COMP_LINE}\n'
        "_shtab_xpuctl\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_bash_completes_commands_and_their_options() -> None:
    assert {"alloc", "pool", "run"} <= set(_bash_complete(["xpuctl", "''"]))
    assert "--wide" in _bash_complete(["xpuctl", "pool", "--w"])
    assert {"--memory", "--model"} <= set(_bash_complete(["xpuctl", "place", "--m"]))
    assert "--json" in _bash_complete(["xpuctl", "status", "--j"])


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed (make deps)")
def test_zsh_completion_parses() -> None:
    check = subprocess.run(
        ["zsh", "-n", str(COMPLETIONS / "_xpuctl")],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ},
    )
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["--socket", "status", "devices", "--wide"],  # a socket path that reads like a command
        ["--json", "alloc", "--memory", "8G", "--compute", "30%", "--ttl", "1h"],
        ["run", "--memory", "1G", "--compute", "5", "--", "pool", "--json"],
        ["pool", "--model", "A100|H100", "--socket", "/x", "--json"],
    ],
)
def test_building_one_command_parses_like_the_whole_parser(argv: list[str]) -> None:
    from agent.cli.xpuctl import chosen_command

    only = chosen_command(argv)
    assert only is not None and only in COMMANDS
    assert build_parser(only).parse_args(argv) == build_parser().parse_args(argv)


def test_unknown_command_lists_the_known_ones() -> None:
    result = run_cli("stauts")
    assert result.returncode == 2
    assert "invalid choice: 'stauts'" in result.stderr and "alloc" in result.stderr


def test_devices_and_leases_fit_with_many_long_rows() -> None:
    devices = [
        {
            "id": f"nvidia-GPU-{i:02d}4b2e0d3c-1111-2222-3333-444455556666",
            "model": "NVIDIA H100 80GB HBM3 with a very long marketing name",
            "memory_used_mib": 1024.0 * i,
            "memory_total_mib": 81920,
            "utilisation_pct": 37.0,
            "slice_count": 3,
            "allocated_compute_pct": 90,
            "allocated_memory_mib": 65536,
            "health": "warning",
            "health_reason": "xid 79: GPU has fallen off the bus (twice in the last hour)",
            "slices": [],
        }
        for i in range(64)
    ]
    leases = [
        {
            "slice_id": f"s-{i:012x}",
            "lender": f"gpu-{i:04d}.rack{i % 40:02d}.site-a.example.internal",
            "device": f"nvidia-GPU-{i:02d}4b2e0d3c-1111-2222-3333-444455556666",
            "memory_mib": 8192,
            "compute_pct": 30,
            "expires_at": None,
            "owner_uid": 1000,
        }
        for i in range(64)
    ]
    for text in (render.devices_text(devices, 80), render.leases_text(leases, 80)):
        lines = text.splitlines()
        assert max(len(line) for line in lines) <= 80, max(lines, key=len)
        assert len(lines) == 2 + 64  # one line per row, nothing wrapped
    assert "s-00000000003f" in render.leases_text(leases, 80)  # ids are never cut
    wide = render.devices_text(devices, None)
    assert devices[0]["health_reason"] in wide  # type: ignore[operator]
