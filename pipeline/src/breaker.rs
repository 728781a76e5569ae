//! The circuit breaker around the store: after an outage is seen, stop writing (and stop
//! pulling messages, so the queue keeps them) until a cool-down has passed and trial batches
//! succeed again. The same code guards DynamoDB and the embedded store.
//!
//! Closed → Open: `consecutive_failures` unavailable or rejected writes in a row, or a failure
//! rate over `failure_rate` across at least `min_calls` writes in one `window`; throttles count
//! apart and open it only after `consecutive_throttles` in a row (a throttle is not an outage).
//! Open → HalfOpen after `cool_down`; HalfOpen admits `trial_batches` at a time and closes after
//! `trial_successes` successes, or opens again at the first failure.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::FailureClass;

pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
pub const DEFAULT_FAILURE_RATE: f64 = 0.5;
pub const DEFAULT_MIN_CALLS: u32 = 20;
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(30);
pub const DEFAULT_CONSECUTIVE_THROTTLES: u32 = 20;
pub const DEFAULT_COOL_DOWN: Duration = Duration::from_secs(15);
pub const DEFAULT_TRIAL_BATCHES: u32 = 1;
pub const DEFAULT_TRIAL_SUCCESSES: u32 = 3;
/// The shortest wait given to a batch turned away (SQS visibility is in whole seconds).
const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);
/// How often a waiting receiver looks again while a trial batch is in flight.
const HALF_OPEN_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy)]
pub struct BreakerConfig {
    pub consecutive_failures: u32,
    pub failure_rate: f64,
    pub min_calls: u32,
    pub window: Duration,
    pub consecutive_throttles: u32,
    pub cool_down: Duration,
    pub trial_batches: u32,
    pub trial_successes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: DEFAULT_CONSECUTIVE_FAILURES,
            failure_rate: DEFAULT_FAILURE_RATE,
            min_calls: DEFAULT_MIN_CALLS,
            window: DEFAULT_WINDOW,
            consecutive_throttles: DEFAULT_CONSECUTIVE_THROTTLES,
            cool_down: DEFAULT_COOL_DOWN,
            trial_batches: DEFAULT_TRIAL_BATCHES,
            trial_successes: DEFAULT_TRIAL_SUCCESSES,
        }
    }
}

/// What `/readyz` and the metrics show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half-open",
        }
    }

    /// 0 closed, 1 half-open, 2 open: a dashboard can plot it.
    fn level(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::HalfOpen => 1,
            Self::Open => 2,
        }
    }
}

/// How a guarded write ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure(FailureClass),
}

#[derive(Debug)]
enum Phase {
    Closed { failures_in_row: u32, throttles_in_row: u32, window_start: Instant, calls: u32, failures: u32 },
    Open { until: Instant },
    HalfOpen { in_flight: u32, successes: u32 },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct TransitionLabel {
    pub to: &'static str,
}

/// Breaker metrics, registered in the process's registry.
#[derive(Clone, Debug, Default)]
pub struct BreakerMetrics {
    pub state: Gauge,
    pub transitions: Family<TransitionLabel, Counter>,
    pub rejected: Counter,
}

impl BreakerMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("catalog_breaker");
        r.register("state", "Store circuit breaker: 0 closed, 1 half-open, 2 open", self.state.clone());
        r.register("transitions", "Breaker state changes, by the state entered", self.transitions.clone());
        r.register("rejected_batches", "Write batches not attempted because the breaker was open", self.rejected.clone());
    }
}

/// Shared by the write stage (which asks and reports), the ingest stage (which waits while it
/// is open) and readiness (which shows it).
#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    phase: Mutex<Phase>,
    /// The write stage holds a batch that failed for the outage: it is the next trial, so
    /// nothing new is received for one.
    holding: std::sync::atomic::AtomicBool,
    state: watch::Sender<BreakerState>,
    metrics: BreakerMetrics,
}

/// Leave to write one batch; report how it went with [`Breaker::record`].
#[derive(Debug)]
#[must_use = "report the write's outcome with Breaker::record"]
pub struct Trial {
    half_open: bool,
}

impl Breaker {
    pub fn new(config: BreakerConfig, metrics: BreakerMetrics) -> Self {
        let (state, _) = watch::channel(BreakerState::Closed);
        metrics.state.set(BreakerState::Closed.level());
        let phase = Mutex::new(Self::closed());
        Self { config, phase, holding: std::sync::atomic::AtomicBool::new(false), state, metrics }
    }

    fn closed() -> Phase {
        Phase::Closed { failures_in_row: 0, throttles_in_row: 0, window_start: Instant::now(), calls: 0, failures: 0 }
    }

    pub fn state(&self) -> BreakerState {
        *self.state.borrow()
    }

    /// Follows the state: the ingest stage waits on it while the breaker is open.
    pub fn subscribe(&self) -> watch::Receiver<BreakerState> {
        self.state.subscribe()
    }

    /// How long a batch turned away now should stay away: until the cool-down ends.
    pub fn retry_after(&self) -> Duration {
        match *self.lock() {
            Phase::Open { until } => until.saturating_duration_since(Instant::now()).max(MIN_RETRY_AFTER),
            _ => self.config.cool_down,
        }
    }

    /// Whether to take more messages from the source now: not while open (the queue keeps
    /// them, and receiving them would count deliveries towards the DLQ), and in half-open only
    /// while a trial batch is free. `Err` says until when to wait at most before asking again.
    pub fn admits_receive(&self) -> Result<(), Instant> {
        let now = Instant::now();
        let holding = self.holding.load(std::sync::atomic::Ordering::SeqCst);
        match *self.lock() {
            Phase::Closed { .. } => Ok(()),
            // The held batch is the trial: receiving another would only add a delivery.
            _ if holding => Err(now + HALF_OPEN_POLL),
            Phase::Open { until } if now >= until => Ok(()),
            Phase::Open { until } => Err(until),
            Phase::HalfOpen { in_flight, .. } if in_flight < self.config.trial_batches => Ok(()),
            Phase::HalfOpen { .. } => Err(now + HALF_OPEN_POLL),
        }
    }

    /// Whether the write stage is holding a batch through an outage (see `admits_receive`).
    pub fn set_holding(&self, holding: bool) {
        self.holding.store(holding, std::sync::atomic::Ordering::SeqCst);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a batch may be written now.
    pub fn try_acquire(&self) -> Option<Trial> {
        let mut phase = self.lock();
        if let Phase::Open { until } = *phase {
            if Instant::now() < until {
                self.metrics.rejected.inc();
                return None;
            }
            self.enter(&mut phase, Phase::HalfOpen { in_flight: 0, successes: 0 });
        }
        match &mut *phase {
            Phase::Closed { .. } => Some(Trial { half_open: false }),
            Phase::HalfOpen { in_flight, .. } if *in_flight < self.config.trial_batches => {
                *in_flight += 1;
                Some(Trial { half_open: true })
            }
            _ => {
                self.metrics.rejected.inc();
                None
            }
        }
    }

    /// Reports how the batch written under `trial` went.
    pub fn record(&self, trial: Trial, outcome: Outcome) {
        let mut phase = self.lock();
        let now = Instant::now();
        let cfg = self.config;
        let open = Phase::Open { until: now + cfg.cool_down };
        match &mut *phase {
            Phase::HalfOpen { in_flight, successes } if trial.half_open => {
                *in_flight = in_flight.saturating_sub(1);
                match outcome {
                    Outcome::Success => {
                        *successes += 1;
                        if *successes >= cfg.trial_successes {
                            self.enter(&mut phase, Self::closed());
                        }
                    }
                    Outcome::Failure(class) if counts_as_outage(class) => self.enter(&mut phase, open),
                    Outcome::Failure(_) => {}
                }
            }
            Phase::Closed { failures_in_row, throttles_in_row, window_start, calls, failures } => {
                if now.duration_since(*window_start) > cfg.window {
                    (*window_start, *calls, *failures) = (now, 0, 0);
                }
                *calls += 1;
                let trip = match outcome {
                    Outcome::Success => {
                        (*failures_in_row, *throttles_in_row) = (0, 0);
                        false
                    }
                    Outcome::Failure(FailureClass::Throttled) => {
                        *throttles_in_row += 1;
                        *throttles_in_row >= cfg.consecutive_throttles
                    }
                    Outcome::Failure(class) if counts_as_outage(class) => {
                        *failures_in_row += 1;
                        *failures += 1;
                        let rate = f64::from(*failures) / f64::from(*calls);
                        *failures_in_row >= cfg.consecutive_failures || (*calls >= cfg.min_calls && rate > cfg.failure_rate)
                    }
                    Outcome::Failure(_) => false,
                };
                if trip {
                    self.enter(&mut phase, open);
                }
            }
            // A batch started before the breaker opened: its outcome changes nothing now.
            _ => {}
        }
    }

    fn enter(&self, phase: &mut Phase, next: Phase) {
        let state = match next {
            Phase::Closed { .. } => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        };
        let from = self.state();
        *phase = next;
        if from != state {
            // The one log line per transition.
            match state {
                BreakerState::Open => {
                    tracing::warn!(from = from.as_str(), to = state.as_str(), cool_down = ?self.config.cool_down, "store circuit breaker opened: writes and receives pause")
                }
                _ => tracing::info!(from = from.as_str(), to = state.as_str(), "store circuit breaker changed state"),
            }
            self.metrics.transitions.get_or_create(&TransitionLabel { to: state.as_str() }).inc();
            self.metrics.state.set(state.level());
            self.state.send_replace(state);
        }
    }
}

/// Corrupt data is a fault of one item, not of the store: it never opens the breaker.
fn counts_as_outage(class: FailureClass) -> bool {
    matches!(class, FailureClass::Unavailable | FailureClass::Rejected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(config: BreakerConfig) -> Breaker {
        Breaker::new(config, BreakerMetrics::default())
    }

    fn write(b: &Breaker, outcome: Outcome) -> bool {
        match b.try_acquire() {
            Some(trial) => {
                b.record(trial, outcome);
                true
            }
            None => false,
        }
    }

    const DOWN: Outcome = Outcome::Failure(FailureClass::Unavailable);
    const SLOW_DOWN: Outcome = Outcome::Failure(FailureClass::Throttled);

    #[tokio::test(start_paused = true)]
    async fn consecutive_outages_open_it_and_a_cool_down_and_trials_close_it() {
        let b = breaker(BreakerConfig { consecutive_failures: 3, trial_successes: 2, ..Default::default() });
        assert!(write(&b, DOWN) && write(&b, DOWN));
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(write(&b, DOWN));
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!write(&b, Outcome::Success), "open: nothing is attempted");
        tokio::time::advance(DEFAULT_COOL_DOWN).await;
        let trial = b.try_acquire().expect("a trial after the cool-down");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.try_acquire().is_none(), "one trial batch at a time");
        b.record(trial, Outcome::Success);
        assert!(write(&b, Outcome::Success));
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_trial_opens_it_again() {
        let b = breaker(BreakerConfig { consecutive_failures: 1, ..Default::default() });
        assert!(write(&b, DOWN));
        tokio::time::advance(DEFAULT_COOL_DOWN).await;
        assert!(write(&b, DOWN));
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.admits_receive().is_err_and(|at| at > Instant::now()), "no receiving while open");
        tokio::time::advance(DEFAULT_COOL_DOWN).await;
        assert!(b.admits_receive().is_ok(), "a trial may be received once the cool-down is over");
    }

    #[tokio::test(start_paused = true)]
    async fn throttles_count_apart_and_open_it_only_when_they_persist() {
        let b = breaker(BreakerConfig { consecutive_failures: 2, consecutive_throttles: 4, ..Default::default() });
        for _ in 0..3 {
            assert!(write(&b, SLOW_DOWN));
        }
        assert!(write(&b, Outcome::Success));
        assert!(write(&b, DOWN));
        assert!(write(&b, SLOW_DOWN), "a throttle between outages does not make them consecutive throttles");
        assert_eq!(b.state(), BreakerState::Closed);
        for _ in 0..4 {
            write(&b, SLOW_DOWN);
        }
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_rate_over_the_window_opens_it() {
        let b = breaker(BreakerConfig { consecutive_failures: 100, min_calls: 10, failure_rate: 0.5, ..Default::default() });
        for i in 0..10 {
            write(&b, if i % 3 == 1 { Outcome::Success } else { DOWN });
        }
        assert_eq!(b.state(), BreakerState::Open, "7 of 10 failed, the last one at the tenth write");
    }

    #[tokio::test(start_paused = true)]
    async fn corrupt_data_never_opens_it_and_transitions_are_published() {
        let b = breaker(BreakerConfig { consecutive_failures: 1, ..Default::default() });
        let mut watch = b.subscribe();
        assert!(write(&b, Outcome::Failure(FailureClass::Corrupt)));
        assert_eq!(b.state(), BreakerState::Closed);
        write(&b, DOWN);
        watch.changed().await.unwrap();
        assert_eq!(*watch.borrow(), BreakerState::Open);
        assert_eq!(b.metrics.state.get(), 2);
    }
}
