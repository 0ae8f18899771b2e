//! Reconnect backoff: exponential from `min` to `max`, each wait jittered over its upper half
//! so a fleet of readers reconnecting at once spreads out.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff { min, max: max.max(min), current: min }
    }

    /// The next wait (in `[current/2, current]`); the one after is twice as long, up to `max`.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.current.mul_f64(0.5 + rand::random::<f64>() * 0.5);
        self.current = (self.current * 2).min(self.max);
        wait
    }

    /// Progress was made: the next failure waits `min` again.
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

/// How long each host of a list asked to be left alone (a refusal's `Retry-After`): it is
/// not asked again sooner, while the others are tried as usual. A wait is jittered over a
/// quarter more (a fleet refused together does not come back together) and capped at `max`
/// (a host asking for hours does not stop the reconnects for longer than configured).
#[derive(Debug, Clone)]
pub struct Pauses {
    until: Vec<Option<tokio::time::Instant>>,
    /// Per host: its last answer asked for a pause (it has not been asked since).
    owed: Vec<bool>,
    max: Duration,
}

impl Pauses {
    pub fn new(max: Duration) -> Self {
        Pauses { until: Vec::new(), owed: Vec::new(), max }
    }

    /// Host `host` was asked; with `asked`, it asked to be left alone that long.
    pub fn asked(&mut self, host: usize, asked: Option<Duration>) {
        let asked = asked.filter(|a| !a.is_zero());
        if self.until.len() <= host {
            self.until.resize(host + 1, None);
            self.owed.resize(host + 1, false);
        }
        self.owed[host] = asked.is_some();
        let Some(asked) = asked else { return };
        let wait = asked.min(self.max).mul_f64(1.0 + rand::random::<f64>() * 0.25).min(self.max);
        let until = tokio::time::Instant::now() + wait;
        self.until[host] = Some(self.until[host].map_or(until, |u| u.max(until)));
    }

    /// Whether `host`'s last answer asked for a pause, and it has not been asked since (whether
    /// or not the pause is over).
    pub fn owed(&self, host: usize) -> bool {
        self.owed.get(host).copied().unwrap_or(false)
    }

    /// How long until `host` may be asked again: zero when it may now.
    pub fn left(&self, host: usize) -> Duration {
        match self.until.get(host) {
            Some(Some(until)) => until.saturating_duration_since(tokio::time::Instant::now()),
            _ => Duration::ZERO,
        }
    }

    /// The host to ask next of `hosts`, meant to be `current`, and how long to wait for it:
    /// `current` when it may be asked now, else the next one after it that may, else the one
    /// whose pause ends first.
    pub fn pick(&self, current: usize, hosts: usize) -> (usize, Duration) {
        let hosts = hosts.max(1);
        self.first_free((0..hosts).map(|i| (current + i) % hosts)).unwrap_or((current, Duration::ZERO))
    }

    /// Another host than `current` of `hosts`: the next one after it that may be asked now,
    /// else the one whose pause ends first. `None` with a single host.
    pub fn pick_other(&self, current: usize, hosts: usize) -> Option<usize> {
        self.first_free((1..hosts).map(|i| (current + i) % hosts)).map(|(host, _)| host)
    }

    /// Of `order`, the first host that may be asked now, else the one whose pause ends first
    /// (the earlier in `order` on a tie), with how long is left of its pause.
    fn first_free(&self, order: impl Iterator<Item = usize>) -> Option<(usize, Duration)> {
        let mut soonest: Option<(usize, Duration)> = None;
        for host in order {
            let left = self.left(host);
            if left.is_zero() {
                return Some((host, left));
            }
            if soonest.is_none_or(|(_, s)| left < s) {
                soonest = Some((host, left));
            }
        }
        soonest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_max_with_jitter_and_resets() {
        let (min, max) = (Duration::from_millis(100), Duration::from_millis(700));
        let mut b = Backoff::new(min, max);
        let mut ceiling = min;
        for _ in 0..6 {
            let w = b.next_wait();
            assert!(w >= ceiling / 2 && w <= ceiling, "{w:?} outside [{:?}, {ceiling:?}]", ceiling / 2);
            ceiling = (ceiling * 2).min(max);
        }
        b.reset();
        assert!(b.next_wait() <= min);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_asked_for_is_kept_per_host_jittered_up_to_the_max() {
        let mut p = Pauses::new(Duration::from_secs(10));
        assert_eq!(p.left(0), Duration::ZERO);
        p.asked(1, Some(Duration::from_secs(4)));
        p.asked(0, None);
        p.asked(2, Some(Duration::ZERO));
        assert_eq!((p.left(0), p.left(2), p.left(7)), (Duration::ZERO, Duration::ZERO, Duration::ZERO));
        let left = p.left(1);
        assert!(left >= Duration::from_secs(4) && left <= Duration::from_secs(5), "{left:?}");
        // A shorter ask does not shorten it; a longer one is cut to the max.
        p.asked(1, Some(Duration::from_secs(1)));
        assert_eq!(p.left(1), left);
        p.asked(3, Some(Duration::from_secs(3_600)));
        assert_eq!(p.left(3), Duration::from_secs(10));
        p.asked(4, Some(Duration::MAX));
        assert_eq!(p.left(4), Duration::from_secs(10));
        // The next host that may be asked, else the soonest.
        assert_eq!(p.pick(0, 4), (0, Duration::ZERO));
        assert_eq!(p.pick(1, 4), (2, Duration::ZERO));
        assert_eq!(p.pick(3, 4), (0, Duration::ZERO));
        let mut all = Pauses::new(Duration::from_secs(10));
        all.asked(0, Some(Duration::from_secs(8)));
        all.asked(1, Some(Duration::from_secs(1)));
        assert_eq!(all.pick(0, 2).0, 1);
        // Another host: the next that may be asked, else the soonest, never the one given.
        assert_eq!((p.pick_other(0, 4), p.pick_other(2, 4), p.pick_other(0, 1)), (Some(2), Some(0), None));
        assert_eq!(all.pick_other(1, 2), Some(0));
        let mut others = Pauses::new(Duration::from_secs(10));
        for (host, secs) in [(0, 9), (1, 8), (2, 6), (3, 2)] {
            others.asked(host, Some(Duration::from_secs(secs)));
        }
        assert_eq!((others.pick_other(0, 4), others.pick_other(3, 4)), (Some(3), Some(2)));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!((p.left(1), p.left(3)), (Duration::ZERO, Duration::from_secs(4)));
        // Owed a turn until asked again, its pause over or not.
        assert!(p.owed(1) && p.owed(3) && !p.owed(0) && !p.owed(2) && !p.owed(9));
        p.asked(1, None);
        assert!(!p.owed(1));
    }
}
