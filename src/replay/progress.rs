//! Progress for the replay tools: indicatif's bar on a terminal, plain timestamped lines
//! otherwise (a CI log or a pipe gets a line every few seconds, not control codes).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How often the plain form prints a line.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

pub struct Progress {
    label: String,
    unit: &'static str,
    total: Option<u64>,
    bar: Option<ProgressBar>,
    started: Instant,
    last_line: Instant,
    position: u64,
}

impl Progress {
    pub fn new(label: impl Into<String>, unit: &'static str, total: Option<u64>) -> Self {
        let label = label.into();
        let bar = std::io::stderr().is_terminal().then(|| {
            let (bar, template) = match total {
                Some(total) => (
                    ProgressBar::new(total),
                    format!("{{spinner}} {label} [{{bar:40}}] {{pos}}/{{len}} {unit} ({{per_sec}}, {{eta}} left)"),
                ),
                None => (ProgressBar::new_spinner(), format!("{{spinner}} {label}: {{pos}} {unit} ({{per_sec}})")),
            };
            bar.set_style(ProgressStyle::with_template(&template).expect("static template").progress_chars("=> "));
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        let now = Instant::now();
        Self { label, unit, total, bar, started: now, last_line: now, position: 0 }
    }

    pub fn set(&mut self, position: u64) {
        self.position = position;
        match &self.bar {
            Some(bar) => bar.set_position(position),
            None if self.last_line.elapsed() >= PLAIN_EVERY => {
                self.last_line = Instant::now();
                eprintln!("{}", self.line());
            }
            None => {}
        }
    }

    pub fn inc(&mut self, by: u64) {
        self.set(self.position + by);
    }

    /// Clears the bar; the caller prints the summary.
    pub fn finish(self) -> (u64, Duration) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        (self.position, self.started.elapsed())
    }

    fn line(&self) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let of = self.total.map(|t| format!("/{t}")).unwrap_or_default();
        format!("{}: {}{of} {} ({:.0}/s)", self.label, self.position, self.unit, self.position as f64 / secs)
    }
}

/// `n` per second over `elapsed`, for summaries.
pub fn rate(n: u64, elapsed: Duration) -> String {
    format!("{:.0}/s", n as f64 / elapsed.as_secs_f64().max(1e-3))
}
