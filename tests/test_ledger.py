"""The SQLite ledger: schema versioning, capacity checks in the writing transaction."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from agent.errors import Conflict, DoesNotFit
from agent.ledger import store
from agent.ledger.store import DeviceCapacity, Ledger, LedgerCorruptError
from agent.model import ProcessRef, SliceRequest, SliceState

CAP = DeviceCapacity(memory_mib=1000, compute_pct=100, max_slices=3)


def req(memory: int = 100, compute: int = 10, **kw: object) -> SliceRequest:
    return SliceRequest(memory_mib=memory, compute_pct=compute, owner_uid=1000, **kw)  # type: ignore[arg-type]


def test_code_schema_is_newest_migration(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    assert ledger.schema_version == store.SCHEMA_VERSION == max(v for v, _ in store._migrations())
    db = sqlite3.connect(tmp_path / "l.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    ledger.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    Ledger(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {store.SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(LedgerCorruptError, match="newer"):
        Ledger(path)


def test_corrupt_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    path.write_bytes(b"SQLite format 3\x00" + b"\x01" * 4000)
    with pytest.raises((LedgerCorruptError, sqlite3.DatabaseError)):
        Ledger(path)


def test_migrations_split_where_sqlite_sees_a_statement_end() -> None:
    sql = (
        "-- a migration\n"
        "CREATE TABLE t (a TEXT DEFAULT 'x;y');\n"
        "INSERT INTO t (a) VALUES ('semi; colon');\n"
        "CREATE TRIGGER tr AFTER INSERT ON t BEGIN\n"
        "  UPDATE t SET a = 'b;c' WHERE rowid = new.rowid;\n"
        "END;\n"
        "-- trailing comment\n"
    )
    statements = store.split_statements(sql)
    assert len(statements) == 3, statements  # a naive split(";") makes 7
    db = sqlite3.connect(":memory:")
    for statement in statements:
        db.execute(statement)
    assert db.execute("SELECT a FROM t").fetchone() == ("semi; colon",)
    db.close()
    with pytest.raises(LedgerCorruptError, match="incomplete"):
        store.split_statements("CREATE TABLE u (a INT")


def test_dangling_foreign_keys_are_refused_at_start(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    ledger = Ledger(path)
    s, _ = ledger.allocate("d0", CAP, req(), 1.0)
    ledger.close()
    db = sqlite3.connect(path)  # foreign keys are off on a connection that does not ask
    db.execute("INSERT INTO bindings (slice_id, pid, start_time) VALUES ('s-gone', 1, 1.0)")
    db.commit()
    db.close()
    with pytest.raises(LedgerCorruptError, match="dangling foreign key in bindings"):
        Ledger(path)
    assert s.id


def test_capacity_is_checked_in_the_transaction(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    now = time.time()
    ledger.allocate("d0", CAP, req(600, 50), now)
    with pytest.raises(DoesNotFit, match="free 400 MiB"):
        ledger.allocate("d0", CAP, req(500, 10), now)
    with pytest.raises(DoesNotFit):
        ledger.allocate("d0", CAP, req(100, 60), now)
    ledger.allocate("d0", CAP, req(100, 10), now)
    ledger.allocate("d0", CAP, req(100, 10), now)
    with pytest.raises(DoesNotFit, match="0 slice"):
        ledger.allocate("d0", CAP, req(10, 1), now)
    assert ledger.usage()["d0"].slices == 3
    ledger.close()


def test_request_id_returns_the_same_slice(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    first, event = ledger.allocate("d0", CAP, req(request_id="k"), time.time())
    again, none = ledger.allocate("d0", CAP, req(request_id="k"), time.time())
    assert event is not None and none is None and again.id == first.id
    other = SliceRequest(memory_mib=100, compute_pct=10, owner_uid=1001, request_id="k")
    assert ledger.allocate("d0", CAP, other, time.time())[0].id != first.id
    ledger.close()


def test_end_bind_expire_and_lost(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    now = time.time()
    s, _ = ledger.allocate("d0", CAP, req(ttl_s=5), now)
    ref = ProcessRef(12345, 1.0)
    assert ledger.bind(s.id, ref, "api") is not None
    assert ledger.bind(s.id, ref, "api") is None  # already bound: no second event
    assert ledger.get(s.id).processes == (ref,)
    assert ledger.expired(now + 1) == []
    assert ledger.expired(now + 6) == [s.id]
    assert [e.kind for e in ledger.set_lost([s.id], True, "gone")] == ["slice.lost"]
    assert ledger.get(s.id).state is SliceState.LOST
    assert ledger.usage()["d0"].slices == 1  # a lost slice keeps its capacity
    ledger.set_lost([s.id], False, "back")
    ended, event = ledger.end(s.id, SliceState.EXPIRED, "ttl", now + 6)
    assert ended.state is SliceState.EXPIRED and ended.processes == ()
    assert event.kind == "slice.expired"
    with pytest.raises(Conflict, match="already expired"):
        ledger.end(s.id, SliceState.RELEASED, "again", now + 7)
    assert [h.id for h in ledger.history(now)] == [s.id]
    assert ledger.forget_history(now + 100) == 1
    ledger.close()


def test_stopped_processes_are_remembered(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    ledger = Ledger(path)
    ledger.mark_stopped(ProcessRef(42, 2.5), "s-x", True)
    ledger.close()
    reopened = Ledger(path)
    assert reopened.stopped() == [(ProcessRef(42, 2.5), "s-x")]
    reopened.mark_stopped(ProcessRef(42, 2.5), None, False)
    assert reopened.stopped() == []
    reopened.close()


async def test_group_commit_isolates_a_failing_call(tmp_path: Path) -> None:
    """Calls queued together share one COMMIT; one that fails is undone alone."""
    import asyncio

    from agent.ledger.worker import LedgerWorker

    path = tmp_path / "l.sqlite"
    worker = LedgerWorker(Ledger(path))

    def make(memory: int) -> object:
        def call() -> object:
            ledger = worker._ledger
            return ledger.allocate("d0", CAP, req(memory), time.time())[0].id

        return call

    def broken() -> object:
        worker._ledger.record_event("half", {})
        raise RuntimeError("fails after writing")

    # Hold the ledger thread so that the four calls queue up and run as *one* batch: the
    # broken one must then be undone by its own SAVEPOINT while the others commit.
    gate = threading.Event()
    held = worker.submit(lambda: gate.wait(10))
    await asyncio.sleep(0.05)
    futures = [
        worker.submit(make(100)),
        worker.submit(broken),
        worker.submit(make(200)),
        worker.submit(make(5000)),
    ]
    gate.set()
    await held
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert isinstance(results[1], RuntimeError)
    assert isinstance(results[3], DoesNotFit)
    assert (worker.batches, worker.calls) == (2, 5), "the four calls shared one transaction"
    worker.close()
    reopened = Ledger(path)
    assert sorted(s.memory_mib for s in reopened.live()) == [100, 200]
    assert [e.kind for e in reopened.events()] == ["slice.allocated", "slice.allocated"]
    reopened.close()


def test_a_version_1_ledger_gains_host_resources_and_keeps_its_slices(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    db = sqlite3.connect(path)
    for statement in store.split_statements(dict(store._migrations())[1]):
        db.execute(statement)
    db.execute(
        "INSERT INTO slices (id, device, memory_mib, compute_pct, owner_uid, state, created_at,"
        " token) VALUES ('s-old', 'mock-0', 100, 10, 1000, 'active', 1.0, 't')"
    )
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    ledger = Ledger(path)
    try:
        assert ledger.schema_version == store.SCHEMA_VERSION >= 2
        (old,) = ledger.live()
        assert (old.id, old.cpu_milli, old.host_memory_mib) == ("s-old", 0, 0)
        host = store.HostCapacity(cpu_milli=4000, memory_mib=8192)
        ledger.allocate("mock-0", CAP, req(cpu_milli=3000, host_memory_mib=4096), 2.0, host)
        assert ledger.host_used() == (3000, 4096)
        with pytest.raises(DoesNotFit, match="host CPU: 2000 milli-CPU asked, 1000 free"):
            ledger.allocate("mock-0", CAP, req(cpu_milli=2000), 3.0, host)
        with pytest.raises(DoesNotFit, match="host memory: 5000 MiB asked, 4096 MiB free"):
            ledger.allocate("mock-0", CAP, req(host_memory_mib=5000), 3.0, host)
    finally:
        ledger.close()
