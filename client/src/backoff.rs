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
}
