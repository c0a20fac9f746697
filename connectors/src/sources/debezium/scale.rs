//! A Debezium source shared by several workers ([`Assignment`]): the partitioned
//! source's takeovers and the shared source's own assignment.
//!
//! **Partitioned.** The group assigns partitions with the range assignor, so partition
//! `p` of every topic of the source goes to one worker (co-partitioned: same partition
//! counts, checked at start; children routed to their root's partition). Every
//! assignment is a *takeover* of what it holds, in this order:
//! 1. each assigned partition is read from where this worker's state store got
//!    (`streams`, or the start of the topic) up to its end offset at assignment: rows
//!    applied, nothing rendered ([`SnapshotMark::Restore`] batches; as Kafka Streams
//!    restores a store from its changelog). The other partitions are paused.
//! 2. once every shared source of the worker caught up (documents joined with half-read
//!    products would go backwards), one batch carries [`Ownership`]: the engine raises
//!    its clock above the versions the sinks hold for those documents, writes every
//!    one of them again from this worker's rows, and only then acknowledges: the
//!    partitions' offsets (their end offsets at assignment) are committed after that.
//! 3. the partitions resume from there, and their documents follow the stream.
//!
//! On revoke (eager: everything) the engine first acknowledges what was read (the
//! consumer waits, as for a single worker), then ownership goes to nothing: fan-out from
//! shared tables stops reaching documents this worker may no longer own. A takeover
//! per assignment costs re-writing the worker's share of the documents at every
//! rebalance and restart; in exchange it needs nothing shared but the consumer group
//! (Tansu does not return commit metadata, so owners cannot leave marks there).
//!
//! **Shared.** Every partition assigned by the worker itself (no group), from the
//! offsets its state store applied; nothing committed to Kafka. Caught up once every
//! partition reached its end offset at start.

use super::consumer::{Ctx, Flow, Offsets};
use super::group::Assignment;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};
use viewkeeper_core::source::Ownership;

const BROKER_TIMEOUT: Duration = Duration::from_secs(5);

/// A partitioned (or shared) source's view of its partitions.
#[derive(Debug, Default)]
pub(crate) struct Part {
    /// Partitions of each topic (checked at start).
    pub partitions: u32,
    /// Partitions whose documents the engine writes now.
    pub owned: BTreeSet<u32>,
    /// A takeover in progress: the partitions, and for every stream the end offset it
    /// is restored up to (stored with the takeover batch).
    pub takeover: Option<(BTreeSet<u32>, Offsets)>,
    /// Streams still being restored → their end offset.
    pub restoring: HashMap<(String, i32), i64>,
    /// Stream → next offset handed to the engine (restores start there).
    pub delivered: HashMap<(String, i32), i64>,
    /// Shared: streams not yet at their end offset at start.
    pub behind: HashMap<(String, i32), i64>,
    pub last_wait_log: Option<Instant>,
}

/// `topic[partition]` → (topic, partition).
pub(super) fn parse_stream(s: &str) -> Option<(String, i32)> {
    let open = s.rfind('[')?;
    let p = s[open + 1..].strip_suffix(']')?.parse().ok()?;
    Some((s[..open].to_string(), p))
}

impl Ctx {
    fn lock_part(&self) -> std::sync::MutexGuard<'_, Part> {
        self.part.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Start of a partitioned source: every topic must have the same partition count.
    pub(super) fn check_copartitioned(&self, consumer: &BaseConsumer<Ctx>) -> Result<u32, String> {
        let mut counts = BTreeMap::new();
        for topic in &self.topics {
            let md = consumer
                .fetch_metadata(Some(topic), BROKER_TIMEOUT)
                .map_err(|e| format!("cannot read the partition count of {topic}: {e}"))?;
            let n = md.topics().first().map_or(0, |t| t.partitions().len());
            if n == 0 {
                return Err(format!("topic {topic} has no partitions (does it exist?)"));
            }
            counts.insert(topic.clone(), n);
        }
        let first = counts.values().next().copied().unwrap_or(0);
        if counts.values().any(|n| *n != first) {
            return Err(format!(
                "assignment = \"partitioned\" needs co-partitioned topics, with the same partition count, but they have {counts:?}: give them the same count (kafka-topics --alter --partitions N) and route every row to its root's partition (Debezium's PartitionRouting SMT on the root key, e.g. orders by id and order_items by order_id)"
            ));
        }
        let mut part = self.lock_part();
        part.partitions = first as u32;
        Ok(first as u32)
    }

    /// A partitioned source's assignment (see the module docs): restore starts set on
    /// `tpl`, then assigned.
    pub(super) fn assign_partitioned(&self, consumer: &BaseConsumer<Ctx>, tpl: &mut TopicPartitionList) {
        let mut sets: BTreeMap<String, BTreeSet<i32>> =
            self.topics.iter().map(|t| (t.clone(), BTreeSet::new())).collect();
        let elems: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        for (t, p) in &elems {
            sets.entry(t.clone()).or_default().insert(*p);
        }
        let first = sets.values().next().cloned().unwrap_or_default();
        let mut held = None;
        if sets.values().any(|s| *s != first) {
            held = Some(format!(
                "the group's assignment is not co-partitioned ({sets:?}): every member must run viewkeeper with the same topics (the range assignor gives partition p of every topic to one member)"
            ));
        }
        let mut part = self.lock_part();
        let mut targets = Offsets::new();
        part.restoring.clear();
        for (t, p) in &elems {
            let (low, high) = match consumer.fetch_watermarks(t, *p, BROKER_TIMEOUT) {
                Ok(w) => w,
                Err(e) => {
                    held.get_or_insert(format!("cannot read the end offset of {t}[{p}]: {e}"));
                    continue;
                }
            };
            let start = part.delivered.get(&(t.clone(), *p)).copied();
            let from = match start {
                Some(s) if s >= low => Offset::Offset(s),
                _ => Offset::Beginning,
            };
            if let Err(e) = tpl.set_partition_offset(t, *p, from) {
                warn!(source = %self.source, topic = %t, partition = p, error = %e, "cannot set the restore start");
            }
            targets.insert((t.clone(), *p), high);
            if start.unwrap_or(low).max(low) < high {
                part.restoring.insert((t.clone(), *p), high);
            }
        }
        if let Err(e) = consumer.assign(tpl) {
            held.get_or_insert(format!("cannot take the assignment: {e}"));
        }
        let takeover: BTreeSet<u32> = first.iter().map(|p| *p as u32).collect();
        info!(source = %self.source, partitions = ?takeover, restoring = part.restoring.len(),
            "partitions assigned: restoring their rows before taking them over");
        // Streams with nothing to restore wait for the takeover, paused.
        let mut pause = TopicPartitionList::new();
        for (t, p) in &elems {
            if held.is_some() || !part.restoring.contains_key(&(t.clone(), *p)) {
                pause.add_partition(t, *p);
            }
        }
        if pause.count() > 0 {
            if let Err(e) = consumer.pause(&pause) {
                warn!(source = %self.source, error = %e, "cannot pause partitions for the takeover");
            }
        }
        part.takeover = Some((takeover, targets));
        drop(part);
        if let Some(f) = self.flow.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            f.restoring = true;
        }
        if let Some(why) = &held {
            error!(source = %self.source, "holding: {why}");
        }
        self.streaming.store(false, Ordering::Relaxed);
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = held;
    }

    /// A partitioned source's revoke, once the engine acknowledged what was read: the
    /// offsets committed, then ownership to nothing.
    pub(super) fn revoke_partitioned(&self, consumer: &BaseConsumer<Ctx>, flow: &mut Flow) {
        super::consumer::store_offsets(&self.source, consumer, flow.take_acked());
        if let Err(e) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
            if !matches!(
                e,
                rdkafka::error::KafkaError::ConsumerCommit(rdkafka::error::RDKafkaErrorCode::NoOffset)
            ) {
                warn!(source = %self.source, error = %e, "revoke: commit failed; the next owner replays from the last commit");
            }
        }
        flow.restoring = false;
        let mut part = self.lock_part();
        part.takeover = None;
        part.restoring.clear();
        let was = std::mem::take(&mut part.owned);
        let partitions = part.partitions;
        drop(part);
        info!(source = %self.source, partitions = ?was, "giving up partitions");
        flow.send_ownership(
            Ownership {
                partitions,
                ..Default::default()
            },
            Offsets::new(),
        );
    }

    /// What a polled record of a partitioned source is: `true` to read it, `false` to
    /// set its partition back to it (paused, or restored already and waiting for the
    /// takeover).
    pub(super) fn admit(&self, consumer: &BaseConsumer<Ctx>, topic: &str, partition: i32, offset: i64) -> bool {
        let mut part = self.lock_part();
        match self.mode {
            Assignment::Partitioned => {}
            Assignment::Shared => {
                let k = (topic.to_string(), partition);
                part.delivered.insert(k.clone(), offset + 1);
                if part.behind.get(&k).is_some_and(|end| offset + 1 >= *end) {
                    part.behind.remove(&k);
                    if part.behind.is_empty() {
                        info!(source = %self.source, "caught up with the topics' end at start");
                        self.scale.gate.caught_up(&self.source);
                    }
                }
                return true;
            }
            Assignment::Whole => return true,
        }
        let k = (topic.to_string(), partition);
        if part.takeover.is_none() {
            part.delivered.insert(k, offset + 1);
            return true;
        }
        match part.restoring.get(&k).copied() {
            Some(end) if offset < end => {
                part.delivered.insert(k.clone(), offset + 1);
                if offset + 1 >= end {
                    part.restoring.remove(&k);
                    let mut tpl = TopicPartitionList::new();
                    tpl.add_partition(topic, partition);
                    if let Err(e) = consumer.pause(&tpl) {
                        warn!(source = %self.source, topic, partition, error = %e, "cannot pause a restored partition");
                    }
                }
                true
            }
            _ => false,
        }
    }

    /// A takeover whose rows are restored and whose shared sources caught up: the batch
    /// that hands the partitions to the engine. `false`: the engine is gone.
    pub(super) fn finish_takeover(&self, consumer: &BaseConsumer<Ctx>, flow: &mut Flow) -> bool {
        let mut part = self.lock_part();
        if part.takeover.is_none() || !part.restoring.is_empty() || self.held.lock().map_or(true, |h| h.is_some()) {
            return true;
        }
        let behind = self.scale.gate.behind();
        if !behind.is_empty() {
            if part.last_wait_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                info!(source = %self.source, ?behind, "rows restored; waiting for the shared sources to catch up before taking the partitions over");
                part.last_wait_log = Some(Instant::now());
            }
            return true;
        }
        let (takeover, targets) = part.takeover.take().expect("checked");
        part.owned = takeover.clone();
        let partitions = part.partitions;
        drop(part);
        // The restore's last batch, then the takeover.
        if !flow.flush() {
            return false;
        }
        flow.restoring = false;
        let sent = flow.send_ownership(
            Ownership {
                partitions,
                owned: takeover.clone(),
                takeover: takeover.clone(),
                ..Default::default()
            },
            targets,
        );
        if let Ok(assigned) = consumer.assignment() {
            if let Err(e) = consumer.resume(&assigned) {
                warn!(source = %self.source, error = %e, "cannot resume the partitions taken over");
            }
        }
        info!(source = %self.source, partitions = ?takeover, "owning partitions");
        self.streaming.store(true, Ordering::Relaxed);
        sent
    }

    /// A shared source's assignment: every partition of its topics, from the offsets
    /// the state store applied.
    pub(super) fn assign_shared(&self, consumer: &BaseConsumer<Ctx>) -> Result<(), String> {
        let mut tpl = TopicPartitionList::new();
        let mut part = self.lock_part();
        for topic in &self.topics {
            let md = consumer
                .fetch_metadata(Some(topic), BROKER_TIMEOUT)
                .map_err(|e| format!("cannot read the partitions of {topic}: {e}"))?;
            for t in md.topics() {
                for p in t.partitions() {
                    let k = (t.name().to_string(), p.id());
                    let (low, high) = consumer
                        .fetch_watermarks(t.name(), p.id(), BROKER_TIMEOUT)
                        .map_err(|e| format!("cannot read the end offset of {}[{}]: {e}", t.name(), p.id()))?;
                    let start = part.delivered.get(&k).copied().filter(|s| *s >= low);
                    tpl.add_partition_offset(t.name(), p.id(), start.map_or(Offset::Beginning, Offset::Offset))
                        .map_err(|e| e.to_string())?;
                    if start.unwrap_or(low) < high {
                        part.behind.insert(k, high);
                    }
                }
            }
        }
        consumer
            .assign(&tpl)
            .map_err(|e| format!("cannot assign the partitions: {e}"))?;
        info!(source = %self.source, partitions = tpl.count(), behind = part.behind.len(), "reading every partition (shared)");
        if part.behind.is_empty() {
            self.scale.gate.caught_up(&self.source);
        }
        self.streaming.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// `viewkeeper_kafka_partition_lag{source,topic,partition}`: records behind each
    /// assigned partition's end.
    pub(super) fn report_lag(&self, consumer: &BaseConsumer<Ctx>) {
        let Ok(pos) = consumer.position() else { return };
        for e in pos.elements() {
            let Ok((_, high)) = consumer.fetch_watermarks(e.topic(), e.partition(), Duration::from_millis(500)) else {
                continue;
            };
            let at = match e.offset() {
                Offset::Offset(o) => o,
                _ => continue,
            };
            metrics::gauge!("viewkeeper_kafka_partition_lag",
                "source" => self.source.clone(), "topic" => e.topic().to_string(), "partition" => e.partition().to_string())
            .set((high - at).max(0) as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_stream;

    #[test]
    fn streams_name_topic_and_partition() {
        assert_eq!(
            parse_stream("shop.public.orders[3]"),
            Some(("shop.public.orders".into(), 3))
        );
        assert_eq!(parse_stream("orders"), None);
    }
}
