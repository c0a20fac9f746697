//! The hybrid version clock every sink write is versioned by: `max(last + 1,
//! unix_ms << 20)`, kept in `meta` and advanced in the same transaction as the state it
//! versions, so it never goes back (across restarts, processes, and a rebuilt store).

use super::{now_ms, StoreError, StoreTx};

impl StoreTx<'_> {
    /// Reserves `n` versions; returns the first.
    pub fn next_versions(&self, n: u64) -> Result<u64, StoreError> {
        let last: u64 = self.meta("clock")?.and_then(|s| s.parse().ok()).unwrap_or(0);
        let first = (last + 1).max((now_ms() as u64) << 20);
        let new_last = first + n.saturating_sub(1);
        self.set_meta("clock", Some(&new_last.to_string()))?;
        Ok(first)
    }
}
