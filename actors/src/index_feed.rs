//! Following the document change feed: every node tails the store's feed
//! (`DocumentStore::changes_after`) and applies each entry to its own search
//! index, so a document stored, re-chunked or deleted through any node is found
//! (or no longer found) through every node within a poll or two. An entry is
//! applied by reading the document's current state from the store (gone: out of
//! the index; there: indexed, re-read when re-chunked), so entries seen out of
//! order or twice leave the same index.
//!
//! Numbers are handed out before their entry is written, so a follower may see
//! 12 before 11: it waits `gap_wait` for a missing number, then gives up on it
//! (a writer that died between its write and its entry); the periodic
//! reconciliation (`retrieval::reconcile_every`) repairs what such a loss leaves.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;
use uuid::Uuid;

use crate::ports::{ChangeKind, DocumentChange, DocumentStore};
use crate::retrieval::{sync, HasDocuments, IndexDocuments, RemoveDocument, Retrieval};
use crate::supervision::{retry_until_ok, SendTracked, Supervised};

/// Entries read per poll.
const READ: u32 = 1000;
/// Documents read from the store at once.
const READS: usize = 64;
/// How often old entries are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Where a follower stands: every entry up to `upto` was applied (or given up
/// on), and `seen` holds those above it that were applied.
#[derive(Debug)]
pub struct FeedCursor {
    upto: u64,
    seen: BTreeSet<u64>,
    /// Since when the number after `upto` has been missing (with that `upto`).
    gap: Option<(u64, Instant)>,
    /// Numbers given up on, in all.
    pub skipped: u64,
}

impl FeedCursor {
    pub fn new(upto: u64) -> Self {
        FeedCursor {
            upto,
            seen: BTreeSet::new(),
            gap: None,
            skipped: 0,
        }
    }

    /// The number to read after.
    pub fn upto(&self) -> u64 {
        self.upto
    }

    /// The entries of a read not applied yet.
    pub fn fresh(&self, read: &[DocumentChange]) -> Vec<DocumentChange> {
        read.iter()
            .filter(|c| c.seq > self.upto && !self.seen.contains(&c.seq))
            .copied()
            .collect()
    }

    /// Marks entries applied, then moves `upto` over every number without a gap
    /// before it, and over a gap older than `gap_wait`.
    pub fn applied(&mut self, seqs: impl IntoIterator<Item = u64>, now: Instant, gap_wait: Duration) {
        let upto = self.upto;
        self.seen.extend(seqs.into_iter().filter(|s| *s > upto));
        loop {
            while self.seen.remove(&(self.upto + 1)) {
                self.upto += 1;
            }
            let Some(&first) = self.seen.first() else {
                self.gap = None;
                return;
            };
            let since = match self.gap {
                Some((at, since)) if at == self.upto => since,
                _ => {
                    self.gap = Some((self.upto, now));
                    now
                }
            };
            if now.saturating_duration_since(since) < gap_wait {
                return;
            }
            self.skipped += first - self.upto - 1;
            self.upto = first - 1;
            self.gap = None;
        }
    }
}

/// What applying entries did to the index.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Applied {
    pub indexed: usize,
    pub removed: usize,
}

/// Applies entries: each document they name is read once from the store and
/// indexed (when the index lacks it or it was re-chunked) or removed (when the
/// store no longer has it). Documents to index are read many at a time: one by
/// one, a node following a bulk ingest on MongoDB spent four round trips per
/// document and fell tens of seconds behind.
pub async fn apply(
    store: &dyn DocumentStore,
    retrieval: &Addr<Retrieval>,
    changes: &[DocumentChange],
) -> Result<Applied, String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let mut order = Vec::new();
    let mut rechunked: HashMap<Uuid, bool> = HashMap::new();
    for c in changes {
        let again = rechunked.entry(c.document_id).or_insert_with(|| {
            order.push(c.document_id);
            false
        });
        *again |= c.kind == ChangeKind::Rechunked;
    }
    let has: HashSet<Uuid> = retrieval
        .send_tracked(HasDocuments(order.clone()))
        .await
        .map_err(|x| e(&x))?
        .into_iter()
        .collect();
    // Documents to read whole (new here, or re-chunked) are read READS at a
    // time in one bulk read each; for the others (this node's own writes coming
    // back, mostly) only whether they still exist matters.
    let (to_read, to_check): (Vec<Uuid>, Vec<Uuid>) =
        order.into_iter().partition(|id| !has.contains(id) || rechunked[id]);
    let mut out = Applied::default();
    let mut gone = Vec::new();
    for id in to_check {
        if store.document(id).await.map_err(|x| e(&x))?.is_none() {
            gone.push(id);
        }
    }
    let mut batch = Vec::new();
    for ids in to_read.chunks(READS) {
        let read = store.documents_with_chunks(ids).await.map_err(|x| e(&x))?;
        let found: HashSet<Uuid> = read.iter().map(|(d, _)| d.id).collect();
        gone.extend(ids.iter().filter(|id| !found.contains(id) && has.contains(id)));
        out.indexed += read.len();
        batch.extend(read);
    }
    for id in gone {
        retrieval
            .send_tracked(RemoveDocument(id))
            .await
            .map_err(|x| e(&x))?
            .map_err(|x| e(&x))?;
        out.removed += 1;
    }
    if !batch.is_empty() {
        retrieval
            .send_tracked(IndexDocuments(batch))
            .await
            .map_err(|x| e(&x))?
            .map_err(|x| e(&x))?;
    }
    Ok(out)
}

/// How a node follows the feed.
#[derive(Debug, Clone, Copy)]
pub struct FollowConfig {
    /// Time between reads of the feed.
    pub poll: Duration,
    /// How long a missing number is waited for.
    pub gap_wait: Duration,
    /// Entries older than this are pruned (by every node, once a minute).
    pub retention: Duration,
}

/// Follows the feed in the background from `start` (the feed's last number
/// read before the index was brought in line with the store at start). Without
/// one (the store was down), the follower reads it once the store answers and
/// then brings the index in line itself before following.
pub fn follow(
    documents: Arc<dyn DocumentStore>,
    retrieval: Arc<Supervised<Retrieval>>,
    start: Option<u64>,
    config: FollowConfig,
) {
    actix::spawn(async move {
        let (store, actor) = (&documents, &retrieval);
        let start = match start {
            Some(n) => n,
            None => {
                retry_until_ok("change feed start", || async move {
                    let n = store.last_change().await.map_err(|e| e.to_string())?;
                    sync(store.as_ref(), &actor.addr()).await?;
                    Ok::<_, String>(n)
                })
                .await
            }
        };
        let mut cursor = FeedCursor::new(start);
        let mut pruned = Instant::now();
        let mut failing = false;
        let mut tick = tokio::time::interval(config.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match follow_once(store.as_ref(), &actor.addr(), &mut cursor, config.gap_wait).await {
                Ok(applied) => {
                    failing = false;
                    if applied.indexed + applied.removed > 0 {
                        metrics::counter!("search_index_feed_applied_total", "change" => "indexed")
                            .increment(applied.indexed as u64);
                        metrics::counter!("search_index_feed_applied_total", "change" => "removed")
                            .increment(applied.removed as u64);
                    }
                    metrics::gauge!("search_index_feed_position").set(cursor.upto() as f64);
                }
                Err(e) => {
                    // Once per outage in the log; the next tick tries again.
                    if !failing {
                        tracing::warn!(error = %e, "could not follow the document change feed; trying again");
                    }
                    failing = true;
                }
            }
            if pruned.elapsed() >= PRUNE_EVERY {
                pruned = Instant::now();
                let before = chrono::Utc::now()
                    - chrono::Duration::from_std(config.retention).unwrap_or(chrono::Duration::days(1));
                if let Err(e) = store.prune_changes(before).await {
                    tracing::warn!(error = %e, "could not prune the document change feed");
                }
            }
        }
    });
}

/// One poll: reads the feed after the cursor, applies what is new, moves on.
pub async fn follow_once(
    store: &dyn DocumentStore,
    retrieval: &Addr<Retrieval>,
    cursor: &mut FeedCursor,
    gap_wait: Duration,
) -> Result<Applied, String> {
    let mut total = Applied::default();
    loop {
        let read = store
            .changes_after(cursor.upto(), READ)
            .await
            .map_err(|e| e.to_string())?;
        let fresh = cursor.fresh(&read);
        let applied = apply(store, retrieval, &fresh).await?;
        let skipped = cursor.skipped;
        let before = cursor.upto();
        cursor.applied(fresh.iter().map(|c| c.seq), Instant::now(), gap_wait);
        if cursor.skipped > skipped {
            metrics::counter!("search_index_feed_gaps_skipped_total").increment(cursor.skipped - skipped);
            tracing::warn!(
                skipped = cursor.skipped - skipped,
                "change feed numbers never written; the next reconciliation covers them"
            );
        }
        total.indexed += applied.indexed;
        total.removed += applied.removed;
        // A full read that moved the cursor: there may be more now.
        if read.len() < READ as usize || cursor.upto() == before {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(seq: u64) -> DocumentChange {
        DocumentChange {
            seq,
            document_id: Uuid::nil(),
            kind: ChangeKind::Stored,
        }
    }

    #[test]
    fn the_cursor_moves_over_numbers_applied_in_order() {
        let mut c = FeedCursor::new(10);
        let t = Instant::now();
        let read = [change(11), change(12), change(13)];
        assert_eq!(c.fresh(&read).len(), 3);
        c.applied([11, 12, 13], t, Duration::from_secs(5));
        assert_eq!(c.upto(), 13);
        assert!(c.fresh(&read).is_empty());
    }

    #[test]
    fn a_missing_number_is_waited_for_then_given_up_on() {
        let wait = Duration::from_secs(5);
        let mut c = FeedCursor::new(0);
        let t = Instant::now();
        // 2 is not there yet: 1 and 3 are applied, the cursor stops at 1.
        c.applied([1, 3], t, wait);
        assert_eq!(c.upto(), 1);
        // 3 is not applied twice while the cursor waits.
        assert!(c.fresh(&[change(3)]).is_empty());
        assert_eq!(c.fresh(&[change(2), change(3)]), vec![change(2)]);
        c.applied([], t + Duration::from_secs(4), wait);
        assert_eq!(c.upto(), 1);
        // 2 arrives in time.
        c.applied([2], t + Duration::from_secs(4), wait);
        assert_eq!((c.upto(), c.skipped), (3, 0));

        // 4 and 5 never come: given up on after the wait, counted.
        c.applied([6, 7], t + Duration::from_secs(10), wait);
        assert_eq!(c.upto(), 3);
        c.applied([], t + Duration::from_secs(14), wait);
        assert_eq!(c.upto(), 3);
        c.applied([], t + Duration::from_secs(15), wait);
        assert_eq!((c.upto(), c.skipped), (7, 2));
    }

    #[test]
    fn a_new_gap_gets_its_own_wait() {
        let wait = Duration::from_secs(5);
        let mut c = FeedCursor::new(0);
        let t = Instant::now();
        c.applied([2], t, wait);
        c.applied([1, 4], t + Duration::from_secs(4), wait);
        // The gap at 3 started at 4 s, not when the gap at 1 did.
        c.applied([], t + Duration::from_secs(8), wait);
        assert_eq!(c.upto(), 2);
        c.applied([], t + Duration::from_secs(9), wait);
        assert_eq!((c.upto(), c.skipped), (4, 1));
    }
}
