//! Retention: trims the oldest events by age and by the disk budget, on a blocking thread
//! every `trim_interval`, and refreshes the log's [`Tip`](super::Tip) every few seconds in
//! between (RocksDB's size moves with flushes and compactions, not with appends).
//!
//! Age is measured back from the newest event, or from the wall clock when that is earlier
//! (DESIGN.md invariant 9): a clock that steps years forward (a VM resumed, a bad RTC) must not
//! delete the whole log in one pass, and the newest event is never trimmed. And what arrived
//! within the retention, by the monotonic clock ([`Arrivals`]), is never trimmed by age: once
//! a clock stepped forward has stamped new events years ahead, counting back from the newest
//! would reach every event before the step.

use super::Log;
use crate::clock::now_us;
use crate::metrics::Metrics;
use crate::units::{parse_duration, parse_size, ser_duration};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The smallest `--max-disk-bytes` other than 0 (no limit).
pub const MIN_DISK_BUDGET: u64 = 256 << 20;

/// How often the tip's size figure is refreshed between trims.
const TIP_REFRESH: Duration = Duration::from_secs(5);

/// What retention keeps (`contrail serve` flags; see `config/contrail.example.toml`).
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct RetentionConfig {
    /// Keep events this long (e.g. 24h, 36h, 7d).
    #[arg(long, env = "CONTRAIL_RETENTION", default_value = "24h", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub retention: Duration,
    /// Also trim the oldest events while their files take more disk than this (e.g. 50GiB; at
    /// least 256MiB). On top: the stored compressed frames of --precompress-window and the
    /// write-ahead log (at most 256 MiB). 0: no limit.
    #[arg(long, env = "CONTRAIL_MAX_DISK_BYTES", default_value = "0", value_parser = parse_size)]
    pub max_disk_bytes: u64,
    /// How often retention runs.
    #[arg(long, env = "CONTRAIL_TRIM_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub trim_interval: Duration,
}

impl RetentionConfig {
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.retention.is_zero() {
            return Err(("retention", "must be more than 0".into()));
        }
        if self.trim_interval.is_zero() {
            return Err(("trim-interval", "must be more than 0".into()));
        }
        if self.max_disk_bytes != 0 && self.max_disk_bytes < MIN_DISK_BUDGET {
            // Below a few memtables' worth, the budget would keep little beyond what is still
            // being written.
            return Err(("max-disk-bytes", "must be 0 (no limit) or at least 256MiB".into()));
        }
        Ok(())
    }
}

/// When events arrived, by the monotonic clock (which no wall-clock step moves): marks of the
/// newest `time_us` at moments of this process's life, about a 256th of the retention apart.
/// Before the process started nothing is known: those events are aged by `time_us` alone.
pub struct Arrivals {
    /// Oldest first; the first is the latest mark at least a retention ago, or the start.
    marks: VecDeque<(Instant, u64)>,
}

impl Arrivals {
    /// Starts at `now` with `newest` the log's newest `time_us` (0 when empty).
    pub fn new(now: Instant, newest: u64) -> Self {
        Arrivals { marks: VecDeque::from([(now, newest)]) }
    }

    /// Notes that by `now` the log's newest event was `newest`.
    pub fn record(&mut self, now: Instant, newest: u64, retention: Duration) {
        let spacing = retention / 256;
        if self.marks.back().is_none_or(|(at, _)| now.saturating_duration_since(*at) >= spacing) {
            self.marks.push_back((now, newest));
        }
        self.forget_before(now, retention);
    }

    /// The first `time_us` that may have arrived within `retention` of `now`: age trims
    /// nothing from there on.
    pub fn kept_from(&mut self, now: Instant, retention: Duration) -> u64 {
        self.forget_before(now, retention);
        self.marks[0].1.saturating_add(1)
    }

    /// Keeps one mark at least a retention old (or the start), and those after it.
    fn forget_before(&mut self, now: Instant, retention: Duration) {
        if let Some(ago) = now.checked_sub(retention) {
            while self.marks.len() > 1 && self.marks[1].0 <= ago {
                self.marks.pop_front();
            }
        }
    }
}

/// Runs until `cancel` fires; a failing trim (our own store failing) ends it with the error.
pub async fn run(
    log: Arc<Log>,
    metrics: Arc<Metrics>,
    opts: RetentionConfig,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let mut next_trim = Instant::now() + opts.trim_interval;
    let started = log.newest_time_us()?.unwrap_or(0);
    let arrivals = Arc::new(std::sync::Mutex::new(Arrivals::new(Instant::now(), started)));
    loop {
        let wait = TIP_REFRESH.min(next_trim.saturating_duration_since(Instant::now()));
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
        let trim = Instant::now() >= next_trim;
        if trim {
            next_trim = Instant::now() + opts.trim_interval;
        }
        let (log, metrics, opts, arrivals) = (log.clone(), metrics.clone(), opts.clone(), arrivals.clone());
        tokio::task::spawn_blocking(move || {
            let mut arrivals = arrivals.lock().unwrap_or_else(|p| p.into_inner());
            arrivals.record(Instant::now(), log.newest_time_us()?.unwrap_or(0), opts.retention);
            if trim {
                let kept_from = arrivals.kept_from(Instant::now(), opts.retention);
                enforce(&log, &metrics, &opts, now_us(), kept_from)
            } else {
                log.refresh_tip().map_err(anyhow::Error::from)
            }
        })
        .await??;
    }
}

/// Events older than this are past retention: `retention` back from the newest event or the
/// clock, whichever is earlier, and never past the newest event.
pub fn age_cutoff(newest: u64, now_us: u64, retention: Duration) -> u64 {
    newest.min(now_us).saturating_sub(retention.as_micros() as u64).min(newest)
}

/// One retention pass, with the wall clock reading `now_us`; age trims nothing from
/// `kept_from` on (what arrived within the retention: [`Arrivals::kept_from`]; `u64::MAX` when
/// not known).
pub fn enforce(
    log: &Log,
    metrics: &Metrics,
    opts: &RetentionConfig,
    now_us: u64,
    kept_from: u64,
) -> anyhow::Result<()> {
    let Some(newest) = log.newest_time_us()? else { return Ok(()) };
    let cutoff = age_cutoff(newest, now_us, opts.retention).min(kept_from);
    if log.oldest_time_us()?.is_some_and(|t| t < cutoff) {
        log.trim_before(cutoff)?;
        metrics.store_trims.inc();
        tracing::info!(cutoff_time_us = cutoff, "trimmed events older than retention");
    }
    // Disk budget: drop the oldest tenth of the time span per step until under budget, or
    // until a step frees nothing (what is left is not yet in files trimming can delete).
    for _ in 0..10 {
        let before = log.event_bytes();
        if opts.max_disk_bytes == 0 || before <= opts.max_disk_bytes {
            break;
        }
        let (Some(old), Some(new)) = (log.oldest_time_us()?, log.newest_time_us()?) else { break };
        let cut = old + (new - old) / 10 + 1;
        log.trim_before(cut.min(new))?;
        metrics.store_trims.inc();
        let after = log.event_bytes();
        tracing::warn!(
            cutoff_time_us = cut,
            event_bytes = after,
            budget = opts.max_disk_bytes,
            "trimmed oldest events for the disk budget"
        );
        if after >= before {
            break;
        }
    }
    log.refresh_tip()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_keep_what_came_since_the_start_until_a_retention_has_passed() {
        let (start, hour, minute) = (Instant::now(), Duration::from_secs(3600), Duration::from_secs(60));
        let mut a = Arrivals::new(start, 500);
        a.record(start + 10 * minute, 900, hour);
        a.record(start + 20 * minute, 1_300, hour);
        // Younger than the retention: everything that came after the start is kept.
        assert_eq!(a.kept_from(start + 30 * minute, hour), 501);
        // An hour after the 10-minute mark, what had come by then may go.
        assert_eq!(a.kept_from(start + 75 * minute, hour), 901);
        assert_eq!(a.kept_from(start + 90 * minute, hour), 1_301);
        // Marks closer than a 256th of the retention are one; old ones are forgotten.
        for i in 0..10_000 {
            a.record(start + 90 * minute + Duration::from_millis(i), 2_000 + i, hour);
        }
        assert!(a.marks.len() <= 3, "{} marks", a.marks.len());
    }
}
