//! The diesel schema: the `wrapped_keys` table, the `deployment` row, the audit `ledger` (v2)
//! and the pre-v2 `audit_log` (no longer written; declared so the schema test sees it intact).
//!
//! Hand-written, not generated: it must match the migrations in `migrations/postgres/` and
//! `migrations/sqlite/`. The tests below apply the migrations on both backends and round-trip
//! every column through this definition, so a drift fails the tests.

diesel::table! {
    /// One row per wrapped key; written once, updated only by a master-key rotation (new blob,
    /// mechanism, fingerprint and MAC, in one transaction with its ledger entry).
    wrapped_keys (key_id) {
        /// The API's key id.
        key_id -> Text,
        /// The driver's scheme name.
        scheme -> Text,
        /// The API's curve name.
        curve -> Text,
        /// The public key.
        public_key -> Binary,
        /// The wrapped private key.
        wrapped_key -> Binary,
        /// The wrapping mechanism.
        wrap_mechanism -> Text,
        /// The fingerprint of the wrapping master key.
        master_key_fingerprint -> Text,
        /// Creation time, milliseconds since the Unix epoch.
        created_at_ms -> BigInt,
        /// The driver that created the row.
        created_by -> Text,
        /// The record's MAC (HMAC-SHA256 in the HSM over its identifying fields); empty for
        /// rows written before the column existed.
        record_mac -> Binary,
    }
}

diesel::table! {
    /// The deployment's identity: at most one row, `id = 1`.
    deployment (id) {
        /// Always 1.
        id -> Integer,
        /// The fingerprint of the master key every HSM of the deployment holds.
        master_key_fingerprint -> Text,
        /// The driver that recorded it.
        registered_by -> Text,
        /// When, milliseconds since the Unix epoch.
        registered_at_ms -> BigInt,
    }
}

diesel::table! {
    /// The pre-v2 audit log: one global SHA-256 hash chain, unauthenticated. No longer written or
    /// verified; kept readable by SQL.
    audit_log (seq) {
        /// Position in the log, contiguous from 1.
        seq -> BigInt,
        /// The API job.
        job_id -> Text,
        /// The key generated or used.
        key_id -> Text,
        /// `KeyGeneration` or `Signature`.
        kind -> Text,
        /// SHA-256 of the signed payload (of the public key for a key generation).
        payload_digest -> Binary,
        /// The public key or the signature.
        result -> Binary,
        /// Milliseconds since the Unix epoch.
        created_at_ms -> BigInt,
        /// The driver that appended the entry.
        driver_id -> Text,
        /// The previous entry's hash.
        prev_hash -> Binary,
        /// This entry's hash.
        entry_hash -> Binary,
    }
}

diesel::table! {
    /// The audit ledger v2: one chain per driver, each entry MACed in the HSM (see `ledger.rs`).
    ledger (chain, seq) {
        /// The chain: the appending driver's id.
        chain -> Text,
        /// Position in the chain, contiguous from 1.
        seq -> BigInt,
        /// The API job.
        job_id -> Text,
        /// The key generated or used.
        key_id -> Text,
        /// `KeyGeneration` or `Signature`.
        kind -> Text,
        /// SHA-256 of the signed payload (of the public key for a key generation).
        payload_digest -> Binary,
        /// The public key or the signature.
        result -> Binary,
        /// Milliseconds since the Unix epoch.
        created_at_ms -> BigInt,
        /// The previous entry's MAC in the chain (zeros for seq 1).
        prev_mac -> Binary,
        /// HMAC-SHA256 under the HSM's ledger key.
        mac -> Binary,
    }
}

diesel::table! {
    /// Which master keys each driver's HSM holds, as it last recorded them.
    driver_master_keys (driver_id) {
        /// The driver's id.
        driver_id -> Text,
        /// The fingerprints, sorted and comma-separated.
        fingerprints -> Text,
        /// When it recorded them, milliseconds since the Unix epoch.
        seen_at_ms -> BigInt,
    }
}

#[cfg(test)]
mod tests {
    use diesel::prelude::*;
    use diesel::sql_types::Text;

    use super::wrapped_keys;
    use crate::diesel_store::test_support::{on_backend, revert_all, with_connection};
    use crate::{DatabaseUrl, DieselKeyStore, PoolOptions};

    #[derive(QueryableByName)]
    struct ColumnName {
        #[diesel(sql_type = Text)]
        name: String,
    }

    type Row = (
        String,
        String,
        String,
        Vec<u8>,
        Vec<u8>,
        String,
        String,
        i64,
        String,
        Vec<u8>,
    );

    /// Migrates a fresh database, checks that the table's columns are exactly this module's and
    /// round-trip every value, then reverts (`down.sql`) and migrates again.
    fn check_schema_matches_migrations(store: &DieselKeyStore) {
        let pending = store
            .pending_migrations()
            .expect("reading pending migrations of a fresh database");
        assert!(
            !pending.is_empty(),
            "a fresh {} database has pending migrations",
            store.backend()
        );
        assert_eq!(
            store.migrate().expect("migrating a fresh database"),
            pending,
            "migrate applies what was pending"
        );

        let expected: Vec<Row> = vec![(
            "key-\u{e9}".into(),
            "ecdsa-secp256k1".into(),
            "secp256k1".into(),
            vec![0x02, 0x00, 0xff],
            (0..=255).collect(),
            "aes-key-wrap-pad".into(),
            "fp".into(),
            i64::MAX,
            "driver-1".into(),
            (0..32).rev().collect(),
        )];
        with_connection(store, |conn| {
            for (table, declared) in tables() {
                let mut columns: Vec<String> = on_backend!(conn, |c| {
                    let catalog = match c.backend_name() {
                        "sqlite" => format!("SELECT name FROM pragma_table_info('{table}')"),
                        _ => format!(
                            "SELECT column_name AS name FROM information_schema.columns \
                             WHERE table_schema = current_schema() AND table_name = '{table}'"
                        ),
                    };
                    diesel::sql_query(catalog).load::<ColumnName>(c)
                })
                .expect("reading the table's columns from the catalog")
                .into_iter()
                .map(|column| column.name)
                .collect();
                columns.sort();
                let mut declared: Vec<&str> = declared.to_vec();
                declared.sort_unstable();
                assert_eq!(
                    columns, declared,
                    "the migrated table {table} has exactly the columns of schema.rs"
                );
            }

            let stored: Vec<Row> = on_backend!(conn, |c| {
                diesel::insert_into(wrapped_keys::table)
                    .values(&expected[0].clone().into_values())
                    .execute(c)
                    .and_then(|_| {
                        wrapped_keys::table
                            .select(wrapped_keys::all_columns)
                            .load(c)
                    })
            })
            .expect("inserting and reading back every column");
            assert_eq!(
                stored, expected,
                "every column round-trips through schema.rs"
            );

            // A row written without a MAC (as before the column existed) reads back empty.
            let mut old = expected[0].clone();
            old.0 = "written-before-record-macs".into();
            let old_mac: Vec<u8> = on_backend!(conn, |c| {
                use wrapped_keys::*;
                diesel::insert_into(wrapped_keys::table)
                    .values((
                        key_id.eq(old.0.clone()),
                        scheme.eq(old.1.clone()),
                        curve.eq(old.2.clone()),
                        public_key.eq(old.3.clone()),
                        wrapped_key.eq(old.4.clone()),
                        wrap_mechanism.eq(old.5.clone()),
                        master_key_fingerprint.eq(old.6.clone()),
                        created_at_ms.eq(old.7),
                        created_by.eq(old.8.clone()),
                    ))
                    .execute(c)
                    .and_then(|_| {
                        wrapped_keys::table
                            .find(old.0.clone())
                            .select(record_mac)
                            .first(c)
                    })
            })
            .expect("inserting a row without a MAC");
            assert!(old_mac.is_empty(), "the default MAC is empty");
        });

        let reverted =
            with_connection(store, revert_all).expect("reverting every migration (down.sql)");
        assert_eq!(
            reverted.len(),
            pending.len(),
            "every applied migration reverts"
        );
        assert_eq!(
            store.pending_migrations().expect("pending after revert"),
            pending,
            "all pending again after revert"
        );
        assert_eq!(
            store.migrate().expect("migrating again after a revert"),
            pending,
            "re-applies after revert"
        );
    }

    /// Every table and its columns as declared above.
    fn tables() -> [(&'static str, &'static [&'static str]); 4] {
        [
            (
                "wrapped_keys",
                &[
                    "key_id",
                    "scheme",
                    "curve",
                    "public_key",
                    "wrapped_key",
                    "wrap_mechanism",
                    "master_key_fingerprint",
                    "created_at_ms",
                    "created_by",
                    "record_mac",
                ],
            ),
            (
                "deployment",
                &[
                    "id",
                    "master_key_fingerprint",
                    "registered_by",
                    "registered_at_ms",
                ],
            ),
            (
                "audit_log",
                &[
                    "seq",
                    "job_id",
                    "key_id",
                    "kind",
                    "payload_digest",
                    "result",
                    "created_at_ms",
                    "driver_id",
                    "prev_hash",
                    "entry_hash",
                ],
            ),
            (
                "ledger",
                &[
                    "chain",
                    "seq",
                    "job_id",
                    "key_id",
                    "kind",
                    "payload_digest",
                    "result",
                    "created_at_ms",
                    "prev_mac",
                    "mac",
                ],
            ),
        ]
    }

    /// Lets one generic block ask which backend it runs on.
    trait BackendName {
        fn backend_name(&self) -> &'static str;
    }
    impl BackendName for diesel::SqliteConnection {
        fn backend_name(&self) -> &'static str {
            "sqlite"
        }
    }
    impl BackendName for diesel::PgConnection {
        fn backend_name(&self) -> &'static str {
            "postgresql"
        }
    }

    /// Turns a row tuple into insertable column values.
    trait IntoValues {
        type Values;
        fn into_values(self) -> Self::Values;
    }
    impl IntoValues for Row {
        type Values = (
            diesel::dsl::Eq<wrapped_keys::key_id, String>,
            diesel::dsl::Eq<wrapped_keys::scheme, String>,
            diesel::dsl::Eq<wrapped_keys::curve, String>,
            diesel::dsl::Eq<wrapped_keys::public_key, Vec<u8>>,
            diesel::dsl::Eq<wrapped_keys::wrapped_key, Vec<u8>>,
            diesel::dsl::Eq<wrapped_keys::wrap_mechanism, String>,
            diesel::dsl::Eq<wrapped_keys::master_key_fingerprint, String>,
            diesel::dsl::Eq<wrapped_keys::created_at_ms, i64>,
            diesel::dsl::Eq<wrapped_keys::created_by, String>,
            diesel::dsl::Eq<wrapped_keys::record_mac, Vec<u8>>,
        );
        fn into_values(self) -> Self::Values {
            use wrapped_keys::*;
            (
                key_id.eq(self.0),
                scheme.eq(self.1),
                curve.eq(self.2),
                public_key.eq(self.3),
                wrapped_key.eq(self.4),
                wrap_mechanism.eq(self.5),
                master_key_fingerprint.eq(self.6),
                created_at_ms.eq(self.7),
                created_by.eq(self.8),
                record_mac.eq(self.9),
            )
        }
    }

    #[test]
    fn sqlite_schema_matches_migrations() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let url = DatabaseUrl::Sqlite(dir.path().join("keys.db").to_string_lossy().into_owned());
        let store = DieselKeyStore::connect(&url, PoolOptions::default())
            .expect("opening a fresh SQLite file");
        check_schema_matches_migrations(&store);
    }

    #[cfg(feature = "pg-fixture")]
    #[test]
    fn postgres_schema_matches_migrations() {
        let Some(db) =
            crate::testing::PgTestDatabase::create_or_skip().expect("creating a test database")
        else {
            return;
        };
        let store = DieselKeyStore::connect(&db.database_url(), PoolOptions::default())
            .expect("connecting to the test database");
        check_schema_matches_migrations(&store);
    }
}
