//! One conformance suite for every [`KeyStore`]: each behaviour is a generic async function in
//! `suite`, run against SQLite (a temporary file), PostgreSQL (a fresh database per test) and the
//! in-memory fake, so the three agree on what a user of the trait can observe.

mod support;

use support::{ledger_record, record};
use wrapped_keystore::{
    GroupWrite, InsertOutcome, KeyRecord, KeyStore, MAX_PAGE_LIMIT, MasterKeyRegistration,
    MasterKeySwitch, PageRequest, PresentKey, ReplaceOutcome, StoredLedgerRow,
};

mod suite {
    use std::collections::BTreeSet;
    use std::sync::Arc;
    use std::time::Duration;

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

    async fn rows(store: &impl KeyStore, chain: &str) -> Vec<StoredLedgerRow> {
        store
            .ledger_page(chain, 0, MAX_PAGE_LIMIT)
            .await
            .unwrap_or_else(|e| panic!("reading chain {chain}: {e:?}"))
    }

    /// Tried: entries written to two chains, interleaved; read back by head, page and chain list.
    pub(crate) async fn ledger_entries_round_trip_per_chain<S: KeyStore + Clone>(store: S) {
        assert_eq!(store.ledger_head("driver-a").await.expect("head"), None);
        assert!(store.ledger_chains().await.expect("chains").is_empty());
        for seq in 1..=3 {
            for chain in ["driver-b", "driver-a"] {
                if chain == "driver-b" && seq == 3 {
                    continue;
                }
                store
                    .append_ledger(vec![ledger_record(chain, seq)])
                    .await
                    .expect("appending a ledger entry");
            }
        }
        assert_eq!(
            store.ledger_head("driver-a").await.expect("head"),
            Some(StoredLedgerRow::from(&ledger_record("driver-a", 3))),
            "the head is the chain's newest entry, every field as written"
        );
        assert_eq!(
            store
                .ledger_head("driver-b")
                .await
                .expect("head")
                .map(|r| r.seq),
            Some(2),
            "each chain has its own head"
        );
        assert_eq!(
            store.ledger_chains().await.expect("chains"),
            vec!["driver-a".to_owned(), "driver-b".to_owned()]
        );
        let a: Vec<_> = rows(&store, "driver-a").await;
        assert_eq!(
            a,
            (1..=3)
                .map(|seq| StoredLedgerRow::from(&ledger_record("driver-a", seq)))
                .collect::<Vec<_>>(),
            "a chain reads back in seq order, only its own entries"
        );
        let page = store.ledger_page("driver-a", 1, 1).await.expect("a page");
        assert_eq!(
            page.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![2],
            "a page starts after the given seq and holds at most the limit"
        );
    }

    /// Tried: a second entry at a place already taken (two writers of one chain).
    pub(crate) async fn a_taken_ledger_place_is_a_conflict<S: KeyStore + Clone>(store: S) {
        store
            .append_ledger(vec![ledger_record("driver-a", 1)])
            .await
            .expect("the first entry");
        let mut other = ledger_record("driver-a", 1);
        other.entry.job_id = "another-writer".into();
        let error = store
            .append_ledger(vec![other])
            .await
            .expect_err("a taken (chain, seq) must be refused");
        assert!(
            error.is_ledger_conflict() && !error.is_retryable(),
            "{error:?}"
        );
        assert_eq!(
            rows(&store, "driver-a").await,
            vec![StoredLedgerRow::from(&ledger_record("driver-a", 1))],
            "the stored entry is untouched"
        );
    }

    /// Tried: a run of entries appended in one call, then a run whose last place is taken
    /// (another writer of the chain got there first).
    pub(crate) async fn a_run_of_ledger_entries_is_written_whole_or_not_at_all<
        S: KeyStore + Clone,
    >(
        store: S,
    ) {
        store
            .append_ledger((1..=3).map(|seq| ledger_record("driver-a", seq)).collect())
            .await
            .expect("a run of three entries");
        assert_eq!(
            rows(&store, "driver-a").await,
            (1..=3)
                .map(|seq| StoredLedgerRow::from(&ledger_record("driver-a", seq)))
                .collect::<Vec<_>>(),
            "a run is written in order, every entry"
        );
        store
            .append_ledger(vec![ledger_record("driver-a", 5)])
            .await
            .expect("another writer takes seq 5");
        let error = store
            .append_ledger((4..=5).map(|seq| ledger_record("driver-a", seq)).collect())
            .await
            .expect_err("a run with a taken place must be refused");
        assert!(error.is_ledger_conflict(), "{error:?}");
        assert_eq!(
            rows(&store, "driver-a")
                .await
                .iter()
                .map(|r| r.seq)
                .collect::<Vec<_>>(),
            vec![1, 2, 3, 5],
            "nothing of the refused run is written: seq 4 stays free"
        );
        store
            .append_ledger(Vec::new())
            .await
            .expect("an empty run writes nothing and succeeds");
    }

    /// Tried: a run of 7,000 entries (70,000 bound values: more than one statement may bind on
    /// PostgreSQL, 65,535, or on SQLite, 32,766), then a run of 7,000 more whose last place is
    /// taken.
    pub(crate) async fn a_run_past_one_statement_is_written_whole_or_not_at_all<
        S: KeyStore + Clone,
    >(
        store: S,
    ) {
        const RUN: u64 = 7_000;
        store
            .append_ledger(
                (1..=RUN)
                    .map(|seq| ledger_record("driver-a", seq))
                    .collect(),
            )
            .await
            .expect("a run past one statement's bound values is written");
        assert_eq!(
            all_seqs(&store, "driver-a").await,
            (1..=i64::try_from(RUN).expect("fits")).collect::<Vec<_>>(),
            "every entry of the long run, in order"
        );
        store
            .append_ledger(vec![ledger_record("driver-a", 2 * RUN)])
            .await
            .expect("another writer takes the last place of the next run");
        let error = store
            .append_ledger(
                (RUN + 1..=2 * RUN)
                    .map(|seq| ledger_record("driver-a", seq))
                    .collect(),
            )
            .await
            .expect_err("a long run with a taken place must be refused");
        assert!(error.is_ledger_conflict(), "{error:?}");
        let seqs = all_seqs(&store, "driver-a").await;
        assert_eq!(
            (seqs.len(), seqs.last()),
            (
                usize::try_from(RUN).expect("fits") + 1,
                Some(&(2 * i64::try_from(RUN).expect("fits")))
            ),
            "nothing of the refused long run is written, though its first chunks fitted"
        );
    }

    /// Every seq of `chain`, page by page.
    async fn all_seqs(store: &impl KeyStore, chain: &str) -> Vec<i64> {
        let mut seqs: Vec<i64> = Vec::new();
        loop {
            let after = seqs.last().copied().unwrap_or(0);
            let page = store
                .ledger_page(chain, after, MAX_PAGE_LIMIT)
                .await
                .unwrap_or_else(|e| panic!("reading chain {chain}: {e:?}"));
            if page.is_empty() {
                return seqs;
            }
            seqs.extend(page.iter().map(|row| row.seq));
        }
    }

    /// Tried: 3 chains appended to at once, 50 entries each.
    pub(crate) async fn concurrent_appends_to_distinct_chains_all_land<S: KeyStore + Clone>(
        store: S,
    ) {
        let barrier = Arc::new(Barrier::new(3));
        let tasks: Vec<_> = (0..3u32)
            .map(|driver| {
                let (store, barrier) = (store.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    for seq in 1..=50 {
                        store
                            .append_ledger(vec![ledger_record(&format!("driver-{driver}"), seq)])
                            .await
                            .expect("a concurrent append");
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("an append task");
        }
        for driver in 0..3 {
            let chain = format!("driver-{driver}");
            let seqs: Vec<i64> = rows(&store, &chain).await.iter().map(|r| r.seq).collect();
            assert_eq!(seqs, (1..=50).collect::<Vec<i64>>(), "{chain} holds 1..=50");
        }
    }

    /// `record(key_id, 1)` moved to master key `mk-new` with a new blob and MAC.
    fn moved(key_id: &str) -> KeyRecord {
        let mut moved = record(key_id, 1);
        moved.wrapped_key = vec![0xee; 40];
        moved.wrap_mechanism = wrapped_keystore::WrapMechanism::AesKeyWrapKwp;
        moved.master_key_fingerprint = "mk-new".to_owned();
        moved.record_mac = vec![0xaa; 32];
        moved
    }

    pub(crate) async fn a_rotation_replaces_a_record_with_its_entry_or_nothing<
        S: KeyStore + Clone,
    >(
        store: S,
    ) {
        for id in ["key-a", "key-b", "key-c"] {
            insert(&store, record(id, 1)).await;
        }
        insert(&store, record("key-z", 2)).await;
        assert_eq!(
            store.count_by_master_key().await.unwrap(),
            vec![("mk-01".to_owned(), 3), ("mk-02".to_owned(), 1)]
        );
        let page = store.list_under_master_key("mk-01", None, 2).await.unwrap();
        let ids: Vec<_> = page.iter().map(|r| r.key_id.as_str()).collect();
        assert_eq!(ids, ["key-a", "key-b"], "first page of mk-01, by key id");
        let rest = store
            .list_under_master_key("mk-01", Some("key-b".to_owned()), 2)
            .await
            .unwrap();
        assert_eq!(rest, vec![record("key-c", 1)]);

        // The move: the record and its entry, both.
        let outcome = store
            .replace_with_ledger(record("key-a", 1), moved("key-a"), ledger_record("rot", 1))
            .await
            .unwrap();
        assert_eq!(outcome, ReplaceOutcome::Replaced);
        let stored = store.get("key-a").await.unwrap().unwrap();
        assert!(stored.same_key_as(&moved("key-a")), "{stored:?}");
        assert_eq!(
            (stored.created_at_ms, stored.created_by.as_str()),
            (record("key-a", 1).created_at_ms, "driver-1"),
            "creation time and creator are kept"
        );
        assert_eq!(rows(&store, "rot").await.len(), 1);

        // Tried: the same move again (a second rotator, or a retry after a lost commit
        // acknowledgement): the record is no longer the one read, nothing is written.
        let again = store
            .replace_with_ledger(record("key-a", 1), moved("key-a"), ledger_record("rot", 2))
            .await
            .unwrap();
        assert_eq!(again, ReplaceOutcome::Changed);
        assert_eq!(
            rows(&store, "rot").await.len(),
            1,
            "no entry for nothing done"
        );

        // Tried: a move whose entry's place is taken: neither the record nor the entry.
        let error = store
            .replace_with_ledger(record("key-b", 1), moved("key-b"), ledger_record("rot", 1))
            .await
            .expect_err("a taken ledger place");
        assert!(error.is_ledger_conflict(), "{error:?}");
        assert_eq!(
            store.get("key-b").await.unwrap(),
            Some(record("key-b", 1)),
            "the record is as it was"
        );

        // Tried: a move whose expected record differs in one field (its MAC): nothing.
        let mut stale = record("key-c", 1);
        stale.record_mac = vec![0; 32];
        let outcome = store
            .replace_with_ledger(stale, moved("key-c"), ledger_record("rot", 2))
            .await
            .unwrap();
        assert_eq!(outcome, ReplaceOutcome::Changed);
        assert_eq!(store.get("key-c").await.unwrap(), Some(record("key-c", 1)));
        assert_eq!(
            store.count_by_master_key().await.unwrap(),
            vec![
                ("mk-01".to_owned(), 2),
                ("mk-02".to_owned(), 1),
                ("mk-new".to_owned(), 1)
            ]
        );
    }

    pub(crate) async fn the_deployment_switches_master_key_by_compare_and_set<
        S: KeyStore + Clone,
    >(
        store: S,
    ) {
        assert_eq!(store.deployment_master_key().await.unwrap(), None);
        store
            .register_master_key("mk-old", "driver-a")
            .await
            .unwrap();
        assert_eq!(
            store.deployment_master_key().await.unwrap().as_deref(),
            Some("mk-old")
        );
        // Tried: switching from a key the deployment does not use: refused, nothing changes.
        let error = store
            .switch_master_key("mk-other", "mk-new", "rotator")
            .await
            .expect_err("a switch from the wrong key");
        assert!(error.is_master_key_mismatch(), "{error:?}");
        assert_eq!(
            store
                .switch_master_key("mk-old", "mk-new", "rotator")
                .await
                .unwrap(),
            MasterKeySwitch::Switched
        );
        assert_eq!(
            store
                .switch_master_key("mk-old", "mk-new", "rotator")
                .await
                .unwrap(),
            MasterKeySwitch::AlreadySwitched,
            "running the switch again is harmless"
        );
        assert_eq!(
            store.deployment_master_key().await.unwrap().as_deref(),
            Some("mk-new")
        );

        store
            .record_driver_master_keys("driver-b", vec!["mk-new".into(), "mk-old".into()])
            .await
            .unwrap();
        store
            .record_driver_master_keys("driver-a", vec!["mk-old".into()])
            .await
            .unwrap();
        store
            .record_driver_master_keys("driver-a", vec!["mk-old".into(), "mk-new".into()])
            .await
            .unwrap();
        let drivers = store.driver_master_keys().await.unwrap();
        let seen: Vec<_> = drivers
            .iter()
            .map(|d| (d.driver_id.as_str(), d.fingerprints.clone()))
            .collect();
        assert_eq!(
            seen,
            vec![
                ("driver-a", vec!["mk-new".to_owned(), "mk-old".to_owned()]),
                ("driver-b", vec!["mk-new".to_owned(), "mk-old".to_owned()]),
            ],
            "one row per driver, the latest, sorted"
        );
        assert!(drivers.iter().all(|d| d.seen_at_ms > 1_700_000_000_000));
    }

    /// Tried: a new key (record + entry), the same key again, a conflicting key, and a new key
    /// whose entry's place is taken.
    pub(crate) async fn insert_with_ledger_writes_both_or_neither<S: KeyStore + Clone>(store: S) {
        assert_eq!(
            store
                .insert_with_ledger(record("key-audited", 1), ledger_record("driver-a", 1))
                .await
                .expect("inserting a new key with its ledger entry"),
            InsertOutcome::Inserted,
            "a new key is inserted"
        );
        assert_eq!(
            store.get("key-audited").await.expect("get"),
            Some(record("key-audited", 1))
        );
        assert_eq!(
            rows(&store, "driver-a").await.len(),
            1,
            "one entry for one key"
        );

        assert_eq!(
            store
                .insert_with_ledger(record("key-audited", 1), ledger_record("driver-a", 2))
                .await
                .expect("inserting the same key again"),
            InsertOutcome::AlreadyPresent,
            "the same key again is already present"
        );
        assert_eq!(
            rows(&store, "driver-a").await.len(),
            1,
            "a retried key adds no entry"
        );

        let error = store
            .insert_with_ledger(record("key-audited", 2), ledger_record("driver-a", 2))
            .await
            .expect_err("a different key under a stored id must fail");
        assert!(error.is_conflict(), "a conflict, got {error:?}");
        assert_eq!(
            rows(&store, "driver-a").await.len(),
            1,
            "and writes no entry"
        );

        let error = store
            .insert_with_ledger(record("key-new", 3), ledger_record("driver-a", 1))
            .await
            .expect_err("an entry at a taken place must fail");
        assert!(
            error.is_ledger_conflict(),
            "a ledger conflict, got {error:?}"
        );
        assert_eq!(
            store.get("key-new").await.expect("get"),
            None,
            "a refused entry leaves its key unwritten"
        );
        assert_eq!(
            store.get("key-audited").await.expect("get"),
            Some(record("key-audited", 1)),
            "conflicts leave the stored key untouched"
        );
    }

    /// Tried: a group of two new keys and three entries; then groups holding a stored key (the
    /// same, and another under its id), the same new id twice, and a taken ledger place. Each
    /// of those writes nothing: no key of the group, no entry. Committing the group's new keys
    /// while answering the stored ones (tried on the databases) left `key-g3` written.
    pub(crate) async fn a_group_of_keys_and_entries_is_written_whole_or_not_at_all<
        S: KeyStore + Clone,
    >(
        store: S,
    ) {
        let entries = |seqs: std::ops::RangeInclusive<u64>| {
            seqs.map(|seq| ledger_record("driver-a", seq))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            store
                .append_ledger_with_keys(
                    entries(1..=3),
                    vec![record("key-g1", 1), record("key-g2", 2)]
                )
                .await
                .expect("a group of new keys"),
            GroupWrite::Written
        );
        assert_eq!(
            store.get("key-g1").await.unwrap(),
            Some(record("key-g1", 1))
        );
        assert_eq!(
            store.get("key-g2").await.unwrap(),
            Some(record("key-g2", 2))
        );
        assert_eq!(
            rows(&store, "driver-a").await.len(),
            3,
            "every entry written"
        );

        let unwritten = |what: &'static str| {
            let store = store.clone();
            async move {
                assert_eq!(
                    store.get("key-g3").await.unwrap(),
                    None,
                    "{what}: the new key of the group is not written"
                );
                assert_eq!(
                    rows(&store, "driver-a").await.len(),
                    3,
                    "{what}: no entry of the group is written"
                );
                assert_eq!(
                    store.get("key-g1").await.unwrap(),
                    Some(record("key-g1", 1)),
                    "{what}: the stored key is untouched"
                );
            }
        };
        for (what, keys, expected) in [
            (
                "a stored key again",
                vec![record("key-g3", 3), record("key-g1", 1)],
                vec![PresentKey {
                    key_id: "key-g1".to_owned(),
                    same_key: true,
                }],
            ),
            (
                "another key under a stored id",
                vec![record("key-g1", 9), record("key-g3", 3)],
                vec![PresentKey {
                    key_id: "key-g1".to_owned(),
                    same_key: false,
                }],
            ),
            (
                "one new id twice",
                vec![record("key-g3", 3), record("key-g3", 3)],
                vec![PresentKey {
                    key_id: "key-g3".to_owned(),
                    same_key: true,
                }],
            ),
        ] {
            assert_eq!(
                store
                    .append_ledger_with_keys(entries(4..=5), keys)
                    .await
                    .expect(what),
                GroupWrite::KeysPresent(expected),
                "{what}"
            );
            unwritten(what).await;
        }
        let error = store
            .append_ledger_with_keys(entries(3..=4), vec![record("key-g3", 3)])
            .await
            .expect_err("an entry at a taken place must fail");
        assert!(
            error.is_ledger_conflict(),
            "a ledger conflict, got {error:?}"
        );
        unwritten("a taken place").await;
    }

    /// Tried: after the deployment switched from `mk-01` to `mk-02`, a group holding a key
    /// wrapped under `mk-01` (a key generation that read the deployment's key just before the
    /// switch): refused whole, naming that key, nothing written; the group without it is
    /// written, and `insert_with_ledger` refuses such a key as a mismatch. Removing the check
    /// (tried on all three stores) wrote the key under `mk-01` after the switch: a rotation
    /// whose sweep had already passed would leave it behind under a key about to be retired.
    pub(crate) async fn a_key_under_a_switched_master_key_is_refused<S: KeyStore + Clone>(
        store: S,
    ) {
        let entries = |seqs: std::ops::RangeInclusive<u64>| {
            seqs.map(|seq| ledger_record("driver-a", seq))
                .collect::<Vec<_>>()
        };
        store
            .register_master_key("mk-01", "driver-a")
            .await
            .unwrap();
        assert_eq!(
            store
                .append_ledger_with_keys(entries(1..=1), vec![record("key-s1", 1)])
                .await
                .unwrap(),
            GroupWrite::Written,
            "a key under the deployment's master key"
        );
        assert_eq!(
            store
                .switch_master_key("mk-01", "mk-02", "rotator")
                .await
                .unwrap(),
            MasterKeySwitch::Switched
        );
        assert_eq!(
            store
                .append_ledger_with_keys(
                    entries(2..=3),
                    vec![record("key-s2", 2), record("key-s3", 1)]
                )
                .await
                .unwrap(),
            GroupWrite::MasterKeySwitched {
                deployment: "mk-02".to_owned(),
                key_ids: vec!["key-s3".to_owned()],
            }
        );
        assert_eq!(store.get("key-s2").await.unwrap(), None, "nothing written");
        assert_eq!(store.get("key-s3").await.unwrap(), None, "nothing written");
        assert_eq!(rows(&store, "driver-a").await.len(), 1, "no entry written");

        assert_eq!(
            store
                .append_ledger_with_keys(entries(2..=2), vec![record("key-s2", 2)])
                .await
                .unwrap(),
            GroupWrite::Written,
            "the group without the refused key"
        );
        let error = store
            .insert_with_ledger(record("key-s4", 1), ledger_record("driver-a", 3))
            .await
            .expect_err("a single key under the old master key");
        assert!(error.is_master_key_mismatch(), "{error:?}");
        assert_eq!(store.get("key-s4").await.unwrap(), None);
        assert_eq!(rows(&store, "driver-a").await.len(), 2);
        assert_eq!(
            store.count_by_master_key().await.unwrap(),
            vec![("mk-01".to_owned(), 1), ("mk-02".to_owned(), 1)],
            "only the key written before the switch is under mk-01"
        );
    }

    /// Tried: 4 writers appending groups of keys as fast as they can, each under the master key
    /// it last learnt (a refusal names the deployment's, as a driver learns it), while the
    /// deployment switches five times, `mk-00` to `mk-01` to … `mk-05`. Once a switch has
    /// returned, no key under the key it switched from may be written any more: the count under
    /// it when the switch returns is the count for good. On PostgreSQL, reading the deployment's
    /// key without `FOR SHARE` (tried) let groups that read it before a switch commit after it:
    /// the count grew in 2 runs of 3 with one switch each.
    pub(crate) async fn no_key_under_the_old_master_key_lands_after_the_switch<
        S: KeyStore + Clone,
    >(
        store: S,
    ) {
        const SWITCHES: u8 = 5;
        let fingerprint = |n: u8| format!("mk-{n:02x}");
        let under = |counts: &[(String, u64)], fingerprint: &str| {
            counts
                .iter()
                .find(|(mk, _)| mk == fingerprint)
                .map_or(0, |(_, n)| *n)
        };
        store
            .register_master_key(&fingerprint(0), "driver-a")
            .await
            .unwrap();
        const WRITERS: usize = 4;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (progress, mut seen) =
            tokio::sync::watch::channel(vec![(fingerprint(0), 0u64); WRITERS]);
        let progress = Arc::new(progress);
        // Fewer writers than the pool's 8 connections: the switch and the counts never wait
        // for one.
        let writers: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let (store, stop) = (store.clone(), Arc::clone(&stop));
                let progress = Arc::clone(&progress);
                let mut current = fingerprint(0);
                tokio::spawn(async move {
                    let chain = format!("writer-{writer}");
                    let (mut seq, mut refused) = (0, 0);
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let keys = (0..4)
                            .map(|k| KeyRecord {
                                master_key_fingerprint: current.clone(),
                                ..record(&format!("key-{writer}-{seq}-{k}"), 1)
                            })
                            .collect();
                        let records = vec![ledger_record(&chain, seq + 1)];
                        match store.append_ledger_with_keys(records, keys).await.unwrap() {
                            GroupWrite::Written => {
                                seq += 1;
                                progress.send_modify(|p| p[writer].1 += 1);
                            }
                            GroupWrite::MasterKeySwitched { deployment, .. } => {
                                refused += 1;
                                current = deployment;
                                progress.send_modify(|p| p[writer] = (current.clone(), 0));
                            }
                            other => panic!("unexpected {other:?}"),
                        }
                        tokio::task::yield_now().await;
                    }
                    refused
                })
            })
            .collect();
        // Per writer: the key it writes under, and the groups it has written under it.
        type Progress = [(String, u64)];
        let mut wait_until = async |what: &str, done: &dyn Fn(&Progress) -> bool| {
            tokio::time::timeout(Duration::from_secs(10), seen.wait_for(|p| done(p)))
                .await
                .unwrap_or_else(|_| panic!("the writers never {what}"))
                .expect("the writers hold the progress");
        };
        for switch in 0..SWITCHES {
            let (from, to) = (fingerprint(switch), fingerprint(switch + 1));
            // Every writer is writing under `from` when it is switched from.
            wait_until("wrote under the key switched from", &|p| {
                p.iter().all(|(key, written)| *key == from && *written > 0)
            })
            .await;
            assert_eq!(
                store
                    .switch_master_key(&from, &to, "rotator")
                    .await
                    .unwrap(),
                MasterKeySwitch::Switched
            );
            let at_switch = under(&store.count_by_master_key().await.unwrap(), &from);
            assert!(
                at_switch > 0,
                "the writers wrote under {from} before the switch"
            );
            // Every writer has had a group refused since: any group it began under `from`
            // before the switch has ended, written or not.
            wait_until("learnt the new key", &|p| {
                p.iter().all(|(key, _)| *key == to)
            })
            .await;
            assert_eq!(
                under(&store.count_by_master_key().await.unwrap(), &from),
                at_switch,
                "keys under {from} were written after the switch from it returned"
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut refused = 0;
        for writer in writers {
            refused += writer.await.unwrap();
        }
        assert!(
            refused >= u32::from(SWITCHES),
            "the writers kept writing across the switches ({refused} refusals)"
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
                ledger_entries_round_trip_per_chain,
                a_taken_ledger_place_is_a_conflict,
                a_run_of_ledger_entries_is_written_whole_or_not_at_all,
                a_run_past_one_statement_is_written_whole_or_not_at_all,
                concurrent_appends_to_distinct_chains_all_land,
                insert_with_ledger_writes_both_or_neither,
                a_group_of_keys_and_entries_is_written_whole_or_not_at_all,
                a_rotation_replaces_a_record_with_its_entry_or_nothing,
                the_deployment_switches_master_key_by_compare_and_set,
                a_key_under_a_switched_master_key_is_refused,
                no_key_under_the_old_master_key_lands_after_the_switch
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
