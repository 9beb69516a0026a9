-- The audit ledger v2: one chain per driver, each entry authenticated by an HMAC computed inside
-- the HSM under its ledger key (encoding: src/ledger.rs). Must match src/schema.rs.
-- A driver appends only to its own chain (chain = its driver id) with the next seq; the
-- primary key makes a second writer of the same chain fail instead of forking it.
-- The pre-v2 `audit_log` table is left as it was: readable by SQL, no longer written.
CREATE TABLE ledger (
    chain TEXT NOT NULL,
    seq INTEGER NOT NULL,
    job_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload_digest BLOB NOT NULL,
    result BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL,
    prev_mac BLOB NOT NULL,
    mac BLOB NOT NULL,
    PRIMARY KEY (chain, seq)
) STRICT;
