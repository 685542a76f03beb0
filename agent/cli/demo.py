"""``xpu-agent demo``: a self-contained local cluster for a first look.

N agents on mock cards and an MQTT broker — a local ``mosquitto`` when one is installed,
else an embedded ``amqtt`` broker (``pip install 'xpu-agent[demo]'``) — with every file
under ``./.run/demo``, in the foreground until Ctrl-C. No root needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from agent.client.http import AgentClient, ClientError

DEMO_DIR = Path(".run/demo")
ZONE = "demo"
#: Mock cards per node, in turn: different models make ``place --model`` interesting.
FLEET = (
    ("MockA100-80G", 81920, 4),
    ("MockH100-80G", 81920, 2),
    ("Ascend910B3", 65536, 8),
    ("MockL40S-48G", 49152, 4),
)
NO_BROKER = 3
SOCKET_PATH_MAX = 104
_SBIN = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


@dataclass(frozen=True, slots=True)
class Broker:
    kind: str  # "mosquitto" | "amqtt"
    program: str


def find_broker() -> Broker | None:
    """A local mosquitto (PATH, then the sbin dirs), else amqtt if importable."""
    found = shutil.which("mosquitto") or next((p for p in _SBIN if os.access(p, os.X_OK)), None)
    if found:
        return Broker("mosquitto", found)
    if importlib.util.find_spec("amqtt") is not None:
        return Broker("amqtt", sys.executable)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the broker exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the broker did not listen on port {port} within {timeout_s:g}s")


def _start_broker(broker: Broker, base: Path, port: int) -> subprocess.Popen[bytes]:
    log = open(base / "broker.log", "wb")  # noqa: SIM115 - handed to the child
    if broker.kind == "mosquitto":
        config = base / "mosquitto.conf"
        config.write_text(
            f"listener {port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "set_tcp_nodelay true\n"
        )
        command = [broker.program, "-c", str(config)]
    else:
        command = [broker.program, "-m", "agent.cli.demo", "--amqtt-port", str(port)]
    try:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=base)
    finally:
        log.close()


def _agent_config(base: Path, index: int, port: int) -> Path:
    node = f"node-{index}"
    folder = base / node
    folder.mkdir(parents=True, exist_ok=True)
    model, memory_mib, count = FLEET[(index - 1) % len(FLEET)]
    config = folder / "agent.toml"
    config.write_text(
        "version = 1\n"
        f'[node]\nname = "{node}"\nzone = "{ZONE}"\n'
        f'[paths]\nstate_dir = "{folder / "state"}"\nsocket = "{folder / "agent.sock"}"\n'
        '[api]\nsocket_group = ""\n'
        '[backends]\nenabled = ["mock"]\n'
        "[backends.mock]\n"
        f'devices = [{{ model = "{model}", memory_mib = {memory_mib}, count = {count} }}]\n'
        f'[mqtt]\nurl = "mqtt://127.0.0.1:{port}"\nkeepalive_s = 5\nheartbeat_s = 10\n'
        "[pool]\npeer_ttl_s = 30\nidle_after_s = 60\n"
        # Every demo node is this machine: run --pool "dispatches" with a local launcher
        # (`env sh -c ...`) to the lender's own xpuctl and socket, no sshd needed.
        f'launcher = ["env"]\nremote_xpuctl = "{_xpuctl_path()}"\n'
    )
    return config


def _wait_ready(
    sockets: list[Path], procs: list[subprocess.Popen[bytes]], timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    pending = dict(zip(sockets, procs, strict=True))
    while pending and time.monotonic() < deadline:
        for path, proc in list(pending.items()):
            if proc.poll() is not None:
                raise RuntimeError(f"agent {path.parent.name} exited ({proc.returncode})")
            with contextlib.suppress(ClientError):
                if path.exists() and AgentClient(str(path), timeout_s=1).get("/v1/health"):
                    del pending[path]
        time.sleep(0.1)
    if pending:
        raise RuntimeError(
            f"agents not ready in {timeout_s:g}s: {sorted(p.parent.name for p in pending)}"
        )


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _xpuctl_path() -> str:
    beside = Path(sys.executable).parent / "xpuctl"
    return str(beside) if beside.exists() else "xpuctl"


def _xpuctl() -> str:
    beside = Path(sys.executable).parent / "xpuctl"
    if beside.exists():
        return _shown(beside)
    return "xpuctl"


def _stop(procs: list[subprocess.Popen[bytes]], timeout_s: float = 15.0) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(nodes: int, base: Path = DEMO_DIR, out: TextIO = sys.stdout) -> int:
    broker = find_broker()
    if broker is None:
        print(
            "xpu-agent demo: no MQTT broker: install mosquitto (apt-get install mosquitto) "
            "or the embedded one (pip install 'xpu-agent[demo]')",
            file=sys.stderr,
        )
        return NO_BROKER
    base = base.resolve()
    base.mkdir(parents=True, exist_ok=True)
    sockets = [base / f"node-{i}" / "agent.sock" for i in range(1, nodes + 1)]
    if len(str(sockets[-1])) > SOCKET_PATH_MAX:
        print(f"xpu-agent demo: {sockets[-1]} is too long for a Unix socket", file=sys.stderr)
        return 2
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    port = _free_port()
    agents: list[subprocess.Popen[bytes]] = []
    broker_proc = _start_broker(broker, base, port)
    try:
        _wait_listening(port, broker_proc, 10)
        for index in range(1, nodes + 1):
            config = _agent_config(base, index, port)
            with open(config.parent / "agent.log", "wb") as log:
                agents.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "agent.cli.daemon_main", "--config", str(config)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                )
        _wait_ready(sockets, agents, 30)
        _announce(out, broker, port, base, sockets)
        while not stop.wait(0.5):
            named = [("the broker", broker_proc)] + [
                (f"node-{i}", p) for i, p in enumerate(agents, start=1)
            ]
            dead = [name for name, p in named if p.poll() is not None]
            if dead:
                print(f"xpu-agent demo: {dead[0]} exited; stopping", file=out)
                return 1
        print("\nstopping the demo ...", file=out, flush=True)
        return 0
    except RuntimeError as exc:
        print(f"xpu-agent demo: {exc} (logs under {_shown(base)})", file=sys.stderr)
        return 1
    finally:
        _stop(agents)
        _stop([broker_proc], 5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _announce(out: TextIO, broker: Broker, port: int, base: Path, sockets: list[Path]) -> None:
    xpuctl = _xpuctl()
    first = _shown(sockets[0])
    lines = [
        f"xpu-agent demo: {len(sockets)} agents on mock cards, {broker.kind} broker on "
        f"127.0.0.1:{port}, files under {_shown(base)}",
        "",
        "Try, in another terminal:",
        f"  {xpuctl} --socket {first} pool",
        f"  {xpuctl} --socket {first} place --memory 8GiB --compute 30",
        f"  {xpuctl} --socket {first} place --memory 8GiB --compute 30 --model H100",
        f"  {xpuctl} --socket {first} borrow --memory 8GiB --compute 30",
        f"  {xpuctl} --socket {first} leases",
        f"  {xpuctl} --socket {first} run --pool --memory 8GiB --compute 30 --model H100"
        " -- sh -c 'echo running on $XPU_DEVICE'",
    ]
    if len(sockets) > 1:
        second = _shown(sockets[1])
        lines += [
            f"  {xpuctl} --socket {second} alloc --memory 16GiB --compute 50",
            f"  {xpuctl} --socket {second} events --follow",
        ]
    lines += ["", "Ctrl-C stops everything."]
    print("\n".join(lines), file=out, flush=True)


def check(out: TextIO = sys.stdout) -> int:
    """``--check``: which broker the demo would use."""
    broker = find_broker()
    if broker is None:
        print("no broker: neither mosquitto nor amqtt is available", file=out)
        return NO_BROKER
    print(f"{broker.kind}: {broker.program}", file=out)
    return 0


# -- the embedded broker -----------------------------------------------------------------


async def _serve_amqtt(port: int) -> None:
    broker_module: Any = importlib.import_module("amqtt.broker")
    broker = broker_module.Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
    )
    await broker.start()
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopped.set)
    await stopped.wait()
    await broker.shutdown()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--amqtt-port"]:
        asyncio.run(_serve_amqtt(int(sys.argv[2])))
