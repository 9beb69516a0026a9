//! The audit ledger's data (v2): what one entry holds, the exact bytes its MAC covers, and the
//! rows the store keeps. The store only persists and reads rows; the MACs are computed and
//! checked inside the HSM by the engine (driver-core's `ledger` module), under a
//! non-extractable key of its own purpose (`custody_model::MacKey::Ledger`).
//!
//! Every key the deployment generates and every signature it makes is appended to the chain of
//! the driver that did it: one chain per driver id, numbered from 1, each entry carrying the
//! previous entry's MAC. Someone who can write to the database but cannot use the HSM can
//! delete, alter, reorder or renumber rows, but cannot compute the MAC of anything they write,
//! so the first entry they touch no longer verifies. Deleting a chain's newest entries leaves a
//! shorter valid chain: that is caught against checkpoints kept outside the database (the API's
//! and an optional local file, see `docs/ledger.md`).
//!
//! # The entry MAC, exactly
//!
//! ```text
//! mac = HMAC-SHA256( ledger key, message )
//! message = DOMAIN_TAG || field(chain) || field(seq) || prev_mac
//!           || field(job_id) || field(key_id) || field(kind) || field(payload_digest)
//!           || field(result) || field(created_at_ms)
//!
//! DOMAIN_TAG = the 21 ASCII bytes "hsm-driver/ledger/v2\n" (no length prefix)
//! field(x)   = len(x) as an 8-byte unsigned big-endian integer, then the bytes of x
//! chain      = the driver id, UTF-8
//! seq        = 8 bytes, unsigned big-endian (so field(seq) is 00..08 followed by seq)
//! prev_mac   = the previous entry's mac in the same chain, 32 raw bytes (no length prefix);
//!              32 zero bytes for the first entry (seq 1)
//! job_id, key_id = their UTF-8 bytes
//! kind       = the ASCII bytes "KeyGeneration", "Signature" or "KeyRewrap"
//! payload_digest = its 32 bytes; result = its bytes
//! created_at_ms = 8 bytes, big-endian two's complement (i64)
//! ```
//!
//! The same in Python, for a check that does not trust this crate (`row` is one `ledger` row as
//! stored; `prev` the previous row's `mac` in the same chain, or 32 zero bytes before seq 1):
//!
//! ```text
//! import struct
//! def field(b): return struct.pack(">Q", len(b)) + b
//! def message(row, prev):
//!     m = b"hsm-driver/ledger/v2\n" + field(row.chain.encode()) + field(struct.pack(">Q", row.seq))
//!     m += prev
//!     for b in [row.job_id.encode(), row.key_id.encode(), row.kind.encode(),
//!               row.payload_digest, row.result, struct.pack(">q", row.created_at_ms)]:
//!         m += field(b)
//!     return m   # the HSM checks hmac(ledger_key, m, sha256) == row.mac
//! ```
//!
//! The length prefixes make the encoding unambiguous: no two different entries encode to the
//! same bytes, whatever their strings contain. The chain and seq are inside the MAC, so an entry
//! cannot be moved to another chain or position. [`mac_message`] is the reference
//! implementation and the unit tests below pin a known answer.
//!
//! # The pre-v2 log
//!
//! The `audit_log` table of earlier versions (one global SHA-256 hash chain that anyone with
//! write access could recompute) is left in the database untouched and readable by SQL, but is
//! no longer written or verified.

use std::fmt;

/// The bytes every MAC message starts with, so a ledger MAC can never stand for a MAC of
/// anything else (and a future encoding gets a new tag).
pub const DOMAIN_TAG: &[u8; 21] = b"hsm-driver/ledger/v2\n";

/// The `prev_mac` of a chain's first entry (seq 1): 32 zero bytes.
pub const GENESIS_PREV_MAC: [u8; 32] = [0; 32];

/// What a ledger entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// A key was generated; the result is its public key.
    KeyGeneration,
    /// A payload was signed; the result is the signature.
    Signature,
    /// A master-key rotation moved a key to another master key; the payload digest is the
    /// SHA-256 of the new wrapped key, the result the new master key's fingerprint (ASCII hex).
    KeyRewrap,
}

impl EntryKind {
    /// The name stored in the `kind` column and MACed: `"KeyGeneration"`, `"Signature"` or
    /// `"KeyRewrap"`.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::KeyGeneration => "KeyGeneration",
            EntryKind::Signature => "Signature",
            EntryKind::KeyRewrap => "KeyRewrap",
        }
    }

    /// The kind named `name`, if it is one ([`as_str`](Self::as_str) reversed).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "KeyGeneration" => Some(EntryKind::KeyGeneration),
            "Signature" => Some(EntryKind::Signature),
            "KeyRewrap" => Some(EntryKind::KeyRewrap),
            _ => None,
        }
    }
}

impl fmt::Display for EntryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event to append (the engine assigns its chain, seq and MAC).
#[derive(Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    /// The API job that asked for the key or signature.
    pub job_id: String,
    /// The key generated or used.
    pub key_id: String,
    /// Key generation or signature.
    pub kind: EntryKind,
    /// SHA-256 of the signed payload; for a key generation, SHA-256 of the public key.
    pub payload_digest: [u8; 32],
    /// The public key (key generation) or the encoded signature (signature).
    pub result: Vec<u8>,
    /// When it happened, in milliseconds since the Unix epoch.
    pub created_at_ms: i64,
}

impl fmt::Debug for LedgerEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LedgerEntry")
            .field("job_id", &self.job_id)
            .field("key_id", &self.key_id)
            .field("kind", &self.kind)
            .field("payload_digest", &hex::encode(self.payload_digest))
            .field("result", &hex::encode(&self.result))
            .field("created_at_ms", &self.created_at_ms)
            .finish()
    }
}

/// An entry with its place in its chain and its MAC: what is written as one `ledger` row.
#[derive(Clone, PartialEq, Eq)]
pub struct LedgerRecord {
    /// The chain: the id of the driver that appended it.
    pub chain: String,
    /// Position in the chain: 1 for the first entry, then contiguous.
    pub seq: u64,
    /// The entry.
    pub entry: LedgerEntry,
    /// The previous entry's `mac` ([`GENESIS_PREV_MAC`] for seq 1).
    pub prev_mac: [u8; 32],
    /// HMAC-SHA256 under the HSM's ledger key of [`mac_message`]`(chain, seq, prev_mac, entry)`.
    pub mac: [u8; 32],
}

impl LedgerRecord {
    /// The bytes this record's MAC covers.
    pub fn mac_message(&self) -> Vec<u8> {
        mac_message(&self.chain, self.seq, &self.prev_mac, &self.entry)
    }
}

impl fmt::Debug for LedgerRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LedgerRecord")
            .field("chain", &self.chain)
            .field("seq", &self.seq)
            .field("entry", &self.entry)
            .field("prev_mac", &hex::encode(self.prev_mac))
            .field("mac", &hex::encode(self.mac))
            .finish()
    }
}

/// A `ledger` row exactly as read from the database, before its lengths and kind are checked:
/// a row altered outside the store may not even decode, and a verifier must still name it.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredLedgerRow {
    /// The chain (driver id).
    pub chain: String,
    /// The seq as stored.
    pub seq: i64,
    /// The job id.
    pub job_id: String,
    /// The key id.
    pub key_id: String,
    /// The kind's name.
    pub kind: String,
    /// The payload digest (32 bytes if intact).
    pub payload_digest: Vec<u8>,
    /// The public key or signature.
    pub result: Vec<u8>,
    /// Milliseconds since the Unix epoch.
    pub created_at_ms: i64,
    /// The previous entry's MAC (32 bytes if intact).
    pub prev_mac: Vec<u8>,
    /// This entry's MAC (32 bytes if intact).
    pub mac: Vec<u8>,
}

impl StoredLedgerRow {
    /// The record, or what makes the row unreadable.
    ///
    /// # Errors
    /// A description of the first malformed column (a negative seq, an unknown kind, a digest
    /// or MAC that is not 32 bytes).
    pub fn decode(&self) -> Result<LedgerRecord, String> {
        let bytes32 = |name: &str, bytes: &[u8]| -> Result<[u8; 32], String> {
            <[u8; 32]>::try_from(bytes)
                .map_err(|_| format!("{name} is {} bytes, not 32", bytes.len()))
        };
        Ok(LedgerRecord {
            chain: self.chain.clone(),
            seq: u64::try_from(self.seq).map_err(|_| "negative seq".to_owned())?,
            entry: LedgerEntry {
                job_id: self.job_id.clone(),
                key_id: self.key_id.clone(),
                kind: EntryKind::from_name(&self.kind)
                    .ok_or_else(|| format!("unknown kind {:?}", self.kind))?,
                payload_digest: bytes32("payload_digest", &self.payload_digest)?,
                result: self.result.clone(),
                created_at_ms: self.created_at_ms,
            },
            prev_mac: bytes32("prev_mac", &self.prev_mac)?,
            mac: bytes32("mac", &self.mac)?,
        })
    }
}

impl From<&LedgerRecord> for StoredLedgerRow {
    fn from(record: &LedgerRecord) -> Self {
        StoredLedgerRow {
            chain: record.chain.clone(),
            // Seqs are assigned from 1 and checked to fit when written.
            seq: i64::try_from(record.seq).unwrap_or(i64::MAX),
            job_id: record.entry.job_id.clone(),
            key_id: record.entry.key_id.clone(),
            kind: record.entry.kind.as_str().to_owned(),
            payload_digest: record.entry.payload_digest.to_vec(),
            result: record.entry.result.clone(),
            created_at_ms: record.entry.created_at_ms,
            prev_mac: record.prev_mac.to_vec(),
            mac: record.mac.to_vec(),
        }
    }
}

impl fmt::Debug for StoredLedgerRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredLedgerRow")
            .field("chain", &self.chain)
            .field("seq", &self.seq)
            .field("job_id", &self.job_id)
            .field("key_id", &self.key_id)
            .field("kind", &self.kind)
            .field("payload_digest", &hex::encode(&self.payload_digest))
            .field("result", &hex::encode(&self.result))
            .field("created_at_ms", &self.created_at_ms)
            .field("prev_mac", &hex::encode(&self.prev_mac))
            .field("mac", &hex::encode(&self.mac))
            .finish()
    }
}

/// Where the previous entry's MAC sits in [`mac_message`]`(chain, ..)`: after the tag, the
/// chain and the seq. The HSM writes each MAC there when it MACs a run of entries in one
/// request (`custody_model::MacChain`).
pub fn prev_mac_offset(chain: &str) -> usize {
    DOMAIN_TAG.len() + 8 + chain.len() + 8 + 8
}

/// The bytes the MAC of the entry at `seq` of `chain`, after an entry whose MAC is
/// `prev_mac`, covers; the encoding is in the [module documentation](self).
pub fn mac_message(chain: &str, seq: u64, prev_mac: &[u8; 32], entry: &LedgerEntry) -> Vec<u8> {
    // The tag, the 32-byte link, 9 length prefixes and the fixed-size fields, then the rest.
    let variable = chain.len() + entry.job_id.len() + entry.key_id.len() + entry.result.len();
    let mut message =
        Vec::with_capacity(DOMAIN_TAG.len() + 32 + 9 * 8 + 8 + 16 + 32 + 8 + variable);
    message.extend_from_slice(DOMAIN_TAG);
    let field = |message: &mut Vec<u8>, bytes: &[u8]| {
        // usize always fits in u64 on the platforms we build for.
        message.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
        message.extend_from_slice(bytes);
    };
    field(&mut message, chain.as_bytes());
    field(&mut message, &seq.to_be_bytes());
    message.extend_from_slice(prev_mac);
    field(&mut message, entry.job_id.as_bytes());
    field(&mut message, entry.key_id.as_bytes());
    field(&mut message, entry.kind.as_str().as_bytes());
    field(&mut message, &entry.payload_digest);
    field(&mut message, &entry.result);
    field(&mut message, &entry.created_at_ms.to_be_bytes());
    message
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    use super::*;

    fn entry() -> LedgerEntry {
        LedgerEntry {
            job_id: "job-1".into(),
            key_id: "key-1".into(),
            kind: EntryKind::Signature,
            payload_digest: [1; 32],
            result: vec![1, 0, 255],
            created_at_ms: 1_700_000_000_001,
        }
    }

    #[test]
    fn the_previous_mac_sits_where_prev_mac_offset_says() {
        for chain in ["", "driver-a", "a chain id with spaces and ünïcode"] {
            let prev = [0xa5; 32];
            let message = mac_message(chain, 7, &prev, &entry());
            let at = prev_mac_offset(chain);
            assert_eq!(&message[at..at + 32], &prev, "chain {chain:?}");
            // And nowhere else: a different link changes only those 32 bytes.
            let other = mac_message(chain, 7, &[0x5a; 32], &entry());
            let differing: Vec<usize> = (0..message.len())
                .filter(|i| message[*i] != other[*i])
                .collect();
            assert_eq!(
                differing,
                (at..at + 32).collect::<Vec<_>>(),
                "chain {chain:?}"
            );
        }
    }

    /// HMAC-SHA256 (RFC 2104) for the known answer, written out independently of hsm-pkcs11.
    fn hmac(key: &[u8; 32], message: &[u8]) -> [u8; 32] {
        let mut ipad = [0x36u8; 64];
        let mut opad = [0x5cu8; 64];
        for (i, k) in key.iter().enumerate() {
            ipad[i] ^= k;
            opad[i] ^= k;
        }
        let inner = Sha256::new()
            .chain_update(ipad)
            .chain_update(message)
            .finalize();
        Sha256::new()
            .chain_update(opad)
            .chain_update(inner)
            .finalize()
            .into()
    }

    #[test]
    fn the_message_is_the_documented_encoding() {
        // Re-implements the documented encoding byte by byte, as a customer would.
        let mut bytes = Vec::new();
        bytes.extend_from_slice(b"hsm-driver/ledger/v2\n");
        bytes.extend_from_slice(&8u64.to_be_bytes());
        bytes.extend_from_slice(b"driver-a");
        bytes.extend_from_slice(&8u64.to_be_bytes());
        bytes.extend_from_slice(&7u64.to_be_bytes());
        bytes.extend_from_slice(&[0xab; 32]);
        let fields: [&[u8]; 6] = [
            b"job-1",
            b"key-1",
            b"Signature",
            &[1; 32],
            &[1, 0, 255],
            &1_700_000_000_001i64.to_be_bytes(),
        ];
        for field in fields {
            bytes.extend_from_slice(&(field.len() as u64).to_be_bytes());
            bytes.extend_from_slice(field);
        }
        assert_eq!(mac_message("driver-a", 7, &[0xab; 32], &entry()), bytes);
    }

    #[test]
    fn the_mac_has_a_known_answer() {
        // Pinned so that any change to the encoding fails here first: a changed encoding breaks
        // every stored chain, and needs a new domain tag. Computed independently with Python's
        // hmac module from the documented encoding, with the ledger key 32 bytes of 0x42.
        let message = mac_message("driver-a", 1, &GENESIS_PREV_MAC, &entry());
        assert_eq!(hex::encode(hmac(&[0x42; 32], &message)), KNOWN_ANSWER);
    }

    const KNOWN_ANSWER: &str = "8dd4b8b13ca7ef818f3f567251cbb79dd9b33fedb46c6f1617c8ede40998a8e0";

    #[test]
    fn length_prefixes_keep_moved_bytes_apart() {
        let mut a = entry();
        let mut b = entry();
        a.job_id = "ab".into();
        a.key_id = "c".into();
        b.job_id = "a".into();
        b.key_id = "bc".into();
        assert_ne!(
            mac_message("d", 1, &GENESIS_PREV_MAC, &a),
            mac_message("d", 1, &GENESIS_PREV_MAC, &b),
            "moving a byte from one field to the next changes the message"
        );
        assert_ne!(
            mac_message("d1", 1, &GENESIS_PREV_MAC, &entry()),
            mac_message("d", 11, &GENESIS_PREV_MAC, &entry()),
            "nor can the chain and the seq trade bytes"
        );
    }

    #[test]
    fn a_row_round_trips_and_a_malformed_one_says_why() {
        let record = LedgerRecord {
            chain: "driver-a".into(),
            seq: 3,
            entry: entry(),
            prev_mac: [2; 32],
            mac: [3; 32],
        };
        let row = StoredLedgerRow::from(&record);
        assert_eq!(row.decode(), Ok(record));
        let mut short = row.clone();
        short.mac.pop();
        assert_eq!(short.decode().unwrap_err(), "mac is 31 bytes, not 32");
        let mut unknown = row.clone();
        unknown.kind = "Transfer".into();
        assert!(unknown.decode().unwrap_err().contains("unknown kind"));
        let mut negative = row;
        negative.seq = -1;
        assert_eq!(negative.decode().unwrap_err(), "negative seq");
    }
}
