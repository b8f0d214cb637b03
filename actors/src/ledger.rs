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
//!
//! Supervision: the ledger runs under a [`Supervised`] handle ([`Ledger`]). If it
//! dies, what it held in memory (the buffer and a batch being written) goes to
//! the spool as it stops, records sent while it is down wait in the handle, and
//! the new instance replays the spool and receives them: nothing is lost.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;

use crate::domain::UsageRecord;
use crate::ports::UsageStore;
use crate::supervision::{Child, Mailbox, RestartPolicy, SendTracked, Supervised};

pub static LEDGER_MAILBOX: Mailbox = Mailbox::new("billing-ledger");
crate::tracked_mailbox!(BillingLedger, LEDGER_MAILBOX; Record, Flush, GetStats, Crash);

#[derive(Debug, Clone)]
pub struct LedgerConfig {
    pub flush_interval: Duration,
    pub max_batch: usize,
    pub spool_path: PathBuf,
}

type Parked = Arc<Mutex<Vec<UsageRecord>>>;

/// One usage record on its way to the ledger. If the message is dropped without
/// being handled (the ledger died with it in its mailbox, or was already gone),
/// the record is parked in the [`Ledger`] handle for the next instance.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Record {
    record: Option<UsageRecord>,
    parked: Parked,
}

impl Record {
    fn new(record: UsageRecord, parked: &Parked) -> Self {
        Record {
            record: Some(record),
            parked: parked.clone(),
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        if let Some(r) = self.record.take() {
            lock(&self.parked).push(r);
        }
    }
}

/// Write (or spool) everything now; answers when done.
#[derive(Message, Debug)]
#[rtype(result = "LedgerStats")]
pub struct Flush;

#[derive(Message, Debug)]
#[rtype(result = "LedgerStats")]
pub struct GetStats;

/// Makes the ledger panic (fault tests of its supervision).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Crash;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, MessageResponse)]
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
    /// A copy of the batch being written, until the write (or spool) is done.
    inflight: Vec<UsageRecord>,
    flushing: bool,
    stats: LedgerStats,
    child: Option<Arc<Child>>,
    /// While the store is down: the next attempt is not before this, and the
    /// wait doubles (from the flush interval to `RETRY_MAX`) with each failure;
    /// batches meanwhile go straight to the spool, which is not read again.
    retry_at: Option<std::time::Instant>,
    backoff: Duration,
}

/// The longest wait between two attempts at a store that is down.
const RETRY_MAX: Duration = Duration::from_secs(5);

impl BillingLedger {
    pub fn new(store: Arc<dyn UsageStore>, config: LedgerConfig) -> Self {
        let spooled = read_spool(&config.spool_path).map(|v| v.len()).unwrap_or(0);
        BillingLedger {
            store,
            config,
            buffer: Vec::new(),
            inflight: Vec::new(),
            flushing: false,
            stats: LedgerStats {
                spooled,
                ..Default::default()
            },
            child: None,
            retry_at: None,
            backoff: Duration::ZERO,
        }
    }

    /// Reports its exit to `child` (its supervisor).
    pub fn supervised_by(mut self, child: Arc<Child>) -> Self {
        self.child = Some(child);
        self
    }

    /// One flush cycle: replay the spool, then write the buffer (or spool it).
    fn flush_cycle(&mut self) -> ResponseActFuture<Self, LedgerStats> {
        if self.flushing {
            return Box::pin(fut::ready(self.stats_now()));
        }
        self.flushing = true;
        let batch: Vec<UsageRecord> = std::mem::take(&mut self.buffer);
        self.inflight = batch.clone();
        let waiting = self.stats.store_down && self.retry_at.is_some_and(|t| std::time::Instant::now() < t);
        if waiting {
            // The store was down a moment ago: the batch joins the spool, and
            // neither the store nor the spool file is touched otherwise.
            let path = self.config.spool_path.clone();
            let spooled = self.stats.spooled + batch.len();
            let work = async move {
                if !batch.is_empty() {
                    spool_or_log(&path, &batch);
                }
            };
            return Box::pin(work.into_actor(self).map(move |(), act, _| {
                act.flushing = false;
                act.inflight.clear();
                act.stats.spooled = spooled;
                act.stats_now()
            }));
        }
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
            act.inflight.clear();
            act.stats.written += written;
            act.stats.spooled = spooled;
            act.stats.store_down = failed;
            if failed {
                act.stats.failed_flushes += 1;
                let first = act.config.flush_interval.max(Duration::from_millis(10));
                act.backoff = if act.backoff.is_zero() {
                    first
                } else {
                    (act.backoff * 2).min(RETRY_MAX)
                };
                act.retry_at = Some(std::time::Instant::now() + act.backoff);
            } else {
                act.backoff = Duration::ZERO;
                act.retry_at = None;
            }
            act.stats_now()
        }))
    }

    fn stats_now(&self) -> LedgerStats {
        LedgerStats {
            // A batch being written is still held here: a shutdown waits for it.
            buffered: self.buffer.len() + self.inflight.len(),
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
    let mut f = OpenOptions::new().create(true).append(true).read(true).open(path)?;
    let mut buf = Vec::new();
    // A crash mid-append leaves a torn last line: end it, so that it is skipped
    // alone instead of swallowing the first record written after it.
    if ends_torn(&mut f)? {
        buf.push(b'\n');
    }
    for r in records {
        serde_json::to_writer(&mut buf, r).map_err(std::io::Error::other)?;
        buf.push(b'\n');
    }
    f.write_all(&buf)?;
    f.sync_data()
}

/// Whether the file's last byte is not a newline (a torn, unfinished line).
fn ends_torn(f: &mut File) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    if f.metadata()?.len() == 0 {
        return Ok(false);
    }
    f.seek(SeekFrom::End(-1))?;
    let mut last = [0u8; 1];
    f.read_exact(&mut last)?;
    Ok(last[0] != b'\n')
}

/// Reads the spool; a torn line (crash mid-append) is skipped, alone.
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

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        // Whatever is still in memory goes to the spool (a batch being written
        // may be partly stored already: replays are idempotent).
        let mut left = std::mem::take(&mut self.inflight);
        left.append(&mut self.buffer);
        if !left.is_empty() {
            tracing::warn!(records = left.len(), "ledger stopping: spooling what it held");
            spool_or_log(&self.config.spool_path, &left);
        }
        if let Some(child) = &self.child {
            child.exited();
        }
    }
}

impl Handler<Record> for BillingLedger {
    type Result = ();

    fn handle(&mut self, mut msg: Record, ctx: &mut Self::Context) {
        if let Some(r) = msg.record.take() {
            self.buffer.push(r);
        }
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
    type Result = LedgerStats;

    fn handle(&mut self, _: GetStats, _ctx: &mut Self::Context) -> LedgerStats {
        self.stats_now()
    }
}

impl Handler<Crash> for BillingLedger {
    type Result = ();

    fn handle(&mut self, _: Crash, _ctx: &mut Self::Context) {
        // Deliberate: the fault test checks the supervisor restarts the ledger.
        #[allow(clippy::panic)]
        {
            panic!("billing ledger crashed on request");
        }
    }
}

/// The ledger as the rest of the server holds it: the current instance of the
/// supervised actor, and records parked while it is being restarted (sent while
/// it was down, or left in the mailbox of an instance that died).
#[derive(Clone)]
pub struct Ledger {
    sup: Arc<Supervised<BillingLedger>>,
    parked: Parked,
    spool_path: PathBuf,
}

fn lock(m: &Mutex<Vec<UsageRecord>>) -> std::sync::MutexGuard<'_, Vec<UsageRecord>> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Ledger {
    /// Starts the ledger on an arbiter of its own, under a supervisor. Must run
    /// inside an actix System.
    pub fn start(store: Arc<dyn UsageStore>, config: LedgerConfig, policy: RestartPolicy) -> Result<Ledger, String> {
        let arbiter = Arbiter::new().handle();
        let parked: Parked = Arc::default();
        let waiting = parked.clone();
        let spool_path = config.spool_path.clone();
        let on_restart = Box::new(move |addr: &Addr<BillingLedger>| {
            let n = deliver_parked(addr, &waiting);
            if n > 0 {
                tracing::info!(records = n, "ledger back: sending the records parked meanwhile");
            }
        });
        let sup = Supervised::start(
            "billing-ledger",
            policy,
            move |child| {
                let (store, config) = (store.clone(), config.clone());
                Ok(BillingLedger::start_in_arbiter(&arbiter, move |_| {
                    BillingLedger::new(store, config).supervised_by(child)
                }))
            },
            Some(on_restart),
        )?;
        Ok(Ledger {
            sup,
            parked,
            spool_path,
        })
    }

    /// Hands a record to the ledger (never dropped: parked while it restarts).
    pub fn record(&self, record: UsageRecord) {
        let addr = self.sup.addr();
        if addr.connected() {
            deliver_parked(&addr, &self.parked);
        }
        // Parked by its own drop if the ledger is gone.
        addr.do_send_tracked(Record::new(record, &self.parked));
    }

    /// Records waiting for a restarted ledger.
    pub fn parked(&self) -> usize {
        lock(&self.parked).len()
    }

    pub fn supervisor(&self) -> &Supervised<BillingLedger> {
        &self.sup
    }

    pub async fn stats(&self) -> Result<LedgerStats, MailboxError> {
        self.sup.send(GetStats).await
    }

    /// Writes (or spools) everything now. With the ledger down (being
    /// restarted), the parked records go straight to the spool, which the next
    /// instance replays.
    pub async fn flush(&self) -> Result<LedgerStats, MailboxError> {
        let addr = self.sup.addr();
        if addr.connected() {
            deliver_parked(&addr, &self.parked);
        } else {
            let records = std::mem::take(&mut *lock(&self.parked));
            if !records.is_empty() {
                tracing::warn!(records = records.len(), "ledger down: spooling the parked records");
                spool_or_log(&self.spool_path, &records);
            }
        }
        self.sup.send(Flush).await
    }
}

/// Sends the parked records to `addr`; returns how many. One that cannot be
/// delivered parks itself again.
fn deliver_parked(addr: &Addr<BillingLedger>, parked: &Parked) -> usize {
    let records = std::mem::take(&mut *lock(parked));
    let n = records.len();
    for r in records {
        addr.do_send_tracked(Record::new(r, parked));
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u64) -> UsageRecord {
        let now = chrono::Utc::now();
        UsageRecord {
            id: uuid::Uuid::new_v4(),
            user_id: uuid::Uuid::new_v4(),
            resource: crate::plans::Resource::Messages,
            quantity: n,
            period: crate::plans::month_of(now),
            metadata: serde_json::json!({}),
            created_at: now,
        }
    }

    #[actix::test]
    async fn while_the_store_is_down_it_is_retried_with_backoff_and_nothing_is_lost() {
        use std::sync::atomic::Ordering;
        let usage = Arc::new(crate::admission::fakes::Usage::default());
        usage.down.store(true, Ordering::Relaxed);
        let spool = std::env::temp_dir().join(format!("ragchat-spool-{}.jsonl", uuid::Uuid::new_v4().simple()));
        let config = LedgerConfig {
            flush_interval: Duration::from_millis(10),
            max_batch: 100,
            spool_path: spool.clone(),
        };
        let ledger = Ledger::start(usage.clone(), config, RestartPolicy::default()).expect("ledger");
        let user = uuid::Uuid::new_v4();
        // One second of traffic while the store is down: 50 records, a flush due every 10 ms.
        for _ in 0..50 {
            let mut r = record(1);
            r.user_id = user;
            ledger.record(r);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let attempts = usage.inserts.load(Ordering::Relaxed);
        assert!(attempts <= 12, "{attempts} attempts in a second: it should back off");
        usage.down.store(false, Ordering::Relaxed);
        for _ in 0..100 {
            if usage.recorded(user) == 50 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(usage.recorded(user), 50, "every record reached the store once");
        let _ = std::fs::remove_file(&spool);
    }

    #[test]
    fn a_torn_line_is_skipped_without_losing_the_records_after_it() {
        let path = std::env::temp_dir().join(format!("ragchat-spool-{}.jsonl", uuid::Uuid::new_v4().simple()));
        append_spool(&path, &[record(1)]).expect("append");
        // A crash in the middle of the next append: half a record, no newline.
        let whole = serde_json::to_string(&record(2)).expect("json");
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(&whole.as_bytes()[..whole.len() / 2]).expect("torn write");
        drop(f);
        append_spool(&path, &[record(3), record(4)]).expect("append after the crash");
        let back: Vec<u64> = read_spool(&path).expect("read").iter().map(|r| r.quantity).collect();
        assert_eq!(back, [1, 3, 4]);
        let _ = std::fs::remove_file(&path);
    }
}
