//! Monthly quotas: pure rules, unit-tested here.
//!
//! The store keeps one counter per (user, resource, month), raised only by an
//! atomic conditional increment (`UsageStore::try_reserve`), so several server
//! processes never admit more than the limit between them. A session does not
//! go to the store for every unit: it reserves a small **lease** of units at a
//! time and admits from it locally. The lease is small when the quota is nearly
//! spent (one unit at a time within the last `LEASE_SPREAD` × lease units), so
//! the last units of a quota are reserved one by one and several processes
//! still admit exactly the limit. Units not used are handed back (`Lease::take_unused`)
//! when the lease sits idle, the plan changes, the month ends or the session stops.

use chrono::{DateTime, Utc};

/// A lease is at most the remaining quota divided by this: near the limit,
/// leases shrink to single units.
pub const LEASE_SPREAD: u64 = 16;

/// How many units to reserve when the store's counter stands at `used` of
/// `limit` and `cost` units are wanted now: at least `cost`, at most
/// `max_lease`, and no more than 1/`LEASE_SPREAD` of what remains.
pub fn lease_size(limit: u64, used: u64, cost: u64, max_lease: u64) -> u64 {
    let remaining = limit.saturating_sub(used);
    (remaining / LEASE_SPREAD).min(max_lease).max(cost)
}

/// Units reserved in the store for one resource and month, not yet admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub period_start: DateTime<Utc>,
    /// Units reserved and not admitted yet.
    pub held: u64,
    /// The store's counter after the last reservation (held units included).
    pub counter: u64,
}

/// What a session does with a request for `cost` units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaStep {
    /// Admitted from the lease; `used` is the user's count with this request.
    Admit { used: u64 },
    /// The lease cannot cover it: reserve this many units in the store.
    Reserve { units: u64 },
}

impl Lease {
    pub fn empty(period_start: DateTime<Utc>) -> Self {
        Lease {
            period_start,
            held: 0,
            counter: 0,
        }
    }

    /// Units admitted so far as this session knows it (the counter less what it holds).
    pub fn used(&self) -> u64 {
        self.counter.saturating_sub(self.held)
    }

    /// Admits `cost` units from the lease when it holds them and the limit
    /// (which may have been lowered since the lease was taken) allows them; else
    /// says how many units to reserve in the store.
    pub fn step(&mut self, cost: u64, limit: u64, max_lease: u64) -> QuotaStep {
        if self.held >= cost && self.used() + cost <= limit {
            self.held -= cost;
            return QuotaStep::Admit { used: self.used() };
        }
        QuotaStep::Reserve {
            units: lease_size(limit, self.counter, cost, max_lease),
        }
    }

    /// The store granted `units`; its counter now stands at `counter`. Takes
    /// `cost` of them for the request and keeps the rest; returns the user's count.
    pub fn granted(&mut self, units: u64, counter: u64, cost: u64) -> u64 {
        self.held += units.saturating_sub(cost);
        self.counter = counter;
        self.used()
    }

    /// The store refused; its counter stands at `counter`.
    pub fn refused(&mut self, counter: u64) {
        self.counter = counter.max(self.counter);
    }

    /// Units of admitted work that did not happen come back to the lease.
    pub fn give_back(&mut self, cost: u64) {
        self.held += cost;
    }

    /// Empties the lease: the units to hand back to the store.
    pub fn take_unused(&mut self) -> u64 {
        let n = self.held;
        self.counter = self.counter.saturating_sub(n);
        self.held = 0;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn month() -> DateTime<Utc> {
        crate::plans::month_of(Utc::now()).start
    }

    /// A store counter with the conditional increment of `try_reserve`.
    struct Counter {
        used: u64,
        limit: u64,
    }

    impl Counter {
        fn try_reserve(&mut self, n: u64) -> Result<u64, u64> {
            if self.used + n <= self.limit {
                self.used += n;
                Ok(self.used)
            } else {
                Err(self.used)
            }
        }
    }

    /// One admission as a session makes it: from the lease, else reserve (and
    /// after a refusal, once more with the size the fresh counter allows).
    fn admit(lease: &mut Lease, store: &mut Counter, max_lease: u64) -> bool {
        for _ in 0..2 {
            match lease.step(1, store.limit, max_lease) {
                QuotaStep::Admit { .. } => return true,
                QuotaStep::Reserve { units } => match store.try_reserve(units) {
                    Ok(counter) => {
                        lease.granted(units, counter, 1);
                        return true;
                    }
                    Err(counter) => lease.refused(counter),
                },
            }
        }
        false
    }

    #[test]
    fn leases_shrink_to_single_units_near_the_limit() {
        assert_eq!(lease_size(1_000_000, 0, 1, 32), 32);
        assert_eq!(lease_size(100, 0, 1, 32), 6);
        assert_eq!(lease_size(20, 0, 1, 32), 1);
        assert_eq!(lease_size(100, 90, 1, 32), 1);
        assert_eq!(
            lease_size(100, 100, 1, 32),
            1,
            "a spent quota still asks for the cost (and is refused)"
        );
        assert_eq!(lease_size(100, 0, 5, 2), 5, "never less than the cost");
    }

    #[test]
    fn exactly_the_limit_is_admitted_by_one_session() {
        for limit in [1, 2, 20, 33, 100, 1000, 5000] {
            let mut store = Counter { used: 0, limit };
            let mut lease = Lease::empty(month());
            let admitted = (0..limit + 50).filter(|_| admit(&mut lease, &mut store, 32)).count() as u64;
            assert_eq!(admitted, limit, "limit {limit}");
            assert_eq!(lease.held, 0, "nothing stranded at the end (limit {limit})");
        }
    }

    #[test]
    fn two_processes_sharing_a_counter_admit_exactly_the_limit_between_them() {
        for limit in [20, 100, 1000, 4096] {
            let mut store = Counter { used: 0, limit };
            let (mut a, mut b) = (Lease::empty(month()), Lease::empty(month()));
            let mut admitted = 0;
            // Interleaved unevenly, as two nodes behind a balancer see it.
            for i in 0..(limit * 2) {
                let lease = if i % 3 == 0 { &mut a } else { &mut b };
                admitted += u64::from(admit(lease, &mut store, 32));
            }
            // Both keep asking until both are refused: held units are used first.
            while admit(&mut a, &mut store, 32) || admit(&mut b, &mut store, 32) {
                admitted += 1;
            }
            assert_eq!(admitted, limit, "limit {limit}");
        }
    }

    #[test]
    fn units_given_back_or_handed_back_are_not_counted() {
        let mut store = Counter { used: 0, limit: 1_000 };
        let mut lease = Lease::empty(month());
        assert!(admit(&mut lease, &mut store, 32));
        // 62 remaining / 16 … the first reservation took min(32, 1000/16) = 32 units.
        assert_eq!((store.used, lease.held, lease.used()), (32, 31, 1));
        // A refused or failed request gives its unit back to the lease.
        lease.give_back(1);
        assert_eq!(lease.used(), 0);
        // An idle lease hands its units back to the store.
        let unused = lease.take_unused();
        store.used -= unused;
        assert_eq!((unused, store.used, lease.used()), (32, 0, 0));
    }

    #[test]
    fn a_lease_taken_under_a_higher_limit_admits_no_more_than_the_new_one() {
        let mut store = Counter { used: 0, limit: 10_000 };
        let mut lease = Lease::empty(month());
        assert!(admit(&mut lease, &mut store, 32));
        assert_eq!((lease.used(), lease.held), (1, 31));
        // The plan was lowered to 1 unit elsewhere: the held units do not count.
        assert!(matches!(lease.step(1, 1, 32), QuotaStep::Reserve { .. }));
        assert_eq!(lease.held, 31, "nothing taken from the lease");
    }

    #[test]
    fn a_quota_stays_refused_once_spent() {
        let mut store = Counter { used: 0, limit: 3 };
        let mut lease = Lease::empty(month());
        assert!((0..3).all(|_| admit(&mut lease, &mut store, 32)));
        assert!(!admit(&mut lease, &mut store, 32));
        assert_eq!(lease.used(), 3);
    }
}
