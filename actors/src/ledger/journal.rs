//! The ledger's journal: each usage record written to a file as it reaches the
//! ledger, so that a process killed between two flushes (SIGKILL, the OOM killer)
//! loses no usage: the next start moves what the journal holds into the spool,
//! which is replayed to the store (records carry their permit id: nothing counts
//! twice).
//!
//! Written, not synced: the kernel keeps what a killed process wrote, a machine
//! that loses power may not (the spool, which is fsynced, is what survives that).
//!
//! Files beside the spool, `<spool>.journal.<n>`: a flush cycle starts a new one
//! (`rotate`), and once the cycle has stored or spooled everything that was in
//! memory when it started, the files up to it are deleted (`settle`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::spool;
use crate::domain::UsageRecord;

pub struct Journal {
    base: PathBuf,
    /// The file new records go to.
    current: u64,
    /// The oldest file of this journal not yet deleted (files before it were
    /// left by an earlier process: `recover` reads them).
    oldest: u64,
    file: Option<File>,
    /// A write failed: said once, tried again with the next file.
    failed: bool,
}

impl Journal {
    /// A journal beside `spool_path`, starting after the files already there.
    pub fn new(spool_path: &Path) -> Journal {
        let base = journal_base(spool_path);
        let current = files(&base).last().map_or(0, |(n, _)| n + 1);
        Journal {
            base,
            current,
            oldest: current,
            file: None,
            failed: false,
        }
    }

    /// Writes one record to the current file.
    pub fn write(&mut self, record: &UsageRecord) {
        let mut frame = Vec::with_capacity(256);
        if spool::encode(record, &mut frame).is_err() {
            return;
        }
        let result = match &mut self.file {
            Some(f) => f.write_all(&frame),
            None => match open(&self.base, self.current) {
                Ok(mut f) => {
                    let r = f.write_all(&frame);
                    self.file = Some(f);
                    r
                }
                Err(e) => Err(e),
            },
        };
        if let Err(e) = result {
            if !self.failed {
                tracing::error!(error = %e, "ledger: cannot write the journal; records wait in memory only until the next flush");
            }
            self.failed = true;
            self.file = None;
        }
    }

    /// Starts a new file for the records that arrive from now on; returns the
    /// number of the last file written so far (every record in it and before it
    /// is in memory now, or stored, or spooled).
    pub fn rotate(&mut self) -> u64 {
        let sealed = self.current;
        if self.file.take().is_some() || self.failed {
            self.current += 1;
            self.failed = false;
        }
        sealed
    }

    /// Deletes this journal's files up to `upto` (never the one in use): what
    /// they hold is stored or spooled.
    pub fn settle(&mut self, upto: u64) {
        while self.oldest <= upto && self.oldest < self.current {
            let path = file_path(&self.base, self.oldest);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(error = %e, path = %path.display(), "ledger: cannot delete a settled journal file (its records would be replayed again, harmlessly)")
                }
            }
            self.oldest += 1;
        }
    }

    /// Deletes files an earlier process left, up to `upto` (once spooled).
    pub fn remove_left(spool_path: &Path, upto: u64) {
        for (n, path) in files(&journal_base(spool_path)) {
            if n > upto {
                break;
            }
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(error = %e, path = %path.display(), "ledger: cannot delete a recovered journal file (its records would be spooled again, harmlessly)");
            }
        }
    }

    /// The number of the file new records go to.
    #[cfg(test)]
    pub fn current(&self) -> u64 {
        self.current
    }
}

/// Every record in the journal files beside `spool_path`, oldest first, with the
/// number of the last file read (None when there are none).
pub fn recover(spool_path: &Path) -> (Vec<UsageRecord>, Option<u64>) {
    let mut records = Vec::new();
    let mut last = None;
    for (n, path) in files(&journal_base(spool_path)) {
        last = Some(n);
        match spool::Reader::<UsageRecord>::open(&path, 0) {
            Ok(Some(mut reader)) => loop {
                match reader.next() {
                    Ok(Some(r)) => records.push(r),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!(error = %e, path = %path.display(), "ledger: cannot read a journal file");
                        break;
                    }
                }
            },
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, path = %path.display(), "ledger: cannot open a journal file"),
        }
    }
    (records, last)
}

fn journal_base(spool_path: &Path) -> PathBuf {
    let mut name = spool_path.as_os_str().to_owned();
    name.push(".journal.");
    PathBuf::from(name)
}

fn open(base: &Path, n: u64) -> std::io::Result<File> {
    let path = file_path(base, n);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

fn file_path(base: &Path, n: u64) -> PathBuf {
    let mut name = base.as_os_str().to_owned();
    name.push(n.to_string());
    PathBuf::from(name)
}

/// The journal files of `base`, by number.
fn files(base: &Path) -> Vec<(u64, PathBuf)> {
    let dir = match base.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.to_path_buf(),
        None => PathBuf::from("."),
    };
    let Some(prefix) = base.file_name().and_then(|p| p.to_str()) else {
        return Vec::new();
    };
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name();
                    let n = name.to_str()?.strip_prefix(prefix)?.parse::<u64>().ok()?;
                    Some((n, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plans::{month_of, Resource};

    fn record(n: u64) -> UsageRecord {
        UsageRecord {
            id: uuid::Uuid::from_u128(u128::from(n) + 1),
            user_id: uuid::Uuid::nil(),
            resource: Resource::ApiCalls,
            quantity: n,
            period: month_of(chrono::Utc::now()),
            metadata: serde_json::json!({}),
            created_at: chrono::Utc::now(),
        }
    }

    fn quantities(spool: &Path) -> Vec<u64> {
        recover(spool).0.iter().map(|r| r.quantity).collect()
    }

    #[test]
    fn records_survive_until_settled_and_rotation_keeps_the_newer_ones() {
        let dir = std::env::temp_dir().join(format!("ragchat-journal-{}", uuid::Uuid::new_v4().simple()));
        let spool = dir.join("spool.bin");
        let mut j = Journal::new(&spool);
        assert_eq!(recover(&spool), (Vec::new(), None));
        j.write(&record(1));
        j.write(&record(2));
        // A flush cycle starts: 1 and 2 are in its batch; 3 arrives meanwhile.
        let sealed = j.rotate();
        j.write(&record(3));
        assert_eq!(quantities(&spool), [1, 2, 3], "a killed process leaves all three");
        j.settle(sealed);
        assert_eq!(quantities(&spool), [3], "the cycle stored 1 and 2");
        // A rotation with nothing written keeps the same file; settling it while
        // records are being written to it is refused.
        let sealed = j.rotate();
        j.settle(sealed);
        assert_eq!(quantities(&spool), Vec::<u64>::new());
        j.write(&record(4));
        j.settle(j.current());
        assert_eq!(quantities(&spool), [4], "the file in use is kept");
        // A new instance starts after the files left behind.
        let next = Journal::new(&spool);
        assert!(next.current() > j.current());
        let _ = std::fs::remove_dir_all(dir);
    }
}
