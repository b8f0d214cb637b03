//! BillingLedger: the one writer of usage records. Sessions `do_send` a `Record`
//! per completed permit (never dropped: the ledger's mailbox is unbounded on
//! purpose, as a lost record is lost money); the ledger writes them in batches
//! every `flush_interval` or when `max_batch` are waiting.
//!
//! Durability: while the store is unreachable, batches go to a local append-only
//! spool file instead (`spool`: each record framed with its length and a crc32,
//! fsynced; a torn or damaged record is skipped alone). While the store stays
//! down it is tried again with backoff (the flush interval doubling to 5 s), and
//! each try reads one record of the spool, not the spool: once the store takes
//! it, the rest is replayed in batches, from where the last replay stopped, and
//! the file is emptied only after the store has accepted all of it. Each record
//! carries its permit id as idempotency key, so a replay after a partial failure
//! or a crash before the file was emptied never counts twice. `Flush` (sent on
//! graceful shutdown) writes or spools everything still in memory.
//!
//! Bound: the spool holds at most `max_spool_bytes`. Records that do not fit are
//! held in memory (never dropped) and, while any are held, [`Ledger::refusing`]
//! is true: admission refuses new work until the store is back and has taken
//! them. Only `Flush` and a dying instance write past the bound (losing records
//! at exit would be worse than a larger file).
//!
//! Killed processes: every record is also written to a journal as it arrives
//! (`journal`: a file beside the spool, not synced, so it survives the process
//! though not the machine). Files a flush cycle has stored or spooled are
//! deleted; at start, what the journal still holds goes to the spool first.
//!
//! Supervision: the ledger runs under a [`Supervised`] handle ([`Ledger`]). If it
//! dies, what it held in memory (the buffer, records held past the bound and a
//! batch being written) goes to the spool as it stops, records sent while it is
//! down wait in the handle, and the new instance replays the spool and receives
//! them: nothing is lost.

mod journal;
mod spool;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// The most bytes the spool file may hold (see the module's "Bound").
    pub max_spool_bytes: u64,
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

/// Write (or spool) everything now, past the spool's bound if it must; answers
/// when done.
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
    /// Records in memory, not yet written (held past the spool's bound included).
    pub buffered: usize,
    /// Records waiting in the spool file.
    pub spooled: usize,
    /// The spool file's size.
    pub spool_bytes: u64,
    /// Records in memory that the spool had no room for (admission refuses
    /// while there are any).
    pub held: usize,
    /// Records the store accepted (new ones) since start.
    pub written: u64,
    pub failed_flushes: u64,
    pub store_down: bool,
}

/// The spool as the rest of the server sees it, without a message to the
/// ledger (read at every admission and scrape).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// The spool file's size.
    pub bytes: u64,
    /// Records in it not yet replayed to the store.
    pub records: u64,
    /// The bound, `max_spool_bytes`.
    pub max_bytes: u64,
    /// Records in memory that did not fit (or could not be written).
    pub held: u64,
    /// Records read back from the spool since start (replays and retries).
    pub records_read: u64,
}

impl SpoolStats {
    /// Records are waiting that the spool cannot take: new work is refused.
    pub fn full(&self) -> bool {
        self.held > 0
    }
}

/// Shared by the handle and every instance of the ledger.
#[derive(Debug, Default)]
struct SpoolGauges {
    bytes: AtomicU64,
    records: AtomicU64,
    held: AtomicU64,
    records_read: AtomicU64,
    /// Where the next replay starts: records before it are in the store already.
    replayed_to: AtomicU64,
}

/// The ledger's use of the spool file: the bound, the counts, the replay.
#[derive(Clone)]
struct Spool {
    path: PathBuf,
    max_bytes: u64,
    gauges: Arc<SpoolGauges>,
}

impl Spool {
    fn stats(&self) -> SpoolStats {
        let g = &self.gauges;
        SpoolStats {
            bytes: g.bytes.load(Ordering::Relaxed),
            records: g.records.load(Ordering::Relaxed),
            max_bytes: self.max_bytes,
            held: g.held.load(Ordering::Relaxed),
            records_read: g.records_read.load(Ordering::Relaxed),
        }
    }

    /// As an instance starts: a spool of the old format (JSON lines) is
    /// rewritten framed, then the file is counted; replays start from its
    /// beginning (what is there already in the store is not counted twice).
    fn open(&self) {
        self.recover_journal();
        match spool::migrate_legacy::<UsageRecord>(&self.path) {
            Ok(Some(n)) => tracing::warn!(records = n, "ledger: the old JSON-lines spool was rewritten framed"),
            Ok(None) => {}
            Err(e) => tracing::error!(
                error = %e,
                "ledger: cannot rewrite the old JSON-lines spool; it is replayed as it is, and nothing is added to it"
            ),
        }
        let mut records = 0u64;
        match spool::Reader::<UsageRecord>::open(&self.path, 0) {
            Ok(Some(mut reader)) => loop {
                match reader.next() {
                    Ok(Some(_)) => records += 1,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "ledger: cannot read the spool");
                        break;
                    }
                }
            },
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "ledger: cannot open the spool"),
        }
        let g = &self.gauges;
        g.records.store(records, Ordering::Relaxed);
        g.bytes.store(spool::len(&self.path).unwrap_or(0), Ordering::Relaxed);
        g.replayed_to.store(0, Ordering::Relaxed);
        if records > 0 {
            tracing::info!(records, path = %self.path.display(), "ledger: records waiting in the spool");
        }
    }

    fn is_empty(&self) -> bool {
        self.gauges.bytes.load(Ordering::Relaxed) == 0
    }

    /// Moves what an earlier process (or instance) left in the journal into the
    /// spool, then deletes the journal files; they stay when the spool cannot
    /// take it.
    fn recover_journal(&self) {
        let (records, last) = journal::recover(&self.path);
        let Some(last) = last else { return };
        let n = records.len();
        if self.append(records, true).is_empty() {
            journal::Journal::remove_left(&self.path, last);
            if n > 0 {
                tracing::warn!(
                    records = n,
                    "ledger: usage records left in the journal (a process stopped before its flush) were spooled"
                );
            }
        }
    }

    /// Appends, in one fsynced write, the records that fit under the bound (all
    /// of them with `past_bound`); returns those that did not go in.
    fn append(&self, mut records: Vec<UsageRecord>, past_bound: bool) -> Vec<UsageRecord> {
        if records.is_empty() {
            return records;
        }
        let size = match spool::format_of(&self.path) {
            Ok(spool::Format::Legacy) => match spool::migrate_legacy::<UsageRecord>(&self.path) {
                Ok(_) => {
                    self.gauges.replayed_to.store(0, Ordering::Relaxed);
                    spool::len(&self.path)
                }
                Err(e) => Err(e),
            },
            Ok(_) => spool::len(&self.path),
            Err(e) => Err(e),
        };
        let size = match size {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, records = records.len(), "ledger: CANNOT SPOOL usage records; they stay in memory");
                return records;
            }
        };
        let room = if past_bound {
            u64::MAX
        } else {
            self.max_bytes.saturating_sub(size)
        };
        let mut frames = Vec::new();
        let mut fit = 0;
        for r in &records {
            let before = frames.len();
            if let Err(e) = spool::encode(r, &mut frames) {
                tracing::error!(error = %e, "ledger: a usage record cannot be framed; it stays in memory");
                frames.truncate(before);
                break;
            }
            if frames.len() as u64 > room {
                frames.truncate(before);
                break;
            }
            fit += 1;
        }
        if fit == 0 {
            return records;
        }
        match spool::append(&self.path, &frames) {
            Ok(len) => {
                self.gauges.bytes.store(len, Ordering::Relaxed);
                self.gauges.records.fetch_add(fit as u64, Ordering::Relaxed);
                if len > self.max_bytes {
                    tracing::warn!(
                        bytes = len,
                        max_spool_bytes = self.max_bytes,
                        "ledger: spooled past the bound (flush or stop)"
                    );
                }
                records.split_off(fit)
            }
            Err(e) => {
                // Part of it may be on disk: replaying it too is harmless (ids).
                tracing::error!(error = %e, records = records.len(), "ledger: CANNOT SPOOL usage records; they stay in memory");
                if let Ok(len) = spool::len(&self.path) {
                    self.gauges.bytes.store(len, Ordering::Relaxed);
                }
                records
            }
        }
    }

    /// Replays the spool to the store from where the last replay stopped: the
    /// first `first` records (one, to try a store that was down), then batches
    /// of `max_batch`. Once the store has all of it, the file is emptied.
    /// Err(written so far, why): the store (or the file) failed.
    async fn replay(&self, store: &dyn UsageStore, first: usize, max_batch: usize) -> Result<u64, (u64, String)> {
        let g = &self.gauges;
        let from = g.replayed_to.load(Ordering::Relaxed);
        let mut reader = match spool::Reader::<UsageRecord>::open(&self.path, from) {
            Ok(Some(r)) => r,
            Ok(None) => {
                self.emptied();
                return Ok(0);
            }
            Err(e) => return Err((0, format!("spool unreadable: {e}"))),
        };
        let mut written = 0;
        let mut n = first.max(1);
        loop {
            let chunk = reader
                .next_batch(n)
                .map_err(|e| (written, format!("spool unreadable: {e}")))?;
            g.records_read.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            if chunk.is_empty() {
                break;
            }
            match store.insert_usage(&chunk).await {
                Ok(k) => {
                    written += k;
                    g.replayed_to.store(reader.offset(), Ordering::Relaxed);
                    let done = chunk.len() as u64;
                    let _ = g
                        .records
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| Some(x.saturating_sub(done)));
                }
                Err(e) => return Err((written, e.to_string())),
            }
            n = max_batch.max(1);
        }
        let end = reader.offset();
        drop(reader);
        // Empty the file, unless records were added behind the replay (then the
        // next replay starts at `end`).
        match spool::len(&self.path) {
            Ok(len) if len == end => match spool::truncate(&self.path) {
                Ok(()) => self.emptied(),
                Err(e) => {
                    tracing::error!(error = %e, "ledger: cannot empty the replayed spool (a later replay is idempotent)")
                }
            },
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "ledger: cannot stat the spool"),
        }
        Ok(written)
    }

    fn emptied(&self) {
        let g = &self.gauges;
        g.bytes.store(0, Ordering::Relaxed);
        g.records.store(0, Ordering::Relaxed);
        g.replayed_to.store(0, Ordering::Relaxed);
    }
}

/// What one flush cycle did: records the store took, whether the store
/// failed, records the spool had no room for.
type Outcome = (u64, bool, Vec<UsageRecord>);

pub struct BillingLedger {
    store: Arc<dyn UsageStore>,
    config: LedgerConfig,
    buffer: Vec<UsageRecord>,
    /// Records the spool had no room for: written before the buffer.
    held: Vec<UsageRecord>,
    /// A copy of the batch being written, until the write (or spool) is done.
    inflight: Vec<UsageRecord>,
    flushing: bool,
    stats: LedgerStats,
    spool: Spool,
    /// Where the records go that even a dying instance cannot spool.
    parked: Parked,
    child: Option<Arc<Child>>,
    /// While the store is down: the next attempt is not before this, and the
    /// wait doubles (from the flush interval to `RETRY_MAX`) with each failure;
    /// batches meanwhile go straight to the spool, which is not read.
    retry_at: Option<Instant>,
    backoff: Duration,
    /// Every record as it arrives, until a flush cycle has stored or spooled it.
    journal: journal::Journal,
}

/// The longest wait between two attempts at a store that is down.
const RETRY_MAX: Duration = Duration::from_secs(5);

impl BillingLedger {
    /// `spool` has been opened (`Spool::open`) for this instance.
    fn new(store: Arc<dyn UsageStore>, config: LedgerConfig, spool: Spool, parked: Parked) -> Self {
        let spool_path = config.spool_path.clone();
        BillingLedger {
            store,
            config,
            buffer: Vec::new(),
            held: Vec::new(),
            inflight: Vec::new(),
            flushing: false,
            stats: LedgerStats::default(),
            spool,
            parked,
            child: None,
            retry_at: None,
            backoff: Duration::ZERO,
            journal: journal::Journal::new(&spool_path),
        }
    }

    /// Reports its exit to `child` (its supervisor).
    pub fn supervised_by(mut self, child: Arc<Child>) -> Self {
        self.child = Some(child);
        self
    }

    /// One flush cycle: replay the spool, then write what is in memory (or
    /// spool it). `past_bound`: spool everything, however large the file gets.
    fn flush_cycle(&mut self, past_bound: bool) -> ResponseActFuture<Self, LedgerStats> {
        if self.flushing {
            return Box::pin(fut::ready(self.stats_now()));
        }
        self.flushing = true;
        // Every record journaled so far is in `pending` (or stored, or spooled).
        let sealed = self.journal.rotate();
        let mut pending = std::mem::take(&mut self.held);
        pending.append(&mut self.buffer);
        self.inflight = pending.clone();
        let spool = self.spool.clone();
        let waiting = self.stats.store_down && self.retry_at.is_some_and(|t| Instant::now() < t);
        let work: Pin<Box<dyn Future<Output = Outcome>>> = if waiting {
            // The store was down a moment ago: what is in memory joins the
            // spool, and neither the store nor the spool's records are read.
            Box::pin(async move { (0, true, spool.append(pending, past_bound)) })
        } else {
            let store = self.store.clone();
            let max_batch = self.config.max_batch.max(1);
            // Trying a store that was down costs one record of the spool.
            let first = if self.stats.store_down { 1 } else { max_batch };
            Box::pin(async move {
                let mut written = 0u64;
                let mut failed = false;
                // 1. The spool first, so records reach the store in arrival order.
                if !spool.is_empty() {
                    match spool.replay(store.as_ref(), first, max_batch).await {
                        Ok(n) => {
                            written += n;
                            tracing::info!(written = n, "ledger: spool replayed");
                        }
                        Err((n, e)) => {
                            written += n;
                            tracing::warn!(error = %e, "ledger: spool replay failed");
                            failed = true;
                        }
                    }
                }
                // 2. Memory: to the store, or behind the spool while the store is down.
                let mut rest = Vec::new();
                if failed {
                    rest = spool.append(pending, past_bound);
                } else {
                    let mut at = 0;
                    while at < pending.len() {
                        let end = (at + max_batch).min(pending.len());
                        match store.insert_usage(&pending[at..end]).await {
                            Ok(n) => {
                                written += n;
                                at = end;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "ledger: store unreachable, spooling");
                                failed = true;
                                rest = spool.append(pending.split_off(at), past_bound);
                                break;
                            }
                        }
                    }
                }
                (written, failed, rest)
            })
        };
        Box::pin(work.into_actor(self).map(move |(written, failed, rest), act, _| {
            act.flushing = false;
            act.inflight.clear();
            act.stats.written += written;
            if rest.is_empty() && act.held.is_empty() {
                act.journal.settle(sealed);
            }
            act.hold(rest);
            if !waiting {
                act.attempted(failed);
            }
            act.stats_now()
        }))
    }

    /// Keeps the records the spool had no room for; says so loudly when that
    /// starts and ends (admission refuses meanwhile).
    fn hold(&mut self, rest: Vec<UsageRecord>) {
        let before = self.spool.gauges.held.swap(rest.len() as u64, Ordering::Relaxed);
        if before == 0 && !rest.is_empty() {
            tracing::error!(
                held = rest.len(),
                spool_bytes = self.spool.gauges.bytes.load(Ordering::Relaxed),
                max_spool_bytes = self.config.max_spool_bytes,
                "ledger: the usage store is down and the spool is full: records are held in memory \
                 and new work is refused (503 usage_store_unavailable) until the store takes them"
            );
        } else if before > 0 && rest.is_empty() {
            tracing::warn!("ledger: the records held in memory are written; admission resumes");
        }
        self.held = rest;
    }

    /// After a try at the store: back off while it fails.
    fn attempted(&mut self, failed: bool) {
        self.stats.store_down = failed;
        if failed {
            self.stats.failed_flushes += 1;
            // Never past RETRY_MAX, whatever the flush interval.
            let first = self.config.flush_interval.clamp(Duration::from_millis(10), RETRY_MAX);
            self.backoff = if self.backoff.is_zero() {
                first
            } else {
                (self.backoff * 2).min(RETRY_MAX)
            };
            self.retry_at = Some(Instant::now() + self.backoff);
        } else {
            self.backoff = Duration::ZERO;
            self.retry_at = None;
        }
    }

    fn stats_now(&self) -> LedgerStats {
        let spool = self.spool.stats();
        LedgerStats {
            // A batch being written is still held here: a shutdown waits for it.
            buffered: self.buffer.len() + self.inflight.len() + self.held.len(),
            spooled: spool.records as usize,
            spool_bytes: spool.bytes,
            held: spool.held as usize,
            ..self.stats
        }
    }
}

impl Actor for BillingLedger {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.config.flush_interval, |act, ctx| {
            if !act.buffer.is_empty() || !act.held.is_empty() || !act.spool.is_empty() {
                let f = act.flush_cycle(false);
                ctx.spawn(f.map(|_, _, _| ()));
            }
        });
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        // Whatever is still in memory goes to the spool, past its bound if it
        // must (a batch being written may be partly stored already: replays are
        // idempotent). What cannot be written waits in the handle for the next
        // instance.
        let mut left = std::mem::take(&mut self.inflight);
        left.append(&mut self.held);
        left.append(&mut self.buffer);
        if !left.is_empty() {
            tracing::warn!(records = left.len(), "ledger stopping: spooling what it held");
            let rest = self.spool.append(left, true);
            if rest.is_empty() {
                let upto = self.journal.rotate();
                self.journal.settle(upto);
            }
            if !rest.is_empty() {
                tracing::error!(
                    records = rest.len(),
                    "ledger stopping: cannot spool; parked for the next instance"
                );
                lock(&self.parked).extend(rest);
            }
        }
        self.spool.gauges.held.store(0, Ordering::Relaxed);
        if let Some(child) = &self.child {
            child.exited();
        }
    }
}

impl Handler<Record> for BillingLedger {
    type Result = ();

    fn handle(&mut self, mut msg: Record, ctx: &mut Self::Context) {
        if let Some(r) = msg.record.take() {
            self.journal.write(&r);
            self.buffer.push(r);
        }
        if self.buffer.len() >= self.config.max_batch && !self.flushing {
            let f = self.flush_cycle(false);
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
                        act.flush_cycle(true)
                    }
                },
            ));
        }
        self.flush_cycle(true)
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
/// supervised actor, records parked while it is being restarted (sent while
/// it was down, or left in the mailbox of an instance that died), and the
/// spool's figures.
#[derive(Clone)]
pub struct Ledger {
    sup: Arc<Supervised<BillingLedger>>,
    parked: Parked,
    spool: Spool,
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
        let spool = Spool {
            path: config.spool_path.clone(),
            max_bytes: config.max_spool_bytes,
            gauges: Arc::default(),
        };
        let on_restart = Box::new(move |addr: &Addr<BillingLedger>| {
            let n = deliver_parked(addr, &waiting);
            if n > 0 {
                tracing::info!(records = n, "ledger back: sending the records parked meanwhile");
            }
        });
        // Counted before the first instance, so the figures are right from the
        // start; again before each restart (a dying instance spooled more).
        spool.open();
        let restart = std::sync::atomic::AtomicBool::new(false);
        let (instance_spool, instance_parked) = (spool.clone(), parked.clone());
        let sup = Supervised::start(
            "billing-ledger",
            policy,
            move |child| {
                let (store, config) = (store.clone(), config.clone());
                let (spool, parked) = (instance_spool.clone(), instance_parked.clone());
                let reopen = restart.swap(true, Ordering::Relaxed);
                Ok(BillingLedger::start_in_arbiter(&arbiter, move |_| {
                    if reopen {
                        spool.open();
                    }
                    BillingLedger::new(store, config, spool, parked).supervised_by(child)
                }))
            },
            Some(on_restart),
        )?;
        Ok(Ledger { sup, parked, spool })
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

    /// The spool's size, records and bound, without asking the actor.
    pub fn spool(&self) -> SpoolStats {
        self.spool.stats()
    }

    /// True while usage records wait in memory because the store is down and
    /// the spool is full (or cannot be written): new work must be refused,
    /// since it could not be accounted for durably.
    pub fn refusing(&self) -> bool {
        self.spool.stats().full()
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
                let rest = self.spool.append(records, true);
                lock(&self.parked).extend(rest);
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
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::admission::fakes::Usage;

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

    fn temp_spool() -> PathBuf {
        std::env::temp_dir().join(format!("ragchat-spool-{}.jsonl", uuid::Uuid::new_v4().simple()))
    }

    fn config(spool_path: &std::path::Path, max_spool_bytes: u64) -> LedgerConfig {
        LedgerConfig {
            flush_interval: Duration::from_millis(10),
            max_batch: 100,
            spool_path: spool_path.to_path_buf(),
            max_spool_bytes,
        }
    }

    fn frame_len(r: &UsageRecord) -> u64 {
        let mut buf = Vec::new();
        spool::encode(r, &mut buf).expect("frame");
        buf.len() as u64
    }

    fn stored_ids(usage: &Usage) -> Vec<uuid::Uuid> {
        usage
            .records
            .lock()
            .map(|r| r.iter().map(|x| x.id).collect())
            .unwrap_or_default()
    }

    async fn until(mut done: impl FnMut() -> bool) {
        for _ in 0..300 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[actix::test]
    async fn while_the_store_is_down_it_is_retried_with_backoff_and_the_spool_is_read_once() {
        let usage = Arc::new(Usage::default());
        usage.down.store(true, Ordering::Relaxed);
        let spool = temp_spool();
        let ledger = Ledger::start(usage.clone(), config(&spool, 1 << 20), RestartPolicy::default()).expect("ledger");
        let user = uuid::Uuid::new_v4();
        // One second of traffic while the store is down: 50 records, a flush due every 10 ms.
        for _ in 0..50 {
            let mut r = record(1);
            r.user_id = user;
            ledger.record(r);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Read first: a try counts its read just before its write.
        let read_while_down = ledger.spool().records_read;
        let attempts = usage.inserts.load(Ordering::Relaxed);
        assert!(attempts <= 12, "{attempts} attempts in a second: it should back off");
        // Each try at the store read one record of the spool, not the spool
        // (one more: a try may be between its read and its write).
        assert!(
            read_while_down <= attempts + 1,
            "{read_while_down} records read back in {attempts} tries"
        );
        usage.down.store(false, Ordering::Relaxed);
        until(|| usage.recorded(user) == 50 && ledger.spool().bytes == 0).await;
        assert_eq!(usage.recorded(user), 50, "every record reached the store once");
        let spool_stats = ledger.spool();
        assert_eq!((spool_stats.bytes, spool_stats.records), (0, 0), "emptied");
        // On recovery the spool was read once: at most its 50 records more.
        assert!(
            spool_stats.records_read <= read_while_down + 50,
            "{} records read back in all",
            spool_stats.records_read
        );
        assert_eq!(std::fs::metadata(&spool).map(|m| m.len()).unwrap_or(0), 0);
        let _ = std::fs::remove_file(&spool);
    }

    #[actix::test]
    async fn a_replay_after_a_crash_before_the_spool_was_emptied_counts_each_record_once() {
        let usage = Arc::new(Usage::default());
        let path = temp_spool();
        let records: Vec<UsageRecord> = (1..=5).map(record).collect();
        // The store took the first three, then the process died before the
        // spool was emptied: all five are still in the file.
        let spool = Spool {
            path: path.clone(),
            max_bytes: 1 << 20,
            gauges: Arc::default(),
        };
        assert!(spool.append(records.clone(), false).is_empty());
        usage.insert_usage(&records[..3]).await.expect("insert");

        let ledger = Ledger::start(usage.clone(), config(&path, 1 << 20), RestartPolicy::default()).expect("ledger");
        until(|| ledger.spool().bytes == 0).await;
        let mut ids = stored_ids(&usage);
        ids.sort();
        let mut want: Vec<_> = records.iter().map(|r| r.id).collect();
        want.sort();
        assert_eq!(ids, want, "each record once");
        let stats = ledger.stats().await.expect("stats");
        assert_eq!((stats.written, stats.spooled), (2, 0), "{stats:?}");
        let _ = std::fs::remove_file(&path);
    }

    #[actix::test]
    async fn an_old_json_lines_spool_is_rewritten_framed_and_replayed_once() {
        let usage = Arc::new(Usage::default());
        usage.down.store(true, Ordering::Relaxed);
        let path = temp_spool();
        // What the previous version left: JSON lines, the last one torn.
        let old: Vec<UsageRecord> = (1..=3).map(record).collect();
        let mut text = String::new();
        for r in &old {
            text.push_str(&serde_json::to_string(r).expect("json"));
            text.push('\n');
        }
        let torn = serde_json::to_string(&record(9)).expect("json");
        text.push_str(&torn[..torn.len() / 2]);
        std::fs::write(&path, text).expect("write");

        let ledger = Ledger::start(usage.clone(), config(&path, 1 << 20), RestartPolicy::default()).expect("ledger");
        let stats = ledger.stats().await.expect("stats");
        assert_eq!(stats.spooled, 3, "counted at start: {stats:?}");
        let head = std::fs::read(&path).expect("read");
        assert_eq!(&head[..2], &[0xFF, 0x5A], "rewritten framed");
        // New records join it while the store is still down.
        let new = record(4);
        ledger.record(new.clone());
        until(|| ledger.spool().records == 4).await;
        assert_eq!(ledger.spool().records, 4);

        usage.down.store(false, Ordering::Relaxed);
        until(|| ledger.spool().bytes == 0).await;
        let mut ids = stored_ids(&usage);
        ids.sort();
        let mut want: Vec<_> = old.iter().chain([&new]).map(|r| r.id).collect();
        want.sort();
        assert_eq!(ids, want, "every old record and the new one, once");
        let _ = std::fs::remove_file(&path);
    }

    #[actix::test]
    async fn a_full_spool_holds_records_in_memory_and_refuses_until_the_store_takes_them() {
        let usage = Arc::new(Usage::default());
        usage.down.store(true, Ordering::Relaxed);
        let path = temp_spool();
        let user = uuid::Uuid::new_v4();
        let records: Vec<UsageRecord> = (0..10)
            .map(|_| UsageRecord {
                user_id: user,
                ..record(1)
            })
            .collect();
        // Room for three records.
        let bound = 3 * frame_len(&records[0]) + 10;
        let ledger = Ledger::start(usage.clone(), config(&path, bound), RestartPolicy::default()).expect("ledger");
        assert!(!ledger.refusing());
        for r in &records {
            ledger.record(r.clone());
        }
        until(|| ledger.spool().held == 7).await;
        let spool = ledger.spool();
        assert_eq!((spool.records, spool.held), (3, 7), "{spool:?}");
        assert!(spool.bytes <= bound, "{} bytes past the bound {bound}", spool.bytes);
        assert!(ledger.refusing(), "new work is refused while records are held");
        let stats = ledger.stats().await.expect("stats");
        assert_eq!((stats.buffered, stats.held), (7, 7), "{stats:?}");

        // The store is back: the spool, then the held records; admission resumes.
        usage.down.store(false, Ordering::Relaxed);
        until(|| usage.recorded(user) == 10 && !ledger.refusing()).await;
        assert_eq!(usage.recorded(user), 10, "nothing lost, nothing twice");
        assert!(!ledger.refusing());
        assert_eq!(ledger.spool().bytes, 0);
        let _ = std::fs::remove_file(&path);
    }

    #[actix::test]
    async fn a_flush_at_shutdown_spools_held_records_past_the_bound() {
        let usage = Arc::new(Usage::default());
        usage.down.store(true, Ordering::Relaxed);
        let path = temp_spool();
        let user = uuid::Uuid::new_v4();
        let first = UsageRecord {
            user_id: user,
            ..record(1)
        };
        let bound = 2 * frame_len(&first);
        let ledger = Ledger::start(usage.clone(), config(&path, bound), RestartPolicy::default()).expect("ledger");
        ledger.record(first);
        for _ in 0..5 {
            ledger.record(UsageRecord {
                user_id: user,
                ..record(1)
            });
        }
        until(|| ledger.spool().held == 4).await;
        assert!(ledger.refusing());
        let mut stats = ledger.flush().await.expect("flush");
        for _ in 0..50 {
            if stats.buffered == 0 {
                break;
            }
            stats = ledger.flush().await.expect("flush");
        }
        assert_eq!((stats.buffered, stats.spooled), (0, 6), "all on disk: {stats:?}");
        assert!(stats.spool_bytes > bound);
        assert!(!ledger.refusing());
        // Once the store is back, all of them are replayed.
        usage.down.store(false, Ordering::Relaxed);
        until(|| usage.recorded(user) == 6 && ledger.spool().bytes == 0).await;
        assert_eq!(usage.recorded(user), 6);
        let _ = std::fs::remove_file(&path);
    }
}
