-- The deployment's master key identity and the audit ledger. Must match src/schema.rs.

-- At most one row (id = 1): the fingerprint of the master key every HSM of the deployment
-- must hold. Written once by the first driver to start; later drivers compare against it.
CREATE TABLE deployment (
    id INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    master_key_fingerprint TEXT NOT NULL,
    registered_by TEXT NOT NULL,
    registered_at_ms INTEGER NOT NULL
) STRICT;

-- Append-only, hash-chained log of every key generated and payload signed. seq is assigned by
-- the store inside an immediate transaction (contiguous from 1; not AUTOINCREMENT, so that the
-- store alone decides it). The hashing is documented in src/audit.rs.
CREATE TABLE audit_log (
    seq INTEGER NOT NULL PRIMARY KEY,
    job_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload_digest BLOB NOT NULL,
    result BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL,
    driver_id TEXT NOT NULL,
    prev_hash BLOB NOT NULL,
    entry_hash BLOB NOT NULL
) STRICT;
