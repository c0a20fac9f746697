//! The slot beside the stream: how much WAL it retains (a gauge, a warning past
//! `max_retained_wal_bytes`, the throttle of a paused snapshot), whether it confirmed a
//! position, and the heartbeat that moves a quiet database's slot. Each check opens its
//! own SQL connection and is bounded: a hung one costs a warning, never the stream.

use super::PgSource;
use std::time::Duration;
use tracing::{debug, warn};
use viewkeeper_core::model::Position;
use viewkeeper_core::source::SourceError;

/// Bound of one slot check or heartbeat (each opens its own SQL connection).
const SIDE_TIMEOUT: Duration = Duration::from_secs(10);

impl PgSource {
    /// The slot's retained WAL in bytes and the server's current WAL position.
    pub(super) async fn retained_wal(
        &self,
        c: &tokio_postgres::Client,
    ) -> Result<Option<(u64, Position)>, tokio_postgres::Error> {
        let row = c
            .query_opt(
                "SELECT (pg_current_wal_lsn() - restart_lsn)::bigint, (pg_current_wal_lsn() - '0/0')::bigint
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.cfg.slot],
            )
            .await?;
        Ok(row.and_then(|r| {
            let retained: Option<i64> = r.get(0);
            let current: Option<i64> = r.get(1);
            Some((retained? as u64, Position::new(current? as u64, 0)))
        }))
    }

    /// Waits (bounded) until the slot's confirmed position reaches `at`, so the retained
    /// WAL is measured after the slot let go of what was caught up.
    pub(super) async fn await_confirmed(
        &self,
        c: &tokio_postgres::Client,
        at: Position,
    ) -> Result<(), tokio_postgres::Error> {
        let deadline = std::time::Instant::now() + self.status_interval() * 3 + Duration::from_secs(1);
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        while std::time::Instant::now() < deadline {
            tick.tick().await;
            let confirmed: Option<i64> = c
                .query_opt(
                    "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1",
                    &[&self.cfg.slot],
                )
                .await?
                .and_then(|r| r.get(0));
            if confirmed.is_some_and(|l| l as u64 >= at.major) {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Slot health every 10 s (retained WAL: a gauge, and a warning past the bound) and,
    /// with `heartbeats`, the heartbeat. Each bounded by [`SIDE_TIMEOUT`]: one that does
    /// not answer in time is skipped with a warning. Never ends.
    pub(super) async fn side_checks(&self, heartbeats: bool) {
        let mut slot_check = tokio::time::interval(Duration::from_secs(10));
        let every = (self.cfg.heartbeat_interval_ms > 0 && heartbeats)
            .then(|| Duration::from_millis(self.cfg.heartbeat_interval_ms));
        let mut heartbeat = tokio::time::interval(every.unwrap_or(Duration::from_secs(3600)));
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        slot_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let (what, done) = tokio::select! {
                _ = slot_check.tick() => ("slot check", tokio::time::timeout(SIDE_TIMEOUT, self.check_slot()).await),
                _ = heartbeat.tick(), if every.is_some() => ("heartbeat", tokio::time::timeout(SIDE_TIMEOUT, self.heartbeat()).await),
            };
            if done.is_err() {
                warn!(source = %self.name, timeout_ms = SIDE_TIMEOUT.as_millis() as u64,
                    "{what} did not answer in time: skipped (streaming goes on)");
            }
        }
    }

    /// Writes a non-transactional logical message into this database's WAL: the slot
    /// sees it and moves on even when no published table changes. Best effort.
    async fn heartbeat(&self) {
        let r = self
            .on_connection("heartbeat", async |c| {
                c.batch_execute("SELECT pg_logical_emit_message(false, 'viewkeeper_heartbeat', now()::text)")
                    .await
                    .map_err(|e| self.sql_error("heartbeat", &e))
            })
            .await;
        if let Err(e) = r {
            debug!(source = %self.name, error = %e, "heartbeat failed");
        }
    }

    /// Records the WAL the slot holds back (`viewkeeper_slot_retained_wal_bytes`) and
    /// warns past `max_retained_wal_bytes`. Best effort: a failed query is only logged.
    async fn check_slot(&self) {
        let retained: Result<Option<(i64, i64)>, SourceError> = async {
            let row = self
                .on_connection("slot check", async |c| {
                    c.query_opt(
                        "SELECT (pg_current_wal_lsn() - restart_lsn)::bigint, (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint
                         FROM pg_replication_slots WHERE slot_name = $1",
                        &[&self.cfg.slot],
                    )
                    .await
                    .map_err(|e| self.sql_error("slot check", &e))
                })
                .await?;
            Ok(row.and_then(|row| Some((row.get::<_, Option<i64>>(0)?, row.get::<_, Option<i64>>(1)?))))
        }
        .await;
        match retained {
            Ok(Some((bytes, lag))) => {
                // WAL written since the last position viewkeeper acknowledged.
                metrics::gauge!("viewkeeper_replication_lag_bytes", "source" => self.name.clone()).set(lag as f64);
                metrics::gauge!("viewkeeper_slot_retained_wal_bytes", "source" => self.name.clone()).set(bytes as f64);
                if bytes as u64 > self.cfg.max_retained_wal_bytes {
                    warn!(source = %self.name, slot = %self.cfg.slot, retained_wal_bytes = bytes, bound = self.cfg.max_retained_wal_bytes,
                        "slot retains more WAL than the bound: the worker is behind or stalled (a sink down?); Postgres keeps this WAL on disk until it catches up");
                }
            }
            Ok(None) => {}
            Err(e) => debug!(source = %self.name, error = %e, "slot check failed"),
        }
    }
}
