//! Progress of long operator commands (`inspect frames`, `inspect log`, `dict train`) on
//! stderr: done/total, rate and time left, redrawn at most five times a second — only when
//! stderr is a terminal. Scripts and tests, which read stdout and the stderr summary, see
//! nothing of it.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Redraws at most this often.
const REDRAW: Duration = Duration::from_millis(200);

pub struct Progress {
    what: &'static str,
    total: Option<u64>,
    done: u64,
    started: Instant,
    last_draw: Option<Instant>,
    enabled: bool,
}

impl Progress {
    /// Progress of `what` (a plural noun: "frames"), out of `total` when known; shown only
    /// when stderr is a terminal.
    pub fn new(what: &'static str, total: Option<u64>) -> Self {
        Self::with_output(what, total, std::io::stderr().is_terminal())
    }

    fn with_output(what: &'static str, total: Option<u64>, enabled: bool) -> Self {
        Progress { what, total, done: 0, started: Instant::now(), last_draw: None, enabled }
    }

    /// `n` more are done.
    pub fn add(&mut self, n: u64) {
        self.done += n;
        if self.enabled && self.last_draw.is_none_or(|t| t.elapsed() >= REDRAW) {
            self.last_draw = Some(Instant::now());
            let line = self.line();
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r{line}\x1b[K");
            let _ = err.flush();
        }
    }

    /// The last line (the final count and the time it took), then a newline.
    pub fn finish(&mut self) {
        if self.enabled {
            let line = self.line();
            let _ = writeln!(
                std::io::stderr().lock(),
                "\r{line}, done in {:.1} s\x1b[K",
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    /// `frames 12000/20000 (60%), 45000/s, 0:01 left`
    fn line(&self) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = self.done as f64 / secs;
        match self.total {
            Some(total) if total > 0 => {
                let pct = (self.done as f64 * 100.0 / total as f64).min(100.0);
                let left = total.saturating_sub(self.done) as f64 / rate.max(1e-9);
                format!(
                    "{} {}/{total} ({pct:.0}%), {rate:.0}/s, {}:{:02} left",
                    self.what,
                    self.done,
                    (left / 60.0) as u64,
                    (left % 60.0) as u64
                )
            }
            _ => format!("{} {}, {rate:.0}/s", self.what, self.done),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_say_done_total_rate_and_time_left() {
        let mut p = Progress::with_output("frames", Some(200), false);
        p.done = 50;
        let line = p.line();
        assert!(line.starts_with("frames 50/200 (25%), "), "{line}");
        assert!(line.ends_with(" left"), "{line}");
        let q = Progress::with_output("events", None, false);
        assert!(q.line().starts_with("events 0, "), "{}", q.line());
    }
}
