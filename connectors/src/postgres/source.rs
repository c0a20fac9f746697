//! The Postgres source task: prepares the publication and slot, streams pgoutput
//! through `pgwire-replication`, and hands whole transactions to the engine.
//!
//! Acknowledgement: the flushed LSN reported to Postgres is exactly the checkpoint
//! the engine sent back (the end LSN of the last transaction that is in the state
//! store and in every sink). While idle (no transaction open, everything sent has
//! been acknowledged), a keepalive's WAL end is passed through the engine as an empty
//! batch, so the checkpoint, and with it the slot, moves forward on a quiet database.
//!
//! Errors: losing the connection is transient (reconnect with backoff and resume from
//! the checkpoint; duplicates are harmless). A missing or invalidated slot while a
//! checkpoint exists, a table without a usable replica identity, or `wal_level` other
//! than `logical` are fatal, with the fix in the message.

use super::connect::{PgConnectError, PgConnector};
use super::decode::{TableBinding, TxDecoder};
use super::pgoutput::{self, PgOutputMessage};
use super::snapshot;
use crate::source::{SnapshotMark, SourceBatch, SourceDeadLetter, SourceError, TableProgress};
use backon::BackoffBuilder;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use viewkeeper_projections::model::Position;

/// What the source needs from the config.
#[derive(Clone, Debug)]
pub struct PgSourceSettings {
    pub name: String,
    pub url: String,
    pub slot: String,
    pub publication: String,
    /// `schema.table` → binding.
    pub tables: HashMap<String, TableBinding>,
    pub status_interval: Duration,
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Read the existing rows when the slot is created (see [`snapshot`]).
    pub initial_snapshot: bool,
    /// Where an interrupted snapshot stands (from the state store), per table.
    pub snapshot_progress: HashMap<String, TableProgress>,
    /// `viewkeeper backfill`: stop once the snapshot is sent instead of streaming.
    pub stop_after_snapshot: bool,
    /// Rows per snapshot chunk.
    pub snapshot_chunk_rows: usize,
    /// Warn (and say so in the log) when the slot retains more WAL than this.
    pub max_retained_wal_bytes: u64,
    /// Emit a heartbeat (`pg_logical_emit_message`) this often while streaming, so
    /// the slot of a database without changes still moves; `None`: off.
    pub heartbeat_interval: Option<Duration>,
    /// Set while streaming from the slot (read by the worker's `/readyz`).
    pub streaming: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Bound of one slot check or heartbeat (each opens its own SQL connection).
const SIDE_TIMEOUT: Duration = Duration::from_secs(10);

/// A paused snapshot streams the slot up to `until`; `conn` watches the slot meanwhile.
#[derive(Clone, Copy)]
struct CatchUp<'a> {
    until: Position,
    conn: &'a tokio_postgres::Client,
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

/// How a (re)connection starts.
enum Start {
    Stream,
    /// Take (or resume) the initial snapshot; `fresh`: the slot was just created.
    Snapshot {
        cp: Position,
        fresh: bool,
    },
}

pub struct PgSource {
    s: PgSourceSettings,
    /// The parsed URL with its TLS setup (an error: the URL or its CA file is bad).
    pg: Result<PgConnector, String>,
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn quote_table(t: &str) -> String {
    t.split('.').map(quote_ident).collect::<Vec<_>>().join(".")
}

impl PgSource {
    pub fn new(s: PgSourceSettings) -> Self {
        let pg = PgConnector::parse(&s.url);
        PgSource { s, pg }
    }

    fn connector(&self) -> Result<&PgConnector, SourceError> {
        self.pg
            .as_ref()
            .map_err(|e| self.fatal(format!("bad connection string: {e}")))
    }

    /// A failed connection: TLS failures (untrusted certificate, wrong host name, TLS
    /// refused) are setup errors, fatal; the rest is transient.
    fn connect_failed(&self, what: &str, e: PgConnectError) -> SourceError {
        if e.tls {
            self.fatal(format!("{what}: {e}"))
        } else {
            self.transient(format!("{what}: {e}"))
        }
    }

    fn fatal(&self, message: impl Into<String>) -> SourceError {
        SourceError::Fatal {
            source_name: self.s.name.clone(),
            message: message.into(),
        }
    }

    fn transient(&self, message: impl Into<String>) -> SourceError {
        SourceError::Transient {
            source_name: self.s.name.clone(),
            message: message.into(),
        }
    }

    /// Runs until shutdown or a fatal error, reconnecting after transient ones.
    /// `checkpoint`: where the state store says this source is durable.
    pub async fn run(
        self,
        checkpoint: Option<Position>,
        tx: mpsc::Sender<SourceBatch>,
        mut acks: watch::Receiver<Position>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let mut backoff = backon::ExponentialBuilder::default()
            .with_min_delay(self.s.retry_min)
            .with_max_delay(self.s.retry_max)
            .with_jitter()
            .without_max_times()
            .build();
        let mut progress = self.s.snapshot_progress.clone();
        // Acks alone do not say the snapshot is complete: catch-up batches are acked too.
        let mut loaded = checkpoint.is_some_and(|c| c != Position::ZERO);
        loop {
            let acked = (*acks.borrow()).max(checkpoint.unwrap_or_default());
            let result = match self.prepare(loaded).await {
                Ok(Start::Snapshot { cp, fresh }) => {
                    if fresh {
                        progress.clear();
                        let begin = SourceBatch {
                            source: self.s.name.clone(),
                            snapshot: Some(SnapshotMark::Begin),
                            ..Default::default()
                        };
                        if !self.send(&tx, &shutdown, begin).await? {
                            return Ok(());
                        }
                    }
                    match self.snapshot(cp, &mut progress, &tx, &mut acks, &shutdown).await {
                        Ok(Some(_)) if self.s.stop_after_snapshot => return Ok(()),
                        Ok(Some(from)) => {
                            loaded = true;
                            self.stream(from, None, &tx, &mut acks, &shutdown).await.map(|_| ())
                        }
                        Ok(None) => return Ok(()),
                        Err(e) => Err(e),
                    }
                }
                Ok(Start::Stream) if self.s.stop_after_snapshot => {
                    info!(source = %self.s.name, "already loaded (the state store has a checkpoint): nothing to backfill");
                    return Ok(());
                }
                Ok(Start::Stream) => self.stream(acked, None, &tx, &mut acks, &shutdown).await.map(|_| ()),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => return Ok(()),
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => {
                    let delay = backoff.next().unwrap_or(self.s.retry_max);
                    warn!(source = %self.s.name, error = %e, retry_in_ms = delay.as_millis() as u64, "postgres source interrupted");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Checks the server and creates the publication and slot when missing.
    async fn prepare(&self, has_checkpoint: bool) -> Result<Start, SourceError> {
        let (client, conn_task) = self
            .connector()?
            .connect()
            .await
            .map_err(|e| self.connect_failed("postgres", e))?;
        let r = self.prepare_on(&client, has_checkpoint).await;
        drop(client);
        let _ = conn_task.await;
        r
    }

    async fn prepare_on(&self, c: &tokio_postgres::Client, has_checkpoint: bool) -> Result<Start, SourceError> {
        let sql = |e: tokio_postgres::Error| self.transient(format!("query failed: {e}"));
        let wal: String = c.query_one("SHOW wal_level", &[]).await.map_err(sql)?.get(0);
        if wal != "logical" {
            return Err(self.fatal(format!(
                "wal_level is '{wal}'; logical replication needs wal_level = logical (set it in postgresql.conf and restart Postgres)"
            )));
        }
        let mut tables: Vec<&String> = self.s.tables.keys().collect();
        tables.sort();
        let mut partitioned = Vec::new();
        for t in &tables {
            let row = c
                .query_opt(
                    "SELECT c.relreplident::text, EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
                            c.relkind = 'p'
                     FROM pg_class c WHERE c.oid = to_regclass($1)",
                    &[&quote_table(t)],
                )
                .await
                .map_err(sql)?;
            let Some(row) = row else {
                return Err(self.fatal(format!(
                    "table {t} does not exist in this database; create it or fix tables.*.name for source {}",
                    self.s.name
                )));
            };
            let ident: String = row.get(0);
            let has_pk: bool = row.get(1);
            if row.get::<_, bool>(2) {
                partitioned.push(t.to_string());
            }
            if ident == "n" || (ident == "d" && !has_pk) {
                return Err(self.fatal(format!(
                    "table {t} has no replica identity, so its updates and deletes cannot be identified; add a primary key or run ALTER TABLE {} REPLICA IDENTITY FULL",
                    quote_table(t)
                )));
            }
        }
        let exists = c
            .query_opt(
                "SELECT 1 FROM pg_publication WHERE pubname = $1",
                &[&self.s.publication],
            )
            .await
            .map_err(sql)?
            .is_some();
        let list = tables.iter().map(|t| quote_table(t)).collect::<Vec<_>>().join(", ");
        if !exists {
            // A partitioned table is one table: its partitions' changes are published under
            // the root's name (and a row moving between partitions is a delete and an insert
            // of it), and the snapshot reads the root.
            info!(source = %self.s.name, publication = %self.s.publication, tables = %list, "creating publication");
            c.batch_execute(&format!(
                "CREATE PUBLICATION {} FOR TABLE {list} WITH (publish_via_partition_root = true)",
                quote_ident(&self.s.publication)
            ))
            .await
            .map_err(|e| self.fatal(format!("cannot create publication {}: {e}", self.s.publication)))?;
        } else {
            let via_root: bool = c
                .query_one(
                    "SELECT pubviaroot FROM pg_publication WHERE pubname = $1",
                    &[&self.s.publication],
                )
                .await
                .map_err(sql)?
                .get(0);
            if !via_root && !partitioned.is_empty() {
                info!(source = %self.s.name, publication = %self.s.publication, tables = ?partitioned,
                    "partitioned tables: publishing their changes under the root's name");
                c.batch_execute(&format!(
                    "ALTER PUBLICATION {} SET (publish_via_partition_root = true)",
                    quote_ident(&self.s.publication)
                ))
                .await
                .map_err(|e| {
                    self.fatal(format!(
                        "publication {} publishes the partitions of {} under their own names, which no table of the config has: run ALTER PUBLICATION {} SET (publish_via_partition_root = true) as its owner ({e})",
                        self.s.publication,
                        partitioned.join(", "),
                        quote_ident(&self.s.publication)
                    ))
                })?;
            }
            let rows = c
                .query(
                    "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1",
                    &[&self.s.publication],
                )
                .await
                .map_err(sql)?;
            let have: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            let missing: Vec<String> = tables
                .iter()
                .filter(|t| !have.contains(t))
                .map(|t| quote_table(t))
                .collect();
            if !missing.is_empty() {
                info!(source = %self.s.name, publication = %self.s.publication, tables = ?missing, "adding tables to publication");
                c.batch_execute(&format!(
                    "ALTER PUBLICATION {} ADD TABLE {}",
                    quote_ident(&self.s.publication),
                    missing.join(", ")
                ))
                .await
                .map_err(|e| self.fatal(format!("cannot add tables to publication {}: {e}", self.s.publication)))?;
            }
        }
        let slot = c
            .query_opt(
                "SELECT plugin, coalesce(wal_status, ''), database, coalesce(confirmed_flush_lsn, '0/0')::text
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.s.slot],
            )
            .await
            .map_err(sql)?;
        match slot {
            None if has_checkpoint => Err(self.fatal(format!(
                "replication slot {} is missing but the state store has a checkpoint for this source: changes since then are lost to the slot. \
                 Rebuild with `viewkeeper backfill` (or drop the data dir to start over); viewkeeper never silently restarts from a new slot",
                self.s.slot
            ))),
            Some(r) if !has_checkpoint && self.s.initial_snapshot => {
                // No checkpoint yet: the initial snapshot is not complete. Resume it.
                let lsn: String = r.get(3);
                let cp = Lsn::parse(&lsn).map_err(|e| self.fatal(format!("slot {}: bad confirmed_flush_lsn {lsn}: {e}", self.s.slot)))?;
                Ok(Start::Snapshot { cp: Position::new(cp.as_u64(), 0), fresh: false })
            }
            None if self.s.initial_snapshot => {
                info!(source = %self.s.name, slot = %self.s.slot, "creating replication slot");
                let lsn: String = c
                    .query_one("SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')", &[&self.s.slot])
                    .await
                    .map_err(|e| self.fatal(format!("cannot create replication slot {}: {e}", self.s.slot)))?
                    .get(0);
                let cp = Lsn::parse(&lsn).map_err(|e| self.fatal(format!("slot {}: bad lsn {lsn}: {e}", self.s.slot)))?;
                Ok(Start::Snapshot { cp: Position::new(cp.as_u64(), 0), fresh: true })
            }
            None => {
                info!(source = %self.s.name, slot = %self.s.slot, "creating replication slot");
                c.query_one("SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')", &[&self.s.slot])
                    .await
                    .map_err(|e| self.fatal(format!("cannot create replication slot {}: {e}", self.s.slot)))?;
                Ok(Start::Stream)
            }
            Some(r) => {
                let plugin: String = r.get(0);
                let status: String = r.get(1);
                if plugin != "pgoutput" {
                    return Err(self.fatal(format!(
                        "replication slot {} uses plugin {plugin}, not pgoutput; drop it or name another slot in sources.{}.slot",
                        self.s.slot, self.s.name
                    )));
                }
                if status == "lost" {
                    return Err(self.fatal(format!(
                        "replication slot {} is invalidated (wal_status = lost): Postgres removed WAL it still needed. Rebuild with `viewkeeper backfill`",
                        self.s.slot
                    )));
                }
                Ok(Start::Stream)
            }
        }
    }

    fn replication_config(&self, from: Position) -> Result<ReplicationConfig, SourceError> {
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
            self.s.slot.clone(),
            self.s.publication.clone(),
        )
        .with_port(port)
        .with_tls(tls)
        .with_start_lsn(Lsn::from_u64(from.major))
        .with_ack_lsn(Lsn::from_u64(from.major))
        .with_status_interval(self.s.status_interval)
        .with_wakeup_interval(Duration::from_secs(5))
        .with_options("-c datestyle=ISO,YMD -c timezone=UTC -c extra_float_digits=3 -c intervalstyle=iso_8601")
        .with_application_name(format!("viewkeeper-{}", self.s.name)))
    }

    /// Streams from the slot. With `catch_up`, catches up while a snapshot is paused: the
    /// batches are marked [`SnapshotMark::CatchUp`], and it returns the last position
    /// sent once the stream reached `until`, the engine acknowledged everything and the
    /// slot confirmed it.
    async fn stream(
        &self,
        from: Position,
        catch_up: Option<CatchUp<'_>>,
        tx: &mpsc::Sender<SourceBatch>,
        acks: &mut watch::Receiver<Position>,
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
                info!(source = %self.s.name, slot = %self.s.slot, from = %last_sent, "streaming");
                Some(StreamingFlag::set(&self.s.streaming))
            }
            Some(until) => {
                info!(source = %self.s.name, slot = %self.s.slot, from = %last_sent, %until, "snapshot paused: catching up on the slot");
                None
            }
        };
        let mut decoder = TxDecoder::new(self.s.tables.clone());
        let mut acked = from;
        // Slot checks and heartbeats run beside the stream (polled with it, never blocking
        // it: a hung SQL connection must not stall replication) and each is bounded.
        let side = self.side_checks(until.is_none());
        tokio::pin!(side);
        let mut open: Option<(u64, i64, SourceBatch, u64)> = None; // final lsn, commit ms, batch, ordinal
        loop {
            if let Some(c) = catch_up.filter(|_| reached && acked >= last_sent) {
                // Keep the session until the slot confirmed it: that is what frees the WAL.
                client.update_applied_lsn(Lsn::from_u64(acked.major));
                let confirmed = self.await_confirmed(c.conn, last_sent).await;
                let _ = client.shutdown().await;
                confirmed.map_err(|e| self.transient(format!("initial snapshot: {e}")))?;
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
                    acked = *acks.borrow_and_update();
                    client.update_applied_lsn(Lsn::from_u64(acked.major));
                    continue;
                }
                ev = client.recv(), if !reached => ev.map_err(|e| self.classify(e))?,
            };
            let Some(ev) = ev else {
                return Err(self.transient("replication stream ended"));
            };
            match ev {
                ReplicationEvent::Begin {
                    final_lsn,
                    commit_time_micros,
                    ..
                } => {
                    let ms = pgoutput::pg_time_to_unix_us(commit_time_micros) / 1000;
                    let batch = SourceBatch {
                        source: self.s.name.clone(),
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
                            warn!(source = %self.s.name, reason = %dl.reason, "dead letter");
                            match &mut open {
                                Some((_, _, b, _)) => b.dead_letters.push(dl),
                                None => {
                                    self.send(
                                        tx,
                                        shutdown,
                                        SourceBatch {
                                            source: self.s.name.clone(),
                                            dead_letters: vec![dl],
                                            checkpoint: last_sent,
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
                        return Err(self.transient("row change outside a transaction"));
                    }
                    let out = decoder.on_message(msg, lsn, ms, &mut ordinal);
                    for w in decoder.warnings.drain(..) {
                        warn!(source = %self.s.name, "{w}");
                    }
                    if let Some((_, _, b, o)) = &mut open {
                        *o = ordinal;
                        for dl in &out.dead_letters {
                            warn!(source = %self.s.name, table = %dl.table, key = %dl.key, reason = %dl.reason, "dead letter");
                        }
                        b.changes.extend(out.changes);
                        b.dead_letters.extend(out.dead_letters);
                    }
                }
                ReplicationEvent::Commit { end_lsn, .. } => {
                    let Some((_, _, mut batch, _)) = open.take() else {
                        return Err(self.transient("commit without begin"));
                    };
                    batch.checkpoint = Position::new(end_lsn.as_u64(), 0);
                    last_sent = batch.checkpoint;
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
                                    source: self.s.name.clone(),
                                    checkpoint: at,
                                    snapshot: mark.clone(),
                                    ..Default::default()
                                };
                                if !self.send(tx, shutdown, b).await? {
                                    return Ok(last_sent);
                                }
                            }
                            reached = true;
                        }
                    } else if open.is_none()
                        && acked >= last_sent
                        && at > last_sent
                        && last_idle.elapsed() >= self.s.status_interval
                    {
                        debug!(source = %self.s.name, at = %at, "idle: advancing checkpoint");
                        last_sent = at;
                        last_idle = std::time::Instant::now();
                        self.send(
                            tx,
                            shutdown,
                            SourceBatch {
                                source: self.s.name.clone(),
                                checkpoint: at,
                                ..Default::default()
                            },
                        )
                        .await?;
                    }
                }
                ReplicationEvent::Message {
                    prefix, transactional, ..
                } => {
                    debug!(source = %self.s.name, %prefix, transactional, "logical message");
                    if prefix == "viewkeeper_heartbeat" {
                        metrics::counter!("viewkeeper_heartbeats_total", "source" => self.s.name.clone()).increment(1);
                    }
                }
                ReplicationEvent::StoppedAt { .. } => return Ok(last_sent),
            }
        }
    }

    /// Reads every table not yet done, chunk by chunk, resuming after `progress`, then
    /// sends the final batch, whose checkpoint is returned: where streaming goes on.
    /// `Ok(None)`: shutdown.
    ///
    /// Throttling: the slot holds WAL from `cp` while the snapshot reads. When it
    /// retains more than `max_retained_wal_bytes`, reading pauses and the slot is
    /// streamed up to the current WAL position first (applied, acknowledged, so the
    /// slot lets go of that WAL). Rows streamed early are safe: snapshot rows carry
    /// position `(cp, 0)`, below every streamed change, so they never overwrite one.
    async fn snapshot(
        &self,
        cp: Position,
        progress: &mut HashMap<String, TableProgress>,
        tx: &mpsc::Sender<SourceBatch>,
        acks: &mut watch::Receiver<Position>,
        shutdown: &CancellationToken,
    ) -> Result<Option<Position>, SourceError> {
        let (c, conn_task) = self
            .connector()?
            .connect()
            .await
            .map_err(|e| self.connect_failed("initial snapshot", e))?;
        let r = self.snapshot_on(&c, cp, progress, tx, acks, shutdown).await;
        drop(c);
        let _ = conn_task.await;
        r
    }

    /// The slot's retained WAL in bytes and the server's current WAL position.
    async fn retained_wal(&self, c: &tokio_postgres::Client) -> Result<Option<(u64, Position)>, String> {
        let row = c
            .query_opt(
                "SELECT (pg_current_wal_lsn() - restart_lsn)::bigint, (pg_current_wal_lsn() - '0/0')::bigint
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.s.slot],
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(row.and_then(|r| {
            let retained: Option<i64> = r.get(0);
            let current: Option<i64> = r.get(1);
            Some((retained? as u64, Position::new(current? as u64, 0)))
        }))
    }

    /// Waits (bounded) until the slot's confirmed position reaches `at`, so the retained
    /// WAL is measured after the slot let go of what was caught up.
    async fn await_confirmed(&self, c: &tokio_postgres::Client, at: Position) -> Result<(), String> {
        let deadline = std::time::Instant::now() + self.s.status_interval * 3 + Duration::from_secs(1);
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        while std::time::Instant::now() < deadline {
            tick.tick().await;
            let confirmed: Option<i64> = c
                .query_opt(
                    "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1",
                    &[&self.s.slot],
                )
                .await
                .map_err(|e| e.to_string())?
                .and_then(|r| r.get(0));
            if confirmed.is_some_and(|l| l as u64 >= at.major) {
                return Ok(());
            }
        }
        Ok(())
    }

    async fn snapshot_on(
        &self,
        c: &tokio_postgres::Client,
        cp: Position,
        progress: &mut HashMap<String, TableProgress>,
        tx: &mpsc::Sender<SourceBatch>,
        acks: &mut watch::Receiver<Position>,
        shutdown: &CancellationToken,
    ) -> Result<Option<Position>, SourceError> {
        let mut streamed = cp; // where a catch-up left the slot
        let mut pauses = 0u64;
        let err = |e: String| self.transient(format!("initial snapshot: {e}"));
        c.batch_execute(snapshot::SESSION_SETTINGS)
            .await
            .map_err(|e| err(e.to_string()))?;
        let mut tables: Vec<&String> = self.s.tables.keys().collect();
        tables.sort();
        let started = std::time::Instant::now();
        let mut rows = 0u64;
        info!(source = %self.s.name, consistent_point = %cp, "initial snapshot: reading existing rows");
        for table in tables {
            let p = progress.entry(table.clone()).or_default();
            if p.done {
                continue;
            }
            let binding = &self.s.tables[table];
            let tc = snapshot::columns(c, table, binding).await.map_err(&err)?;
            loop {
                let (mut batch, next) = snapshot::read_chunk(
                    c,
                    &self.s.name,
                    (table, binding, &tc),
                    p.last_key.as_deref(),
                    cp,
                    self.s.snapshot_chunk_rows,
                )
                .await
                .map_err(&err)?;
                let Some(next) = next else { break };
                rows += (batch.changes.len() + batch.dead_letters.len()) as u64;
                batch.snapshot = Some(SnapshotMark::Chunk {
                    table: table.clone(),
                    last_key: next.clone(),
                });
                if !self.send(tx, shutdown, batch).await? {
                    return Ok(None);
                }
                p.last_key = Some(next);
                if let Some((retained, current)) = self.retained_wal(c).await.map_err(&err)? {
                    metrics::gauge!("viewkeeper_slot_retained_wal_bytes", "source" => self.s.name.clone())
                        .set(retained as f64);
                    // Pause only when most of it is WAL not streamed yet: the rest (the slot's
                    // restart point trails its confirmed one) does not shrink by streaming.
                    let unread = current.major.saturating_sub(streamed.major);
                    let bound = self.s.max_retained_wal_bytes;
                    if retained > bound && unread > bound / 2 {
                        pauses += 1;
                        info!(source = %self.s.name, retained_wal_bytes = retained, unread_wal_bytes = unread, bound,
                            "snapshot paused: the slot retains more WAL than max_retained_wal_bytes");
                        let catch_up = CatchUp {
                            until: current,
                            conn: c,
                        };
                        streamed = self.stream(streamed, Some(catch_up), tx, acks, shutdown).await?;
                        if shutdown.is_cancelled() {
                            return Ok(None);
                        }
                        info!(source = %self.s.name, at = %streamed, "snapshot resumed");
                    }
                }
            }
            let done = SourceBatch {
                source: self.s.name.clone(),
                snapshot: Some(SnapshotMark::TableDone { table: table.clone() }),
                ..Default::default()
            };
            if !self.send(tx, shutdown, done).await? {
                return Ok(None);
            }
            p.done = true;
            info!(source = %self.s.name, %table, rows, elapsed_ms = started.elapsed().as_millis() as u64, "initial snapshot: table read");
        }
        let complete = SourceBatch {
            source: self.s.name.clone(),
            checkpoint: streamed,
            snapshot: Some(SnapshotMark::Complete),
            ..Default::default()
        };
        if !self.send(tx, shutdown, complete).await? {
            return Ok(None);
        }
        info!(source = %self.s.name, rows, pauses, elapsed_ms = started.elapsed().as_millis() as u64, "initial snapshot read");
        Ok(Some(streamed))
    }

    /// Slot health every 10 s (retained WAL: a gauge, and a warning past the bound) and,
    /// with `heartbeats`, the heartbeat. Each bounded by [`SIDE_TIMEOUT`]: one that does
    /// not answer in time is skipped with a warning. Never ends.
    async fn side_checks(&self, heartbeats: bool) {
        let mut slot_check = tokio::time::interval(Duration::from_secs(10));
        let every = self.s.heartbeat_interval.filter(|_| heartbeats);
        let mut heartbeat = tokio::time::interval(every.unwrap_or(Duration::from_secs(3600)));
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        slot_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let (what, done) = tokio::select! {
                _ = slot_check.tick() => ("slot check", tokio::time::timeout(SIDE_TIMEOUT, self.check_slot()).await),
                _ = heartbeat.tick(), if every.is_some() => ("heartbeat", tokio::time::timeout(SIDE_TIMEOUT, self.heartbeat()).await),
            };
            if done.is_err() {
                warn!(source = %self.s.name, timeout_ms = SIDE_TIMEOUT.as_millis() as u64,
                    "{what} did not answer in time: skipped (streaming goes on)");
            }
        }
    }

    /// Writes a non-transactional logical message into this database's WAL: the slot
    /// sees it and moves on even when no published table changes. Best effort.
    async fn heartbeat(&self) {
        let r: Result<(), String> = async {
            let (c, task) = self
                .connector()
                .map_err(|e| e.to_string())?
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            let r = c
                .batch_execute("SELECT pg_logical_emit_message(false, 'viewkeeper_heartbeat', now()::text)")
                .await
                .map_err(|e| e.to_string());
            drop(c);
            let _ = task.await;
            r
        }
        .await;
        if let Err(e) = r {
            debug!(source = %self.s.name, error = %e, "heartbeat failed");
        }
    }

    /// Records the WAL the slot holds back (`viewkeeper_slot_retained_wal_bytes`) and
    /// warns past `max_retained_wal_bytes`. Best effort: a failed query is only logged.
    async fn check_slot(&self) {
        let retained: Result<Option<(i64, i64)>, String> = async {
            let (c, task) = self.connector().map_err(|e| e.to_string())?.connect().await.map_err(|e| e.to_string())?;
            let r = c
                .query_opt(
                    "SELECT (pg_current_wal_lsn() - restart_lsn)::bigint, (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint
                     FROM pg_replication_slots WHERE slot_name = $1",
                    &[&self.s.slot],
                )
                .await
                .map_err(|e| e.to_string());
            drop(c);
            let _ = task.await;
            Ok(r?.and_then(|row| Some((row.get::<_, Option<i64>>(0)?, row.get::<_, Option<i64>>(1)?))))
        }
        .await;
        match retained {
            Ok(Some((bytes, lag))) => {
                // WAL written since the last position viewkeeper acknowledged.
                metrics::gauge!("viewkeeper_replication_lag_bytes", "source" => self.s.name.clone()).set(lag as f64);
                metrics::gauge!("viewkeeper_slot_retained_wal_bytes", "source" => self.s.name.clone())
                    .set(bytes as f64);
                if bytes as u64 > self.s.max_retained_wal_bytes {
                    warn!(source = %self.s.name, slot = %self.s.slot, retained_wal_bytes = bytes, bound = self.s.max_retained_wal_bytes,
                        "slot retains more WAL than the bound: the worker is behind or stalled (a sink down?); Postgres keeps this WAL on disk until it catches up");
                }
            }
            Ok(None) => {}
            Err(e) => debug!(source = %self.s.name, error = %e, "slot check failed"),
        }
    }

    /// Hands a batch to the engine (waiting for room); `Ok(false)` on shutdown.
    async fn send(
        &self,
        tx: &mpsc::Sender<SourceBatch>,
        shutdown: &CancellationToken,
        b: SourceBatch,
    ) -> Result<bool, SourceError> {
        tokio::select! {
            _ = shutdown.cancelled() => Ok(false),
            r = tx.send(b) => r.map(|_| true).map_err(|_| self.transient("engine stopped")),
        }
    }

    fn classify(&self, e: pgwire_replication::PgWireError) -> SourceError {
        let msg = e.to_string();
        if e.is_tls() {
            if let Ok(pg) = &self.pg {
                return self.fatal(format!("replication connection: {}", pg.error(&msg)));
            }
        }
        if msg.contains("does not exist") && msg.contains("slot") {
            self.fatal(format!(
                "{msg}: the replication slot is gone; rebuild with `viewkeeper backfill`"
            ))
        } else if msg.contains("can no longer get changes") || msg.contains("invalidated") {
            self.fatal(format!(
                "{msg}: the slot was invalidated; rebuild with `viewkeeper backfill`"
            ))
        } else {
            self.transient(msg)
        }
    }
}
