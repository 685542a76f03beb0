"""The black-box attack, replayed against the code users run, with the figures it yields.

- ``fuzz``: schemathesis against the agent's own OpenAPI document (the same run as
  ``tests/test_fuzz_api.py``): requests tried, failures (5xx and contract violations).
- ``mqtt``: adversarial messages at a real agent's inbox and state topics (oversized,
  malformed, deeply nested, spoofed, unknown methods), then a real borrow through the same
  inbox: dropped by reason, agent RSS before/after, whether lending still works.
- ``idle``: (root) 1,100 idle connections of one user under a 1,024-fd limit; how many
  were held, and the wall time of another user's ``xpuctl status`` meanwhile.
- ``kills``: ``kill -9`` at random instants under concurrent alloc/free
  (``tests/test_crash.py``'s clients and checks): kills, requests, losses.
- ``disk``: (root) a 4 MiB tmpfs state directory filled up and freed: the status of a
  write while full, and the time from freeing space to ``health: ok``.

Run: ``python -m benchmarks.attack [--only fuzz,mqtt,idle,kills,disk] [--fuzz-seconds 60]
[--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from agent.bus import payloads
from agent.bus.topics import Kind, Topics
from tests import sim_peers, test_crash
from tests.broker import Mosquitto, mqtt_config, topic_root
from tests.harness import AgentProcess, short_tmpdir, wait_for
from tests.relay import tcp_relay
from tests.test_authz import GROUP, ensure_group, ensure_user
from tests.test_fuzz_api import FUZZ_CONFIG, schemathesis_run
from tests.test_hardening import start_flood

PARTS = ("fuzz", "mqtt", "idle", "kills", "disk")


def fuzz(seconds: int) -> dict[str, Any]:
    agent = AgentProcess(short_tmpdir(), config=FUZZ_CONFIG).start()
    try:
        with tcp_relay(agent.socket) as port:
            run = schemathesis_run(agent, port, Path(tempfile.mkdtemp()), seconds)
    finally:
        agent.cleanup()
    text = run.stdout + run.stderr
    generated = re.search(r"(\d+) generated", text)
    failures = re.search(r"(\d+) found (\d+) unique failures", text)
    return {
        "seconds": seconds,
        "test_cases": int(generated.group(1)) if generated else None,
        "unique_failures": int(failures.group(2)) if failures else 0,
        "exit_code": run.returncode,
    }


def _adversarial(topics: Topics, target: str, n: int) -> list[tuple[str, bytes]]:
    rng = random.Random(7)
    inbox = topics.rpc(target, "borrow")
    now = time.time()
    status = payloads.Status(
        node="someone-else", boot_id="b", seq=1, ts=now, state="online", agent="x", since=now
    )
    kinds: list[tuple[str, bytes]] = [
        (inbox, b"x" * (700 * 1024)),  # over max_payload_bytes
        (inbox, b"{not json"),
        (inbox, b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}"),  # nested
        (topics.rpc(target, "no-such-method"), b"{}"),
        (topics.state(Kind.STATUS, "mallory"), payloads.encode(status)),  # spoofed node
        (topics.state(Kind.CAPACITY, "mallory"), b'{"node": "mallory"}'),
    ]
    return [kinds[rng.randrange(len(kinds))] for _ in range(n)]


def mqtt(n: int) -> dict[str, Any]:
    broker = Mosquitto().start()
    root = topic_root()
    lender = AgentProcess(short_tmpdir(), config=mqtt_config(broker, root, "lender"), node="lender")
    borrower = AgentProcess(
        short_tmpdir(), config=mqtt_config(broker, root, "borrower"), node="borrower"
    )
    try:
        lender.start()
        borrower.start()
        wait_for(lambda: any(p["placeable"] for p in borrower.api("GET", "/v1/pool")[1]), 15)
        assert lender.proc is not None
        rss_before = psutil.Process(lender.proc.pid).memory_info().rss
        client = sim_peers.connect(broker)
        messages = _adversarial(Topics(root, "z", "mallory"), "lender", n)
        started = time.monotonic()
        infos = [client.publish(topic, body, qos=1) for topic, body in messages]
        for info in infos:
            info.wait_for_publish(60)
        client.loop_stop()
        client.disconnect()
        sent_s = time.monotonic() - started

        def counted() -> int:
            return sum(lender.api("GET", "/v1/node")[1]["mqtt"]["dropped"].values())

        last, stable_since = -1, time.monotonic()
        while time.monotonic() - stable_since < 2:
            now = counted()
            if now != last:
                last, stable_since = now, time.monotonic()
            time.sleep(0.2)
        rss_after = psutil.Process(lender.proc.pid).memory_info().rss
        dropped = lender.api("GET", "/v1/node")[1]["mqtt"]["dropped"]
        broker_dropped = broker.log().count("Outgoing messages are being dropped")
        client_dropped = lender.log().count("queue is full")
        lease = borrower.xpuctl(
            "--json", "borrow", "--node", "lender", "--memory", "1GiB", "--compute", "10"
        )
    finally:
        borrower.cleanup()
        lender.cleanup()
        broker.cleanup()
    return {
        "messages": n,
        "seconds": round(sent_s, 1),
        "dropped": {k: v for k, v in dropped.items() if v},
        "dropped_total": sum(dropped.values()),
        "broker_queue_drop_notices": broker_dropped,
        "client_queue_full_notices": client_dropped,
        "rss_mib_before": round(rss_before / 2**20, 1),
        "rss_mib_after": round(rss_after / 2**20, 1),
        "borrow_after": "ok" if lease.returncode == 0 else lease.stderr.strip(),
    }


def idle(n: int) -> dict[str, Any]:
    if os.geteuid() != 0:
        return {"skipped": "needs root (another user, prlimit)"}
    ensure_group(GROUP)
    flooder = ensure_user("xa-flooder", [GROUP])
    agent = AgentProcess(short_tmpdir(), config=f'[api]\nsocket_group = "{GROUP}"\n').start()
    try:
        assert agent.proc is not None
        os.chmod(agent.dir, 0o755)
        resource.prlimit(agent.proc.pid, resource.RLIMIT_NOFILE, (1024, 1024))
        # 30 s held; api.max_connections_per_uid (64) of them stay open.
        flood = start_flood(agent.socket, flooder.uid, n, hold_s=30, keep=64)
        assert flood.stdout is not None
        connected, closed = map(int, flood.stdout.readline().split())
        time.sleep(1)
        times = []
        for _ in range(20):
            started = time.monotonic()
            ok = agent.xpuctl("status").returncode == 0
            times.append((time.monotonic() - started, ok))
        flood.kill()
        flood.wait()
        flood.stdout.close()
    finally:
        agent.cleanup()
    return {
        "connections_opened": connected,
        "closed_by_the_agent": closed,
        "held_open": connected - closed,
        "other_user_status_ok": sum(ok for _, ok in times),
        "other_user_status_p50_ms": round(1000 * sorted(t for t, _ in times)[10], 1),
        "fd_limit": 1024,
    }


def kills(k: int) -> dict[str, Any]:
    agent = AgentProcess(
        short_tmpdir(),
        config=f"[slicing]\nmax_slices_per_device = {test_crash.MAX_SLICES}\n",
        mock_devices=f'[{{ model = "M", memory_mib = {test_crash.CARD_MIB}, '
        f"count = {test_crash.CARDS} }}]",
    ).start()
    record = test_crash.Record()
    stop = threading.Event()
    threads = [
        threading.Thread(target=test_crash.client, args=(agent, f"c{i}", record, stop), daemon=True)
        for i in range(4)
    ]
    for thread in threads:
        thread.start()
    rng = random.Random(99)
    problems = 0
    try:
        for _ in range(k):
            time.sleep(rng.uniform(0.05, 0.5))
            agent.kill9()
            try:
                test_crash.check(agent, record)
            except AssertionError:
                problems += 1
            agent.start()
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        agent.cleanup()
    return {
        "kills": k,
        "requests": record.requests,
        "answered": record.answered,
        "acknowledged_slices": len(record.acked),
        "inconsistencies": problems,
    }


def disk() -> dict[str, Any]:
    if os.geteuid() != 0:
        return {"skipped": "needs root (tmpfs)"}
    where = short_tmpdir("xfull")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], check=True)
    agent = AgentProcess(short_tmpdir())
    agent.config_path.write_text(
        agent.config_path.read_text().replace(str(agent.state), str(where / "state"))
    )
    try:
        agent.start()
        filler = where / "filler"
        with filler.open("wb") as out:
            try:
                while True:
                    out.write(b"\0" * 65536)
                    out.flush()
            except OSError:
                pass
        status, _, _ = agent.api("POST", "/v1/slices", {"memory_mib": 1024, "compute_pct": 10})
        health = agent.api("GET", "/v1/health")[1]
        filler.unlink()
        freed = time.monotonic()
        wait_for(lambda: agent.api("GET", "/v1/health")[1]["status"] == "ok", 15, 0.02)
        recovered = time.monotonic() - freed
        after, _, _ = agent.api("POST", "/v1/slices", {"memory_mib": 1024, "compute_pct": 10})
    finally:
        agent.cleanup()
        subprocess.run(["umount", "-l", str(where)], check=False)
    return {
        "write_while_full": status,
        "health_while_full": health["status"],
        "recovery_s": round(recovered, 2),
        "write_after": after,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(PARTS))
    parser.add_argument("--fuzz-seconds", type=int, default=60)
    parser.add_argument("--mqtt-messages", type=int, default=11_000)
    parser.add_argument("--idle", type=int, default=1100)
    parser.add_argument("--kills", type=int, default=60)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    wanted = args.only.split(",")
    results: dict[str, Any] = {}
    runs = {
        "fuzz": lambda: fuzz(args.fuzz_seconds),
        "mqtt": lambda: mqtt(args.mqtt_messages),
        "idle": lambda: idle(args.idle),
        "kills": lambda: kills(args.kills),
        "disk": disk,
    }
    for part in PARTS:
        if part in wanted:
            results[part] = runs[part]()
            if not args.json:
                print(part, json.dumps(results[part]), flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
