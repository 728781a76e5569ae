//! Rate budgets (governor's GCRA): how fast recovery writes to the store and how fast the
//! replay tools read, write and move messages, so catching up never stampedes a backend.

use std::num::NonZeroU32;
use std::sync::Arc;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// A budget of units per second, shared by clones. `None` inside: unlimited.
#[derive(Clone, Default)]
pub struct Budget {
    limiter: Option<Arc<DefaultDirectRateLimiter>>,
    burst: u32,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.limiter {
            Some(_) => write!(f, "Budget({}/s)", self.burst),
            None => f.write_str("Budget(unlimited)"),
        }
    }
}

impl Budget {
    /// `per_second` units a second, bursting to one second's worth; 0 means unlimited.
    pub fn per_second(per_second: u32) -> Self {
        match NonZeroU32::new(per_second) {
            Some(rate) => Self { limiter: Some(Arc::new(RateLimiter::direct(Quota::per_second(rate)))), burst: rate.get() },
            None => Self::unlimited(),
        }
    }

    pub fn unlimited() -> Self {
        Self { limiter: None, burst: 0 }
    }

    pub fn is_limited(&self) -> bool {
        self.limiter.is_some()
    }

    /// Waits until `units` fit the budget. More than one second's burst is taken a burst at a
    /// time, so a large batch waits as long as it should instead of being refused.
    pub async fn take(&self, units: usize) {
        let Some(limiter) = &self.limiter else { return };
        let mut left = u32::try_from(units).unwrap_or(u32::MAX);
        while left > 0 {
            let chunk = left.min(self.burst);
            let n = NonZeroU32::new(chunk).expect("chunk is positive");
            // Cannot fail: `chunk` never exceeds the burst the quota was built with.
            let _ = limiter.until_n_ready(n).await;
            left -= chunk;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[tokio::test]
    async fn an_unlimited_budget_never_waits() {
        let started = Instant::now();
        Budget::per_second(0).take(1_000_000).await;
        assert!(started.elapsed() < Duration::from_millis(50));
    }

    #[tokio::test]
    async fn a_budget_spreads_units_over_time_even_beyond_its_burst() {
        let budget = Budget::per_second(100);
        let started = Instant::now();
        // The first second's 100 are a burst; the next 50 take about half a second more.
        budget.take(150).await;
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(400), "waited only {waited:?}");
    }
}
