//! The one backoff every retry loop uses: exponential from `min` to `max`, with jitter, for
//! as long as it takes (the caller stops on shutdown).

use std::time::Duration;

pub use backon::BackoffBuilder;

/// A fresh backoff; take delays with `next()` (`Iterator`), `None` never comes.
pub fn backoff(min: Duration, max: Duration) -> Backoff {
    Backoff {
        inner: backon::ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_jitter()
            .without_max_times()
            .build(),
        max,
    }
}

pub struct Backoff {
    inner: backon::ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    /// The next delay.
    pub fn delay(&mut self) -> Duration {
        self.inner.next().unwrap_or(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_its_bound() {
        let mut b = backoff(Duration::from_millis(10), Duration::from_millis(40));
        let d: Vec<Duration> = (0..8).map(|_| b.delay()).collect();
        assert!(d.iter().all(|d| *d <= Duration::from_millis(80)), "{d:?}");
        assert!(d[7] >= Duration::from_millis(40), "{d:?}");
    }
}
