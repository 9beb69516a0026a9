//! One conformance suite for every [`KeyStore`]: each behaviour is a generic async function in
//! `suite`, run against SQLite (a temporary file), PostgreSQL (a fresh database per test) and the
//! in-memory fake, so the three agree on what a user of the trait can observe.

mod support;

use support::{VerifyAudit, audit_entry, record};
use wrapped_keystore::audit::{GENESIS_PREV_HASH, entry_hash};
use wrapped_keystore::{
    InsertOutcome, KeyRecord, KeyStore, MAX_PAGE_LIMIT, MasterKeyRegistration, PageRequest,
};

mod suite {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use tokio::sync::Barrier;

    use super::*;

    async fn insert(store: &impl KeyStore, record: KeyRecord) -> InsertOutcome {
        let key_id = record.key_id.clone();
        store
            .insert(record)
            .await
            .unwrap_or_else(|e| panic!("inserting {key_id}: {e:?}"))
    }

    async fn page(store: &impl KeyStore, after: Option<&str>, limit: u32) -> Vec<KeyRecord> {
        store
            .list(PageRequest {
                after: after.map(str::to_owned),
                limit,
            })
            .await
            .unwrap_or_else(|e| panic!("listing {limit} after {after:?}: {e:?}"))
    }

    pub(crate) async fn check_succeeds_on_a_working_store<S: KeyStore + Clone>(store: S) {
        store.check().await.expect("checking a fresh store");
        insert(&store, record("key-checked", 1)).await;
        store
            .check()
            .await
            .expect("checking a store that holds a key");
    }

    pub(crate) async fn insert_then_get_round_trips_every_field<S: KeyStore + Clone>(store: S) {
        let stored = record("key-round-trip", 1);
        assert_eq!(
            insert(&store, stored.clone()).await,
            InsertOutcome::Inserted,
            "inserting a new key"
        );
        let fetched = store
            .get("key-round-trip")
            .await
            .expect("getting a stored key");
        assert_eq!(
            fetched,
            Some(stored),
            "get returns every field as inserted, binary included"
        );
    }

    pub(crate) async fn inserting_the_same_key_again_is_idempotent<S: KeyStore + Clone>(store: S) {
        let original = record("key-idempotent", 1);
        assert_eq!(
            insert(&store, original.clone()).await,
            InsertOutcome::Inserted,
            "first insert"
        );
        assert_eq!(
            insert(&store, original.clone()).await,
            InsertOutcome::AlreadyPresent,
            "identical second insert"
        );

        let mut retried_elsewhere = original.clone();
        retried_elsewhere.created_at_ms += 5_000;
        retried_elsewhere.created_by = "another-driver".to_owned();
        assert_eq!(
            insert(&store, retried_elsewhere).await,
            InsertOutcome::AlreadyPresent,
            "the same key from another driver at another time is already present"
        );
        assert_eq!(
            store.get("key-idempotent").await.expect("get"),
            Some(original),
            "the first insert's creation time and creator are kept"
        );
        assert_eq!(
            store.count().await.expect("count"),
            1,
            "idempotent inserts store one record"
        );
    }

    pub(crate) async fn conflicting_insert_leaves_the_original_untouched<S: KeyStore + Clone>(
        store: S,
    ) {
        let original = record("key-conflict", 1);
        insert(&store, original.clone()).await;
        let error = store
            .insert(record("key-conflict", 2))
            .await
            .expect_err("inserting different content under a stored key id must fail");
        assert!(
            error.is_conflict(),
            "a different key under a stored id is a conflict, got {error:?}"
        );
        assert!(!error.is_retryable(), "a conflict is not retryable");
        assert!(
            error.to_string().contains("key-conflict"),
            "the conflict names the key id: {error}"
        );
        assert_eq!(
            store.get("key-conflict").await.expect("get"),
            Some(original),
            "the stored record is unchanged after a conflict"
        );
        assert_eq!(
            store.count().await.expect("count"),
            1,
            "a conflict adds no record"
        );
    }

    pub(crate) async fn a_different_record_mac_is_a_conflict<S: KeyStore + Clone>(store: S) {
        let original = record("key-mac", 1);
        assert_eq!(original.record_mac.len(), 32);
        insert(&store, original.clone()).await;
        let mut remaced = original.clone();
        remaced.record_mac[0] ^= 1;
        assert!(!remaced.same_key_as(&original));
        let error = store
            .insert(remaced)
            .await
            .expect_err("the same key under another MAC must not be accepted");
        assert!(error.is_conflict(), "{error:?}");
        let mut unmaced = original.clone();
        unmaced.record_mac.clear();
        assert!(store.insert(unmaced).await.unwrap_err().is_conflict());
        assert_eq!(
            store.get("key-mac").await.expect("get"),
            Some(original),
            "the stored MAC is unchanged"
        );
    }

    pub(crate) async fn unknown_key_is_none<S: KeyStore + Clone>(store: S) {
        insert(&store, record("key-known", 1)).await;
        assert_eq!(
            store.get("key-unknown").await.expect("get"),
            None,
            "an unknown key id is None, not an error"
        );
        assert_eq!(
            store.get("").await.expect("get"),
            None,
            "the empty key id is unknown"
        );
    }

    pub(crate) async fn paging_walks_every_record_once_in_order<S: KeyStore + Clone>(store: S) {
        // Inserted out of order, so the order comes from the store.
        let mut ids: Vec<String> = (0..25)
            .map(|i| format!("key-{:02}", (i * 7) % 25))
            .collect();
        for id in &ids {
            insert(&store, record(id, 1)).await;
        }
        ids.sort();

        let first = page(&store, None, 10).await;
        let second = page(
            &store,
            Some(&first.last().expect("a full first page").key_id),
            10,
        )
        .await;
        let third = page(
            &store,
            Some(&second.last().expect("a full second page").key_id),
            10,
        )
        .await;
        let sizes = [first.len(), second.len(), third.len()];
        assert_eq!(sizes, [10, 10, 5], "25 records in pages of 10");
        let after_last = page(
            &store,
            Some(&third.last().expect("a third page").key_id),
            10,
        )
        .await;
        assert!(after_last.is_empty(), "nothing after the last record");

        let listed: Vec<String> = first
            .iter()
            .chain(&second)
            .chain(&third)
            .map(|r| r.key_id.clone())
            .collect();
        assert_eq!(listed, ids, "pages list every key once, ascending");
        assert_eq!(
            first[0],
            record("key-00", 1),
            "listed records carry every field"
        );
        assert!(
            page(&store, None, 0).await.is_empty(),
            "a page of 0 is empty"
        );
        let cursor_between = page(&store, Some("key-04x"), 3).await;
        let between: Vec<&str> = cursor_between.iter().map(|r| r.key_id.as_str()).collect();
        assert_eq!(
            between,
            ["key-05", "key-06", "key-07"],
            "a cursor that is not a stored id still works"
        );
    }

    pub(crate) async fn listing_orders_key_ids_bytewise<S: KeyStore + Clone>(store: S) {
        // Under a language collation (PostgreSQL's en_US.UTF-8, say) these sort differently.
        let mut ids = [
            "b",
            "B",
            "a-2",
            "a1",
            "a_1",
            "A",
            "_x",
            "\u{e9}t\u{e9}",
            "e",
            "Z9",
            "z",
            "0",
        ]
        .map(str::to_owned)
        .to_vec();
        for id in &ids {
            insert(&store, record(id, 1)).await;
        }
        ids.sort(); // Rust orders strings bytewise (by code point).
        let mut listed = Vec::new();
        let mut after = None;
        loop {
            let chunk = page(&store, after.as_deref(), 5).await;
            let Some(last) = chunk.last() else { break };
            after = Some(last.key_id.clone());
            listed.extend(chunk.into_iter().map(|r| r.key_id));
        }
        assert_eq!(
            listed, ids,
            "key ids are listed in bytewise order, paging included"
        );
    }

    pub(crate) async fn a_page_is_capped_at_the_maximum<S: KeyStore + Clone>(store: S) {
        let total = MAX_PAGE_LIMIT + 5;
        // Eight writers, each inserting every eighth key in turn.
        let tasks: Vec<_> = (0..8)
            .map(|writer| {
                let store = store.clone();
                tokio::spawn(async move {
                    for i in (writer..total).step_by(8) {
                        insert(&store, record(&format!("key-{i:05}"), 1)).await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("an insert task");
        }
        let listed = page(&store, None, u32::MAX).await;
        assert_eq!(
            listed.len(),
            MAX_PAGE_LIMIT as usize,
            "asking for u32::MAX records returns the cap"
        );
        assert_eq!(
            store.count().await.expect("count"),
            u64::from(total),
            "count is not capped"
        );
    }

    pub(crate) async fn count_counts_distinct_keys<S: KeyStore + Clone>(store: S) {
        assert_eq!(
            store.count().await.expect("count"),
            0,
            "a fresh store is empty"
        );
        for i in 0..7 {
            insert(&store, record(&format!("key-{i}"), 1)).await;
        }
        insert(&store, record("key-3", 1)).await;
        let _ = store.insert(record("key-4", 2)).await;
        assert_eq!(
            store.count().await.expect("count"),
            7,
            "7 keys, whatever was retried or refused"
        );
    }

    pub(crate) async fn concurrent_different_inserts_of_one_key_store_exactly_one<
        S: KeyStore + Clone,
    >(
        store: S,
    ) {
        let results = race(&store, |task| record("key-contested", task)).await;
        let inserted: Vec<u8> = results
            .iter()
            .filter(|(_, r)| matches!(r, Ok(InsertOutcome::Inserted)))
            .map(|(task, _)| *task)
            .collect();
        assert_eq!(
            inserted.len(),
            1,
            "exactly one of 16 different inserts wins: {results:?}"
        );
        for (task, result) in &results {
            if *task != inserted[0] {
                assert!(
                    matches!(result, Err(e) if e.is_conflict()),
                    "every loser of the race gets a conflict, task {task} got {result:?}"
                );
            }
        }
        assert_eq!(
            store.count().await.expect("count"),
            1,
            "one row after the race"
        );
        assert_eq!(
            store.get("key-contested").await.expect("get"),
            Some(record("key-contested", inserted[0])),
            "the stored record is the winner's"
        );
    }

    pub(crate) async fn concurrent_identical_inserts_store_one<S: KeyStore + Clone>(store: S) {
        let results = race(&store, |_| record("key-shared", 1)).await;
        let outcomes: Vec<InsertOutcome> = results
            .into_iter()
            .map(|(task, r)| r.unwrap_or_else(|e| panic!("identical insert {task} failed: {e:?}")))
            .collect();
        let inserted = outcomes
            .iter()
            .filter(|o| **o == InsertOutcome::Inserted)
            .count();
        let present = outcomes
            .iter()
            .filter(|o| **o == InsertOutcome::AlreadyPresent)
            .count();
        assert_eq!(
            (inserted, present),
            (1, 15),
            "16 identical inserts: one Inserted, 15 AlreadyPresent"
        );
        assert_eq!(
            store.count().await.expect("count"),
            1,
            "one row after the race"
        );
    }

    /// Tried: the first registration, the same fingerprint again (from another driver), and a
    /// different fingerprint.
    pub(crate) async fn master_key_is_recorded_once_and_checked_after<S: KeyStore + Clone>(
        store: S,
    ) {
        assert_eq!(
            store
                .register_master_key("mk-aaaa", "driver-1")
                .await
                .expect("first registration"),
            MasterKeyRegistration::Recorded,
            "the first fingerprint is recorded"
        );
        assert_eq!(
            store
                .register_master_key("mk-aaaa", "driver-2")
                .await
                .expect("same fingerprint"),
            MasterKeyRegistration::AlreadyRecorded,
            "the same fingerprint from another driver is already recorded"
        );
        let error = store
            .register_master_key("mk-bbbb", "driver-3")
            .await
            .expect_err("a different fingerprint must be refused");
        assert!(
            error.is_master_key_mismatch() && !error.is_retryable(),
            "a different master key is a final mismatch: {error:?}"
        );
        let message = error.to_string();
        assert!(
            message.contains("mk-aaaa")
                && message.contains("mk-bbbb")
                && message.contains("all HSMs must hold the same master key"),
            "the mismatch names both fingerprints and says what to do: {message}"
        );
        assert_eq!(
            store
                .register_master_key("mk-aaaa", "driver-1")
                .await
                .expect("original again"),
            MasterKeyRegistration::AlreadyRecorded,
            "a refused fingerprint does not replace the recorded one"
        );
    }

    /// Tried: 8 drivers registering 8 different fingerprints at once on a fresh store.
    pub(crate) async fn racing_master_key_registrations_have_one_winner<S: KeyStore + Clone>(
        store: S,
    ) {
        let barrier = Arc::new(Barrier::new(8));
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let (store, barrier) = (store.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    let fingerprint = format!("mk-{i}");
                    let result = store
                        .register_master_key(&fingerprint, &format!("driver-{i}"))
                        .await;
                    (fingerprint, result)
                })
            })
            .collect();
        let mut winners = Vec::new();
        let mut losers = 0;
        for task in tasks {
            let (fingerprint, result) = task.await.expect("a registration task");
            match result {
                Ok(MasterKeyRegistration::Recorded) => winners.push(fingerprint),
                Err(e) if e.is_master_key_mismatch() => losers += 1,
                other => panic!("{fingerprint}: expected Recorded or a mismatch, got {other:?}"),
            }
        }
        assert_eq!(
            winners.len(),
            1,
            "exactly one of 8 racing drivers records its key: {winners:?}"
        );
        assert_eq!(losers, 7, "every other driver gets a mismatch");
        assert_eq!(
            store
                .register_master_key(&winners[0], "driver-late")
                .await
                .expect("the winner's key"),
            MasterKeyRegistration::AlreadyRecorded,
            "the winner's fingerprint is the one recorded"
        );
    }

    /// Tried: three entries appended one after another; checked seq, links and hashes.
    pub(crate) async fn appended_entries_form_a_chain<S: KeyStore + Clone + VerifyAudit>(store: S) {
        let empty = store.verify().await;
        assert!(
            empty.is_intact() && empty.entries_checked == 0 && empty.head.is_none(),
            "an empty log is intact and has no head: {empty:?}"
        );
        let mut previous: Option<wrapped_keystore::AuditRecord> = None;
        for job in 1..=3 {
            let appended = store
                .append_audit(audit_entry(job, "driver-a"))
                .await
                .expect("appending an audit entry");
            assert_eq!(
                appended.seq,
                u64::from(job),
                "seqs start at 1 and are contiguous"
            );
            assert_eq!(
                appended.entry,
                audit_entry(job, "driver-a"),
                "the entry is stored as given"
            );
            let expected_prev = previous
                .as_ref()
                .map_or(GENESIS_PREV_HASH, |p| p.entry_hash);
            assert_eq!(
                appended.prev_hash, expected_prev,
                "entry {job} links to the one before"
            );
            assert_eq!(
                appended.entry_hash,
                entry_hash(appended.seq, &appended.prev_hash, &appended.entry),
                "entry {job}'s hash is the documented one"
            );
            previous = Some(appended);
        }
        let result = store.verify().await;
        let last = previous.expect("three entries");
        assert_eq!(
            (result.entries_checked, result.head, result.problem),
            (3, Some((3, last.entry_hash)), None),
            "three appended entries verify, the head is the last"
        );
    }

    /// Tried: 3 tasks appending 50 entries each at once.
    pub(crate) async fn concurrent_appends_stay_contiguous_and_chained<
        S: KeyStore + Clone + VerifyAudit,
    >(
        store: S,
    ) {
        let barrier = Arc::new(Barrier::new(3));
        let tasks: Vec<_> = (0..3u32)
            .map(|driver| {
                let (store, barrier) = (store.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    let mut seqs = Vec::new();
                    for job in 0..50 {
                        let entry = audit_entry(driver * 1000 + job, &format!("driver-{driver}"));
                        seqs.push(
                            store
                                .append_audit(entry)
                                .await
                                .expect("a concurrent append")
                                .seq,
                        );
                    }
                    seqs
                })
            })
            .collect();
        let mut seqs = Vec::new();
        for task in tasks {
            seqs.extend(task.await.expect("an append task"));
        }
        seqs.sort_unstable();
        assert_eq!(
            seqs,
            (1..=150).collect::<Vec<u64>>(),
            "150 appends get seqs 1..=150 once each"
        );
        let result = store.verify().await;
        assert!(
            result.is_intact(),
            "the interleaved chain verifies: {result:?}"
        );
        assert_eq!(result.entries_checked, 150, "every entry is checked");
    }

    /// Tried: a new key (record + entry), the same key again, and a conflicting key.
    pub(crate) async fn insert_with_audit_writes_both_or_neither<
        S: KeyStore + Clone + VerifyAudit,
    >(
        store: S,
    ) {
        let generated = audit_entry(3, "driver-a");
        assert_eq!(
            store
                .insert_with_audit(record("key-audited", 1), generated.clone())
                .await
                .expect("inserting a new key with its audit entry"),
            InsertOutcome::Inserted,
            "a new key is inserted"
        );
        assert_eq!(
            store.get("key-audited").await.expect("get"),
            Some(record("key-audited", 1))
        );
        assert_eq!(
            store.verify().await.entries_checked,
            1,
            "one audit entry for one new key"
        );

        assert_eq!(
            store
                .insert_with_audit(record("key-audited", 1), audit_entry(4, "driver-b"))
                .await
                .expect("inserting the same key again"),
            InsertOutcome::AlreadyPresent,
            "the same key again is already present"
        );
        assert_eq!(
            store.verify().await.entries_checked,
            1,
            "a retried key adds no audit entry"
        );

        let error = store
            .insert_with_audit(record("key-audited", 2), audit_entry(5, "driver-c"))
            .await
            .expect_err("a different key under a stored id must fail");
        assert!(error.is_conflict(), "a conflict, got {error:?}");
        let after = store.verify().await;
        assert!(
            after.is_intact() && after.entries_checked == 1,
            "a conflict writes no audit entry: {after:?}"
        );
        assert_eq!(
            store.get("key-audited").await.expect("get"),
            Some(record("key-audited", 1)),
            "a conflict leaves the stored key untouched"
        );

        let next = store
            .append_audit(audit_entry(6, "driver-a"))
            .await
            .expect("appending after a refused insert");
        assert_eq!(next.seq, 2, "a refused insert leaves no hole in the seqs");
    }

    /// Starts 16 inserts together (released by one barrier) and collects their results.
    async fn race<S: KeyStore + Clone>(
        store: &S,
        make: impl Fn(u8) -> KeyRecord,
    ) -> Vec<(u8, Result<InsertOutcome, wrapped_keystore::StoreError>)> {
        const TASKS: u8 = 16;
        let barrier = Arc::new(Barrier::new(usize::from(TASKS)));
        let tasks: Vec<_> = (1..=TASKS)
            .map(|task| {
                let (store, barrier, record) = (store.clone(), barrier.clone(), make(task));
                tokio::spawn(async move {
                    barrier.wait().await;
                    (task, store.insert(record).await)
                })
            })
            .collect();
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.expect("an insert task"));
        }
        let distinct: BTreeSet<u8> = results.iter().map(|(task, _)| *task).collect();
        assert_eq!(distinct.len(), usize::from(TASKS), "every task reported");
        results
    }
}

/// Runs every suite function against one backend's fixture.
macro_rules! conformance {
    ($backend:ident, $fixture:path) => {
        mod $backend {
            use super::*;
            conformance!(@tests $fixture;
                check_succeeds_on_a_working_store,
                insert_then_get_round_trips_every_field,
                inserting_the_same_key_again_is_idempotent,
                conflicting_insert_leaves_the_original_untouched,
                a_different_record_mac_is_a_conflict,
                unknown_key_is_none,
                paging_walks_every_record_once_in_order,
                listing_orders_key_ids_bytewise,
                a_page_is_capped_at_the_maximum,
                count_counts_distinct_keys,
                concurrent_different_inserts_of_one_key_store_exactly_one,
                concurrent_identical_inserts_store_one,
                master_key_is_recorded_once_and_checked_after,
                racing_master_key_registrations_have_one_winner,
                appended_entries_form_a_chain,
                concurrent_appends_stay_contiguous_and_chained,
                insert_with_audit_writes_both_or_neither
            );
        }
    };
    (@tests $fixture:path; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let Some(fixture) = $fixture().await else { return };
                suite::$name(fixture.store.clone()).await;
            }
        )*
    };
}

conformance!(sqlite, support::sqlite);
conformance!(postgres, support::postgres);
conformance!(memory, support::memory);
