//! One conformance suite for every [`KeyStore`]: each behaviour is a generic async function in
//! `suite`, run against SQLite (a temporary file), PostgreSQL (a fresh database per test) and the
//! in-memory fake, so the three agree on what a user of the trait can observe.

mod support;

use support::record;
use wrapped_keystore::{InsertOutcome, KeyRecord, KeyStore, MAX_PAGE_LIMIT, PageRequest};

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
                insert_then_get_round_trips_every_field,
                inserting_the_same_key_again_is_idempotent,
                conflicting_insert_leaves_the_original_untouched,
                unknown_key_is_none,
                paging_walks_every_record_once_in_order,
                listing_orders_key_ids_bytewise,
                a_page_is_capped_at_the_maximum,
                count_counts_distinct_keys,
                concurrent_different_inserts_of_one_key_store_exactly_one,
                concurrent_identical_inserts_store_one
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
