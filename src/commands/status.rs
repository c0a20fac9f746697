//! `viewkeeper status` and `slot list|drop`: positions, slots, sinks, projections, rows and
//! dead letters, beside a running worker (the state store is opened read-only) or without.

use super::{compile, open_read_only, search_client, Client};
use crate::config::{Config, SinkConfig, SourceConfig};
use anyhow::Context;
use serde_json::{json, Value};
use std::path::Path;
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

/// `viewkeeper status`: per source checkpoint and slot, per table stored rows, dead letters.
pub async fn status(cfg: &Config, data_dir: &Path, as_json: bool) -> anyhow::Result<()> {
    let store = open_read_only(cfg, data_dir)?;
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
            // Offsets live in the consumer group (kafka-consumer-groups --describe).
            SourceConfig::Debezium(d) => json!({
                "checkpoint_batch": checkpoint.map(|c| c.value()),
                "brokers": d.brokers,
                "group_id": d.group(name),
            }),
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
