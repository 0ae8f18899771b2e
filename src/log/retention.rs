//! Retention: trims the oldest events by age and by the disk budget, on a blocking thread
//! every `trim_interval`, and refreshes the log's [`Tip`](super::Tip) every few seconds in
//! between (RocksDB's size moves with flushes and compactions, not with appends).
//!
//! Age is measured back from the newest event, or from the wall clock when that is earlier
//! (DESIGN.md invariant 9): a clock that steps years forward (a VM resumed, a bad RTC) must not
//! delete the whole log in one pass, and the newest event is never trimmed. And once the wall
//! clock has been seen to step forward (it ran ahead of the monotonic clock), what arrived
//! within the retention by the monotonic clock ([`Arrivals`]) is not trimmed by age: events
//! stamped after such a step sit years ahead, and counting back from them would reach every
//! event before it. Without a step (a replica replaying old events arrives at them fast) age
//! is by `time_us` as before. Whatever its `time_us`, what arrived a retention or more before
//! the newest event may go: a log stamped years ahead (a clock that jumped forward, then back)
//! still ages, and a quiet log still keeps what it has. A clock already ahead of the log at
//! the start counts as a step ([`Arrivals::new`]).

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
        if self.trim_interval.is_zero() || self.trim_interval > Duration::from_secs(86_400) {
            return Err(("trim-interval", "must be more than 0 and at most 1d".into()));
        }
        if self.retention > Duration::from_secs(100 * 365 * 86_400) {
            return Err(("retention", "must be at most 100 years".into()));
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
/// newest `time_us`, with the wall clock's reading, at moments of this process's life when the
/// log grew, about a 256th of the retention apart. Age by arrival counts back from when the
/// newest event arrived, as age by `time_us` counts back from the newest event: a quiet log
/// keeps what it has. Of what came before the process started only `time_us` is known: after
/// a step, those events are aged by it from the wall clock as it would read without the step
/// ([`Arrivals::kept_from`]).
pub struct Arrivals {
    /// Oldest first; the first is the latest mark at least a retention before `grew_at`, or
    /// the start.
    marks: VecDeque<Mark>,
    /// When the newest event last changed, and to what.
    grew_at: Instant,
    newest: u64,
    /// This process stamps the events (a replica keeps its upstream's `time_us`: its own
    /// clock's steps move nothing).
    stamps: bool,
}

/// What the monotonic clock says about age, for [`enforce`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ByArrival {
    /// Age trims nothing from here on: what arrived within the retention, once the wall clock
    /// stepped forward ([`Arrivals::kept_from`]).
    pub kept_from: u64,
    /// Age trims everything before this, whatever its `time_us`: it arrived a retention or
    /// more before the newest event ([`Arrivals::old_before`]).
    pub old_before: u64,
}

impl ByArrival {
    /// Nothing known: age by `time_us` alone.
    pub const UNKNOWN: ByArrival = ByArrival { kept_from: u64::MAX, old_before: 0 };
}

#[derive(Debug, Clone, Copy)]
struct Mark {
    at: Instant,
    wall_us: u64,
    newest: u64,
}

/// How far the wall clock may run ahead of the monotonic one before it counts as a step
/// forward (NTP slews far less; a suspended VM resumes with at most its pause).
const STEP_FORWARD_US: u64 = 60_000_000;

impl Arrivals {
    /// Starts at `now` (the wall clock reading `wall_us`) with `newest` the log's newest
    /// `time_us` (0 when empty). Make it before ingest starts.
    ///
    /// A clock already well past the log's newest event at the start is taken as no further
    /// than a step's allowance past it: a host that boots with its clock hours ahead (an RTC
    /// kept in local time, NTP not synced yet) then counts as a step, and the history from
    /// before the start is aged from the log's newest event rather than trimmed by that clock
    /// in the first pass. A start after an outage reads the same (the two cannot be told
    /// apart): that history then stays for at most the outage longer than its retention.
    pub fn new(now: Instant, wall_us: u64, newest: u64) -> Self {
        let wall_us = if newest > 0 { wall_us.min(newest.saturating_add(STEP_FORWARD_US)) } else { wall_us };
        Arrivals { marks: VecDeque::from([Mark { at: now, wall_us, newest }]), grew_at: now, newest, stamps: true }
    }

    /// For a replica, which keeps its upstream's `time_us`: no step of its own clock holds
    /// events back.
    pub fn for_replica(mut self) -> Self {
        self.stamps = false;
        self
    }

    /// Notes that by `now` (the wall clock reading `wall_us`) the log's newest event was
    /// `newest` (read before `now` was taken). A mark is kept only when the log grew.
    pub fn record(&mut self, now: Instant, wall_us: u64, newest: u64, retention: Duration) {
        if newest > self.newest {
            (self.grew_at, self.newest) = (now, newest);
            let spacing = retention / 256;
            if self.marks.back().is_none_or(|m| now.saturating_duration_since(m.at) >= spacing) {
                self.marks.push_back(Mark { at: now, wall_us, newest });
            }
        }
        self.forget_old(retention);
    }

    /// When the wall clock has stepped forward since the oldest mark (it moved further than
    /// the monotonic clock), the first `time_us` that may have arrived within `retention`
    /// before the newest event: age trims nothing from there on. Otherwise `u64::MAX`: age by
    /// `time_us`.
    ///
    /// What came before the oldest mark (in a process younger than the retention: before it
    /// started) has only its `time_us` to tell its age, counted back from the wall clock as it
    /// would read without the step (the mark's reading plus the monotonic time since): after
    /// a deploy and a step, the history from before the deploy stays for its retention.
    pub fn kept_from(&mut self, now: Instant, wall_us: u64, retention: Duration) -> u64 {
        self.forget_old(retention);
        let first = self.marks[0];
        let monotonic = now.saturating_duration_since(first.at).as_micros() as u64;
        if self.stamps && wall_us.saturating_sub(first.wall_us) > monotonic.saturating_add(STEP_FORWARD_US) {
            let unstepped_now = first.wall_us.saturating_add(monotonic);
            // Kept: younger than the retention (as for arrivals, one exactly that old goes).
            let within_retention = unstepped_now.saturating_sub(retention.as_micros() as u64).saturating_add(1);
            first.newest.saturating_add(1).min(within_retention)
        } else {
            u64::MAX
        }
    }

    /// Every `time_us` below this arrived a retention or more before the newest event, by the
    /// monotonic clock (0 while nothing is known to have).
    pub fn old_before(&mut self, retention: Duration) -> u64 {
        self.forget_old(retention);
        let first = self.marks[0];
        match self.grew_at.checked_sub(retention) {
            Some(ago) if first.at <= ago => first.newest.saturating_add(1),
            _ => 0,
        }
    }

    /// Both, as [`enforce`] takes them.
    pub fn by_arrival(&mut self, now: Instant, wall_us: u64, retention: Duration) -> ByArrival {
        ByArrival { kept_from: self.kept_from(now, wall_us, retention), old_before: self.old_before(retention) }
    }

    /// Keeps one mark at least a retention before the newest event's arrival (or the start),
    /// and those after it.
    fn forget_old(&mut self, retention: Duration) {
        if let Some(ago) = self.grew_at.checked_sub(retention) {
            while self.marks.len() > 1 && self.marks[1].at <= ago {
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
    arrivals: Arrivals,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let mut next_trim = Instant::now() + opts.trim_interval;
    let arrivals = Arc::new(std::sync::Mutex::new(arrivals));
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
            let newest = log.newest_time_us()?.unwrap_or(0);
            arrivals.record(Instant::now(), now_us(), newest, opts.retention);
            if trim {
                let by_arrival = arrivals.by_arrival(Instant::now(), now_us(), opts.retention);
                enforce(&log, &metrics, &opts, now_us(), by_arrival)
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

/// One retention pass, with the wall clock reading `now_us`, bounded by what the monotonic
/// clock says ([`ByArrival`]; [`ByArrival::UNKNOWN`] when nothing is known).
pub fn enforce(
    log: &Log,
    metrics: &Metrics,
    opts: &RetentionConfig,
    now_us: u64,
    by_arrival: ByArrival,
) -> anyhow::Result<()> {
    let Some(newest) = log.newest_time_us()? else { return Ok(()) };
    // Age by arrival trims more only where age by time_us cannot: a log stamped ahead of the
    // wall clock (counting back from the clock would keep it until the clock caught up).
    // Otherwise it could trim what a replica behind its primary, or a burst noticed late, still
    // holds within the retention by time_us.
    let old_before = if newest > now_us.saturating_add(STEP_FORWARD_US) { by_arrival.old_before } else { 0 };
    let cutoff = age_cutoff(newest, now_us, opts.retention).min(by_arrival.kept_from).max(old_before).min(newest);
    if log.oldest_time_us()?.is_some_and(|t| t < cutoff) {
        log.trim_before(cutoff)?;
        metrics.store_trims.inc();
        tracing::info!(cutoff_time_us = cutoff, "trimmed events older than retention");
    }
    // Disk budget: drop about the oldest tenth per step until under budget, or until a step
    // frees nothing (what is left is not yet in files trimming can delete). A tenth of the
    // bytes where the files tell, and never more than a tenth of the time span: after a clock
    // step the span is mostly the step, and a tenth of it could be all history before it.
    for _ in 0..10 {
        let before = log.event_bytes();
        if opts.max_disk_bytes == 0 || before <= opts.max_disk_bytes {
            break;
        }
        let (Some(old), Some(new)) = (log.oldest_time_us()?, log.newest_time_us()?) else { break };
        let span_cut = old + (new - old) / 10 + 1;
        let cut = match log.time_at_bytes_fraction(0.1) {
            Some(c) if c > old => c.min(span_cut),
            _ => span_cut,
        };
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
    fn arrivals_bound_age_only_after_the_wall_clock_stepped_forward() {
        let (start, hour, minute) = (Instant::now(), Duration::from_secs(3600), Duration::from_secs(60));
        let (wall, min_us) = (1_800_000_000_000_000u64, 60_000_000u64);
        // The log's newest event is at the start's wall clock reading; events then arrive with it.
        let mut a = Arrivals::new(start, wall, wall);
        a.record(start + 10 * minute, wall + 10 * min_us, wall + 10 * min_us, hour);
        a.record(start + 20 * minute, wall + 20 * min_us, wall + 20 * min_us, hour);
        // The wall clock kept pace with the monotonic one: age is by time_us alone (a replica
        // replaying old events gets them aged as they are).
        assert_eq!(a.kept_from(start + 30 * minute, wall + 30 * min_us, hour), u64::MAX);
        // It jumped a year ahead: what came within an hour is kept; from before the start,
        // what is younger than an hour by the clock without the step (the start's reading
        // plus the monotonic time since).
        let year = 365 * 24 * 60 * min_us;
        assert_eq!(a.kept_from(start + 30 * minute, wall + year, hour), wall - 30 * min_us + 1);
        // Nothing came since: a quiet log keeps what it has, however long it stays quiet.
        assert_eq!(a.kept_from(start + 300 * minute, wall + year, hour), wall + 1);
        assert_eq!(a.old_before(hour), 0);
        // More comes at 75 minutes: what came by the 10-minute mark is over an hour older.
        a.record(start + 75 * minute, wall + year + 45 * min_us, wall + year + 45 * min_us, hour);
        assert_eq!(a.kept_from(start + 75 * minute, wall + year + 45 * min_us, hour), wall + 10 * min_us + 1);
        assert_eq!(a.old_before(hour), wall + 10 * min_us + 1);
        // A minute of drift is not a step.
        assert_eq!(a.kept_from(start + 76 * minute, wall + 76 * min_us + 50_000_000, hour), u64::MAX);
        // A replica's own clock stamps nothing: its steps hold nothing back.
        let mut r = Arrivals::new(start, wall, wall).for_replica();
        assert_eq!(r.kept_from(start + 30 * minute, wall + year, hour), u64::MAX);
        assert_eq!(r.old_before(hour), 0, "nothing came an hour before the newest");
        // Marks closer than a 256th of the retention are one, old ones are forgotten, and a
        // log that does not grow adds none.
        let later = wall + year + 46 * min_us;
        for i in 0..10_000 {
            a.record(start + 90 * minute + Duration::from_millis(i), wall + 90 * min_us, later + i, hour);
            a.record(start + 200 * minute + Duration::from_secs(i), wall + 200 * min_us, later, hour);
        }
        assert!(a.marks.len() <= 4, "{} marks", a.marks.len());
    }

    /// A clock more than a step's allowance past the log's newest event at the start is taken
    /// as a step from there: what came before the start is aged from the log's newest event.
    #[test]
    fn a_clock_ahead_of_the_log_at_the_start_counts_as_a_step() {
        let (start, hour, minute) = (Instant::now(), Duration::from_secs(3600), Duration::from_secs(60));
        let (newest, min_us) = (1_800_000_000_000_000u64, 60_000_000u64);
        let mut a = Arrivals::new(start, newest + 600 * min_us, newest);
        // Ten minutes on, by that clock: aged from the newest event plus the allowance and the
        // ten minutes, not from the clock (which would trim everything before the start).
        let kept = a.kept_from(start + 10 * minute, newest + 610 * min_us, hour);
        assert_eq!(kept, newest + 11 * min_us - 60 * min_us + 1);
        // Within the allowance (a quick restart, a clock a little fast): not a step.
        let mut a = Arrivals::new(start, newest + 30_000_000, newest);
        assert_eq!(a.kept_from(start + 10 * minute, newest + 30_000_000 + 10 * min_us, hour), u64::MAX);
        // An empty log has nothing to age.
        let mut a = Arrivals::new(start, newest + 600 * min_us, 0);
        assert_eq!(a.kept_from(start + 10 * minute, newest + 610 * min_us, hour), u64::MAX);
    }
}
