//! `viewkeeper status` and `slot list|drop`: positions, slots, sinks, projections, rows and
//! dead letters, beside a running worker (the state store is opened read-only) or without.

use super::{compile, open_read_only, search_client, Client};
use crate::config::{Config, SinkConfig, SourceConfig};
use crate::store::streams::OwnershipRecord;
use anyhow::Context;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use viewkeeper_connectors::sources::debezium::describe::{self, GroupState};
use viewkeeper_connectors::sources::debezium::{Assignment, DebeziumConfig};
use viewkeeper_connectors::sources::postgres::PgConnector;
use viewkeeper_projections::render::Projection;

/// `viewkeeper slot list`: each Postgres source's slot as the server sees it.
pub async fn slot_list(cfg: &Config, as_json: bool) -> anyhow::Result<()> {
    let mut out = serde_json::Map::new();
    for (name, sc) in &cfg.sources {
        if let SourceConfig::Postgres(pg) = sc {
            let mut v = slot_info(pg.url.expose(), &pg.slot).await;
            v["slot"] = json!(pg.slot);
            out.insert(name.clone(), v);
        }
    }
    if as_json {
        println!("{}", Value::Object(out));
    } else {
        for (name, v) in &out {
            println!("{name}: {v}");
        }
    }
    Ok(())
}

/// `viewkeeper slot drop SOURCE --yes`: drops the source's slot (refused while a worker
/// streams from it). The state store keeps its checkpoint, so `run` then stops with
/// the "slot is missing" error until the source is loaded anew (a new data dir and
/// `backfill`): what changed meanwhile is no longer in any slot.
pub async fn slot_drop(cfg: &Config, source: &str, yes: bool) -> anyhow::Result<()> {
    let Some(SourceConfig::Postgres(pg)) = cfg.sources.get(source) else {
        anyhow::bail!("no Postgres source '{source}' in the config");
    };
    if !yes {
        println!(
            "would drop slot {} of source {source} (Postgres then frees the WAL it holds; the changes in it are lost to viewkeeper); add --yes to drop it",
            pg.slot
        );
        return Ok(());
    }
    let (c, _conn) = pg.connect().await.with_context(|| format!("source {source}"))?;
    let active: Option<bool> = c
        .query_opt(
            "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
            &[&pg.slot],
        )
        .await?
        .map(|r| r.get(0));
    match active {
        None => anyhow::bail!("slot {} does not exist", pg.slot),
        Some(true) => anyhow::bail!(
            "slot {} is in use (a worker streams from it): stop the worker first",
            pg.slot
        ),
        Some(false) => {
            c.execute("SELECT pg_drop_replication_slot($1)", &[&pg.slot]).await?;
            println!("dropped slot {} of source {source}", pg.slot);
            Ok(())
        }
    }
}

/// `viewkeeper status`: per source checkpoint and slot (Postgres) or partitions (Debezium:
/// end, committed and applied offsets, lag, the group's members and this worker's own
/// partitions), per table stored rows, dead letters.
pub async fn status(cfg: &Config, data_dir: &Path, as_json: bool) -> anyhow::Result<()> {
    let store = open_read_only(cfg, data_dir)?;
    let (worker, ownership, applied) = (store.stored_worker_id()?, store.ownership()?, store.stream_offsets()?);
    let mut sources = serde_json::Map::new();
    for (name, sc) in &cfg.sources {
        let checkpoint = store.checkpoint(name)?;
        let updated = store.checkpoint_updated_ms(name)?.map(ms_text);
        let mut report = match sc {
            SourceConfig::Postgres(pg) => json!({
                "checkpoint_lsn": checkpoint.map_or_else(|| "0/0".to_string(), |c| c.to_string()),
                "slot": pg.slot,
                "slot_state": slot_info(pg.url.expose(), &pg.slot).await,
            }),
            SourceConfig::Debezium(d) => {
                let mut v = json!({
                    "checkpoint_batch": checkpoint.map(|c| c.value()),
                    "brokers": d.brokers,
                    "assignment": d.assignment.as_str(),
                });
                if d.assignment != Assignment::Shared {
                    v["group_id"] = json!(d.group(name));
                }
                let state = describe::read_group(d, name, &source_topics(cfg, name, d)).await;
                let mine = Mine {
                    worker: worker.as_deref(),
                    ownership: ownership.as_ref().filter(|o| &o.source == name),
                    applied: &applied,
                };
                match state {
                    Ok(state) => kafka_report(&mut v, &state, d.assignment, &mine),
                    Err(e) => v["brokers_error"] = json!(e.to_string()),
                }
                v
            }
        };
        report["checkpoint_updated_at"] = json!(updated);
        sources.insert(name.clone(), report);
    }
    let mut sinks = serde_json::Map::new();
    for (name, sc) in &cfg.sinks {
        sinks.insert(name.clone(), sink_health(cfg, name, sc).await);
    }
    let (compiled, _) = compile(cfg)?;
    let mut projections = serde_json::Map::new();
    for (name, p) in &cfg.projections {
        let last_write = cfg
            .tables
            .iter()
            .filter(|(t, _)| *t == &p.root || p.relations.iter().any(|r| uses(r, t)))
            .filter_map(|(_, t)| store.checkpoint_updated_ms(&t.source).ok().flatten())
            .max()
            .map(ms_text);
        projections.insert(
            name.clone(),
            json!({
                "sink": p.sink,
                "documents": projection_count(cfg, &compiled, name).await,
                "last_write_at": last_write,
            }),
        );
    }
    let report = json!({
        "data_dir": data_dir.display().to_string(),
        "sources": sources,
        "sinks": sinks,
        "projections": projections,
        "rows": store.row_counts()?,
        "dead_letters": store.dead_letter_count()?,
    });
    if as_json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

/// The source's topics (of the tables it feeds), sorted, each once.
fn source_topics(cfg: &Config, name: &str, d: &DebeziumConfig) -> Vec<String> {
    let topics: BTreeSet<String> = super::run::fed_tables(cfg, name)
        .iter()
        .map(|t| d.topic_of(&t.alias, &t.name))
        .collect();
    topics.into_iter().collect()
}

/// What the data dir's state store says of its worker.
struct Mine<'a> {
    worker: Option<&'a str>,
    /// Of this source, when it is the partitioned one.
    ownership: Option<&'a OwnershipRecord>,
    /// `topic[partition]` → the next offset it applied.
    applied: &'a BTreeMap<String, u64>,
}

/// Fills a Debezium source's report: `partitions` (per topic partition the end offset,
/// the group's committed offset, what this data dir applied, the lag and the owner),
/// and for a partitioned source `members` (the group as the brokers describe it),
/// `workers` (worker → its partitions, as far as known) and `worker` (this data dir's).
/// Lag is `end - committed` in a group, `end - applied` for a shared source (which
/// commits nothing), counted from the low watermark when there is neither.
fn kafka_report(v: &mut Value, state: &GroupState, assignment: Assignment, mine: &Mine<'_>) {
    let members = state.members.as_ref().ok();
    // Partition → worker, from the brokers' assignments (real Kafka) and this worker's
    // own record (the brokers' may be missing, e.g. from Tansu).
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    // Worker → its partitions (`None`: the brokers did not say).
    let mut workers: BTreeMap<String, Option<BTreeSet<String>>> = BTreeMap::new();
    for m in members.map_or(&[][..], |g| &g.members[..]) {
        let w = m.worker.clone().unwrap_or_else(|| m.member_id.clone());
        let entry = workers.entry(w.clone()).or_default();
        if let Some(Ok(a)) = &m.assignment {
            for stream in a.streams() {
                owner.insert(stream.clone(), w.clone());
                entry.get_or_insert_with(BTreeSet::new).insert(stream);
            }
        }
    }
    let streams = |p: u32| -> Vec<String> {
        state
            .topics
            .iter()
            .filter(|t| t.partitions.iter().any(|x| x.partition as u32 == p))
            .map(|t| format!("{}[{p}]", t.topic))
            .collect()
    };
    if let (Some(o), Some(w)) = (mine.ownership, mine.worker) {
        let own: BTreeSet<String> = o.owned.iter().flat_map(|p| streams(*p)).collect();
        for s in &own {
            owner.insert(s.clone(), w.to_string());
        }
        workers.insert(w.to_string(), Some(own));
        v["worker"] = json!({
            "id": w,
            "owned_partitions": o.owned,
            "partitions": o.partitions,
            "since": ms_text(o.since_ms),
        });
    }
    let mut partitions = vec![];
    let mut errors = serde_json::Map::new();
    for t in &state.topics {
        if let Some(e) = &t.error {
            errors.insert(t.topic.clone(), json!(e));
        }
        for p in &t.partitions {
            let stream = format!("{}[{}]", t.topic, p.partition);
            let applied = mine.applied.get(&stream).map(|n| *n as i64);
            let from = match assignment {
                Assignment::Shared => applied,
                _ => p.committed,
            };
            let mut row = json!({
                "topic": t.topic,
                "partition": p.partition,
                "end": p.end,
                "committed": p.committed,
                "applied": applied,
                "lag": (p.end - from.unwrap_or(p.low)).max(0),
            });
            if assignment == Assignment::Partitioned {
                row["owner"] = json!(owner.get(&stream));
            }
            partitions.push(row);
        }
    }
    v["partitions"] = Value::Array(partitions);
    if !errors.is_empty() {
        v["topic_errors"] = Value::Object(errors);
    }
    if assignment == Assignment::Shared {
        return;
    }
    v["members"] = match &state.members {
        Ok(g) => json!({
            "state": g.state,
            "protocol": g.protocol,
            "members": g.members.iter().map(|m| json!({
                "worker": m.worker,
                "member_id": m.member_id,
                "host": m.host,
                "partitions": match &m.assignment {
                    Some(Ok(a)) => json!(a.streams()),
                    Some(Err(e)) => json!({"error": e}),
                    None => Value::Null,
                },
            })).collect::<Vec<_>>(),
        }),
        Err(e) => json!({"error": e}),
    };
    if assignment == Assignment::Partitioned {
        let unknown = workers.values().filter(|p| p.is_none()).count();
        if unknown > 0 {
            v["members_note"] = json!(format!(
                "the brokers returned no assignment for {unknown} member(s) (Tansu does not): \
                 their partitions are unknown here; `viewkeeper status` on each worker's data dir shows its own"
            ));
        }
        v["workers"] = json!(workers);
    }
}

fn ms_text(ms: i64) -> String {
    viewkeeper_core::model::format_ms(ms)
}

fn uses(r: &viewkeeper_projections::spec::RelationSpec, table: &str) -> bool {
    r.table == table || r.relations.iter().any(|c| uses(c, table))
}

/// Reachable or not, with the error.
async fn sink_health(cfg: &Config, name: &str, sc: &SinkConfig) -> Value {
    let r: anyhow::Result<()> = async {
        if let Client::Search(s) = Client::connect(cfg, name, sc).await? {
            s.alias_target("_viewkeeper_probe").await?;
        }
        Ok(())
    }
    .await;
    match r {
        Ok(()) => json!({"reachable": true}),
        Err(e) => json!({"reachable": false, "error": e.to_string()}),
    }
}

/// Documents behind the alias, or cache entries of the projection (keys of its template
/// that are no other projection's: templates may overlap).
async fn projection_count(cfg: &Config, compiled: &[Projection], name: &str) -> Value {
    let r: anyhow::Result<u64> = async {
        let proj = compiled.iter().find(|c| c.name == name).context("projection")?;
        let p = &proj.spec;
        match &cfg.sinks[&p.sink] {
            SinkConfig::Redis(r) => {
                let s = viewkeeper_connectors::sinks::redis::RedisSink::connect(&p.sink, r).await?;
                let others: Vec<&Projection> = compiled.iter().filter(|o| o.spec.sink == p.sink).collect();
                let keys = s.scan(&proj.id_pattern()).await?;
                Ok(keys.iter().filter(|k| super::verify::owns(proj, &others, k)).count() as u64)
            }
            SinkConfig::Elasticsearch(e) => {
                let alias = p.index.as_ref().map(|i| i.alias.clone()).unwrap_or_default();
                Ok(search_client(cfg, &p.sink, e)?.count(&alias).await?)
            }
            SinkConfig::Blackhole(_) => anyhow::bail!("a blackhole sink keeps nothing to count"),
        }
    }
    .await;
    match r {
        Ok(n) => json!(n),
        Err(e) => json!({"error": e.to_string()}),
    }
}

/// The slot as Postgres sees it: active, confirmed flush, WAL it retains.
async fn slot_info(url: &str, slot: &str) -> Value {
    let conn = match PgConnector::parse(url) {
        Ok(c) => c.connect().await.map_err(|e| e.to_string()),
        Err(e) => Err(format!("bad connection string: {e}")),
    };
    let (client, _conn) = match conn {
        Ok(c) => c,
        Err(e) => return json!({ "error": e }),
    };
    match client
        .query_opt(
            "SELECT active, confirmed_flush_lsn::text, coalesce(wal_status, ''),
                    (pg_current_wal_lsn() - restart_lsn)::bigint, (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
    {
        Ok(Some(r)) => json!({
            "active": r.get::<_, bool>(0),
            "confirmed_flush_lsn": r.get::<_, Option<String>>(1),
            "wal_status": r.get::<_, String>(2),
            "retained_wal_bytes": r.get::<_, Option<i64>>(3),
            "lag_bytes": r.get::<_, Option<i64>>(4),
        }),
        Ok(None) => json!({ "error": "slot does not exist" }),
        Err(e) => json!({ "error": e.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use describe::{GroupMember, GroupMembers, MemberAssignment, PartitionState, TopicState};

    fn topic(name: &str, parts: &[(i32, Option<i64>, i64)]) -> TopicState {
        TopicState {
            topic: name.into(),
            error: None,
            partitions: parts
                .iter()
                .map(|&(partition, committed, end)| PartitionState {
                    partition,
                    committed,
                    low: 0,
                    end,
                    lag: end - committed.unwrap_or(0),
                })
                .collect(),
        }
    }

    fn member(worker: &str, assigned: Option<&[(&str, &[i32])]>) -> GroupMember {
        GroupMember {
            member_id: format!("{worker}-e8bfbb6a-18b9-4fe6-84b8-1807e3d7c6af"),
            client_id: String::new(),
            host: String::new(),
            worker: Some(worker.into()),
            assignment: assigned.map(|ts| {
                Ok(MemberAssignment {
                    version: 1,
                    topics: ts.iter().map(|(t, ps)| (t.to_string(), ps.to_vec())).collect(),
                    user_data: None,
                })
            }),
        }
    }

    fn state(members: Vec<GroupMember>) -> GroupState {
        GroupState {
            topics: vec![
                topic("o", &[(0, Some(5), 7), (1, None, 3)]),
                topic("i", &[(0, Some(2), 2), (1, Some(1), 4)]),
            ],
            members: Ok(GroupMembers {
                state: "Stable".into(),
                protocol: String::new(),
                members,
            }),
        }
    }

    fn record(owned: &[u32]) -> OwnershipRecord {
        OwnershipRecord {
            source: "orders".into(),
            partitions: 2,
            owned: owned.to_vec(),
            governed: vec![],
            since_ms: 0,
        }
    }

    fn applied(streams: &[(&str, u64)]) -> BTreeMap<String, u64> {
        streams.iter().map(|(s, n)| (s.to_string(), *n)).collect()
    }

    fn mine<'a>(record: &'a OwnershipRecord, applied: &'a BTreeMap<String, u64>) -> Mine<'a> {
        Mine {
            worker: Some("w1"),
            ownership: Some(record),
            applied,
        }
    }

    fn column(v: &Value, field: &str) -> Vec<Value> {
        v["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[field].clone())
            .collect()
    }

    #[test]
    fn a_partitioned_source_reports_owners_from_the_brokers_and_from_its_own_store() {
        // The brokers name w2's partitions (real Kafka); w1's (this data dir) come from
        // its store though the brokers returned no assignment for it (Tansu), w3's are
        // not known.
        let s = state(vec![
            member("w1", None),
            member("w2", Some(&[("o", &[1]), ("i", &[1])])),
            member("w3", None),
        ]);
        let mut v = json!({});
        let (rec, done) = (record(&[0]), applied(&[("o[0]", 6)]));
        kafka_report(&mut v, &s, Assignment::Partitioned, &mine(&rec, &done));
        assert_eq!(
            column(&v, "owner"),
            [json!("w1"), json!("w2"), json!("w1"), json!("w2")]
        );
        // Lag from the group's committed offset, from the low watermark when none.
        assert_eq!(column(&v, "lag"), [json!(2), json!(3), json!(0), json!(3)]);
        assert_eq!(column(&v, "applied"), [json!(6), Value::Null, Value::Null, Value::Null]);
        assert_eq!(
            v["workers"],
            json!({"w1": ["i[0]", "o[0]"], "w2": ["i[1]", "o[1]"], "w3": null})
        );
        assert_eq!(v["worker"]["owned_partitions"], json!([0]));
        assert_eq!(v["members"]["members"][0]["partitions"], Value::Null);
        assert!(v["members_note"].as_str().unwrap().contains("1 member"), "{v}");

        // Every assignment known (real Kafka): no note.
        let s = state(vec![
            member("w1", Some(&[("o", &[1]), ("i", &[1])])),
            member("w2", Some(&[("o", &[0]), ("i", &[0])])),
        ]);
        let mut v = json!({});
        let (rec, done) = (record(&[1]), applied(&[]));
        kafka_report(&mut v, &s, Assignment::Partitioned, &mine(&rec, &done));
        assert_eq!(
            column(&v, "owner"),
            [json!("w2"), json!("w1"), json!("w2"), json!("w1")]
        );
        assert!(v.get("members_note").is_none(), "{v}");
    }

    #[test]
    fn a_shared_source_lags_from_what_this_worker_applied() {
        let s = state(vec![]);
        let mut v = json!({});
        let (rec, done) = (record(&[]), applied(&[("o[0]", 7), ("o[1]", 1), ("i[1]", 4)]));
        let m = Mine {
            ownership: None,
            ..mine(&rec, &done)
        };
        kafka_report(&mut v, &s, Assignment::Shared, &m);
        assert_eq!(column(&v, "lag"), [json!(0), json!(2), json!(2), json!(0)]);
        for absent in ["owner", "members", "workers", "worker"] {
            assert!(column(&v, absent).iter().all(Value::is_null) && v.get(absent).is_none());
        }
    }
}
