//! Streaming from the slot: transactions in commit order, each as one batch (or, when
//! large, in chunks with the checkpoint on the last), keepalives advancing an idle slot,
//! and the catch-up a paused initial snapshot needs. Slot checks and heartbeats run beside
//! the stream ([`super::slot`]).

use super::decode::TxDecoder;
use super::initial_load::CatchUp;
use super::pgoutput::{self, PgOutputMessage};
use super::PgSource;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use viewkeeper_core::model::Position;
use viewkeeper_core::source::{SnapshotMark, SourceBatch, SourceDeadLetter, SourceError};
use viewkeeper_core::{Checkpoint, ErrorKind};

/// The checkpoint of a WAL position (none for the start of the WAL).
fn lsn_checkpoint(at: Position) -> Option<Checkpoint> {
    (at != Position::ZERO).then_some(Checkpoint::Lsn(at.major))
}

/// Holds the source's streaming flag up while it lives.
struct StreamingFlag<'a>(&'a std::sync::atomic::AtomicBool);

impl<'a> StreamingFlag<'a> {
    fn set(flag: &'a std::sync::atomic::AtomicBool) -> Self {
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
        StreamingFlag(flag)
    }
}

impl Drop for StreamingFlag<'_> {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

impl PgSource {
    pub(super) fn replication_config(&self, from: Position) -> Result<ReplicationConfig, SourceError> {
        let pg = self.connector()?;
        let cfg = pg.config();
        let name = match cfg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".to_string(),
        };
        // libpq's hostaddr: connect there, check the certificate against the host name.
        let host = cfg
            .get_hostaddrs()
            .first()
            .map(|a| a.to_string())
            .unwrap_or_else(|| name.clone());
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let user = cfg.get_user().unwrap_or("postgres").to_string();
        let password = cfg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        let db = cfg.get_dbname().unwrap_or(&user).to_string();
        let tls = pg.replication_tls(&name);
        Ok(ReplicationConfig::new(
            host,
            user,
            password,
            db,
            self.cfg.slot.clone(),
            self.cfg.publication.clone(),
        )
        .with_port(port)
        .with_tls(tls)
        .with_start_lsn(Lsn::from_u64(from.major))
        .with_ack_lsn(Lsn::from_u64(from.major))
        .with_status_interval(self.status_interval())
        .with_wakeup_interval(Duration::from_secs(5))
        .with_options("-c datestyle=ISO,YMD -c timezone=UTC -c extra_float_digits=3 -c intervalstyle=iso_8601")
        .with_application_name(format!("viewkeeper-{}", self.name)))
    }

    /// Streams from the slot. With `catch_up`, catches up while a snapshot is paused: the
    /// batches are marked [`SnapshotMark::CatchUp`], and it returns the last position
    /// sent once the stream reached `until`, the engine acknowledged everything and the
    /// slot confirmed it.
    pub(super) async fn stream(
        &self,
        from: Position,
        catch_up: Option<CatchUp<'_>>,
        tx: &mpsc::Sender<SourceBatch>,
        acks: &mut watch::Receiver<Option<Checkpoint>>,
        shutdown: &CancellationToken,
    ) -> Result<Position, SourceError> {
        let until = catch_up.map(|c| c.until);
        let mark = until.map(|_| SnapshotMark::CatchUp);
        let mut last_sent = from;
        let mut reached = false;
        // Idle advances cost a state-store commit each: at most one per status interval.
        let mut last_idle = std::time::Instant::now();
        let mut client = ReplicationClient::connect(self.replication_config(from)?)
            .await
            .map_err(|e| self.classify(e))?;
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(last_sent),
            r = client.wait_started() => r.map_err(|e| self.classify(e))?,
        }
        let _streaming = match until {
            None => {
                info!(source = %self.name, slot = %self.cfg.slot, from = %last_sent, "streaming");
                Some(StreamingFlag::set(&self.run.streaming))
            }
            Some(until) => {
                info!(source = %self.name, slot = %self.cfg.slot, from = %last_sent, %until, "snapshot paused: catching up on the slot");
                None
            }
        };
        let mut decoder = TxDecoder::new(self.run.tables.clone());
        let mut acked = from;
        // Slot checks and heartbeats run beside the stream (polled with it, never blocking
        // it: a hung SQL connection must not stall replication) and each is bounded.
        let side = self.side_checks(until.is_none());
        tokio::pin!(side);
        let mut open: Option<(u64, i64, SourceBatch, u64)> = None; // final lsn, commit ms, batch, ordinal
        let chunk = self.cfg.transaction_chunk_changes.max(1);
        let mut chunks = 0u64; // of the open transaction, sent already
        loop {
            if let Some(c) = catch_up.filter(|_| reached && acked >= last_sent) {
                // Keep the session until the slot confirmed it: that is what frees the WAL.
                client.update_applied_lsn(Lsn::from_u64(acked.major));
                let confirmed = self.await_confirmed(c.conn, last_sent).await;
                let _ = client.shutdown().await;
                confirmed.map_err(|e| {
                    self.sql_error("initial snapshot: waiting for the slot to confirm the catch-up", &e)
                })?;
                return Ok(last_sent);
            }
            // Biased: shutdown first, then acks (so feedback is never starved by data).
            let ev = tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    let _ = client.shutdown().await;
                    return Ok(last_sent);
                }
                _ = &mut side => continue, // never ends
                r = acks.changed() => {
                    if r.is_err() {
                        return Ok(last_sent); // engine gone: shutting down
                    }
                    acks.borrow_and_update();
                    acked = super::acked(acks);
                    client.update_applied_lsn(Lsn::from_u64(acked.major));
                    continue;
                }
                ev = client.recv(), if !reached => ev.map_err(|e| self.classify(e))?,
            };
            let Some(ev) = ev else {
                return Err(self.error(ErrorKind::Unavailable, "replication stream ended"));
            };
            match ev {
                ReplicationEvent::Begin {
                    final_lsn,
                    commit_time_micros,
                    ..
                } => {
                    let ms = pgoutput::pg_time_to_unix_us(commit_time_micros) / 1000;
                    let batch = SourceBatch {
                        source: self.name.clone(),
                        snapshot: mark.clone(),
                        ..Default::default()
                    };
                    open = Some((final_lsn.as_u64(), ms, batch, 0));
                }
                ReplicationEvent::XLogData { data, wal_end, .. } => {
                    let msg = match pgoutput::decode(&data) {
                        Ok(m) => m,
                        Err(e) => {
                            let dl = SourceDeadLetter {
                                position: Position::new(wal_end.as_u64(), 0).to_string(),
                                table: String::new(),
                                key: String::new(),
                                reason: format!("malformed pgoutput message: {e}"),
                                payload: data.iter().map(|b| format!("{b:02x}")).collect(),
                            };
                            warn!(source = %self.name, reason = %dl.reason, "dead letter");
                            match &mut open {
                                Some((_, _, b, _)) => b.dead_letters.push(dl),
                                None => {
                                    self.send(
                                        tx,
                                        shutdown,
                                        SourceBatch {
                                            source: self.name.clone(),
                                            dead_letters: vec![dl],
                                            checkpoint: lsn_checkpoint(last_sent),
                                            snapshot: mark.clone(),
                                            ..Default::default()
                                        },
                                    )
                                    .await?;
                                }
                            }
                            continue;
                        }
                    };
                    let (lsn, ms, mut ordinal) = open
                        .as_ref()
                        .map_or((wal_end.as_u64(), 0, 0), |(l, m, _, o)| (*l, *m, *o));
                    if !matches!(
                        msg,
                        PgOutputMessage::Relation(_) | PgOutputMessage::Type { .. } | PgOutputMessage::Origin { .. }
                    ) && open.is_none()
                    {
                        return Err(self.error(ErrorKind::Remote, "row change outside a transaction"));
                    }
                    let out = decoder.on_message(msg, lsn, ms, &mut ordinal);
                    for w in decoder.warnings.drain(..) {
                        warn!(source = %self.name, "{w}");
                    }
                    if let Some((_, _, b, o)) = &mut open {
                        *o = ordinal;
                        for dl in &out.dead_letters {
                            warn!(source = %self.name, table = %dl.table, key = %dl.key, reason = %dl.reason, "dead letter");
                        }
                        b.changes.extend(out.changes);
                        b.dead_letters.extend(out.dead_letters);
                        // A large transaction goes to the engine in chunks (it has committed:
                        // the server decodes it whole first), so memory stays bounded; only
                        // its last chunk carries the checkpoint. A crash in between replays
                        // it whole from the checkpoint before it: the chunks applied already
                        // are no-ops then.
                        if b.changes.len() >= chunk {
                            if chunks == 0 {
                                info!(source = %self.name, at = %Position::new(lsn, 0), "a large transaction: applied in chunks of {chunk} changes, checkpointed at its commit");
                            }
                            chunks += 1;
                            let part = std::mem::replace(
                                b,
                                SourceBatch {
                                    source: self.name.clone(),
                                    snapshot: mark.clone(),
                                    ..Default::default()
                                },
                            );
                            if !self.send(tx, shutdown, part).await? {
                                return Ok(last_sent);
                            }
                        }
                    }
                }
                ReplicationEvent::Commit { end_lsn, .. } => {
                    let Some((_, _, mut batch, _)) = open.take() else {
                        return Err(self.error(ErrorKind::Remote, "commit without begin"));
                    };
                    chunks = 0;
                    last_sent = Position::new(end_lsn.as_u64(), 0);
                    batch.checkpoint = lsn_checkpoint(last_sent);
                    if !self.send(tx, shutdown, batch).await? {
                        return Ok(last_sent);
                    }
                    reached = until.is_some_and(|u| last_sent >= u);
                }
                ReplicationEvent::KeepAlive { wal_end, .. } => {
                    let at = Position::new(wal_end.as_u64(), 0);
                    if let Some(u) = until.filter(|_| open.is_none()) {
                        // Catching up: an idle stream at or past the target is caught up.
                        if at >= u {
                            if at > last_sent {
                                last_sent = at;
                                let b = SourceBatch {
                                    source: self.name.clone(),
                                    checkpoint: lsn_checkpoint(at),
                                    snapshot: mark.clone(),
                                    ..Default::default()
                                };
                                if !self.send(tx, shutdown, b).await? {
                                    return Ok(last_sent);
                                }
                            }
                            reached = true;
                        }
                    } else if open.is_none() && at > last_sent && last_idle.elapsed() >= self.status_interval() {
                        // Everything the publication carries up to the server's WAL end is
                        // sent: the position goes through the engine behind the batches in
                        // flight (not only once they are acknowledged), so it is durable, and
                        // a read-your-writes wait on it answered, one pipeline pass later.
                        debug!(source = %self.name, at = %at, "idle: advancing checkpoint");
                        last_sent = at;
                        last_idle = std::time::Instant::now();
                        self.send(
                            tx,
                            shutdown,
                            SourceBatch {
                                source: self.name.clone(),
                                checkpoint: lsn_checkpoint(at),
                                ..Default::default()
                            },
                        )
                        .await?;
                    }
                }
                ReplicationEvent::Message {
                    prefix, transactional, ..
                } => {
                    debug!(source = %self.name, %prefix, transactional, "logical message");
                    if prefix == "viewkeeper_heartbeat" {
                        metrics::counter!("viewkeeper_heartbeats_total", "source" => self.name.clone()).increment(1);
                    }
                }
                ReplicationEvent::StoppedAt { .. } => return Ok(last_sent),
            }
        }
    }
}
