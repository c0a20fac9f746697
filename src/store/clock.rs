//! The hybrid version clock every sink write is versioned by: `max(last + 1,
//! unix_ms << 20)`, kept in `meta` and advanced in the same transaction as the state it
//! versions, so it never goes back (across restarts, processes, and a rebuilt store).

use super::{now_ms, StoreError, StoreTx};

/// `VIEWKEEPER_TEST_CLOCK_SKEW_MS`: a worker whose clock runs that far ahead (or behind),
/// for the tests of workers taking documents over from each other. 0 unless set.
fn test_skew_ms() -> i64 {
    static SKEW: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *SKEW.get_or_init(|| {
        std::env::var("VIEWKEEPER_TEST_CLOCK_SKEW_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    })
}

impl StoreTx<'_> {
    /// Reserves `n` versions; returns the first.
    pub fn next_versions(&self, n: u64) -> Result<u64, StoreError> {
        let last: u64 = self.meta("clock")?.and_then(|s| s.parse().ok()).unwrap_or(0);
        let first = (last + 1).max(((now_ms() + test_skew_ms()) as u64) << 20);
        let new_last = first + n.saturating_sub(1);
        self.set_meta("clock", Some(&new_last.to_string()))?;
        Ok(first)
    }

    /// Raises the clock to at least `floor` (versions of another worker's documents this
    /// one takes over): versions reserved from now on are above it.
    pub fn raise_clock(&self, floor: u64) -> Result<(), StoreError> {
        let last: u64 = self.meta("clock")?.and_then(|s| s.parse().ok()).unwrap_or(0);
        if floor > last {
            self.set_meta("clock", Some(&floor.to_string()))?;
        }
        Ok(())
    }
}
