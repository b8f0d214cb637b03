//! GCRA (generic cell rate algorithm): a rate limit of `limit` calls per `period`
//! with bursts up to `limit`, kept as one timestamp per key (the theoretical
//! arrival time, TAT). Unlike a fixed window it never lets 2×limit through at a
//! window boundary. The Redis adapter runs the same arithmetic in a Lua script.

use serde::{Deserialize, Serialize};

/// A limit: `limit` calls per `period_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    pub limit: u32,
    pub period_ms: u64,
}

impl Quota {
    /// Time one call "costs": period / limit.
    pub fn emission_ms(&self) -> f64 {
        self.period_ms as f64 / f64::from(self.limit.max(1))
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    /// Calls still allowed right now after this one.
    pub remaining: u32,
    /// Milliseconds until the limit is fully replenished.
    pub reset_ms: u64,
    /// When refused: milliseconds until one call would be allowed.
    pub retry_after_ms: u64,
    /// The new TAT to store (unchanged when refused).
    pub tat_ms: f64,
}

/// One GCRA check at `now_ms` against the stored `tat_ms` (None = fresh key).
pub fn check(q: Quota, tat_ms: Option<f64>, now_ms: f64, cost: u32) -> Decision {
    let t = q.emission_ms();
    let period = q.period_ms as f64;
    let tat = tat_ms.unwrap_or(now_ms).max(now_ms);
    let new_tat = tat + t * f64::from(cost);
    let allow_at = new_tat - period;
    if allow_at <= now_ms + 1e-6 {
        let remaining = ((period - (new_tat - now_ms)) / t + 1e-9).floor().max(0.0) as u32;
        Decision {
            allowed: true,
            remaining,
            reset_ms: (new_tat - now_ms).ceil() as u64,
            retry_after_ms: 0,
            tat_ms: new_tat,
        }
    } else {
        Decision {
            allowed: false,
            remaining: 0,
            reset_ms: (tat - now_ms).ceil() as u64,
            retry_after_ms: (allow_at - now_ms).ceil() as u64,
            tat_ms: tat,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: Quota = Quota {
        limit: 30,
        period_ms: 60_000,
    };

    #[test]
    fn a_burst_of_limit_is_allowed_then_refused() {
        let mut tat = None;
        for i in 0..30 {
            let d = check(Q, tat, 0.0, 1);
            assert!(d.allowed, "call {i}");
            assert_eq!(d.remaining, 29 - i);
            tat = Some(d.tat_ms);
        }
        let d = check(Q, tat, 0.0, 1);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_ms, 2000, "one emission interval");
        assert_eq!(d.reset_ms, 60_000);
    }

    #[test]
    fn no_boundary_doubling_at_most_limit_plus_replenished_in_any_window() {
        // Hammer every 100 ms for 5 minutes. GCRA admits a burst of `limit`, then one
        // call per emission interval (2 s): any 60 s window holds at most the burst
        // plus what refilled during it (30 + 29), never a second instant burst, and the
        // long-run rate is the configured one.
        let mut tat = None;
        let mut allowed_at = Vec::new();
        let mut now = 0.0;
        while now < 300_000.0 {
            let d = check(Q, tat, now, 1);
            if d.allowed {
                allowed_at.push(now);
                tat = Some(d.tat_ms);
            }
            now += 100.0;
        }
        for (i, &t0) in allowed_at.iter().enumerate() {
            let in_window = allowed_at[i..].iter().take_while(|&&t| t < t0 + 60_000.0).count();
            assert!(in_window <= 30 + 29, "window at {t0}: {in_window}");
        }
        // Steady state after the first burst: one call per 2 s.
        let later = allowed_at.iter().filter(|&&t| t >= 60_000.0).count();
        assert!((119..=121).contains(&later), "{later}");
    }

    #[test]
    fn a_fixed_window_boundary_does_not_grant_a_second_burst() {
        // 30 calls at t = 59.9 s, then 30 more at t = 60.1 s: a fixed window would allow
        // all 60. GCRA allows the first 30 and only the replenished ~0 afterwards.
        let mut tat = None;
        let mut ok = 0;
        for _ in 0..30 {
            let d = check(Q, tat, 59_900.0, 1);
            ok += u32::from(d.allowed);
            tat = Some(d.tat_ms);
        }
        for _ in 0..30 {
            let d = check(Q, tat, 60_100.0, 1);
            if d.allowed {
                ok += 1;
                tat = Some(d.tat_ms);
            }
        }
        assert_eq!(ok, 30);
    }
}
