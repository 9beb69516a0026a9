//! The local checkpoint file (`[ledger] checkpoint_file`): this driver's ledger chain heads,
//! one JSON object per line, each line fsynced before the next is written.
//!
//! ```text
//! {"chain":"driver-1","seq":42,"mac":"<64 hex digits>","recorded_at_ms":1764000000000}
//! ```
//!
//! `hsm-driver audit verify --checkpoint-file` reads every line back as a checkpoint: an entry
//! the file records that is missing from the ledger, or stored with another MAC, means the
//! ledger was truncated or rewritten. Keep the file where whoever can write to the database
//! cannot write.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use custody_model::now_ms;
use driver_core::ChainHead;
use driver_core::ledger::Checkpoints;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// One line of the file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    chain: String,
    seq: u64,
    mac: String,
    recorded_at_ms: i64,
}

/// Appends `head` as one line and fsyncs the file. Blocking.
pub(crate) fn append(path: &Path, head: &ChainHead) -> anyhow::Result<()> {
    let line = Line {
        chain: head.chain.clone(),
        seq: head.seq,
        mac: hex_string(&head.mac),
        recorded_at_ms: now_ms(),
    };
    let mut text = serde_json::to_string(&line).context("encoding a checkpoint")?;
    text.push('\n');
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening the checkpoint file {}", path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_data())
        .with_context(|| format!("writing the checkpoint file {}", path.display()))
}

/// Reads every checkpoint in the file. Blocking.
///
/// # Errors
/// The file cannot be read, or a line is not a checkpoint (the error names the line).
pub(crate) fn read(path: &Path) -> anyhow::Result<Checkpoints> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the checkpoint file {}", path.display()))?;
    let mut checkpoints = Checkpoints::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{} line {}", path.display(), index + 1);
        let line: Line = serde_json::from_str(line).with_context(at)?;
        checkpoints.insert(ChainHead {
            chain: line.chain,
            seq: line.seq,
            mac: parse_mac(&line.mac).with_context(at)?,
        });
    }
    Ok(checkpoints)
}

/// 64 hex digits as 32 bytes.
pub(crate) fn parse_mac(hex: &str) -> anyhow::Result<[u8; 32]> {
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("a MAC must be 64 hex digits, got {hex:?}");
    }
    let mut mac = [0u8; 32];
    for (i, byte) in mac.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)?;
    }
    Ok(mac)
}

/// Writes the head each time it changes, at most once per `interval`, until `stop` is
/// cancelled (the driver stopped); then the newest head once more if it was not written yet.
pub(crate) async fn keep_writing(
    path: PathBuf,
    interval: Duration,
    mut head: watch::Receiver<Option<ChainHead>>,
    stop: CancellationToken,
) {
    let mut written: Option<ChainHead> = None;
    loop {
        let current = head.borrow_and_update().clone();
        write_if_new(&path, current, &mut written).await;
        let next_change = async {
            tokio::time::sleep(interval).await;
            head.changed().await
        };
        tokio::select! {
            () = stop.cancelled() => break,
            changed = next_change => if changed.is_err() { break },
        }
    }
    let last = head.borrow().clone();
    write_if_new(&path, last, &mut written).await;
}

/// Appends `current` unless it is the head last written.
async fn write_if_new(path: &Path, current: Option<ChainHead>, written: &mut Option<ChainHead>) {
    let Some(current) = current.filter(|c| written.as_ref() != Some(c)) else {
        return;
    };
    let (path, line) = (path.to_owned(), current.clone());
    match tokio::task::spawn_blocking(move || append(&path, &line)).await {
        Ok(Ok(())) => {
            debug!(head = %current, "ledger checkpoint written to the local file");
            *written = Some(current);
        }
        Ok(Err(e)) => warn!(error = format!("{e:#}"), "writing a ledger checkpoint"),
        Err(e) => warn!(error = %e, "the checkpoint writing task"),
    }
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(seq: u64) -> ChainHead {
        ChainHead {
            chain: "driver-1".into(),
            seq,
            mac: [u8::try_from(seq).unwrap(); 32],
        }
    }

    #[tokio::test]
    async fn the_newest_head_is_in_the_file_when_the_writer_stops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("heads.jsonl");
        let (heads, watching) = watch::channel(Some(head(1)));
        let stop = CancellationToken::new();
        let writer = tokio::spawn(keep_writing(
            path.clone(),
            Duration::from_secs(3600),
            watching,
            stop.clone(),
        ));
        // Changed within the (long) interval, then the driver stops: the last head is written
        // on the way out.
        heads.send_replace(Some(head(2)));
        heads.send_replace(Some(head(3)));
        stop.cancel();
        writer.await.unwrap();
        let written = read(&path).unwrap();
        assert!(written.iter().any(|h| *h == head(3)), "{written:?}");
        assert!(
            written.iter().all(|h| h.seq != 2),
            "at most one line per interval: {written:?}"
        );
    }

    #[test]
    fn checkpoints_round_trip_and_a_bad_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("heads.jsonl");
        let heads = [
            ChainHead {
                chain: "driver-1".into(),
                seq: 3,
                mac: [0xab; 32],
            },
            ChainHead {
                chain: "driver-1".into(),
                seq: 7,
                mac: [0x01; 32],
            },
        ];
        for head in &heads {
            append(&path, head).unwrap();
        }
        assert_eq!(read(&path).unwrap(), heads.iter().cloned().collect());

        std::fs::write(
            &path,
            "{\"chain\":\"d\",\"seq\":1,\"mac\":\"00\",\"recorded_at_ms\":0}\n",
        )
        .unwrap();
        let error = format!("{:#}", read(&path).unwrap_err());
        assert!(
            error.contains("line 1") && error.contains("64 hex"),
            "{error}"
        );
    }
}
