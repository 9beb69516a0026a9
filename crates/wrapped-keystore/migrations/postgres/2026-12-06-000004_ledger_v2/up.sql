-- The audit ledger v2: one chain per driver, each entry authenticated by an HMAC computed inside
-- the HSM under its ledger key (encoding: src/ledger.rs). Must match src/schema.rs.
-- A driver appends only to its own chain (chain = its driver id) with the next seq; the
-- primary key makes a second writer of the same chain fail instead of forking it.
-- The pre-v2 `audit_log` table is left as it was: readable by SQL, no longer written.
CREATE TABLE ledger (
    -- COLLATE "C": chains list in bytewise order on every backend.
    chain TEXT COLLATE "C" NOT NULL,
    seq BIGINT NOT NULL,
    job_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload_digest BYTEA NOT NULL,
    result BYTEA NOT NULL,
    created_at_ms BIGINT NOT NULL,
    prev_mac BYTEA NOT NULL,
    mac BYTEA NOT NULL,
    PRIMARY KEY (chain, seq)
);
