//! The consumer group of a Debezium source as the brokers see it, for `viewkeeper status`:
//! per partition of its topics the group's committed offset, the end offset (high
//! watermark) and the lag; and the group's members (ListGroups + DescribeGroups, as
//! librdkafka's `rd_kafka_list_groups` does): each worker's consumer has `client.id` = its
//! worker id, and its assignment (consumer protocol bytes, [`decode_assignment`]) says
//! which partitions it holds.
//!
//! Read-only: the consumer never joins the group (no subscribe, no assign); it only asks
//! the group coordinator for the committed offsets (OffsetFetch) and the members, and the
//! partition leaders for their watermarks (ListOffsets).
//!
//! Tansu 0.6 (the broker of `scripts/services.sh`) answers DescribeGroups with the state,
//! protocol type `consumer` and the member ids (`<client.id>-<uuid>`) only: empty client
//! id, host, protocol, member metadata and assignment (checked with librdkafka and raw
//! DescribeGroups v0 to v4). ListGroups leaves out a group that never committed an
//! offset, so librdkafka does not describe it, and it keeps a member whose process was
//! killed (still listed 40 s after a SIGKILL with a 6 s session timeout). So with Tansu
//! the members' worker ids come from their member ids and their partitions are unknown;
//! each worker's own partitions are in its state store (`viewkeeper status` on its data
//! dir shows them).

use super::config::DebeziumConfig;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::time::Duration;
use tracing::debug;

/// How long each broker request may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// What [`read_group`] found: the partitions of the source's topics and the group's members.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupState {
    pub topics: Vec<TopicState>,
    /// The members, or why they could not be read (the partitions are reported anyway).
    pub members: Result<GroupMembers, String>,
}

/// The consumer group as DescribeGroups answers (default: the brokers did not list it).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroupMembers {
    /// E.g. `Stable`, `PreparingRebalance`, `Empty`, `Dead`.
    pub state: String,
    /// The assignor, e.g. `range` (empty from Tansu 0.6).
    pub protocol: String,
    pub members: Vec<GroupMember>,
}

/// A member of the group: one worker's consumer.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupMember {
    /// The broker's id for the member (Kafka and Tansu: `<client.id>-<uuid>`).
    pub member_id: String,
    /// As returned (empty from Tansu 0.6).
    pub client_id: String,
    /// As returned (empty from Tansu 0.6), e.g. `/10.0.0.5`.
    pub host: String,
    /// The worker id: `client_id`, or when that is empty the client id the member id
    /// begins with ([`client_id_of_member_id`]).
    pub worker: Option<String>,
    /// Its partitions; `None`: the brokers returned no assignment (Tansu 0.6, or a group
    /// that is rebalancing); `Some(Err)`: bytes that are not the consumer protocol.
    pub assignment: Option<Result<MemberAssignment, String>>,
}

/// A consumer protocol assignment (ConsumerProtocolAssignment, versions 0 to 3).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberAssignment {
    pub version: i16,
    /// Per topic its partitions, as encoded.
    pub topics: Vec<(String, Vec<i32>)>,
    /// `None`: null, or left out.
    pub user_data: Option<Vec<u8>>,
}

impl MemberAssignment {
    /// `topic[partition]` of every assigned partition, in the encoded order.
    pub fn streams(&self) -> Vec<String> {
        self.topics
            .iter()
            .flat_map(|(t, ps)| ps.iter().map(move |p| format!("{t}[{p}]")))
            .collect()
    }
}

/// Decodes a member's assignment in the consumer protocol format: `i16` version, an
/// `i32`-counted array of (`i16`-length topic name, `i32`-counted array of `i32`
/// partitions), then `i32`-length user data (-1: null). Big-endian. Missing user data is
/// `None`; bytes after it (fields of later versions) are ignored.
pub fn decode_assignment(bytes: &[u8]) -> Result<MemberAssignment, String> {
    struct Reader<'a>(&'a [u8], usize);
    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
            let end = self.1.checked_add(n).filter(|e| *e <= self.0.len());
            let end = end.ok_or_else(|| format!("assignment ends inside {what} at byte {}", self.1))?;
            let b = &self.0[self.1..end];
            self.1 = end;
            Ok(b)
        }
        fn i16(&mut self, what: &str) -> Result<i16, String> {
            Ok(i16::from_be_bytes(self.take(2, what)?.try_into().unwrap()))
        }
        fn i32(&mut self, what: &str) -> Result<i32, String> {
            Ok(i32::from_be_bytes(self.take(4, what)?.try_into().unwrap()))
        }
        fn count(&mut self, what: &str) -> Result<usize, String> {
            let n = self.i32(what)?;
            usize::try_from(n.max(0)).map_err(|_| format!("bad {what} {n}"))
        }
    }
    let mut r = Reader(bytes, 0);
    let version = r.i16("the version")?;
    if version < 0 {
        return Err(format!("assignment version {version}"));
    }
    let mut topics = vec![];
    for _ in 0..r.count("the topic count")? {
        let len = r.i16("a topic name length")?;
        let len = usize::try_from(len).map_err(|_| format!("topic name length {len}"))?;
        let name = r.take(len, "a topic name")?;
        let name = std::str::from_utf8(name)
            .map_err(|_| "a topic name is not UTF-8".to_string())?
            .to_string();
        let mut partitions = vec![];
        for _ in 0..r.count("a partition count")? {
            partitions.push(r.i32("a partition")?);
        }
        topics.push((name, partitions));
    }
    let user_data = if r.1 == bytes.len() {
        None
    } else {
        match r.i32("the user data length")? {
            n if n < 0 => None,
            n => Some(r.take(n as usize, "the user data")?.to_vec()),
        }
    };
    Ok(MemberAssignment {
        version,
        topics,
        user_data,
    })
}

/// The client id a broker-made member id `<client.id>-<uuid>` begins with (Kafka and
/// Tansu make them so); `None` when it does not end in `-` and a UUID
/// (8-4-4-4-12 hex digits) or nothing is before it.
pub fn client_id_of_member_id(member_id: &str) -> Option<&str> {
    let (client, uuid) = member_id.len().checked_sub(37).map(|i| member_id.split_at(i))?;
    let uuid = uuid.strip_prefix('-')?;
    let groups: Vec<&str> = uuid.split('-').collect();
    let shape = groups.iter().map(|g| g.len()).collect::<Vec<_>>() == [8, 4, 4, 4, 12];
    let hex = groups.iter().all(|g| g.chars().all(|c| c.is_ascii_hexdigit()));
    (shape && hex && !client.is_empty()).then_some(client)
}

/// A topic of the source: its partitions, or why there are none.
#[derive(Clone, Debug, PartialEq)]
pub struct TopicState {
    pub topic: String,
    /// E.g. the topic does not exist.
    pub error: Option<String>,
    pub partitions: Vec<PartitionState>,
}

/// One partition of a topic and the group's position in it.
#[derive(Clone, Debug, PartialEq)]
pub struct PartitionState {
    pub partition: i32,
    /// The group's committed offset (the next record to read); `None`: none committed.
    pub committed: Option<i64>,
    /// Low watermark: the first offset still in the partition.
    pub low: i64,
    /// High watermark: the offset the next record will get.
    pub end: i64,
    /// `end - committed`, or `end - low` when nothing is committed.
    pub lag: i64,
}

/// Why the group could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("cannot reach brokers {brokers}: {reason}")]
    Unreachable { brokers: String, reason: String },
    #[error("cannot create a Kafka client: {0}")]
    Client(KafkaError),
    #[error("reading the consumer group failed: {0}")]
    Failed(String),
}

/// librdkafka's logs at debug level only: a broker that is down is reported once, in the
/// result, not as a stream of connection errors on stderr.
struct Quiet;

impl ClientContext for Quiet {
    fn log(&self, _level: RDKafkaLogLevel, fac: &str, message: &str) {
        debug!(facility = fac, "librdkafka: {message}");
    }
    fn error(&self, error: KafkaError, reason: &str) {
        debug!("librdkafka: {error}: {reason}");
    }
}

impl ConsumerContext for Quiet {}

/// The group of source `source` (`cfg.group(source)`) on every partition of `topics`,
/// in the order given, and its members. Each broker request times out after 5 s; an
/// unreachable cluster is [`GroupError::Unreachable`].
pub async fn read_group(cfg: &DebeziumConfig, source: &str, topics: &[String]) -> Result<GroupState, GroupError> {
    let (cfg, group, topics) = (cfg.clone(), cfg.group(source), topics.to_vec());
    tokio::task::spawn_blocking(move || read(&cfg, &group, &topics))
        .await
        .map_err(|e| GroupError::Failed(format!("the Kafka client thread failed: {e}")))?
}

fn read(cfg: &DebeziumConfig, group: &str, topics: &[String]) -> Result<GroupState, GroupError> {
    let mut cc = ClientConfig::new();
    for (k, v) in cfg.properties.exposed() {
        cc.set(k, v);
    }
    cc.set("bootstrap.servers", &cfg.brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("allow.auto.create.topics", "false")
        .set("socket.timeout.ms", TIMEOUT.as_millis().to_string());
    let consumer: BaseConsumer<Quiet> = cc.create_with_context(Quiet).map_err(GroupError::Client)?;
    let unreachable = |e: KafkaError| GroupError::Unreachable {
        brokers: cfg.brokers.clone(),
        reason: e.to_string(),
    };

    let mut out = vec![];
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        let md = consumer.fetch_metadata(Some(topic), TIMEOUT).map_err(unreachable)?;
        let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
            out.push(TopicState {
                topic: topic.clone(),
                error: Some("not in the brokers' metadata".into()),
                partitions: vec![],
            });
            continue;
        };
        let error = t.error().map(|e| match RDKafkaErrorCode::from(e) {
            RDKafkaErrorCode::UnknownTopicOrPartition => "topic does not exist".to_string(),
            code => code.to_string(),
        });
        let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
        ids.sort_unstable();
        let mut partitions = vec![];
        for p in ids {
            let (low, end) = consumer.fetch_watermarks(topic, p, TIMEOUT).map_err(unreachable)?;
            tpl.add_partition(topic, p);
            partitions.push(PartitionState {
                partition: p,
                committed: None,
                low,
                end,
                lag: end - low,
            });
        }
        out.push(TopicState {
            topic: topic.clone(),
            error,
            partitions,
        });
    }
    if tpl.count() > 0 {
        let committed = consumer.committed_offsets(tpl, TIMEOUT).map_err(unreachable)?;
        apply_committed(&committed, &mut out)?;
    }
    let members = members(&consumer, group);
    Ok(GroupState { topics: out, members })
}

/// The group's members: librdkafka sends ListGroups and describes the group if listed.
fn members(consumer: &BaseConsumer<Quiet>, group: &str) -> Result<GroupMembers, String> {
    let list = consumer
        .fetch_group_list(Some(group), TIMEOUT)
        .map_err(|e| format!("describing the group failed: {e}"))?;
    let Some(g) = list.groups().iter().find(|g| g.name() == group) else {
        return Ok(GroupMembers::default());
    };
    let members = g
        .members()
        .iter()
        .map(|m| {
            let worker = if m.client_id().is_empty() {
                client_id_of_member_id(m.id()).map(str::to_string)
            } else {
                Some(m.client_id().to_string())
            };
            GroupMember {
                member_id: m.id().to_string(),
                client_id: m.client_id().to_string(),
                host: m.client_host().to_string(),
                worker,
                assignment: m.assignment().filter(|b| !b.is_empty()).map(decode_assignment),
            }
        })
        .collect();
    Ok(GroupMembers {
        state: g.state().to_string(),
        protocol: g.protocol().to_string(),
        members,
    })
}

/// Puts the committed offsets into `out`.
fn apply_committed(committed: &TopicPartitionList, out: &mut [TopicState]) -> Result<(), GroupError> {
    for e in committed.elements() {
        let Some(p) = out
            .iter_mut()
            .filter(|t| t.topic == e.topic())
            .flat_map(|t| t.partitions.iter_mut())
            .find(|p| p.partition == e.partition())
        else {
            continue;
        };
        e.error()
            .map_err(|err| GroupError::Failed(format!("{}[{}]: {err}", e.topic(), e.partition())))?;
        if let Offset::Offset(c) = e.offset() {
            p.committed = Some(c);
            p.lag = (p.end - c).max(0);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A consumer protocol assignment, encoded by hand.
    fn assignment_bytes(version: i16, topics: &[(&str, &[i32])], user_data: Option<&[u8]>) -> Vec<u8> {
        let mut b = version.to_be_bytes().to_vec();
        b.extend((topics.len() as i32).to_be_bytes());
        for (t, ps) in topics {
            b.extend((t.len() as i16).to_be_bytes());
            b.extend(t.as_bytes());
            b.extend((ps.len() as i32).to_be_bytes());
            for p in *ps {
                b.extend(p.to_be_bytes());
            }
        }
        match user_data {
            Some(u) => {
                b.extend((u.len() as i32).to_be_bytes());
                b.extend(u);
            }
            None => b.extend((-1i32).to_be_bytes()),
        }
        b
    }

    #[test]
    fn assignments_decode_from_consumer_protocol_bytes() {
        // What librdkafka's range assignor sends a member holding orders[0,1] and lines[0].
        let bytes = assignment_bytes(1, &[("shop.public.orders", &[0, 1]), ("shop.public.lines", &[0])], None);
        let a = decode_assignment(&bytes).unwrap();
        assert_eq!(
            a,
            MemberAssignment {
                version: 1,
                topics: vec![
                    ("shop.public.orders".into(), vec![0, 1]),
                    ("shop.public.lines".into(), vec![0]),
                ],
                user_data: None,
            }
        );
        assert_eq!(
            a.streams(),
            ["shop.public.orders[0]", "shop.public.orders[1]", "shop.public.lines[0]"]
        );
        // Exact bytes of a one-partition assignment with user data.
        let bytes = [
            0, 0, // version 0
            0, 0, 0, 1, // one topic
            0, 1, b't', // "t"
            0, 0, 0, 1, 0, 0, 0, 3, // partitions [3]
            0, 0, 0, 2, 0xab, 0xcd, // user data
        ];
        let a = decode_assignment(&bytes).unwrap();
        assert_eq!((a.version, a.streams()), (0, vec!["t[3]".to_string()]));
        assert_eq!(a.user_data.as_deref(), Some(&[0xab, 0xcd][..]));
        // Nothing assigned; user data left out; fields of a later version after it.
        assert_eq!(
            decode_assignment(&assignment_bytes(0, &[], None)).unwrap().topics,
            vec![]
        );
        assert_eq!(decode_assignment(&[0, 0, 0, 0, 0, 0]).unwrap().user_data, None);
        let mut later = assignment_bytes(3, &[("t", &[1])], Some(b"u"));
        later.extend([0, 0, 0, 7]);
        assert_eq!(decode_assignment(&later).unwrap().streams(), ["t[1]"]);

        // Not an assignment: errors, not a panic.
        let whole = assignment_bytes(1, &[("orders", &[0, 1])], Some(b"xyz"));
        for cut in 0..whole.len() {
            if cut == 2 + 4 + 2 + 6 + 4 + 8 {
                continue; // ends right after the partitions: user data left out
            }
            assert!(decode_assignment(&whole[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decode_assignment(&[0xff, 0xff, 0, 0, 0, 0])
            .unwrap_err()
            .contains("version"));
        assert!(decode_assignment(&[0, 0, 0, 0, 0, 1, 0xff, 0xff])
            .unwrap_err()
            .contains("length"));
        assert!(decode_assignment(&[0, 0, 0, 0, 0, 1, 0, 1, 0xff, 0, 0, 0, 0])
            .unwrap_err()
            .contains("UTF-8"));
        // A huge count runs out of bytes instead of allocating.
        assert!(decode_assignment(&[0, 0, 0x7f, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn worker_ids_come_from_member_ids() {
        let uuid = "e8bfbb6a-18b9-4fe6-84b8-1807e3d7c6af";
        assert_eq!(
            client_id_of_member_id(&format!("host-aaaa1111-{uuid}")),
            Some("host-aaaa1111")
        );
        assert_eq!(client_id_of_member_id(&format!("w-{uuid}")), Some("w"));
        assert_eq!(client_id_of_member_id(&format!("rdkafka-{uuid}")), Some("rdkafka"));
        for id in [
            format!("-{uuid}"),
            uuid.to_string(),
            format!("host-aaaa1111-{}", &uuid[1..]),
            format!("host-aaaa1111-{}", uuid.replace('-', "_")),
            format!("host-aaaa1111-{}", uuid.replace('e', "g")),
            "host-aaaa1111".into(),
            String::new(),
        ] {
            assert_eq!(client_id_of_member_id(&id), None, "{id}");
        }
    }
}
