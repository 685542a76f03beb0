-- Schema version 1: slices, their bound processes, events, and processes the enforcer stopped.
CREATE TABLE slices (
    id           TEXT PRIMARY KEY,
    device       TEXT NOT NULL,
    memory_mib   INTEGER NOT NULL CHECK (memory_mib > 0),
    compute_pct  INTEGER NOT NULL CHECK (compute_pct BETWEEN 1 AND 100),
    owner_uid    INTEGER NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('active', 'released', 'expired', 'lost')),
    created_at   REAL NOT NULL,
    token        TEXT NOT NULL,
    labels       TEXT NOT NULL DEFAULT '{}',
    priority     INTEGER NOT NULL DEFAULT 0,
    expires_at   REAL,
    borrower     TEXT,
    request_id   TEXT,
    ended_at     REAL
);
CREATE UNIQUE INDEX slices_request ON slices (owner_uid, request_id) WHERE request_id IS NOT NULL;
CREATE INDEX slices_live ON slices (device) WHERE state IN ('active', 'lost');
CREATE INDEX slices_expiry ON slices (expires_at) WHERE state = 'active' AND expires_at IS NOT NULL;

CREATE TABLE bindings (
    slice_id    TEXT NOT NULL REFERENCES slices (id) ON DELETE CASCADE,
    pid         INTEGER NOT NULL,
    start_time  REAL NOT NULL,
    PRIMARY KEY (slice_id, pid, start_time)
);

CREATE TABLE events (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    ts        REAL NOT NULL,
    kind      TEXT NOT NULL,
    slice_id  TEXT,
    data      TEXT NOT NULL DEFAULT '{}'
);

-- Processes the enforcer holds stopped, so that a restart after a crash resumes them.
CREATE TABLE stopped (
    pid         INTEGER NOT NULL,
    start_time  REAL NOT NULL,
    slice_id    TEXT,
    since       REAL NOT NULL,
    PRIMARY KEY (pid, start_time)
);
