//! The Debezium source: a Kafka consumer group over Debezium's change-event topics,
//! each record decoded by [`super::decode`].
//!
//! Contract (see [`viewkeeper_core::source`]):
//! * One consumer (librdkafka, bundled) in group `group_id`, on its own thread: records
//!   arrive in order per partition and are handed to the engine in that order, batched
//!   across partitions (a batch closes when `max_batch_records` are in it, when no
//!   record is waiting, or 100 ms after its first record).
//! * Batches carry a sequence number as their checkpoint (`Checkpoint::Batch(seq)`, growing
//!   from the stored checkpoint across restarts). For each batch the consumer remembers
//!   the next offset of every partition it read; when the engine acknowledges a batch
//!   (state store and every sink durable) those offsets are stored
//!   (`enable.auto.offset.store=false`, `rd_kafka_offsets_store`: the *next* offset to
//!   read, i.e. the record's offset + 1) and librdkafka commits stored offsets every
//!   second. Nothing read but unacknowledged is ever committed, so a crash replays from
//!   the last acknowledged batch; replays are harmless because the state store ignores
//!   changes not newer than a row's stored position.
//! * Rebalance (revoke): the batch being built is handed over, the consumer waits (at
//!   most `revoke_timeout`) until the engine acknowledged everything sent, stores and
//!   commits those offsets synchronously, then lets the partitions go. What was not
//!   acknowledged in time is forgotten here and replayed by the next owner.
//! * Records that cannot be decoded become dead letters with `topic[partition]@offset`
//!   and the reason; the partition keeps flowing. Tombstones, heartbeats, transaction
//!   metadata and logical messages are skipped (debug log).

use super::config::DebeziumConfig;
use super::group::{Assignment, Scaling};
use super::scale::Part;
use super::{ColumnType, Decoded, TopicTable};
use futures_util::future::BoxFuture;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use viewkeeper_core::model::Origin;
use viewkeeper_core::source::{Ownership, SnapshotMark, Source, SourceBatch, SourceError, SourceRun};
use viewkeeper_core::{Checkpoint, DurableTx, ErrorKind};

/// A table this source feeds: its alias, `schema.table` name and primary key.
#[derive(Clone, Debug)]
pub struct FedTable {
    pub alias: String,
    pub name: String,
    pub primary_key: Vec<String>,
}

/// Topic → the table it feeds, with the column type hints of topics without schemas.
pub fn topic_tables(
    name: &str,
    cfg: &DebeziumConfig,
    tables: &[FedTable],
) -> Result<HashMap<String, TopicTable>, SourceError> {
    let mut topics = HashMap::new();
    for t in tables {
        let mut table = TopicTable::new(t.alias.clone(), t.primary_key.clone());
        for (col, hint) in cfg.column_types.get(&t.alias).into_iter().flatten() {
            let ty = ColumnType::from_hint(hint).map_err(|e| {
                SourceError::new(name, ErrorKind::Unfit, format!("column_types.{}.{col}: {e}", t.alias))
            })?;
            table = table.with_column_type(col.clone(), ty);
        }
        topics.insert(cfg.topic_of(&t.alias, &t.name), table);
    }
    Ok(topics)
}

/// The properties viewkeeper sets itself; a config may not override them.
pub const OWN_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "session.timeout.ms",
    "enable.partition.eof",
    "partition.assignment.strategy",
];

/// A batch closes at the latest this long after its first record was read.
const MAX_BATCH_WAIT: Duration = Duration::from_millis(100);

/// `(topic, partition)` → the next offset to read.
pub(super) type Offsets = HashMap<(String, i32), i64>;

/// The batch being built and the batches sent but not yet acknowledged; shared between
/// the poll loop and the rebalance callback, which both run on the consumer's thread.
pub(super) struct Flow {
    source: String,
    tx: mpsc::Sender<SourceBatch>,
    acks: watch::Receiver<Option<Checkpoint>>,
    shutdown: CancellationToken,
    runtime: tokio::runtime::Handle,
    next_seq: u64,
    batch: SourceBatch,
    /// Records read into `batch` (changes, skips and dead letters).
    records: usize,
    /// When the first record of `batch` was read.
    opened: Option<Instant>,
    /// Next offsets of the records in `batch`.
    batch_offsets: Offsets,
    /// Sequence → next offsets of that batch, until acknowledged.
    sent: BTreeMap<u64, Offsets>,
    /// Where acknowledged offsets are published (`/v1/wait`).
    durable: DurableTx,
    /// Set while the batch being built holds rows of partitions being taken over: it is
    /// sent as a [`SnapshotMark::Restore`] batch, and its offsets wait for the takeover.
    pub(super) restoring: bool,
}

impl Flow {
    /// Hands the batch being built to the engine (waiting for room). `false`: the engine
    /// is gone or shutdown came first.
    pub(super) fn flush(&mut self) -> bool {
        if self.batch_offsets.is_empty() {
            return true;
        }
        self.records = 0;
        self.opened = None;
        let mut batch = std::mem::take(&mut self.batch);
        batch.source = self.source.clone();
        if self.restoring {
            // Not a resume point: the partitions' offsets go with the takeover batch.
            self.batch_offsets.clear();
            batch.snapshot = Some(SnapshotMark::Restore);
            return self.send(batch);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        batch.checkpoint = Some(Checkpoint::Batch(seq));
        self.sent.insert(seq, std::mem::take(&mut self.batch_offsets));
        self.send(batch)
    }

    /// Hands over what is read, then a batch carrying `ownership`, whose acknowledgement
    /// stores `offsets`. `false`: the engine is gone or shutdown came first.
    pub(super) fn send_ownership(&mut self, ownership: Ownership, offsets: Offsets) -> bool {
        if !self.flush() {
            return false;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.sent.insert(seq, offsets);
        self.send(SourceBatch {
            source: self.source.clone(),
            checkpoint: Some(Checkpoint::Batch(seq)),
            ownership: Some(ownership),
            ..Default::default()
        })
    }

    fn send(&self, batch: SourceBatch) -> bool {
        let (tx, shutdown) = (self.tx.clone(), self.shutdown.clone());
        self.runtime.block_on(async move {
            tokio::select! {
                _ = shutdown.cancelled() => false,
                r = tx.send(batch) => r.is_ok(),
            }
        })
    }

    /// Offsets of every acknowledged batch (latest per partition), forgotten here.
    pub(super) fn take_acked(&mut self) -> Offsets {
        let acked = self.acks.borrow_and_update().map_or(0, |c| c.value());
        let mut out = Offsets::new();
        while let Some(entry) = self.sent.first_entry() {
            if *entry.key() > acked {
                break;
            }
            for (tp, next) in entry.remove() {
                let e = out.entry(tp).or_insert(next);
                *e = (*e).max(next);
            }
        }
        self.durable.send_if_modified(|d| d.raise_offsets(out.iter()));
        out
    }

    /// Waits until the engine acknowledged every batch sent, at most `timeout`.
    pub(super) fn wait_acked(&mut self, timeout: Duration) -> bool {
        let Some(last) = self.sent.keys().next_back().copied() else {
            return true;
        };
        let (mut acks, shutdown) = (self.acks.clone(), self.shutdown.clone());
        self.runtime.block_on(async move {
            tokio::select! {
                _ = shutdown.cancelled() => false,
                r = tokio::time::timeout(timeout, acks.wait_for(|a| a.is_some_and(|a| a.value() >= last))) => matches!(r, Ok(Ok(_))),
            }
        })
    }
}

pub(super) struct Ctx {
    pub(super) source: String,
    pub(super) mode: Assignment,
    pub(super) scale: Scaling,
    /// A partitioned source's view of its partitions ([`Part`]).
    pub(super) part: Mutex<Part>,
    pub(super) flow: Mutex<Option<Flow>>,
    revoke_timeout: Duration,
    pub(super) streaming: Arc<AtomicBool>,
    /// The topics subscribed to: a worker must hold every partition of them.
    pub(super) topics: Vec<String>,
    /// Set while the assignment misses partitions of them: why nothing is read.
    pub(super) held: Mutex<Option<String>>,
    durable: DurableTx,
}

impl Ctx {
    /// The partitions of the subscribed topics that `assigned` lacks, as `topic[p]`
    /// (the partition counts from the broker's metadata).
    fn missing(&self, consumer: &BaseConsumer<Self>, assigned: &TopicPartitionList) -> Result<Vec<String>, KafkaError> {
        let have: std::collections::HashSet<(String, i32)> = assigned
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        let mut missing = Vec::new();
        for topic in &self.topics {
            let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
            for t in md.topics() {
                for p in t.partitions() {
                    if !have.contains(&(t.name().to_string(), p.id())) {
                        missing.push(format!("{}[{}]", t.name(), p.id()));
                    }
                }
            }
        }
        Ok(missing)
    }
}

impl ClientContext for Ctx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                error!(source = %self.source, facility = fac, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Warning => warn!(source = %self.source, facility = fac, "librdkafka: {message}"),
            _ => debug!(source = %self.source, facility = fac, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // Broker connection trouble: librdkafka reconnects by itself.
        warn!(source = %self.source, %error, "kafka: {reason}");
    }
}

impl ConsumerContext for Ctx {
    /// As rust-rdkafka's, with a partitioned source's own handling (the assignment's
    /// start offsets are set before it takes effect). The protocol is always eager: the
    /// assignment strategy is viewkeeper's (`range`).
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let rebalance = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Rebalance::Assign(tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => Rebalance::Revoke(tpl),
            _ => Rebalance::Error(KafkaError::Rebalance(err.into())),
        };
        self.pre_rebalance(consumer, &rebalance);
        let assign = matches!(rebalance, Rebalance::Assign(_));
        let is_error = matches!(rebalance, Rebalance::Error(_));
        drop(rebalance);
        if assign {
            if self.mode == Assignment::Partitioned {
                self.assign_partitioned(consumer, tpl);
                return;
            }
            if let Err(e) = consumer.assign(tpl) {
                warn!(source = %self.source, error = %e, "cannot take the assignment");
            }
            self.post_rebalance(consumer, &Rebalance::Assign(tpl));
        } else {
            // A revoke, or a failed rebalance (as rust-rdkafka does: nothing assigned).
            if let Err(e) = consumer.unassign() {
                warn!(source = %self.source, error = %e, "cannot give up the assignment");
            }
            if is_error {
                self.post_rebalance(consumer, &Rebalance::Error(KafkaError::Rebalance(err.into())));
            } else {
                self.post_rebalance(consumer, &Rebalance::Revoke(tpl));
            }
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                self.streaming.store(false, Ordering::Relaxed);
                let mut guard = self.flow.lock().unwrap_or_else(|e| e.into_inner());
                let Some(flow) = guard.as_mut() else { return };
                // Drain: what was read goes to the engine, and its offsets are committed
                // once acknowledged, before the partitions go to another consumer.
                let handed = flow.flush();
                if handed && !flow.wait_acked(self.revoke_timeout) {
                    warn!(source = %self.source, timeout_ms = self.revoke_timeout.as_millis() as u64,
                        "revoke: the engine did not acknowledge everything read in time; the next owner replays it");
                }
                if self.mode == Assignment::Partitioned {
                    self.revoke_partitioned(consumer, flow);
                } else {
                    store_offsets(&self.source, consumer, flow.take_acked());
                    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                        if !matches!(e, KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) {
                            warn!(source = %self.source, error = %e, "revoke: commit failed; the next owner replays from the last commit");
                        }
                    }
                }
                let gone: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect();
                for offsets in flow.sent.values_mut() {
                    offsets.retain(|tp, _| !gone.contains(tp));
                }
                info!(source = %self.source, partitions = gone.len(), "partitions revoked");
            }
            Rebalance::Assign(_) | Rebalance::Error(_) => {}
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                // The group's committed offsets were acknowledged by a worker before they
                // were committed: durable everywhere (what `/v1/wait` answers from at once).
                match consumer.committed_offsets((*tpl).clone(), Duration::from_secs(5)) {
                    Ok(committed) => {
                        let offsets: Offsets = committed
                            .elements()
                            .iter()
                            .filter_map(|e| match e.offset() {
                                Offset::Offset(o) => Some(((e.topic().to_string(), e.partition()), o)),
                                _ => None,
                            })
                            .collect();
                        self.durable.send_if_modified(|d| d.raise_offsets(offsets.iter()));
                    }
                    Err(e) => debug!(source = %self.source, error = %e, "cannot read the committed offsets"),
                }
                let parts: Vec<String> = tpl
                    .elements()
                    .iter()
                    .map(|e| format!("{}[{}]", e.topic(), e.partition()))
                    .collect();
                info!(source = %self.source, partitions = ?parts, "partitions assigned");
                // A document joins rows of every topic: a worker holding only some of
                // their partitions would write half-joined documents. Hold (read nothing)
                // until a rebalance gives this worker all of them.
                let assigned = consumer.assignment().unwrap_or_else(|_| (*tpl).clone());
                let held = match self.missing(consumer, &assigned) {
                    Ok(m) if m.is_empty() => None,
                    Ok(m) => Some(format!(
                        "another member shares consumer group: this worker was assigned {} partition(s) but not {}; one worker must hold every partition of its topics (several workers per group are not supported): stop the other member or give it another group_id",
                        assigned.count(),
                        m.join(", ")
                    )),
                    Err(e) => Some(format!("cannot read the topics' partition counts to check the assignment: {e}")),
                };
                let pause = if held.is_some() {
                    consumer.pause(&assigned)
                } else {
                    consumer.resume(&assigned)
                };
                if let Err(e) = pause {
                    warn!(source = %self.source, error = %e, "cannot pause or resume the assigned partitions");
                }
                if let Some(why) = &held {
                    error!(source = %self.source, "holding: {why}");
                }
                self.streaming.store(held.is_none(), Ordering::Relaxed);
                *self.held.lock().unwrap_or_else(|e| e.into_inner()) = held;
            }
            Rebalance::Error(e) => warn!(source = %self.source, error = %e, "rebalance failed"),
            Rebalance::Revoke(_) => {}
        }
    }
}

pub(super) fn store_offsets(source: &str, consumer: &BaseConsumer<Ctx>, offsets: Offsets) {
    if offsets.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), next) in &offsets {
        if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next)) {
            warn!(source, topic, partition, error = %e, "cannot store offset");
        }
    }
    // Fails for partitions no longer assigned: their next owner replays them.
    if let Err(e) = consumer.store_offsets(&tpl) {
        debug!(source, error = %e, "storing offsets");
    }
}

pub struct DebeziumSource {
    name: String,
    cfg: DebeziumConfig,
    /// Topic → the table it feeds.
    topics: HashMap<String, TopicTable>,
    /// Set while the consumer holds partitions (read by the worker's `/readyz`).
    streaming: Arc<AtomicBool>,
    /// What the worker's state store says (partitioned and shared sources).
    scale: Scaling,
}

impl DebeziumSource {
    /// The source `name` reading the topics of `tables`; a bad column type hint is refused.
    pub fn new(
        name: &str,
        cfg: DebeziumConfig,
        tables: &[FedTable],
        streaming: Arc<AtomicBool>,
        scale: Scaling,
    ) -> Result<Self, SourceError> {
        let topics = topic_tables(name, &cfg, tables)?;
        if cfg.assignment == Assignment::Shared {
            scale.gate.register_shared(name);
        }
        Ok(DebeziumSource {
            name: name.to_string(),
            cfg,
            topics,
            streaming,
            scale,
        })
    }

    fn fatal(&self, message: impl Into<String>) -> SourceError {
        SourceError::new(&self.name, ErrorKind::Unfit, message)
    }

    /// Consumes until shutdown (or a fatal error) on a thread of its own.
    async fn run_until(self, r: SourceRun) -> Result<(), SourceError> {
        let runtime = tokio::runtime::Handle::current();
        let name = self.name.clone();
        let checkpoint = r.from.map(|c| c.value());
        tokio::task::spawn_blocking(move || self.consume(checkpoint, r.tx, r.acks, r.shutdown, r.durable, runtime))
            .await
            .map_err(|e| SourceError::new(&name, ErrorKind::Remote, format!("consumer thread failed: {e}")))?
    }

    fn consumer(&self, flow: Flow) -> Result<BaseConsumer<Ctx>, SourceError> {
        let durable = flow.durable.clone();
        let mut cfg = ClientConfig::new();
        for (k, v) in self.cfg.properties.exposed() {
            cfg.set(k, v);
        }
        let mode = self.cfg.assignment;
        cfg.set("bootstrap.servers", &self.cfg.brokers)
            .set("group.id", self.cfg.group(&self.name))
            .set("partition.assignment.strategy", "range")
            .set(
                "enable.auto.commit",
                if mode == Assignment::Shared { "false" } else { "true" },
            )
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("session.timeout.ms", self.cfg.session_timeout_ms.to_string());
        if !self.cfg.properties.keys().any(|k| k == "auto.offset.reset") {
            // A new group reads each topic from its start (Debezium's snapshot first).
            cfg.set("auto.offset.reset", "earliest");
        }
        if !self.scale.worker_id.is_empty() && !self.cfg.properties.keys().any(|k| k == "client.id") {
            cfg.set("client.id", &self.scale.worker_id);
        }
        let mut part = Part::default();
        for (stream, next) in &self.scale.offsets {
            if let Some((t, p)) = super::scale::parse_stream(stream) {
                if self.topics.contains_key(&t) {
                    part.delivered.insert((t, p), *next as i64);
                }
            }
        }
        let ctx = Ctx {
            source: self.name.clone(),
            mode,
            scale: self.scale.clone(),
            part: Mutex::new(part),
            flow: Mutex::new(Some(flow)),
            revoke_timeout: Duration::from_millis(self.cfg.revoke_timeout_ms),
            streaming: self.streaming.clone(),
            topics: self.topics.keys().cloned().collect(),
            held: Mutex::new(None),
            durable,
        };
        cfg.create_with_context(ctx)
            .map_err(|e| self.fatal(format!("cannot create the Kafka consumer: {e}")))
    }

    fn consume(
        self,
        checkpoint: Option<u64>,
        tx: mpsc::Sender<SourceBatch>,
        acks: watch::Receiver<Option<Checkpoint>>,
        shutdown: CancellationToken,
        durable: DurableTx,
        runtime: tokio::runtime::Handle,
    ) -> Result<(), SourceError> {
        let flow = Flow {
            source: self.name.clone(),
            tx,
            acks,
            shutdown: shutdown.clone(),
            runtime,
            next_seq: checkpoint.map_or(1, |c| c + 1),
            batch: SourceBatch::default(),
            records: 0,
            opened: None,
            batch_offsets: Offsets::new(),
            sent: BTreeMap::new(),
            durable,
            restoring: false,
        };
        let consumer = self.consumer(flow)?;
        let mut topics: Vec<&str> = self.topics.keys().map(String::as_str).collect();
        topics.sort();
        match self.cfg.assignment {
            Assignment::Shared => consumer.context().assign_shared(&consumer).map_err(|e| self.fatal(e))?,
            mode => {
                if mode == Assignment::Partitioned {
                    consumer
                        .context()
                        .check_copartitioned(&consumer)
                        .map_err(|e| self.fatal(e))?;
                }
                consumer
                    .subscribe(&topics)
                    .map_err(|e| self.fatal(format!("cannot subscribe to {topics:?}: {e}")))?;
            }
        }
        info!(source = %self.name, brokers = %self.cfg.brokers, group = %self.cfg.group(&self.name), ?topics, "consuming");
        let mut last_error_log: Option<Instant> = None;
        let lock = || consumer.context().flow.lock().unwrap_or_else(|e| e.into_inner());
        let mut last_lag = Instant::now();
        while !shutdown.is_cancelled() {
            let acked = lock().as_mut().map(Flow::take_acked).unwrap_or_default();
            if self.cfg.assignment != Assignment::Shared {
                store_offsets(&self.name, &consumer, acked);
            }
            if self.cfg.assignment == Assignment::Partitioned {
                let ok = lock()
                    .as_mut()
                    .is_none_or(|flow| consumer.context().finish_takeover(&consumer, flow));
                if !ok {
                    break;
                }
            }
            if last_lag.elapsed() >= Duration::from_secs(5) {
                consumer.context().report_lag(&consumer);
                last_lag = Instant::now();
            }
            // Not under the lock: a rebalance callback runs inside poll.
            let polled = consumer.poll(Duration::from_millis(100));
            if let Some(why) = consumer
                .context()
                .held
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_deref()
            {
                if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    error!(source = %self.name, "holding: {why}");
                    last_error_log = Some(Instant::now());
                }
                // Paused partitions deliver nothing new; a record fetched before the pause
                // is not read: its partition is set back to it, for when it resumes.
                if let Some(Ok(m)) = &polled {
                    if let Err(e) = consumer.seek(
                        m.topic(),
                        m.partition(),
                        Offset::Offset(m.offset()),
                        Duration::from_secs(5),
                    ) {
                        warn!(source = %self.name, topic = m.topic(), partition = m.partition(), error = %e, "cannot seek back while holding");
                    }
                    continue;
                }
            }
            let mut guard = lock();
            let Some(flow) = guard.as_mut() else { break };
            let full = match polled {
                None => true, // nothing waiting: hand over what is read
                Some(Err(e)) => {
                    if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        warn!(source = %self.name, error = %e, "kafka consumer error (retrying)");
                        last_error_log = Some(Instant::now());
                    }
                    true
                }
                Some(Ok(m))
                    if !consumer
                        .context()
                        .admit(&consumer, m.topic(), m.partition(), m.offset()) =>
                {
                    // Paused or waiting for its takeover: read again when it resumes.
                    if let Err(e) = consumer.seek(
                        m.topic(),
                        m.partition(),
                        Offset::Offset(m.offset()),
                        Duration::from_secs(5),
                    ) {
                        warn!(source = %self.name, topic = m.topic(), partition = m.partition(), error = %e, "cannot seek back");
                    }
                    false
                }
                Some(Ok(m)) => {
                    self.add(flow, &m);
                    // Full, or old enough: a steady trickle never leaves `poll` empty-handed.
                    flow.records >= self.cfg.max_batch_records
                        || flow.opened.is_some_and(|t| t.elapsed() >= MAX_BATCH_WAIT)
                }
            };
            if full && !flow.flush() {
                break;
            }
        }
        // Leaving: offsets of what the engine acknowledged are committed; the rest
        // (read, not acknowledged) is read again by whoever consumes next.
        let acked = lock().as_mut().map(Flow::take_acked).unwrap_or_default();
        store_offsets(&self.name, &consumer, acked);
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
            if !matches!(e, KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) {
                warn!(source = %self.name, error = %e, "final commit failed; the next start replays from the last commit");
            }
        }
        // The flow's sender must not outlive the consumer loop: the engine waits for it.
        *lock() = None;
        consumer.unsubscribe();
        Ok(())
    }

    /// Decodes one record into the batch being built.
    fn add(&self, flow: &mut Flow, m: &rdkafka::message::BorrowedMessage<'_>) {
        let (topic, partition, offset) = (m.topic(), m.partition(), m.offset());
        flow.batch_offsets.insert((topic.to_string(), partition), offset + 1);
        flow.records += 1;
        flow.opened.get_or_insert_with(Instant::now);
        let Some(table) = self.topics.get(topic) else {
            return; // not subscribed to; cannot happen
        };
        match super::decode(topic, m.key(), m.payload(), table) {
            Ok(Decoded::Change(mut c)) => {
                c.origin = Some(Origin {
                    stream: format!("{topic}[{partition}]"),
                    offset: offset.max(0) as u64,
                });
                flow.batch.changes.push(c)
            }
            Ok(Decoded::Skip(why)) => {
                debug!(source = %self.name, topic, partition, offset, "skipped: {}", why.as_str())
            }
            Err(e) => {
                let at = format!("{topic}[{partition}]@{offset}");
                warn!(source = %self.name, record = %at, error = %e, "dead letter");
                flow.batch
                    .dead_letters
                    .push(e.dead_letter(&table.alias, at, m.key(), m.payload()));
            }
        }
    }
}

impl Source for DebeziumSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn run(self: Box<Self>, run: SourceRun) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin((*self).run_until(run))
    }
}
