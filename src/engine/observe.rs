//! What the engine tells about itself once a batch is durable: counters, the checkpoint
//! and replication-lag gauges, readiness flags for `/readyz`, the state store's size.

use super::apply::BatchInfo;
use super::Engine;
use std::collections::BTreeMap;
use std::time::Duration;
use viewkeeper_core::Checkpoint;

/// Counters the engine keeps (for logs and the stop summary).
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub batches: u64,
    pub changes: u64,
    pub documents: u64,
    pub dead_letters: u64,
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Engine {
    /// Records a durable batch: `checkpoints` stored, `letters` dead letters.
    pub(super) fn observe_durable(
        &mut self,
        batches: &[BatchInfo],
        checkpoints: &BTreeMap<String, Checkpoint>,
        letters: usize,
    ) {
        self.stats.batches += 1;
        self.stats.dead_letters += letters as u64;
        metrics::counter!("viewkeeper_dead_letters_total").increment(letters as u64);
        metrics::counter!("viewkeeper_batches_total").increment(1);
        metrics::counter!("viewkeeper_changes_applied_total").increment(batches.iter().map(|b| b.changes as u64).sum());
        for (source, cp) in checkpoints {
            metrics::gauge!("viewkeeper_checkpoint_lsn", "source" => source.clone()).set(cp.value() as f64);
        }
        // Lag in seconds: from the commit of the newest change applied to now (0 for a
        // batch without changes: the source had nothing newer to send).
        let now = now_ms();
        let mut lags: BTreeMap<&str, f64> = BTreeMap::new();
        for b in batches.iter().filter(|b| b.snapshot.is_none()) {
            // 0: no change, or a snapshot read (no commit time).
            let lag = match b.newest_commit_ms {
                t if t > 0 => (now - t).max(0) as f64 / 1000.0,
                _ => 0.0,
            };
            lags.insert(&b.source, lag);
        }
        for (source, lag) in lags {
            metrics::gauge!("viewkeeper_replication_lag_seconds", "source" => source.to_string()).set(lag);
            if let Some(h) = &self.health {
                h.lag_seconds
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(source.to_string(), lag);
            }
        }
        if self
            .last_size_check
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            self.last_size_check = Some(std::time::Instant::now());
            metrics::gauge!("viewkeeper_state_store_bytes").set(self.store.size_bytes() as f64);
        }
    }
}

/// A sink write's outcome for `/readyz` and the metrics (called from the write tasks).
pub(super) fn observe_write(
    health: Option<&crate::http::Health>,
    projection: &str,
    sink: &str,
    ok: bool,
    docs: usize,
    took: Duration,
) {
    metrics::histogram!("viewkeeper_sink_write_seconds", "sink" => sink.to_string()).record(took.as_secs_f64());
    if let Some(h) = health {
        h.sinks_ok.store(ok, std::sync::atomic::Ordering::Relaxed);
        h.board.wrote(projection, sink, ok, now_ms());
    }
    if ok {
        metrics::counter!("viewkeeper_documents_written_total", "projection" => projection.to_string())
            .increment(docs as u64);
    } else {
        metrics::counter!("viewkeeper_sink_retries_total", "sink" => sink.to_string()).increment(1);
    }
}
