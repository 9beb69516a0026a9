ALTER TABLE wrapped_keys DROP COLUMN record_mac;
