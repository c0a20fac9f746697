//! The `_meta` field of a projection with `meta = true`: how fresh a document is.
//!
//! The engine keeps, per source, how far the state store has applied it ([`Applied`]):
//! the checkpoint LSN of the last batch (Postgres), the offset of the last change per
//! partition (Kafka), and the newest commit time. A document rendered now reflects every
//! change of its sources up to those positions, so its `_meta` says so:
//!
//! ```json
//! {"synced_at": "2026-01-02T10:00:01.250Z", "commit_ts": "2026-01-02T10:00:01.101Z",
//!  "sources": {"ordering": {"lsn": "0/16B3790", "commit_ts": "2026-01-02T10:00:01.101Z"},
//!              "catalog": {"lsn": "0/1A20F08"}}}
//! ```
//!
//! (a Kafka source: `{"partitions": [{"topic": …, "partition": 0, "offset": 41}], …}`).
//! The positions are lower bounds: a later change of a source that does not touch the
//! document leaves its `_meta` as it was. `_meta` is no content: versions, verify and the
//! skip of unchanged columns ignore it.

use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use viewkeeper_core::model::format_ms;
use viewkeeper_core::source::SourceBatch;
use viewkeeper_core::Checkpoint;
use viewkeeper_projections::render::Projection;

/// The field's name in documents and cache entries.
pub const META_FIELD: &str = "_meta";

/// How far the state store has applied one source.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Applied {
    /// Postgres: the checkpoint of the last batch applied.
    pub lsn: Option<u64>,
    /// Kafka: `topic[partition]` → offset of the last change applied.
    pub streams: BTreeMap<String, u64>,
    /// Commit time of the newest change applied (ms since the epoch; 0: unknown).
    pub commit_ms: i64,
}

/// Raises the marks of `b`'s source by what `b` applies.
pub(super) fn record(marks: &mut BTreeMap<String, Applied>, b: &SourceBatch) {
    let m = marks.entry(b.source.clone()).or_default();
    if let Some(Checkpoint::Lsn(v)) = b.checkpoint {
        m.lsn = Some(m.lsn.map_or(v, |l| l.max(v)));
    }
    for c in &b.changes {
        m.commit_ms = m.commit_ms.max(c.commit_time_ms);
        if let Some(o) = &c.origin {
            let e = m.streams.entry(o.stream.clone()).or_insert(o.offset);
            *e = (*e).max(o.offset);
        }
    }
}

/// `topic[partition]` → `(topic, partition)`.
fn split_stream(s: &str) -> Option<(&str, i64)> {
    let (topic, rest) = s.rsplit_once('[')?;
    Some((topic, rest.strip_suffix(']')?.parse().ok()?))
}

/// The `_meta` value of `p`'s documents rendered now (`None`: `meta` is off).
pub fn meta_of(p: &Projection, marks: &BTreeMap<String, Applied>, now_ms: i64) -> Option<Value> {
    if !p.spec.meta {
        return None;
    }
    let mut sources = Map::new();
    let mut newest = 0i64;
    for s in p.sources() {
        let mut o = Map::new();
        if let Some(m) = marks.get(s) {
            if let Some(l) = m.lsn {
                o.insert("lsn".into(), json!(Checkpoint::Lsn(l).to_string()));
            }
            if !m.streams.is_empty() {
                let parts: Vec<Value> = m
                    .streams
                    .iter()
                    .filter_map(|(st, off)| {
                        split_stream(st).map(|(t, p)| json!({"topic": t, "partition": p, "offset": off}))
                    })
                    .collect();
                o.insert("partitions".into(), Value::Array(parts));
            }
            if m.commit_ms > 0 {
                o.insert("commit_ts".into(), json!(format_ms(m.commit_ms)));
                newest = newest.max(m.commit_ms);
            }
        }
        sources.insert(s.to_string(), Value::Object(o));
    }
    let mut meta = Map::new();
    meta.insert("synced_at".into(), json!(format_ms(now_ms)));
    if newest > 0 {
        meta.insert("commit_ts".into(), json!(format_ms(newest)));
    }
    meta.insert("sources".into(), Value::Object(sources));
    Some(Value::Object(meta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use viewkeeper_core::model::{Change, Key, Op, Origin, Position};

    fn change(ms: i64, origin: Option<Origin>) -> Change {
        Change {
            table: "products".into(),
            key: Key::from_canonical("[1]".into()),
            old_key: None,
            op: Op::Delete,
            position: Position::new(1, 0),
            commit_time_ms: ms,
            origin,
        }
    }

    #[test]
    fn marks_only_rise_and_render_per_source() {
        let mut marks = BTreeMap::new();
        record(
            &mut marks,
            &SourceBatch {
                source: "catalog".into(),
                changes: vec![change(1_700_000_000_000, None)],
                checkpoint: Some(Checkpoint::Lsn(0x1_0000_0010)),
                ..Default::default()
            },
        );
        record(
            &mut marks,
            &SourceBatch {
                source: "catalog".into(),
                changes: vec![change(5, None)],
                checkpoint: Some(Checkpoint::Lsn(0x20)),
                ..Default::default()
            },
        );
        record(
            &mut marks,
            &SourceBatch {
                source: "dbz".into(),
                changes: vec![change(
                    0,
                    Some(Origin {
                        stream: "a.public.t[2]".into(),
                        offset: 41,
                    }),
                )],
                checkpoint: Some(Checkpoint::Batch(7)),
                ..Default::default()
            },
        );
        assert_eq!(marks["catalog"].lsn, Some(0x1_0000_0010));
        assert_eq!(marks["catalog"].commit_ms, 1_700_000_000_000);
        assert_eq!(marks["dbz"].lsn, None);
        assert_eq!(split_stream("a.public.t[2]"), Some(("a.public.t", 2)));
        assert_eq!(split_stream("nope"), None);
    }
}
