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

    /// [`Backoff::next_wait`], but no shorter than what the peer `asked` (a refusal's
    /// `Retry-After`), up to `max`: a server shedding load is not asked again sooner than it
    /// said, and one asking for hours does not stop the reconnects for longer than configured.
    pub fn next_wait_at_least(&mut self, asked: Option<Duration>) -> Duration {
        let wait = self.next_wait();
        asked.map_or(wait, |asked| wait.max(asked.min(self.max)))
    }

    /// Progress was made: the next failure waits `min` again.
    pub fn reset(&mut self) {
        self.current = self.min;
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

    #[test]
    fn a_wait_asked_for_is_kept_up_to_the_max() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(10));
        let mut b = Backoff::new(min, max);
        assert!(b.next_wait_at_least(None) <= min);
        assert_eq!(b.next_wait_at_least(Some(Duration::from_secs(3))), Duration::from_secs(3));
        assert_eq!(b.next_wait_at_least(Some(Duration::from_secs(3_600))), max);
        // A shorter ask than the backoff's own wait does not shorten it.
        b = Backoff::new(Duration::from_secs(8), max);
        assert!(b.next_wait_at_least(Some(Duration::from_secs(1))) >= Duration::from_secs(4));
    }
}
