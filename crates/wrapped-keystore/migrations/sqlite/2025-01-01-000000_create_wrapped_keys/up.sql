-- Wrapped keys, one row per key id. Rows are written once and never updated.
-- Must match src/schema.rs.
-- STRICT: SQLite otherwise stores any value in any column; the key material must stay a BLOB.
-- SQLite's default BINARY collation already orders key ids bytewise.
CREATE TABLE wrapped_keys (
    key_id TEXT NOT NULL PRIMARY KEY,
    scheme TEXT NOT NULL,
    curve TEXT NOT NULL,
    public_key BLOB NOT NULL,
    wrapped_key BLOB NOT NULL,
    wrap_mechanism TEXT NOT NULL,
    master_key_fingerprint TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    created_by TEXT NOT NULL
) STRICT;
