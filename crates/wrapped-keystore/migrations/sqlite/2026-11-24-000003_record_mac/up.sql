-- Tamper-evident key records: an HMAC-SHA256, computed inside the HSM with a non-extractable
-- key, over the record's identifying fields (encoding: hsm-pkcs11's record_mac module).
-- Must match src/schema.rs. Rows written before this migration read back with an empty MAC,
-- which the driver refuses as untrusted.
ALTER TABLE wrapped_keys ADD COLUMN record_mac BLOB NOT NULL DEFAULT X'';
