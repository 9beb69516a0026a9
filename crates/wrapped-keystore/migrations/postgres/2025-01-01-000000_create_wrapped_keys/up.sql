-- Wrapped keys, one row per key id. Rows are written once and never updated.
-- Must match src/schema.rs.
CREATE TABLE wrapped_keys (
    -- COLLATE "C": order and compare key ids bytewise, as SQLite and the in-memory fake do,
    -- so keyset pagination returns the same order on every backend whatever the database's
    -- default collation is.
    key_id TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    scheme TEXT NOT NULL,
    curve TEXT NOT NULL,
    public_key BYTEA NOT NULL,
    wrapped_key BYTEA NOT NULL,
    wrap_mechanism TEXT NOT NULL,
    master_key_fingerprint TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    created_by TEXT NOT NULL
);
