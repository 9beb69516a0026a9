DROP INDEX wrapped_keys_by_master_key;
DROP TABLE driver_master_keys;
