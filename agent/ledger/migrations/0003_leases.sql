-- Schema version 3: why a slice ended (a lent slice's borrower is told), slices lent out of
-- an idle slice's share, and the leases this node borrowed from peers (renewed again after
-- a restart, kept a while once ended).
ALTER TABLE slices ADD COLUMN end_reason TEXT;
-- A slice lent out of an idle `lend=true` slice takes that slice's share, not the card's.
ALTER TABLE slices ADD COLUMN lent_from TEXT;

CREATE TABLE leases (
    slice_id     TEXT PRIMARY KEY,
    lender       TEXT NOT NULL,
    address      TEXT NOT NULL DEFAULT '',
    device       TEXT NOT NULL,
    memory_mib   INTEGER NOT NULL CHECK (memory_mib > 0),
    compute_pct  INTEGER NOT NULL CHECK (compute_pct BETWEEN 1 AND 100),
    owner_uid    INTEGER,
    token        TEXT NOT NULL,
    env          TEXT NOT NULL DEFAULT '{}',
    ttl_s        REAL NOT NULL,
    expires_at   REAL,
    state        TEXT NOT NULL DEFAULT 'active'
                 CHECK (state IN ('active', 'returned', 'reclaimed', 'expired', 'lost')),
    reason       TEXT,
    created_at   REAL NOT NULL,
    ended_at     REAL,
    holder_pid   INTEGER,
    holder_start REAL
);
CREATE INDEX leases_active ON leases (lender) WHERE state = 'active';
