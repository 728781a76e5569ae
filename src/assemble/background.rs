//! A thread of its own, at a lower scheduling priority, for background work (the log's
//! compaction) that should yield the CPU to the pipeline and the GETs whenever they want it.

use std::sync::mpsc;

use anyhow::Context;

type Job = Box<dyn FnOnce() + Send>;

/// Runs jobs one at a time on its thread, which ends once this is dropped and its last job is
/// done; a job that panics fails alone, the thread goes on with the next.
pub struct Background {
    jobs: mpsc::Sender<Job>,
}

impl Background {
    /// `nice` as in nice(1): 0 is the pipeline's own priority, 19 the lowest. On a busy
    /// machine the scheduler gives a thread at nice 10 about a tenth of the time of one at 0;
    /// on an idle one, all of it.
    pub fn spawn(name: &str, nice: i32) -> anyhow::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                lower_priority(nice);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_in_order_on_a_thread_at_the_priority_asked_past_a_panic() {
        let background = Background::spawn("test-background", 7).unwrap();
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
}
