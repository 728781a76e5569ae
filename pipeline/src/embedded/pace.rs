//! How the log's compaction gives way to a pipeline that has fallen behind: while the backlog
//! is over a bound, it sleeps for a moment after every few milliseconds of work.
//!
//! Why sleep, when the compaction already runs under `SCHED_IDLE`: a core that runs an idle
//! task is busy to Linux's load balancer. On two cores, with the compaction on one, the fold
//! and the GETs shared the other and the balancer left them there: for half a second the fold
//! got a third of a core where it needed two fifths, while the compaction had most of the
//! other, and events waited 100 ms to be seen (BENCHMARKS.md, round eighteen). Once the
//! compaction sleeps, its core goes idle, and a core going idle pulls waiting work over.

use std::time::{Duration, Instant};

/// Accepted entries not yet processed past which the compaction gives way: a few write
/// batches, about 20 ms of a 50k events/s load, where a pipeline keeping up holds a few hundred.
pub const DEFAULT_YIELD_BACKLOG: u64 = 1024;
/// Work between two looks at the backlog, and the sleep when it is over the bound: at least
/// sysctl `sched_migration_cost` (0.5 ms), the idle time below which a core going idle does
/// not look for work to pull. A compaction that gives way at every look takes twice as long.
const SLICE: Duration = Duration::from_millis(2);
/// Calls between two readings of the clock.
const CALLS_PER_LOOK: u32 = 64;

/// Counts a compaction's work and, when the pipeline is behind, sleeps.
pub(crate) struct Pacer<'a> {
    behind: Option<&'a dyn Fn() -> bool>,
    since: Instant,
    calls: u32,
    paused: Duration,
}

impl<'a> Pacer<'a> {
    /// Never sleeps: for the tools, which run alone.
    pub(crate) fn never() -> Self {
        Self { behind: None, since: Instant::now(), calls: 0, paused: Duration::ZERO }
    }

    /// Sleeps whenever `behind` says so, at most once per slice of work.
    pub(crate) fn when(behind: &'a dyn Fn() -> bool) -> Self {
        Self { behind: Some(behind), ..Self::never() }
    }

    /// One step of work (a record, a lookup) done.
    pub(crate) fn step(&mut self) {
        let Some(behind) = self.behind else { return };
        self.calls += 1;
        if !self.calls.is_multiple_of(CALLS_PER_LOOK) || self.since.elapsed() < SLICE {
            return;
        }
        if behind() {
            std::thread::sleep(SLICE);
            self.paused += SLICE;
        }
        self.since = Instant::now();
    }

    /// The time slept so far.
    pub(crate) fn paused(&self) -> Duration {
        self.paused
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn work(pacer: &mut Pacer<'_>, lasting: Duration) {
        let end = Instant::now() + lasting;
        while Instant::now() < end {
            pacer.step();
        }
    }

    #[test]
    fn it_sleeps_only_while_the_pipeline_is_behind_and_works_a_slice_between_sleeps() {
        let behind = Cell::new(false);
        let check = || behind.get();
        let mut pacer = Pacer::when(&check);
        work(&mut pacer, SLICE * 5);
        assert_eq!(pacer.paused(), Duration::ZERO);
        behind.set(true);
        let started = Instant::now();
        while pacer.paused() < SLICE * 3 {
            pacer.step();
            assert!(started.elapsed() < Duration::from_secs(10), "never slept");
        }
        // Three sleeps and a slice of work between each two: a compaction keeps at least half
        // its pace.
        assert!(started.elapsed() >= SLICE * 5, "{:?}", started.elapsed());
    }

    #[test]
    fn the_tools_pacer_never_asks_nor_sleeps() {
        let mut pacer = Pacer::never();
        work(&mut pacer, SLICE * 3);
        assert_eq!(pacer.paused(), Duration::ZERO);
    }
}
