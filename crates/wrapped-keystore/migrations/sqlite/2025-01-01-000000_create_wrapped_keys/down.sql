DROP TABLE wrapped_keys;
