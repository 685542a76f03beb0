"""The durable slice ledger on SQLite.

Done the way zigpy's appdb does it: WAL, an integrity check at start, ``PRAGMA
user_version`` migrations (one SQL file per version) applied in one transaction. Unlike a
write-behind cache, every mutation commits (``synchronous=FULL``) before it returns, so an
acknowledged slice survives ``kill -9``. Capacity is re-checked inside the writing
transaction, so the ledger never holds more on a card than the card has.

The store is synchronous and not thread-safe: the core owns it from one worker thread.

Size: every statement that touches the SQLite file is in this one class, so that the
transaction discipline (one writer thread, savepoints, durable commits) is seen whole.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from agent.errors import (
    BadRequest,
    Conflict,
    DoesNotFit,
    LedgerUnavailable,
    NotFound,
    StorageFull,
    XpuError,
)
from agent.model import (
    LEASE_STATES,
    Event,
    Lease,
    LeaseState,
    ProcessRef,
    Slice,
    SliceRequest,
    SliceState,
)

LIVE_STATES = (SliceState.ACTIVE.value, SliceState.LOST.value)
#: Written out, not bound: SQLite uses the partial index ``slices_live`` only when a query's
#: WHERE literally implies the index's WHERE, and a bound parameter does not.
LIVE_SQL = "state IN ('active', 'lost')"
EVENTS_KEPT = 10_000


class LedgerCorruptError(XpuError):
    title = "Ledger corrupt"


def split_statements(sql: str) -> list[str]:
    """A migration file's statements, split where SQLite itself sees one end
    (``sqlite3.complete_statement``), so a ``;`` inside a string or a trigger body does not
    cut a statement in two."""
    statements: list[str] = []
    pending = ""
    for line in sql.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            if pending.strip():
                statements.append(pending.strip())
            pending = ""
    if pending.strip() and not all(
        part.strip().startswith("--") or not part.strip() for part in pending.splitlines()
    ):
        raise LedgerCorruptError(f"incomplete statement at the end of a migration: {pending!r}")
    return statements


def _migrations() -> list[tuple[int, str]]:
    folder = resources.files("agent.ledger") / "migrations"
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.read_text(encoding="utf-8")))
    return sorted(found)


SCHEMA_VERSION = max(v for v, _ in _migrations())


@dataclass(frozen=True, slots=True)
class HostCapacity:
    """Host CPU (milli) and memory (MiB) slices may hold: the node's less its reserve."""

    cpu_milli: int
    memory_mib: int


@dataclass(frozen=True, slots=True)
class DeviceCapacity:
    """What the ledger must never exceed on one card."""

    memory_mib: int
    compute_pct: int = 100
    max_slices: int = 10


@dataclass(frozen=True, slots=True)
class Usage:
    memory_mib: int
    compute_pct: int
    slices: int


def new_slice_id() -> str:
    return "s-" + secrets.token_hex(6)


#: SQLite's words for "the disk is full" (a WAL's shared memory that cannot grow is one).
_FULL_CODES = frozenset({"SQLITE_FULL", "SQLITE_IOERR_SHMSIZE"})


def storage_error(exc: BaseException) -> XpuError | None:
    """The caller-facing error for a failed commit, or ``None`` if it is not about storage."""
    if isinstance(exc, XpuError):
        return None
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    if name in _FULL_CODES or "disk is full" in text or "No space left" in text:
        return StorageFull(f"the ledger's disk is full; nothing was changed ({text})")
    if isinstance(exc, sqlite3.OperationalError) and (
        name.startswith("SQLITE_IOERR") or "disk I/O error" in text
    ):
        return LedgerUnavailable(f"the ledger cannot write: {text}; nothing was changed")
    return None


class Ledger:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._savepoints = 0
        #: Why the ledger was opened without its shared memory (None: opened normally).
        self.exclusive_because: str | None = None
        try:
            self._db = self._connect(exclusive=False)
        except sqlite3.OperationalError as exc:
            if not isinstance(storage_error(exc), StorageFull):
                raise
            # A WAL database needs its -shm file, which a full disk cannot grow. With
            # EXCLUSIVE locking SQLite keeps that index in memory instead (the state
            # directory's flock already makes this process the only one): the ledger
            # opens and reads, and writes fail cleanly until there is space.
            self.exclusive_because = str(exc)
            self._db = self._connect(exclusive=True)
        self._check_integrity()
        self._migrate()

    def _connect(self, exclusive: bool) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        try:
            if exclusive:
                db.execute("PRAGMA locking_mode=EXCLUSIVE")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=5000")
            db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        except BaseException:
            db.close()
            raise
        return db

    def probe_write(self) -> None:
        """One tiny durable write (rewrites the schema version): raises while the disk is
        full. Once it succeeds after an exclusive start, the normal connection comes back
        (so that online backups work again)."""
        version = self.schema_version
        with self._write() as db:
            db.execute(f"PRAGMA user_version = {int(version)}")
        if self.exclusive_because is not None and not self._db.in_transaction:
            # The exclusive connection holds its lock until closed: close it first.
            self._db.close()
            try:
                self._db = self._connect(exclusive=False)
                self.exclusive_because = None
            except sqlite3.OperationalError:
                self._db = self._connect(exclusive=True)

    def close(self) -> None:
        self._db.close()

    # -- schema ---------------------------------------------------------------------------

    def _check_integrity(self) -> None:
        result = self._db.execute("PRAGMA integrity_check").fetchone()[0]
        if result != "ok":
            raise LedgerCorruptError(f"{self.path}: integrity check failed: {result}")
        # Rows pointing at rows that are not there (a binding of a deleted slice): SQLite
        # enforces foreign keys only on connections that ask, so check what is on disk.
        dangling = self._db.execute("PRAGMA foreign_key_check").fetchall()
        if dangling:
            tables = sorted({row[0] for row in dangling})
            raise LedgerCorruptError(
                f"{self.path}: {len(dangling)} row(s) with a dangling foreign key in "
                f"{', '.join(tables)}"
            )

    def _migrate(self) -> None:
        current = self._db.execute("PRAGMA user_version").fetchone()[0]
        if current > SCHEMA_VERSION:
            raise LedgerCorruptError(
                f"{self.path} has schema {current}, newer than this agent's {SCHEMA_VERSION}"
            )
        pending = [(v, sql) for v, sql in _migrations() if v > current]
        if not pending:
            return
        with self._write():
            for version, sql in pending:
                for statement in split_statements(sql):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {int(version)}")

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One immediate transaction: either all of it is durable or none of it is.

        Inside :meth:`batch` it is a savepoint of the batch's transaction instead."""
        if self._db.in_transaction:
            with self.savepoint():
                yield self._db
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested unit inside the current transaction; undone alone on error."""
        if not self._db.in_transaction:
            yield
            return
        self._savepoints += 1
        name = f"sp{self._savepoints}"
        self._db.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            self._db.execute(f"ROLLBACK TO {name}")
            self._db.execute(f"RELEASE {name}")
            raise
        self._db.execute(f"RELEASE {name}")

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group commit: everything inside is made durable by one COMMIT."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- reading --------------------------------------------------------------------------

    def _row_to_slice(self, row: sqlite3.Row, processes: tuple[ProcessRef, ...]) -> Slice:
        return Slice(
            id=row["id"],
            device=row["device"],
            memory_mib=row["memory_mib"],
            compute_pct=row["compute_pct"],
            owner_uid=row["owner_uid"],
            state=SliceState(row["state"]),
            created_at=row["created_at"],
            token=row["token"],
            labels=json.loads(row["labels"]),
            priority=row["priority"],
            expires_at=row["expires_at"],
            borrower=row["borrower"],
            request_id=row["request_id"],
            ended_at=row["ended_at"],
            processes=processes,
            cpu_milli=row["cpu_milli"],
            host_memory_mib=row["host_memory_mib"],
            end_reason=row["end_reason"],
            lent_from=row["lent_from"],
        )

    def _slices(self, where: str, params: Iterable[object]) -> list[Slice]:
        rows = self._db.execute(
            f"SELECT * FROM slices WHERE {where} ORDER BY created_at, id",  # noqa: S608
            tuple(params),
        ).fetchall()
        if not rows:
            return []
        ids = [r["id"] for r in rows]
        marks = ",".join("?" * len(ids))
        bound: dict[str, list[ProcessRef]] = {}
        for b in self._db.execute(
            f"SELECT * FROM bindings WHERE slice_id IN ({marks}) ORDER BY pid",  # noqa: S608
            ids,
        ):
            bound.setdefault(b["slice_id"], []).append(ProcessRef(b["pid"], b["start_time"]))
        return [self._row_to_slice(r, tuple(bound.get(r["id"], ()))) for r in rows]

    def get(self, slice_id: str) -> Slice:
        found = self._slices("id = ?", (slice_id,))
        if not found:
            raise NotFound(f"no slice {slice_id!r}")
        return found[0]

    def live(self) -> list[Slice]:
        """Active and lost slices: the ones that hold capacity."""
        return self._slices(LIVE_SQL, ())

    def history(self, since: float) -> list[Slice]:
        return self._slices("state NOT IN (?, ?) AND ended_at >= ?", (*LIVE_STATES, since))

    def usage(self) -> dict[str, Usage]:
        usage: dict[str, Usage] = {}
        for row in self._db.execute(
            "SELECT device, COALESCE(SUM(CASE WHEN lent_from IS NULL THEN memory_mib END), 0),"  # noqa: S608
            " COALESCE(SUM(CASE WHEN lent_from IS NULL THEN compute_pct END), 0), COUNT(*)"
            f" FROM slices WHERE {LIVE_SQL} GROUP BY device",
        ):
            usage[row[0]] = Usage(int(row[1]), int(row[2]), int(row[3]))
        return usage

    def events(self, after: int = 0, limit: int = 1000) -> list[Event]:
        rows = self._db.execute(
            "SELECT * FROM (SELECT * FROM events WHERE seq > ? ORDER BY seq DESC LIMIT ?) "
            "ORDER BY seq",
            (after, limit),
        ).fetchall()
        return [
            Event(r["seq"], r["ts"], r["kind"], json.loads(r["data"]), r["slice_id"]) for r in rows
        ]

    def stopped(self) -> list[tuple[ProcessRef, str | None]]:
        return [
            (ProcessRef(r["pid"], r["start_time"]), r["slice_id"])
            for r in self._db.execute("SELECT * FROM stopped")
        ]

    # -- writing --------------------------------------------------------------------------

    def _event(
        self, db: sqlite3.Connection, kind: str, slice_id: str | None, data: Mapping[str, object]
    ) -> Event:
        ts = time.time()
        text = json.dumps(dict(data), sort_keys=True, default=str)
        cur = db.execute(
            "INSERT INTO events (ts, kind, slice_id, data) VALUES (?, ?, ?, ?)",
            (ts, kind, slice_id, text),
        )
        seq = int(cur.lastrowid or 0)
        if seq % 1000 == 0:
            db.execute("DELETE FROM events WHERE seq <= ?", (seq - EVENTS_KEPT,))
        return Event(seq, ts, kind, dict(data), slice_id)

    def record_event(
        self, kind: str, data: Mapping[str, object], slice_id: str | None = None
    ) -> Event:
        with self._write() as db:
            return self._event(db, kind, slice_id, data)

    def allocate(
        self,
        device: str,
        capacity: DeviceCapacity,
        request: SliceRequest,
        now: float,
        host: HostCapacity | None = None,
    ) -> tuple[Slice, Event | None]:
        """Insert a slice on ``device`` if it still fits there (and its host CPU and memory
        within ``host``); idempotent on request_id.

        Returns the slice and the event written, or ``(existing, None)`` for a repeated
        request_id.
        """
        with self._write() as db:
            if request.request_id is not None:
                row = db.execute(
                    "SELECT id, state FROM slices WHERE owner_uid = ? AND request_id = ?",
                    (request.owner_uid, request.request_id),
                ).fetchone()
                if row is not None and row[1] not in LIVE_STATES:
                    # The retry of a request whose slice has ended since: not a new slice
                    # (that would double-allocate on a late retry), and not the dead one.
                    raise Conflict(
                        f"request_id {request.request_id!r} made slice {row[0]}, which is "
                        f"{row[1]}; use a new request_id for a new slice",
                        slice_id=row[0],
                        state=row[1],
                    )
                if row is not None:
                    return self._slices("id = ?", (row[0],))[0], None
            # Slices lent out of another slice's share take none of the card's.
            used = db.execute(
                "SELECT COALESCE(SUM(CASE WHEN lent_from IS NULL THEN memory_mib END), 0),"  # noqa: S608
                " COALESCE(SUM(CASE WHEN lent_from IS NULL THEN compute_pct END), 0), COUNT(*)"
                f" FROM slices WHERE device = ? AND {LIVE_SQL}",
                (device,),
            ).fetchone()
            memory_free = capacity.memory_mib - used[0]
            compute_free = capacity.compute_pct - used[1]
            if request.lent_from is not None:
                memory_free, compute_free = self._share_free(db, device, request.lent_from)
            if (
                used[2] >= capacity.max_slices
                or request.memory_mib > memory_free
                or request.compute_pct > compute_free
            ):
                raise DoesNotFit(
                    f"does not fit on {device}: free {memory_free} MiB, {compute_free} % compute,"
                    f" {capacity.max_slices - used[2]} slice(s)",
                    device=device,
                    memory_free_mib=memory_free,
                    compute_free_pct=compute_free,
                )
            if host is not None and (request.cpu_milli or request.host_memory_mib):
                self._check_host(db, host, request)
            slice_id = new_slice_id()
            expires_at = now + request.ttl_s if request.ttl_s else None
            db.execute(
                "INSERT INTO slices (id, device, memory_mib, compute_pct, owner_uid, state,"
                " created_at, token, labels, priority, expires_at, borrower, request_id,"
                " cpu_milli, host_memory_mib, lent_from)"
                " VALUES (?, ?, ?, ?, ?, 'active', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    slice_id,
                    device,
                    request.memory_mib,
                    request.compute_pct,
                    request.owner_uid,
                    now,
                    secrets.token_urlsafe(24),
                    json.dumps(dict(request.labels), sort_keys=True),
                    request.priority,
                    expires_at,
                    request.borrower,
                    request.request_id,
                    request.cpu_milli,
                    request.host_memory_mib,
                    request.lent_from,
                ),
            )
            data: dict[str, object] = {
                "device": device,
                "memory_mib": request.memory_mib,
                "compute_pct": request.compute_pct,
                "owner_uid": request.owner_uid,
                "borrower": request.borrower,
            }
            if request.cpu_milli or request.host_memory_mib:
                data |= {"cpu_milli": request.cpu_milli, "host_memory_mib": request.host_memory_mib}
            if request.lent_from is not None:
                data["lent_from"] = request.lent_from
            event = self._event(db, "slice.allocated", slice_id, data)
        return self.get(slice_id), event

    @staticmethod
    def _share_free(db: sqlite3.Connection, device: str, host_id: str) -> tuple[int, int]:
        """What an idle slice's share still has for slices lent out of it."""
        host = db.execute(
            "SELECT memory_mib, compute_pct, device, state, lent_from FROM slices WHERE id = ?",
            (host_id,),
        ).fetchone()
        if host is None or host[2] != device or host[3] != "active" or host[4] is not None:
            raise DoesNotFit(f"slice {host_id} is not an active slice on {device} to lend from")
        taken = db.execute(
            "SELECT COALESCE(SUM(memory_mib), 0), COALESCE(SUM(compute_pct), 0) FROM slices"  # noqa: S608
            f" WHERE lent_from = ? AND {LIVE_SQL}",
            (host_id,),
        ).fetchone()
        return host[0] - taken[0], host[1] - taken[1]

    def host_used(self) -> tuple[int, int]:
        """Host CPU (milli) and memory (MiB) the live slices hold."""
        row = self._db.execute(
            "SELECT COALESCE(SUM(cpu_milli), 0), COALESCE(SUM(host_memory_mib), 0) "  # noqa: S608
            f"FROM slices WHERE {LIVE_SQL}"
        ).fetchone()
        return int(row[0]), int(row[1])

    @staticmethod
    def _check_host(db: sqlite3.Connection, host: HostCapacity, request: SliceRequest) -> None:
        row = db.execute(
            "SELECT COALESCE(SUM(cpu_milli), 0), COALESCE(SUM(host_memory_mib), 0) "  # noqa: S608
            f"FROM slices WHERE {LIVE_SQL}"
        ).fetchone()
        cpu_free, memory_free = host.cpu_milli - row[0], host.memory_mib - row[1]
        short = None
        if request.cpu_milli > cpu_free:
            short = f"host CPU: {request.cpu_milli} milli-CPU asked, {cpu_free} free"
        elif request.host_memory_mib > memory_free:
            short = f"host memory: {request.host_memory_mib} MiB asked, {memory_free} MiB free"
        if short is not None:
            raise DoesNotFit(
                f"does not fit on this node's {short} (after the system reserve)",
                short="host_cpu" if short.startswith("host CPU") else "host_memory",
                cpu_free_milli=cpu_free,
                host_memory_free_mib=memory_free,
            )

    def end(self, slice_id: str, state: SliceState, reason: str, now: float) -> tuple[Slice, Event]:
        """Release, expire or lose-forever a slice; its bindings go with it."""
        if state is SliceState.ACTIVE:
            raise BadRequest("ending a slice needs a final state")
        with self._write() as db:
            row = db.execute("SELECT state FROM slices WHERE id = ?", (slice_id,)).fetchone()
            if row is None:
                raise NotFound(f"no slice {slice_id!r}")
            if row[0] not in LIVE_STATES:
                raise Conflict(f"slice {slice_id!r} is already {row[0]}", state=row[0])
            db.execute(
                "UPDATE slices SET state = ?, ended_at = ?, end_reason = ? WHERE id = ?",
                (state.value, now, reason, slice_id),
            )
            db.execute("DELETE FROM bindings WHERE slice_id = ?", (slice_id,))
            kind = {SliceState.RELEASED: "slice.released", SliceState.EXPIRED: "slice.expired"}
            event = self._event(
                db,
                kind.get(state, "slice.ended"),
                slice_id,
                {"reason": reason, "state": state.value},
            )
        return self.get(slice_id), event

    def set_lost(self, slice_ids: Iterable[str], lost: bool, reason: str) -> list[Event]:
        """Mark slices lost while their card is gone (they keep their capacity) or back."""
        events = []
        old, new = ("active", "lost") if lost else ("lost", "active")
        with self._write() as db:
            for slice_id in slice_ids:
                cur = db.execute(
                    "UPDATE slices SET state = ? WHERE id = ? AND state = ?", (new, slice_id, old)
                )
                if cur.rowcount:
                    kind = "slice.lost" if lost else "slice.recovered"
                    events.append(self._event(db, kind, slice_id, {"reason": reason}))
        return events

    def expired(self, now: float) -> list[str]:
        return [
            r[0]
            for r in self._db.execute(
                "SELECT id FROM slices WHERE state = 'active' AND expires_at IS NOT NULL"
                " AND expires_at <= ?",
                (now,),
            )
        ]

    def extend(self, slice_id: str, expires_at: float) -> Slice:
        with self._write() as db:
            cur = db.execute(
                "UPDATE slices SET expires_at = ? WHERE id = ? AND state = 'active'",
                (expires_at, slice_id),
            )
            if not cur.rowcount:
                raise NotFound(f"no active slice {slice_id!r}")
            self._event(db, "slice.renewed", slice_id, {"expires_at": expires_at})
        return self.get(slice_id)

    def bind(self, slice_id: str, process: ProcessRef, how: str) -> Event | None:
        with self._write() as db:
            row = db.execute("SELECT state FROM slices WHERE id = ?", (slice_id,)).fetchone()
            if row is None or row[0] != "active":
                raise NotFound(f"no active slice {slice_id!r}")
            other = db.execute(
                "SELECT slice_id FROM bindings WHERE pid = ? AND start_time = ?",
                (process.pid, process.start_time),
            ).fetchone()
            if other is not None:
                if other[0] == slice_id:
                    return None
                raise DoesNotFit(f"process {process.pid} is already bound to slice {other[0]}")
            db.execute(
                "INSERT INTO bindings (slice_id, pid, start_time) VALUES (?, ?, ?)",
                (slice_id, process.pid, process.start_time),
            )
            return self._event(db, "process.bound", slice_id, {"pid": process.pid, "how": how})

    def unbind(self, slice_id: str, pid: int, reason: str) -> Event:
        with self._write() as db:
            cur = db.execute("DELETE FROM bindings WHERE slice_id = ? AND pid = ?", (slice_id, pid))
            if not cur.rowcount:
                raise NotFound(f"process {pid} is not bound to slice {slice_id!r}")
            return self._event(db, "process.unbound", slice_id, {"pid": pid, "reason": reason})

    def prune_bindings(self, alive: set[tuple[int, float]]) -> list[Event]:
        """Forget bindings of processes that have exited."""
        gone = [
            (r["slice_id"], r["pid"], r["start_time"])
            for r in self._db.execute("SELECT * FROM bindings")
            if (r["pid"], r["start_time"]) not in alive
        ]
        if not gone:
            return []
        events = []
        with self._write() as db:
            for slice_id, pid, start_time in gone:
                db.execute(
                    "DELETE FROM bindings WHERE slice_id = ? AND pid = ? AND start_time = ?",
                    (slice_id, pid, start_time),
                )
                events.append(self._event(db, "process.exited", slice_id, {"pid": pid}))
        return events

    def mark_stopped(self, process: ProcessRef, slice_id: str | None, stopped: bool) -> None:
        with self._write() as db:
            if stopped:
                db.execute(
                    "INSERT OR REPLACE INTO stopped (pid, start_time, slice_id, since)"
                    " VALUES (?, ?, ?, ?)",
                    (process.pid, process.start_time, slice_id, time.time()),
                )
            else:
                db.execute(
                    "DELETE FROM stopped WHERE pid = ? AND start_time = ?",
                    (process.pid, process.start_time),
                )

    def forget_history(self, before: float) -> int:
        with self._write() as db:
            cur = db.execute(
                "DELETE FROM slices WHERE state NOT IN (?, ?) AND ended_at < ?",
                (*LIVE_STATES, before),
            )
            db.execute("DELETE FROM leases WHERE state != 'active' AND ended_at < ?", (before,))
            return cur.rowcount

    # -- leases borrowed from peers -------------------------------------------------------

    @staticmethod
    def _row_to_lease(row: sqlite3.Row) -> Lease:
        return Lease(
            lender=row["lender"],
            slice_id=row["slice_id"],
            device=row["device"],
            memory_mib=row["memory_mib"],
            compute_pct=row["compute_pct"],
            expires_at=row["expires_at"],
            env=json.loads(row["env"]),
            owner_uid=row["owner_uid"],
            address=row["address"],
            token=row["token"],
            ttl_s=row["ttl_s"],
            state=_lease_state(row["state"]),
            reason=row["reason"],
            created_at=row["created_at"],
            ended_at=row["ended_at"],
            holder=None
            if row["holder_pid"] is None
            else ProcessRef(row["holder_pid"], row["holder_start"]),
        )

    def keep_lease(self, lease: Lease) -> None:
        """Record a lease just granted (a retried grant of the same slice replaces it)."""
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO leases (slice_id, lender, address, device, memory_mib,"
                " compute_pct, owner_uid, token, env, ttl_s, expires_at, state, reason,"
                " created_at, ended_at, holder_pid, holder_start)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    lease.slice_id,
                    lease.lender,
                    lease.address,
                    lease.device,
                    lease.memory_mib,
                    lease.compute_pct,
                    lease.owner_uid,
                    lease.token,
                    json.dumps(dict(lease.env), sort_keys=True),
                    lease.ttl_s,
                    lease.expires_at,
                    lease.state,
                    lease.reason,
                    lease.created_at,
                    lease.ended_at,
                    lease.holder.pid if lease.holder else None,
                    lease.holder.start_time if lease.holder else None,
                ),
            )

    def lease_renewed(self, slice_id: str, expires_at: float) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE leases SET expires_at = ? WHERE slice_id = ? AND state = 'active'",
                (expires_at, slice_id),
            )

    def end_lease(self, slice_id: str, state: LeaseState, reason: str, now: float) -> Lease | None:
        """An active lease ends (``None``: it had ended already, or was never held)."""
        with self._write() as db:
            cur = db.execute(
                "UPDATE leases SET state = ?, reason = ?, ended_at = ?"
                " WHERE slice_id = ? AND state = 'active'",
                (state, reason, now, slice_id),
            )
            if not cur.rowcount:
                return None
        return self.lease(slice_id)

    def lease(self, slice_id: str) -> Lease | None:
        row = self._db.execute("SELECT * FROM leases WHERE slice_id = ?", (slice_id,)).fetchone()
        return None if row is None else self._row_to_lease(row)

    def leases(self, active_only: bool = True) -> list[Lease]:
        where = "WHERE state = 'active'" if active_only else ""
        rows = self._db.execute(
            f"SELECT * FROM leases {where} ORDER BY created_at, slice_id"  # noqa: S608
        ).fetchall()
        return [self._row_to_lease(r) for r in rows]


def _lease_state(text: str) -> LeaseState:
    """The schema's CHECK allows no other value; a file edited by hand is refused."""
    if text not in LEASE_STATES:
        raise LedgerCorruptError(f"lease state {text!r} is not one of {LEASE_STATES}")
    return text
