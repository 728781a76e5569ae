//! A thread of its own, at a lower scheduling priority, for background work (the log's
//! compaction) that should yield the CPU to the pipeline and the GETs whenever they want it.

use std::fmt;
use std::str::FromStr;
use std::sync::mpsc;

use anyhow::Context;

type Job = Box<dyn FnOnce() + Send>;

/// Runs jobs one at a time on its thread, which ends once this is dropped and its last job is
/// done; a job that panics fails alone, the thread goes on with the next.
pub struct Background {
    jobs: mpsc::Sender<Job>,
}

/// How a background thread is scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// Linux's `SCHED_IDLE`: the thread runs on CPU time no other thread wants, and any other
    /// thread that wakes takes the CPU from it at once. A nice value only shares the CPU out:
    /// at 1M products and 41k events/s, a compaction at nice 10 or 19 put the pipeline's
    /// p99 at 200 ms, under `SCHED_IDLE` at 21–24 ms (BENCHMARKS.md, round fourteen). On a
    /// machine kept busy for long it gets next to nothing done meanwhile.
    Idle,
    /// A nice value as nice(1) counts: 0 is the pipeline's own priority, 19 the lowest. On a
    /// busy machine the scheduler gives a thread at nice 10 about a tenth of the time of one
    /// at 0; on an idle one, all of it.
    Nice(i32),
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Idle => f.write_str("idle"),
            Self::Nice(n) => write!(f, "{n}"),
        }
    }
}

impl FromStr for Priority {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("idle") {
            return Ok(Self::Idle);
        }
        match s.parse::<i32>() {
            Ok(n) if (0..=19).contains(&n) => Ok(Self::Nice(n)),
            _ => Err(format!("expected `idle` or a nice value from 0 to 19, not {s:?}")),
        }
    }
}

impl Background {
    /// Starts the thread at `priority`.
    pub fn spawn(name: &str, priority: Priority) -> anyhow::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                match priority {
                    Priority::Idle => schedule_idle(),
                    Priority::Nice(nice) => lower_priority(nice),
                }
                while let Ok(job) = queue.recv() {
                    job();
                }
            })
            .with_context(|| format!("starting the {name} thread"))?;
        Ok(Self { jobs })
    }

    /// Runs `work` on the thread and waits for its result without blocking the runtime.
    /// `None` if it panicked.
    pub async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (done, result) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                if let Ok(value) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)) {
                    let _ = done.send(value);
                }
            }))
            .ok()?;
        result.await.ok()
    }
}

/// The calling thread's nice value (Linux keeps one per thread).
#[cfg(target_os = "linux")]
fn thread_nice() -> i32 {
    #[allow(unsafe_code)]
    // SAFETY: gettid and getpriority take and return plain integers.
    unsafe {
        libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t)
    }
}

/// Lowers the calling thread's priority to `nice`, never raises it (a process started under
/// nice(1) keeps its own); only the thread's. A refusal leaves it as it was, which costs
/// latency, not correctness.
fn lower_priority(nice: i32) {
    #[cfg(target_os = "linux")]
    {
        let nice = nice.max(thread_nice());
        #[allow(unsafe_code)]
        // SAFETY: gettid and setpriority take and return plain integers; this changes the
        // priority of the calling thread only.
        let failed = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) } != 0;
        if failed {
            tracing::warn!(nice, error = %std::io::Error::last_os_error(), "could not lower a background thread's priority");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

/// Puts the calling thread, only it, under `SCHED_IDLE`. A refusal leaves it as it was, which
/// costs latency, not correctness.
fn schedule_idle() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        #[allow(unsafe_code)]
        // SAFETY: gettid returns a plain integer; sched_setscheduler reads `param`, which
        // outlives the call, and changes the policy of the calling thread only.
        let failed = unsafe { libc::sched_setscheduler(libc::gettid(), libc::SCHED_IDLE, &raw const param) } != 0;
        if failed {
            tracing::warn!(error = %std::io::Error::last_os_error(), "could not put a background thread under SCHED_IDLE");
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
fn thread_policy() -> i32 {
    #[allow(unsafe_code)]
    // SAFETY: gettid and sched_getscheduler take and return plain integers.
    unsafe {
        libc::sched_getscheduler(libc::gettid())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_in_order_on_a_thread_at_the_priority_asked_past_a_panic() {
        let background = Background::spawn("test-background", Priority::Nice(7)).unwrap();
        let first = background.run(|| std::thread::current().name().map(str::to_owned)).await.unwrap();
        assert_eq!(first.as_deref(), Some("test-background"));
        #[cfg(target_os = "linux")]
        {
            let ours = thread_nice();
            assert_eq!(background.run(thread_nice).await, Some(7.max(ours)));
            assert_eq!(thread_nice(), ours, "only the background thread is lowered");
        }
        assert_eq!(background.run(|| -> u32 { panic!("a failing job") }).await, None);
        let mut seen = Vec::new();
        for i in 0..3 {
            seen.push(background.run(move || i).await.unwrap());
        }
        assert_eq!(seen, [0, 1, 2], "the jobs after a panic still run, in order");
    }

    #[tokio::test]
    async fn an_idle_thread_is_under_sched_idle_and_only_it() {
        let background = Background::spawn("test-idle", Priority::Idle).unwrap();
        #[cfg(target_os = "linux")]
        {
            assert_eq!(background.run(thread_policy).await, Some(libc::SCHED_IDLE));
            assert_ne!(thread_policy(), libc::SCHED_IDLE, "only the background thread");
        }
        assert_eq!(background.run(|| 1).await, Some(1));
    }

    #[test]
    fn priorities_read_as_written() {
        for text in ["idle", "IDLE", " 0", "10", "19"] {
            let priority: Priority = text.parse().unwrap();
            assert_eq!(priority.to_string().parse::<Priority>().unwrap(), priority);
        }
        assert_eq!("idle".parse::<Priority>().unwrap(), Priority::Idle);
        for bad in ["20", "-1", "low", ""] {
            assert!(bad.parse::<Priority>().unwrap_err().contains("idle"), "{bad}");
        }
    }
}
