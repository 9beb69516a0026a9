//! The audit ledger's data and its hash chain: what one entry holds, how its hash is computed,
//! and how a chain of stored entries is checked.
//!
//! Every key the deployment generates and every signature it makes is appended to an
//! append-only log. Each entry carries the hash of the entry before it, so deleting, reordering
//! or altering a stored entry breaks the chain, and
//! [`DieselKeyStore::verify_audit`](crate::DieselKeyStore::verify_audit) names the first entry
//! where it breaks.
//!
//! # The entry hash, exactly
//!
//! ```text
//! entry_hash = SHA-256( DOMAIN_TAG || prev_hash || field(seq) || field(job_id) || field(key_id)
//!                       || field(kind) || field(payload_digest) || field(result)
//!                       || field(created_at_ms) || field(driver_id) )
//!
//! DOMAIN_TAG = the 24 ASCII bytes "hsm-driver/audit-log/v1\n" (no length prefix)
//! prev_hash  = the previous entry's entry_hash, 32 raw bytes (no length prefix);
//!              32 zero bytes for the first entry (seq 1)
//! field(x)   = len(x) as an 8-byte unsigned big-endian integer, then the bytes of x
//! seq        = 8 bytes, unsigned big-endian (so field(seq) is 00..08 followed by seq)
//! created_at_ms = 8 bytes, big-endian two's complement (i64)
//! job_id, key_id, driver_id = their UTF-8 bytes
//! kind       = the ASCII bytes "KeyGeneration" or "Signature"
//! payload_digest = its 32 bytes; result = its bytes
//! ```
//!
//! The same in Python, for a check that does not trust this crate (`row` is one `audit_log`
//! row as stored; `prev` the previous row's `entry_hash`, or 32 zero bytes before seq 1):
//!
//! ```text
//! import hashlib, struct
//! def field(b): return struct.pack(">Q", len(b)) + b
//! def entry_hash(row, prev):
//!     m = b"hsm-driver/audit-log/v1\n" + prev
//!     for b in [struct.pack(">Q", row.seq), row.job_id.encode(), row.key_id.encode(),
//!               row.kind.encode(), row.payload_digest, row.result,
//!               struct.pack(">q", row.created_at_ms), row.driver_id.encode()]:
//!         m += field(b)
//!     return hashlib.sha256(m).digest()
//! ```
//!
//! The length prefixes make the encoding unambiguous: no two different entries encode to the
//! same bytes, whatever their strings contain. [`entry_hash`] is the reference implementation
//! and the unit tests below pin a known answer.
//!
//! # What the chain detects, and what it cannot
//!
//! Reading the entries in ascending `seq` order, a checker expects `seq` 1, 2, 3… with no gap,
//! each `prev_hash` equal to the previous `entry_hash`, and each `entry_hash` equal to the hash
//! recomputed from the stored fields. A deleted entry shows as a gap, a reordered one as a broken
//! link, an altered one as a hash that does not recompute. Deleting the *newest* entries
//! leaves a shorter but valid chain: that is only detectable against an anchor kept outside the
//! database, such as the [`AuditVerification::head`] exported after an earlier check.

use std::fmt;

use sha2::{Digest, Sha256};

/// The bytes every entry hash starts with, so an entry hash can never be mistaken for a hash of
/// anything else (and a future encoding gets a new tag).
pub const DOMAIN_TAG: &[u8; 24] = b"hsm-driver/audit-log/v1\n";

/// The `prev_hash` of the first entry (seq 1): 32 zero bytes.
pub const GENESIS_PREV_HASH: [u8; 32] = [0; 32];

/// What an audit entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuditKind {
    /// A key was generated; the result is its public key.
    KeyGeneration,
    /// A payload was signed; the result is the signature.
    Signature,
}

impl AuditKind {
    /// The name stored in the `kind` column and hashed: `"KeyGeneration"` or `"Signature"`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::KeyGeneration => "KeyGeneration",
            AuditKind::Signature => "Signature",
        }
    }

    /// The kind named `name`, if it is one ([`as_str`](Self::as_str) reversed).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "KeyGeneration" => Some(AuditKind::KeyGeneration),
            "Signature" => Some(AuditKind::Signature),
            _ => None,
        }
    }
}

impl fmt::Display for AuditKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event to append to the audit log (the store assigns its seq and hashes).
#[derive(Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// The API job that asked for the key or signature.
    pub job_id: String,
    /// The key generated or used.
    pub key_id: String,
    /// Key generation or signature.
    pub kind: AuditKind,
    /// SHA-256 of the signed payload; for a key generation, SHA-256 of the public key.
    pub payload_digest: [u8; 32],
    /// The public key (key generation) or the encoded signature (signature).
    pub result: Vec<u8>,
    /// When it happened, in milliseconds since the Unix epoch.
    pub created_at_ms: i64,
    /// The driver that did it.
    pub driver_id: String,
}

impl fmt::Debug for AuditEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditEntry")
            .field("job_id", &self.job_id)
            .field("key_id", &self.key_id)
            .field("kind", &self.kind)
            .field("payload_digest", &hex::encode(self.payload_digest))
            .field("result", &hex::encode(&self.result))
            .field("created_at_ms", &self.created_at_ms)
            .field("driver_id", &self.driver_id)
            .finish()
    }
}

/// An entry as stored: the [`AuditEntry`] with its place in the chain.
#[derive(Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Position in the log: 1 for the first entry, then contiguous.
    pub seq: u64,
    /// The entry as appended.
    pub entry: AuditEntry,
    /// The previous entry's `entry_hash` ([`GENESIS_PREV_HASH`] for seq 1).
    pub prev_hash: [u8; 32],
    /// [`entry_hash`]`(seq, prev_hash, entry)`.
    pub entry_hash: [u8; 32],
}

impl AuditRecord {
    /// The record that follows `previous` (or starts the log when `previous` is `None`).
    pub(crate) fn next_after(previous: Option<(u64, [u8; 32])>, entry: AuditEntry) -> Self {
        let (seq, prev_hash) = match previous {
            Some((seq, hash)) => (seq + 1, hash),
            None => (1, GENESIS_PREV_HASH),
        };
        let entry_hash = entry_hash(seq, &prev_hash, &entry);
        AuditRecord {
            seq,
            entry,
            prev_hash,
            entry_hash,
        }
    }
}

impl fmt::Debug for AuditRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditRecord")
            .field("seq", &self.seq)
            .field("entry", &self.entry)
            .field("prev_hash", &hex::encode(self.prev_hash))
            .field("entry_hash", &hex::encode(self.entry_hash))
            .finish()
    }
}

/// The hash of the entry at `seq` whose predecessor's hash is `prev_hash`; the encoding is in
/// the [module documentation](self).
pub fn entry_hash(seq: u64, prev_hash: &[u8; 32], entry: &AuditEntry) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(DOMAIN_TAG);
    hasher.update(prev_hash);
    let mut field = |bytes: &[u8]| {
        // usize always fits in u64 on the platforms we build for.
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(bytes);
    };
    field(&seq.to_be_bytes());
    field(entry.job_id.as_bytes());
    field(entry.key_id.as_bytes());
    field(entry.kind.as_str().as_bytes());
    field(&entry.payload_digest);
    field(&entry.result);
    field(&entry.created_at_ms.to_be_bytes());
    field(entry.driver_id.as_bytes());
    hasher.finalize().into()
}

/// The first thing wrong with a stored audit chain.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuditProblem {
    /// The entry after `after` (0: the start of the log) has seq `found`, not `after + 1`: the
    /// entries in between were deleted (or renumbered).
    Gap {
        /// The last seq before the gap (0 if the log does not start at 1).
        after: u64,
        /// The seq found instead of `after + 1`.
        found: u64,
    },
    /// The entry's `prev_hash` is not the previous entry's `entry_hash`: an entry before it was
    /// deleted, replaced or moved.
    ChainBroken {
        /// The entry whose link does not match.
        seq: u64,
    },
    /// The entry's stored `entry_hash` does not match the hash of its stored fields: the entry
    /// was altered.
    Altered {
        /// The altered entry.
        seq: u64,
    },
    /// The stored row cannot even be read as an entry (a hash that is not 32 bytes, an unknown
    /// kind, a negative seq): it was altered outside the store.
    Malformed {
        /// The row's seq as stored.
        seq: i64,
        /// What is wrong with it.
        reason: String,
    },
}

impl AuditProblem {
    /// The seq of the entry where the problem was found.
    pub fn seq(&self) -> i64 {
        // Seqs come from the database as i64, so they fit back.
        match self {
            AuditProblem::Gap { found, .. } => *found as i64,
            AuditProblem::ChainBroken { seq } | AuditProblem::Altered { seq } => *seq as i64,
            AuditProblem::Malformed { seq, .. } => *seq,
        }
    }
}

impl fmt::Display for AuditProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuditProblem::Gap { after, found } => write!(
                f,
                "audit entry {found} follows entry {after}: entries {}..{found} are missing",
                after + 1
            ),
            AuditProblem::ChainBroken { seq } => write!(
                f,
                "audit entry {seq} does not link to the entry before it (deleted, replaced or \
                 reordered entries)"
            ),
            AuditProblem::Altered { seq } => {
                write!(f, "audit entry {seq} was altered: its hash does not match")
            }
            AuditProblem::Malformed { seq, reason } => {
                write!(f, "audit entry {seq} is malformed: {reason}")
            }
        }
    }
}

/// The result of checking the whole audit chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditVerification {
    /// How many entries were checked and found good (up to the first problem).
    pub entries_checked: u64,
    /// The last good entry's seq and entry hash. Export it and compare it with a later check's:
    /// deleting the newest entries leaves a valid but shorter chain that only an anchor kept
    /// elsewhere reveals (a later head must have a greater seq, or the same seq and hash).
    pub head: Option<(u64, [u8; 32])>,
    /// The first problem found; `None` if the chain is intact. Checking stops there.
    pub problem: Option<AuditProblem>,
}

impl AuditVerification {
    /// Whether no problem was found.
    pub fn is_intact(&self) -> bool {
        self.problem.is_none()
    }
}

/// Checks stored entries one at a time in ascending seq order, so a log of any length can be
/// checked in pages. Stops at the first problem.
#[derive(Debug, Default)]
pub(crate) struct AuditVerifier {
    entries_checked: u64,
    head: Option<(u64, [u8; 32])>,
    problem: Option<AuditProblem>,
}

impl AuditVerifier {
    /// Checks the next stored entry; returns `false` once a problem was found (stop reading).
    pub(crate) fn check(&mut self, record: &AuditRecord) -> bool {
        if self.problem.is_some() {
            return false;
        }
        let (expected_seq, expected_prev) = match self.head {
            Some((seq, hash)) => (seq + 1, hash),
            None => (1, GENESIS_PREV_HASH),
        };
        let problem = if record.seq != expected_seq {
            Some(AuditProblem::Gap {
                after: expected_seq - 1,
                found: record.seq,
            })
        } else if record.prev_hash != expected_prev {
            Some(AuditProblem::ChainBroken { seq: record.seq })
        } else if entry_hash(record.seq, &record.prev_hash, &record.entry) != record.entry_hash {
            Some(AuditProblem::Altered { seq: record.seq })
        } else {
            None
        };
        match problem {
            Some(problem) => {
                self.problem = Some(problem);
                false
            }
            None => {
                self.entries_checked += 1;
                self.head = Some((record.seq, record.entry_hash));
                true
            }
        }
    }

    /// Records a row that could not be decoded; checking stops.
    pub(crate) fn malformed(&mut self, seq: i64, reason: String) {
        if self.problem.is_none() {
            self.problem = Some(AuditProblem::Malformed { seq, reason });
        }
    }

    /// Whether checking should go on.
    pub(crate) fn is_ok(&self) -> bool {
        self.problem.is_none()
    }

    pub(crate) fn finish(self) -> AuditVerification {
        AuditVerification {
            entries_checked: self.entries_checked,
            head: self.head,
            problem: self.problem,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u8) -> AuditEntry {
        AuditEntry {
            job_id: format!("job-{i}"),
            key_id: format!("key-{i}"),
            kind: if i % 2 == 0 {
                AuditKind::KeyGeneration
            } else {
                AuditKind::Signature
            },
            payload_digest: [i; 32],
            result: vec![i, 0, 255],
            created_at_ms: 1_700_000_000_000 + i64::from(i),
            driver_id: "driver-a".to_owned(),
        }
    }

    fn chain(n: u8) -> Vec<AuditRecord> {
        let mut records: Vec<AuditRecord> = Vec::new();
        for i in 1..=n {
            let previous = records.last().map(|r| (r.seq, r.entry_hash));
            records.push(AuditRecord::next_after(previous, entry(i)));
        }
        records
    }

    fn verify(records: &[AuditRecord]) -> AuditVerification {
        let mut verifier = AuditVerifier::default();
        for record in records {
            if !verifier.check(record) {
                break;
            }
        }
        verifier.finish()
    }

    #[test]
    fn the_entry_hash_is_the_documented_encoding() {
        // Re-implements the documented encoding byte by byte, as a customer would.
        let e = entry(1);
        let mut bytes = Vec::new();
        bytes.extend_from_slice(b"hsm-driver/audit-log/v1\n");
        bytes.extend_from_slice(&[0xab; 32]);
        let fields: [&[u8]; 8] = [
            &7u64.to_be_bytes(),
            b"job-1",
            b"key-1",
            b"Signature",
            &[1; 32],
            &[1, 0, 255],
            &1_700_000_000_001i64.to_be_bytes(),
            b"driver-a",
        ];
        for field in fields {
            bytes.extend_from_slice(&(field.len() as u64).to_be_bytes());
            bytes.extend_from_slice(field);
        }
        let expected: [u8; 32] = Sha256::digest(&bytes).into();
        assert_eq!(entry_hash(7, &[0xab; 32], &e), expected);
    }

    #[test]
    fn the_entry_hash_has_a_known_answer() {
        // Pinned so that any change to the encoding fails here first: a changed encoding
        // breaks every stored chain, and needs a new domain tag. Computed independently with
        // Python's hashlib from the documented encoding.
        assert_eq!(
            hex::encode(entry_hash(1, &GENESIS_PREV_HASH, &entry(1))),
            KNOWN_ANSWER
        );
    }

    const KNOWN_ANSWER: &str = "b742cd55a78100820fe24fe192410b865d67d635e68321f54333b45dc95f8c62";

    #[test]
    fn length_prefixes_keep_moved_bytes_apart() {
        let mut a = entry(1);
        let mut b = entry(1);
        a.job_id = "ab".into();
        a.key_id = "c".into();
        b.job_id = "a".into();
        b.key_id = "bc".into();
        assert_ne!(
            entry_hash(1, &GENESIS_PREV_HASH, &a),
            entry_hash(1, &GENESIS_PREV_HASH, &b),
            "moving a byte from one field to the next changes the hash"
        );
    }

    #[test]
    fn an_intact_chain_verifies_and_reports_its_head() {
        let records = chain(5);
        let result = verify(&records);
        assert!(result.is_intact(), "{result:?}");
        assert_eq!(result.entries_checked, 5);
        assert_eq!(result.head, Some((5, records[4].entry_hash)));
        assert_eq!(records[0].prev_hash, GENESIS_PREV_HASH);
        assert_eq!(
            verify(&[]),
            AuditVerification {
                entries_checked: 0,
                head: None,
                problem: None
            },
            "an empty log is intact"
        );
    }

    #[test]
    fn tampering_is_found_at_the_first_bad_entry() {
        let records = chain(6);

        let mut deleted = records.clone();
        deleted.remove(2);
        let result = verify(&deleted);
        assert_eq!(
            result.problem,
            Some(AuditProblem::Gap { after: 2, found: 4 }),
            "deleting entry 3"
        );
        assert_eq!(result.entries_checked, 2);

        let mut first_deleted = records.clone();
        first_deleted.remove(0);
        assert_eq!(
            verify(&first_deleted).problem,
            Some(AuditProblem::Gap { after: 0, found: 2 }),
            "deleting entry 1"
        );

        // Deleting entry 3 and renumbering the rest hides the gap but not the broken link.
        let mut renumbered = deleted.clone();
        for r in &mut renumbered[2..] {
            r.seq -= 1;
        }
        assert_eq!(
            verify(&renumbered).problem,
            Some(AuditProblem::ChainBroken { seq: 3 }),
            "deleting entry 3 and renumbering"
        );

        let mut altered = records.clone();
        altered[3].entry.result.push(0);
        assert_eq!(
            verify(&altered).problem,
            Some(AuditProblem::Altered { seq: 4 }),
            "altering entry 4's result"
        );

        let mut swapped = records.clone();
        swapped.swap(1, 4);
        swapped[1].seq = 2;
        swapped[4].seq = 5;
        assert_eq!(
            verify(&swapped).problem,
            Some(AuditProblem::ChainBroken { seq: 2 }),
            "swapping entries 2 and 5"
        );

        let mut truncated = records.clone();
        truncated.pop();
        let result = verify(&truncated);
        assert!(
            result.is_intact(),
            "deleting the newest entry is invisible to the chain alone"
        );
        assert_ne!(
            result.head,
            verify(&records).head,
            "but the head differs from an anchor taken before"
        );
    }
}
