-- Master-key rotation. Must match src/schema.rs.
-- Which master keys each driver's HSM holds, as the driver last recorded them (at start-up and
-- with every heartbeat): a rotation switches the deployment to a new master key only once every
-- live driver holds it. `fingerprints` is the sorted, comma-separated list.
CREATE TABLE driver_master_keys (
    driver_id TEXT NOT NULL PRIMARY KEY,
    fingerprints TEXT NOT NULL,
    seen_at_ms INTEGER NOT NULL
) STRICT;
-- A rotation pages through the records of one master key; `check` counts them per key.
CREATE INDEX wrapped_keys_by_master_key ON wrapped_keys (master_key_fingerprint, key_id);
