//! BillingLedger: the one writer of usage records. Sessions `do_send` a `Record`
//! per completed permit (never dropped: the ledger's mailbox is unbounded on
//! purpose, as a lost record is lost money); the ledger writes them in batches
//! every `flush_interval` or when `max_batch` are waiting.
//!
//! Durability: while the store is unreachable, batches go to a local append-only
//! spool file (JSON lines, fsynced) instead; every flush first replays the spool,
//! and the spool is truncated only after the store has accepted its records. Each
//! record carries its permit id as idempotency key, so a replay after a partial
//! failure never counts twice. `Flush` (sent on graceful shutdown) writes or spools
//! everything still in memory.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::domain::UsageRecord;
use crate::ports::UsageStore;

#[derive(Debug, Clone)]
pub struct LedgerConfig {
    pub flush_interval: Duration,
    pub max_batch: usize,
    pub spool_path: PathBuf,
}

#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Record(pub UsageRecord);

/// Write (or spool) everything now; answers when done.
#[derive(Message, Debug)]
#[rtype(result = "LedgerStats")]
pub struct Flush;

#[derive(Message, Debug)]
#[rtype(result = "LedgerStats")]
pub struct GetStats;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LedgerStats {
    /// Records in memory, not yet written.
    pub buffered: usize,
    /// Records waiting in the spool file.
    pub spooled: usize,
    /// Records the store accepted (new ones) since start.
    pub written: u64,
    pub failed_flushes: u64,
    pub store_down: bool,
}

pub struct BillingLedger {
    store: Arc<dyn UsageStore>,
    config: LedgerConfig,
    buffer: Vec<UsageRecord>,
    flushing: bool,
    stats: LedgerStats,
}

impl BillingLedger {
    pub fn new(store: Arc<dyn UsageStore>, config: LedgerConfig) -> Self {
        let spooled = read_spool(&config.spool_path).map(|v| v.len()).unwrap_or(0);
        BillingLedger {
            store,
            config,
            buffer: Vec::new(),
            flushing: false,
            stats: LedgerStats {
                spooled,
                ..Default::default()
            },
        }
    }

    /// One flush cycle: replay the spool, then write the buffer (or spool it).
    fn flush_cycle(&mut self) -> ResponseActFuture<Self, LedgerStats> {
        if self.flushing {
            return Box::pin(fut::ready(self.stats_now()));
        }
        self.flushing = true;
        let batch: Vec<UsageRecord> = std::mem::take(&mut self.buffer);
        let store = self.store.clone();
        let path = self.config.spool_path.clone();
        let max_batch = self.config.max_batch.max(1);
        let work = async move {
            let mut written = 0u64;
            let mut failed = false;
            // 1. The spool first, so records reach the store in arrival order.
            let spooled = read_spool(&path).unwrap_or_default();
            if !spooled.is_empty() {
                let mut ok = true;
                for chunk in spooled.chunks(max_batch) {
                    match store.insert_usage(chunk).await {
                        Ok(n) => written += n,
                        Err(e) => {
                            tracing::warn!(error = %e, records = spooled.len(), "ledger: spool replay failed");
                            ok = false;
                            break;
                        }
                    }
                }
                if ok {
                    if let Err(e) = truncate_spool(&path) {
                        tracing::error!(error = %e, "ledger: cannot truncate the spool (replay is idempotent)");
                    } else {
                        tracing::info!(records = spooled.len(), "ledger: spool replayed");
                    }
                } else {
                    failed = true;
                }
            }
            // 2. The buffer: to the store, or behind the spool while the store is down.
            if !batch.is_empty() {
                if failed {
                    spool_or_log(&path, &batch);
                } else {
                    for (i, chunk) in batch.chunks(max_batch).enumerate() {
                        match store.insert_usage(chunk).await {
                            Ok(n) => written += n,
                            Err(e) => {
                                tracing::warn!(error = %e, "ledger: store unreachable, spooling");
                                failed = true;
                                spool_or_log(&path, &batch[i * max_batch..]);
                                break;
                            }
                        }
                    }
                }
            }
            let spooled_now = read_spool(&path).map(|v| v.len()).unwrap_or(0);
            (written, failed, spooled_now)
        };
        Box::pin(work.into_actor(self).map(|(written, failed, spooled), act, _| {
            act.flushing = false;
            act.stats.written += written;
            act.stats.spooled = spooled;
            act.stats.store_down = failed;
            if failed {
                act.stats.failed_flushes += 1;
            }
            act.stats_now()
        }))
    }

    fn stats_now(&self) -> LedgerStats {
        LedgerStats {
            buffered: self.buffer.len(),
            ..self.stats
        }
    }
}

fn spool_or_log(path: &PathBuf, records: &[UsageRecord]) {
    if let Err(e) = append_spool(path, records) {
        // Nothing else can be done durably; make it loud.
        tracing::error!(error = %e, records = records.len(), "ledger: CANNOT SPOOL usage records");
    }
}

fn append_spool(path: &PathBuf, records: &[UsageRecord]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = OpenOptions::new().create(true).append(true).open(path)?;
    let mut buf = Vec::new();
    for r in records {
        serde_json::to_writer(&mut buf, r).map_err(std::io::Error::other)?;
        buf.push(b'\n');
    }
    f.write_all(&buf)?;
    f.sync_data()
}

/// Reads the spool; a torn last line (crash mid-append) is skipped.
fn read_spool(path: &PathBuf) -> std::io::Result<Vec<UsageRecord>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for line in BufReader::new(f).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<UsageRecord>(&line) {
            Ok(r) => out.push(r),
            Err(e) => tracing::warn!(error = %e, "ledger: skipping an unreadable spool line"),
        }
    }
    Ok(out)
}

fn truncate_spool(path: &PathBuf) -> std::io::Result<()> {
    let f = OpenOptions::new().write(true).truncate(true).open(path)?;
    f.sync_all()
}

impl Actor for BillingLedger {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.config.flush_interval, |act, ctx| {
            if !act.buffer.is_empty() || act.stats.spooled > 0 {
                let f = act.flush_cycle();
                ctx.spawn(f.map(|_, _, _| ()));
            }
        });
    }
}

impl Handler<Record> for BillingLedger {
    type Result = ();

    fn handle(&mut self, msg: Record, ctx: &mut Self::Context) {
        self.buffer.push(msg.0);
        if self.buffer.len() >= self.config.max_batch && !self.flushing {
            let f = self.flush_cycle();
            ctx.spawn(f.map(|_, _, _| ()));
        }
    }
}

impl Handler<Flush> for BillingLedger {
    type Result = ResponseActFuture<Self, LedgerStats>;

    fn handle(&mut self, _: Flush, _ctx: &mut Self::Context) -> Self::Result {
        if self.flushing {
            // Wait for the running cycle, then run one more for what arrived since.
            return Box::pin(actix::clock::sleep(Duration::from_millis(20)).into_actor(self).then(
                |_, act, _| -> ResponseActFuture<Self, LedgerStats> {
                    if act.flushing {
                        Box::pin(fut::ready(act.stats_now()))
                    } else {
                        act.flush_cycle()
                    }
                },
            ));
        }
        self.flush_cycle()
    }
}

impl Handler<GetStats> for BillingLedger {
    type Result = MessageResult<GetStats>;

    fn handle(&mut self, _: GetStats, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.stats_now())
    }
}
