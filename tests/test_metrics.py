"""Prometheus metrics as an operator meets them: scrape the real daemon over its socket and
over the loopback listener, read the node_exporter textfile, parse with prometheus_client."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent import __version__
from agent.api.metrics import Metrics, device_label_values, write_atomically
from agent.backends.base import Backend
from agent.config import ConfigError, from_mapping, parse_listen
from agent.core.caller import Caller
from agent.core.events import EventHub
from agent.core.inventory import Inventory
from agent.core.pool import LinkState, Peer, PeerDevice, StandalonePool
from agent.core.service import NodeService
from agent.ledger.store import Ledger
from agent.model import Device, DeviceSample, Health, SliceRequest, Vendor
from tests.broker import MOSQUITTO, Mosquitto, mqtt_config, topic_root
from tests.harness import REPO, AgentProcess, agent_env, wait_for

GIB = 1024**3
Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse(text: str) -> Samples:
    """Every sample by name: [(labels without empty values, value)]."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if v != ""}
            out.setdefault(sample.name, []).append((labels, sample.value))
    return out


def one(samples: Samples, name: str, **labels: str) -> float:
    found = [v for lab, v in samples.get(name, []) if labels.items() <= lab.items()]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape_tcp(port: int, path: str = "/metrics") -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(), resp.getheader("Content-Type", "")
    finally:
        conn.close()


# -- the real daemon ------------------------------------------------------------------------


def test_socket_scrape_after_allocation(agent: AgentProcess) -> None:
    slice_ = agent.xpuctl(
        "--json",
        "alloc",
        "--memory",
        "8GiB",
        "--compute",
        "30",
        "--device",
        "mock-1",
        "--ttl",
        "1h",
    )
    assert slice_.returncode == 0, slice_.stderr
    status, text, ctype = agent.api("GET", "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain") and "version=0.0.4" in ctype
    m = parse(text)

    assert one(m, "xpu_agent_build_info", version=__version__, node="test-node") == 1
    # The exporters' join keys are on every device series.
    dev1 = {"device": "mock-1", "uuid": "MOCK-test-node-1", "pci_bus_id": "0000:11:00.0"}
    assert one(m, "xpu_agent_device_memory_total_bytes", **dev1) == 80 * GIB
    assert one(m, "xpu_agent_device_memory_allocated_bytes", **dev1) == 8 * GIB
    assert one(m, "xpu_agent_device_memory_allocated_bytes", device="mock-0") == 0
    assert one(m, "xpu_agent_device_compute_allocated_ratio", **dev1) == pytest.approx(0.3)
    assert one(m, "xpu_agent_device_health", state="ok", **dev1) == 1
    assert one(m, "xpu_agent_device_health", state="lost", **dev1) == 0
    assert one(m, "xpu_agent_slices", state="active", **dev1) == 1
    assert one(m, "xpu_agent_slices", state="active", device="mock-0") == 0
    info = m["xpu_agent_device_info"]
    assert {lab["device"]: lab["model"] for lab, _ in info}["mock-3"] == "MockA100-80G"

    sid = agent.api("GET", "/v1/slices")[1][0]["id"]
    on = {"slice": sid, **dev1}
    assert one(m, "xpu_agent_slice_memory_limit_bytes", **on) == 8 * GIB
    assert one(m, "xpu_agent_slice_compute_quota_ratio", **on) == pytest.approx(0.3)
    assert one(m, "xpu_agent_slice_throttled", **on) == 0
    assert one(m, "xpu_agent_slice_processes", **on) == 0
    assert one(m, "xpu_agent_slice_expiry_timestamp_seconds", **on) == pytest.approx(
        time.time() + 3600, abs=60
    )
    assert one(m, "xpu_agent_slice_info", owner_uid=str(os.getuid()), state="active", **on) == 1

    # Standalone: no bus, no peers; 8 GiB of 320 GiB and 30 % of 400 % promised.
    assert one(m, "xpu_agent_mqtt_connected") == 0
    assert one(m, "xpu_agent_mqtt_enabled") == 0
    assert "xpu_agent_pool_peers" not in m
    assert one(m, "xpu_agent_node_lendable_memory_bytes") == 312 * GIB
    assert one(m, "xpu_agent_node_lendable_compute_ratio") == pytest.approx(370 / 400)
    assert "process_resident_memory_bytes" in m

    # Measured use appears with the next sample; base units, not MiB or percent.
    wait_for(lambda: "xpu_agent_slice_memory_used_bytes" in parse(agent.api("GET", "/metrics")[1]))

    agent.xpuctl("free", sid)
    after = parse(agent.api("GET", "/metrics")[1])
    assert one(after, "xpu_agent_device_memory_allocated_bytes", **dev1) == 0
    assert "xpu_agent_slice_memory_limit_bytes" not in after


def test_loopback_listener_serves_metrics_only(agent_factory: Callable[..., AgentProcess]) -> None:
    port = free_port()
    agent = agent_factory(config=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    agent.xpuctl("alloc", "--memory", "4GiB", "--compute", "20")
    status, text, ctype = wait_for(lambda: _try_tcp(port))
    assert status == 200 and "version=0.0.4" in ctype
    m = parse(text)
    assert one(m, "xpu_agent_slices", state="active", device="mock-0") == 1
    assert one(m, "xpu_agent_device_memory_allocated_bytes", device="mock-0") == 4 * GIB
    # The listener has no identity to check: everything but /metrics is refused there.
    assert scrape_tcp(port, "/v1/slices")[0] == 403
    assert scrape_tcp(port, "/v1/health")[0] == 403


def _try_tcp(port: int) -> tuple[int, str, str] | None:
    try:
        return scrape_tcp(port)
    except OSError:
        return None


def test_port_in_use_keeps_the_socket_api(agent_factory: Callable[..., AgentProcess]) -> None:
    """A failing listener is a failing subsystem: retried, never fatal to the local API."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        agent = agent_factory(config=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
        assert agent.xpuctl("status").returncode == 0
        wait_for(lambda: "metrics-listener" in agent.log() and "restarting" in agent.log())
        assert agent.api("GET", "/metrics")[0] == 200


@pytest.mark.parametrize(
    "listen", ["0.0.0.0:9464", "10.1.2.3:9464", "[::]:9464", "example.org:9464", "9464"]
)
def test_non_loopback_listener_is_refused_at_start(listen: str, tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'version = 1\n[metrics]\nlisten = "{listen}"\n')
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli.daemon_main", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**agent_env(), "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("xpu-agent: config error: metrics.listen: "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_listen_parsing() -> None:
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("127.8.0.1:1") == ("127.8.0.1", 1)
    assert parse_listen("[::1]:9464") == ("::1", 9464)
    assert parse_listen("localhost:9464") == ("localhost", 9464)
    for bad in ("127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", ":9464", "127.0.0.1:x"):
        with pytest.raises(ValueError, match="host:port"):
            parse_listen(bad)
    for key, value, words in [
        ("textfile", "relative.prom", "absolute"),
        ("textfile", "/var/lib/x/xpu.txt", ".prom"),
        ("textfile_interval_s", 0.0, "0.1..3600"),
    ]:
        with pytest.raises(ConfigError, match=words) as err:
            from_mapping({"version": 1, "metrics": {key: value}})
        assert err.value.key == f"metrics.{key}"


def test_textfile_written_atomically_and_removed_on_stop(
    agent_factory: Callable[..., AgentProcess],
) -> None:
    outdir = Path(agent_env().get("TMPDIR", "/tmp")) / f"xa-textfile-{os.getpid()}"
    target = outdir / "xpu_agent.prom"
    agent = agent_factory(config=f'[metrics]\ntextfile = "{target}"\ntextfile_interval_s = 0.1\n')
    try:
        agent.xpuctl("alloc", "--memory", "2GiB", "--compute", "10")
        wait_for(target.exists)
        assert stat.S_IMODE(target.stat().st_mode) == 0o644  # node_exporter's user reads it
        inodes: set[int] = set()
        torn: list[str] = []
        stop = threading.Event()

        def reader() -> None:
            # A reader opening the file at any moment sees a whole exposition.
            while not stop.is_set():
                try:
                    inodes.add(target.stat().st_ino)
                    text = target.read_text()
                except FileNotFoundError:
                    torn.append("missing")
                    continue
                if not text.endswith("\n") or "xpu_agent_build_info" not in text:
                    torn.append(text[-80:])

        thread = threading.Thread(target=reader)
        thread.start()
        time.sleep(1.5)
        stop.set()
        thread.join()
        assert torn == []
        assert len(inodes) >= 3, "the file is replaced (a new inode), not rewritten in place"
        m = parse(target.read_text())
        assert one(m, "xpu_agent_slices", state="active", device="mock-0") == 1
        # node_exporter has its own process_* series; a duplicate would fail its scrape.
        assert not any(name.startswith("process_") for name in m)
        # Only the target is a .prom file (a write may be in flight under a .tmp name).
        assert [p.name for p in outdir.glob("*.prom")] == ["xpu_agent.prom"]
        assert agent.stop() == 0, agent.log()[-4000:]
        # Removed at stop, and no write in flight brings it back or leaves a temporary.
        assert list(outdir.iterdir()) == []
    finally:
        for leftover in outdir.glob("*"):
            leftover.unlink()
        outdir.rmdir()


def test_write_atomically_sets_mode_and_leaves_no_temporaries(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        target = tmp_path / "sub" / "x.prom"
        write_atomically(target, b"a 1\n")
        write_atomically(target, b"a 2\n")
    finally:
        os.umask(old)
    assert target.read_bytes() == b"a 2\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["x.prom"]


# -- the collector against a real core, with the pool and vendors the daemon cannot fake ----


class _Cards(Backend):
    name = "fixed"

    def __init__(self, devices: Sequence[Device]) -> None:
        self._devices = list(devices)

    async def discover(self) -> Sequence[Device]:
        return self._devices

    async def sample(self, bound: Mapping[str, frozenset[int]]) -> Sequence[DeviceSample]:
        return []


class _Bus(StandalonePool):
    def link(self) -> LinkState:
        return LinkState(enabled=True, connected=True, url="mqtt://b:1883", state="connected")

    def peers(self) -> Sequence[Peer]:
        card = PeerDevice("npu-0-0", "Ascend910B3", "ascend", "ok", 65536, 32768, 50, 1)
        now = 1000.0  # heard 2.5 s, 1 s and 99 s ago on the peers' clock
        return (
            Peer(
                "b-node", "online", True, now - 2.5, "0.1.0", (card,), 32768, 50, clock=lambda: now
            ),
            Peer(
                "a-node", "online", True, now - 1.0, "0.1.0", (card,), 1024, 10, clock=lambda: now
            ),
            Peer("c-node", "offline", False, now - 99, "0.1.0", (), 0, 0, clock=lambda: now),
        )


ASCEND = Device(
    id="npu-3-0",
    backend="fixed",
    vendor=Vendor.ASCEND,
    model="Ascend910B3",
    index=3,
    memory_total_mib=65536,
    pci_bus_id="0000:C1:00.0",
)
NVIDIA = Device(
    id="GPU-1234",
    backend="fixed",
    vendor=Vendor.NVIDIA,
    model="NVIDIA A100-SXM4-80GB",
    index=0,
    memory_total_mib=81920,
    uuid="GPU-1234",
    pci_bus_id="00000000:3B:00.0",
    health=Health.UNHEALTHY,
    health_reason="Xid 79",
)


async def test_collector_labels_vendors_and_reports_the_pool(tmp_path: Path) -> None:
    config = from_mapping({"version": 1, "node": {"name": "n1"}})
    inventory = Inventory([_Cards([ASCEND, NVIDIA])])
    await inventory.discover()
    service = NodeService(config, inventory, Ledger(tmp_path / "l.sqlite"), EventHub())
    await service.open()
    try:
        root = Caller(uid=0, gid=0, pid=os.getpid(), admin=True)
        await service.allocate(root, SliceRequest(memory_mib=16384, compute_pct=40, owner_uid=0))
        metrics = Metrics(service, _Bus(), restarts={"sampler": 2}, process_metrics=False)
        m = parse(metrics.render().decode())
    finally:
        await service.close()

    # Ascend series carry npu-exporter's `id` (the logical chip id) and no uuid.
    npu = {"device": "npu-3-0", "id": "3", "pci_bus_id": "0000:C1:00.0"}
    assert one(m, "xpu_agent_device_memory_allocated_bytes", **npu) == 16 * GIB
    labels = next(lab for lab, _ in m["xpu_agent_device_info"] if lab["device"] == "npu-3-0")
    assert "uuid" not in labels and labels["vendor"] == "ascend"
    # NVIDIA series carry dcgm-exporter's uuid and pci_bus_id, and no `id`.
    gpu = {"device": "GPU-1234", "uuid": "GPU-1234", "pci_bus_id": "00000000:3B:00.0"}
    labels = next(lab for lab, _ in m["xpu_agent_device_info"] if lab["device"] == "GPU-1234")
    assert "id" not in labels
    assert one(m, "xpu_agent_device_health", state="unhealthy", **gpu) == 1
    assert one(m, "xpu_agent_device_health", state="ok", **gpu) == 0
    # The slice went to the healthy card.
    assert one(m, "xpu_agent_slices", state="active", **npu) == 1

    assert one(m, "xpu_agent_mqtt_connected") == 1
    assert one(m, "xpu_agent_pool_peers", state="online", placeable="true") == 2
    assert one(m, "xpu_agent_pool_peers", state="offline", placeable="false") == 1
    assert one(m, "xpu_agent_pool_peer_age_seconds", peer="b-node") == 2.5
    assert one(m, "xpu_agent_pool_peer_lendable_memory_bytes", peer="a-node") == GIB
    assert one(m, "xpu_agent_task_restarts_total", task="sampler") == 2
    assert not any(name.startswith("process_") for name in m)


@pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed (make deps)")
def test_pool_and_bus_figures_from_real_peers(agent_factory: Callable[..., AgentProcess]) -> None:
    broker = Mosquitto().start()
    try:
        root = topic_root()
        a, b = (agent_factory(node=name, config=mqtt_config(broker, root, name)) for name in "ab")

        def seen() -> Samples | None:
            # b's status, capacity and idle messages arrive separately.
            m = parse(a.api("GET", "/metrics")[1])
            peers = m.get("xpu_agent_pool_peers", [])
            lends = m.get("xpu_agent_pool_peer_lendable_memory_bytes", [])
            placeable = ({"state": "online", "placeable": "true"}, 1.0) in peers
            return m if placeable and ({"peer": "b"}, 320 * GIB) in lends else None

        m = wait_for(seen, 15)
        assert one(m, "xpu_agent_mqtt_connected") == 1 and one(m, "xpu_agent_mqtt_enabled") == 1
        assert one(m, "xpu_agent_pool_peers", state="online", placeable="true") == 1
        assert one(m, "xpu_agent_pool_peer_lendable_memory_bytes", peer="b") == 320 * GIB
        assert 0 <= one(m, "xpu_agent_pool_peer_age_seconds", peer="b") < 60
        b.stop()
        wait_for(
            lambda: (
                "online"
                not in {
                    lab["state"]
                    for lab, _ in parse(a.api("GET", "/metrics")[1]).get("xpu_agent_pool_peers", [])
                }
            ),
            15,
        )
    finally:
        broker.cleanup()


def test_grafana_dashboard_queries_only_exported_metrics(agent: AgentProcess) -> None:
    dashboard = json.loads((REPO / "docs" / "grafana-dashboard.json").read_text())
    exported = set(re.findall(r"^# TYPE (\S+) ", agent.api("GET", "/metrics")[1], re.M))
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    used = set(re.findall(r"\b(?:xpu_agent|process)_\w+", " ".join(queries)))
    assert used and used <= exported, used - exported
    for family in (
        "xpu_agent_slice_",
        "xpu_agent_device_",
        "xpu_agent_pool_peers",
        "xpu_agent_mqtt_connected",
        "xpu_agent_build_info",
    ):
        assert any(name.startswith(family) for name in used), family
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "xpu-agent"


def test_device_label_values_for_unknown_device() -> None:
    assert device_label_values(None, "gone-0") == ["gone-0", "", "", ""]
