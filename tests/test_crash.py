"""kill -9 at random instants under concurrent alloc/free: the ledger stays consistent.

Clients record what the agent *acknowledged*. After every restart, and at the end:
no acknowledged slice is lost, no released one comes back, no request_id has two slices,
and no card ever holds more memory, compute or slices than it has.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.harness import AgentProcess

CARDS = 3
CARD_MIB = 8192
MAX_SLICES = 6
KILLS = 55


@dataclass
class Record:
    lock: threading.Lock = field(default_factory=threading.Lock)
    acked: dict[str, str] = field(default_factory=dict)  # request_id -> slice id
    released: set[str] = field(default_factory=set)  # slice ids acknowledged released
    in_doubt: set[str] = field(default_factory=set)  # request ids sent, answer lost
    releasing: set[str] = field(default_factory=set)  # slice ids whose DELETE had no answer
    requests: int = 0
    answered: int = 0


def client(agent: AgentProcess, name: str, record: Record, stop: threading.Event) -> None:
    rng = random.Random(name)
    mine: list[str] = []
    n = 0
    while not stop.is_set():
        if mine and rng.random() < 0.45:
            slice_id = mine[rng.randrange(len(mine))]
            with record.lock:
                record.releasing.add(slice_id)
            try:
                status, _, _ = agent.api("DELETE", f"/v1/slices/{slice_id}")
            except OSError:
                time.sleep(0.02)
                continue
            if status in (200, 404):
                mine.remove(slice_id)
                with record.lock:
                    record.released.add(slice_id)
                    record.releasing.discard(slice_id)
            continue
        n += 1
        request_id = f"{name}-{n}"
        body = {
            "memory_mib": rng.choice([512, 1024, 2048, 3072]),
            "compute_pct": rng.choice([10, 20, 30, 50]),
            "request_id": request_id,
        }
        with record.lock:
            record.requests += 1
            record.in_doubt.add(request_id)
        try:
            status, slice_, _ = agent.api("POST", "/v1/slices", body)
        except OSError:
            time.sleep(0.02)
            continue
        with record.lock:
            record.answered += 1
            if status in (200, 201):
                record.acked[request_id] = slice_["id"]
                record.in_doubt.discard(request_id)
                mine.append(slice_["id"])
            elif status == 409:
                record.in_doubt.discard(request_id)


def check(agent: AgentProcess, record: Record) -> None:
    db = sqlite3.connect(agent.state / "ledger.sqlite")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = db.execute(
            "SELECT id, device, memory_mib, compute_pct, state, request_id FROM slices"
        ).fetchall()
    finally:
        db.close()
    by_id = {r[0]: r for r in rows}
    with record.lock:
        acked = dict(record.acked)
        released = set(record.released)
        releasing = set(record.releasing)
        known = set(acked) | set(record.in_doubt)
    # Every acknowledged allocation is in the ledger, active unless acknowledged released.
    for request_id, slice_id in acked.items():
        assert slice_id in by_id, f"acknowledged slice {slice_id} ({request_id}) lost"
        if slice_id not in released and slice_id not in releasing:
            assert by_id[slice_id][4] == "active", by_id[slice_id]
    for slice_id in released:
        assert by_id[slice_id][4] != "active", f"released slice {slice_id} came back"
    # No request produced two slices; nothing appeared that no client asked for.
    request_ids = [r[5] for r in rows]
    assert len(request_ids) == len(set(request_ids))
    assert set(request_ids) <= known
    # No card holds more than it has.
    per_card: dict[str, list[int]] = {}
    for _, device, memory, compute, state, _ in rows:
        if state == "active":
            acc = per_card.setdefault(device, [0, 0, 0])
            acc[0] += memory
            acc[1] += compute
            acc[2] += 1
    for device, (memory, compute, count) in per_card.items():
        assert memory <= CARD_MIB and compute <= 100 and count <= MAX_SLICES, (
            device,
            memory,
            compute,
            count,
        )


def test_kill_9_at_random_instants_keeps_the_ledger_consistent(
    agent_factory: Callable[..., AgentProcess],
) -> None:
    agent = agent_factory(
        config=f"[slicing]\nmax_slices_per_device = {MAX_SLICES}\n",
        mock_devices=f'[{{ model = "M", memory_mib = {CARD_MIB}, count = {CARDS} }}]',
    )
    record = Record()
    stop = threading.Event()
    threads = [
        threading.Thread(target=client, args=(agent, f"c{i}", record, stop), daemon=True)
        for i in range(4)
    ]
    for thread in threads:
        thread.start()
    rng = random.Random(1234)
    try:
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.05, 0.5))
            agent.kill9()
            check(agent, record)
            agent.start()
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    check(agent, record)
    status, live, _ = agent.api("GET", "/v1/slices")
    assert status == 200
    with record.lock:
        assert record.answered > 4 * KILLS, "clients must have raced the kills"
        live_ids = {s["id"] for s in live}
        expected = {
            sid
            for sid in record.acked.values()
            if sid not in record.released and sid not in record.releasing
        }
    assert expected <= live_ids
