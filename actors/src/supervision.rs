//! Restart policy for supervised children (the model worker threads): the
//! first restart in a window is immediate, then each one waits twice as long as
//! the previous, up to a ceiling, so a child that crashes on every start cannot
//! spin the machine. Restarts are counted in metrics
//! (`supervisor_restarts_total{child}`) and a storm is logged as such.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The last failure of a supervised child, with its time (for /admin/actors).
#[derive(Debug, Default)]
pub struct LastError(std::sync::Mutex<Option<String>>);

impl LastError {
    pub fn note(&self, what: String) {
        let line = format!("{}: {what}", chrono::Utc::now().to_rfc3339());
        match self.0.lock() {
            Ok(mut g) => *g = Some(line),
            Err(p) => *p.into_inner() = Some(line),
        }
    }

    pub fn get(&self) -> Option<String> {
        match self.0.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RestartPolicy {
    /// Restarts older than this are forgotten.
    pub window: Duration,
    /// The wait before the second restart within the window (doubling after).
    pub base: Duration,
    /// The longest wait.
    pub max: Duration,
    /// This many restarts within the window is a storm (logged as an error).
    pub storm: usize,
    recent: VecDeque<Instant>,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy::new(
            Duration::from_secs(60),
            Duration::from_millis(250),
            Duration::from_secs(30),
            3,
        )
    }
}

impl RestartPolicy {
    pub fn new(window: Duration, base: Duration, max: Duration, storm: usize) -> Self {
        RestartPolicy {
            window,
            base,
            max,
            storm,
            recent: VecDeque::new(),
        }
    }

    /// Records a restart at `now`; returns how long to wait before it and the
    /// number of restarts within the window (this one included).
    pub fn restart(&mut self, now: Instant) -> (Duration, usize) {
        while self
            .recent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > self.window)
        {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        let n = self.recent.len();
        let delay = if n <= 1 {
            Duration::ZERO
        } else {
            let factor = 1u32.checked_shl((n - 2).min(16) as u32).unwrap_or(u32::MAX);
            self.base.saturating_mul(factor).min(self.max)
        };
        (delay, n)
    }

    /// Records a restart of `child`, logs and counts it, and sleeps the backoff
    /// (for children on threads of their own).
    pub fn restart_blocking(&mut self, child: &'static str) {
        let (delay, n) = self.restart(Instant::now());
        metrics::counter!("supervisor_restarts_total", "child" => child).increment(1);
        if n >= self.storm {
            tracing::error!(
                child,
                restarts_in_window = n,
                backoff_ms = delay.as_millis() as u64,
                "restart storm: backing off"
            );
        } else {
            tracing::warn!(child, restarts_in_window = n, "restarting");
        }
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_exponentially_up_to_the_ceiling_and_reset_after_the_window() {
        let mut p = RestartPolicy::new(
            Duration::from_secs(60),
            Duration::from_millis(100),
            Duration::from_secs(1),
            3,
        );
        let t0 = Instant::now();
        let delays: Vec<u128> = (0..7)
            .map(|i| p.restart(t0 + Duration::from_secs(i)).0.as_millis())
            .collect();
        assert_eq!(delays, [0, 100, 200, 400, 800, 1000, 1000]);
        // A quiet minute later the next restart is immediate again.
        let (d, n) = p.restart(t0 + Duration::from_secs(200));
        assert_eq!((d, n), (Duration::ZERO, 1));
    }
}
