//! The ground truth: every table the projections read, from the source databases (read
//! like the initial snapshot, so values convert identically) plus what only the state
//! store knows (tombstones of deleted rows, decommission times; Debezium tables: the
//! store's rows), and what it renders.

use crate::config::{Config, SourceConfig};
use crate::store::{Catalog, Store};
use anyhow::Context;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use viewkeeper_connectors::sources::postgres::chunks;
use viewkeeper_connectors::sources::postgres::decode::TableBinding;
use viewkeeper_core::model::{Key, Op, Row, StoredRow, Tombstone, TombstoneKind};
use viewkeeper_projections::render::{LookupError, Projection, RowLookup};

/// Rows by table, with the join indexes the projections look up by.
#[derive(Default)]
pub(super) struct Truth {
    rows: HashMap<String, BTreeMap<Key, StoredRow>>,
    /// (table, columns) → JSON text of the values → keys.
    indexes: HashMap<(String, Vec<String>), HashMap<String, Vec<Key>>>,
}

impl Truth {
    pub(super) fn index(&mut self, table: &str, cols: &[String]) {
        let mut ix: HashMap<String, Vec<Key>> = HashMap::new();
        for (k, r) in self.rows.get(table).into_iter().flatten() {
            let vals: Vec<&Value> = cols.iter().map(|c| r.image.get(c).unwrap_or(&Value::Null)).collect();
            ix.entry(serde_json::to_string(&vals).expect("JSON"))
                .or_default()
                .push(k.clone());
        }
        self.indexes.insert((table.to_string(), cols.to_vec()), ix);
    }
}

impl RowLookup for Truth {
    fn get(&self, table: &str, key: &Key) -> Result<Option<StoredRow>, LookupError> {
        Ok(self.rows.get(table).and_then(|t| t.get(key)).cloned())
    }

    fn find(&self, table: &str, columns: &[String], values: &[Value]) -> Result<Vec<StoredRow>, LookupError> {
        let Some(rows) = self.rows.get(table) else {
            return Ok(vec![]);
        };
        match self.indexes.get(&(table.to_string(), columns.to_vec())) {
            Some(ix) => Ok(ix
                .get(&serde_json::to_string(&values.iter().collect::<Vec<_>>()).expect("JSON"))
                .into_iter()
                .flatten()
                .filter_map(|k| rows.get(k).cloned())
                .collect()),
            None => Ok(rows
                .values()
                .filter(|r| columns.iter().zip(values).all(|(c, v)| r.image.get(c) == Some(v)))
                .cloned()
                .collect()),
        }
    }
}

/// One expected entry: rendered body (`None`: no entry should exist), tombstoned, member.
pub(super) struct Expected {
    pub(super) body: Option<Row>,
    pub(super) tombstoned: bool,
    pub(super) member: String,
    pub(super) root: String,
}

fn member_of(key: &Key) -> String {
    key.values()
        .iter()
        .map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect::<Vec<_>>()
        .join(":")
}

/// Reads the truth: every table the projections read.
pub(super) async fn load_truth(
    cfg: &Config,
    catalog: &Catalog,
    store: &Store,
    tables: &BTreeSet<String>,
) -> anyhow::Result<Truth> {
    let mut truth = Truth::default();
    for alias in tables {
        let spec = &catalog.tables[alias];
        let needed = catalog.needed_columns.get(alias).cloned().unwrap_or_default();
        let stored: BTreeMap<Key, StoredRow> = store
            .keys(alias)?
            .into_iter()
            .filter_map(|k| RowLookup::get(store, alias, &k).ok().flatten().map(|r| (k, r)))
            .collect();
        let mut rows = BTreeMap::new();
        match &cfg.sources[&spec.source] {
            SourceConfig::Debezium(_) => rows = stored,
            SourceConfig::Postgres(pg) => {
                let (c, task) = pg.connect().await.with_context(|| format!("source {}", spec.source))?;
                c.batch_execute(chunks::SESSION_SETTINGS).await?;
                let binding = TableBinding {
                    alias: alias.clone(),
                    primary_key: spec.primary_key.clone(),
                };
                let tc = chunks::columns(&c, &spec.name, &binding).await?;
                let mut last: Option<Vec<String>> = None;
                loop {
                    let (batch, next) = chunks::read_chunk(
                        &c,
                        &spec.source,
                        (&spec.name, &binding, &tc),
                        last.as_deref(),
                        Default::default(),
                        10_000,
                    )
                    .await?;
                    for ch in batch.changes {
                        let Op::Upsert { cells } = ch.op else { continue };
                        let image: Row = cells
                            .into_iter()
                            .filter(|(col, _)| needed.contains(col))
                            .filter_map(|(col, cell)| match cell {
                                viewkeeper_core::model::Cell::Value(v) => Some((col, v)),
                                viewkeeper_core::model::Cell::Unchanged => None,
                            })
                            .collect();
                        let old = stored.get(&ch.key).and_then(|r| r.tombstone.clone());
                        let tombstone = match &spec.decommissioned {
                            Some(rule) if rule.matches(&image) => Some(Tombstone {
                                kind: TombstoneKind::Decommissioned,
                                at_ms: old
                                    .filter(|t| t.kind == TombstoneKind::Decommissioned)
                                    .and_then(|t| t.at_ms),
                            }),
                            _ => None,
                        };
                        rows.insert(
                            ch.key.clone(),
                            StoredRow {
                                key: ch.key,
                                image,
                                tombstone,
                            },
                        );
                    }
                    match next {
                        Some(n) => last = Some(n),
                        None => break,
                    }
                }
                drop(c);
                let _ = task.await;
                // Deleted in the source: only the state store remembers them.
                for (k, r) in stored {
                    if !rows.contains_key(&k) && r.tombstone.as_ref().is_some_and(|t| t.kind == TombstoneKind::Deleted)
                    {
                        rows.insert(k, r);
                    }
                }
            }
        }
        truth.rows.insert(alias.clone(), rows);
    }
    Ok(truth)
}

/// What the truth renders for projection `p`, by sink id.
pub(super) fn expected(p: &Projection, truth: &Truth) -> anyhow::Result<BTreeMap<String, Expected>> {
    let mut out = BTreeMap::new();
    for key in truth.rows.get(p.root_table()).into_iter().flatten().map(|(k, _)| k) {
        if let Some(r) = p.render(key, truth).map_err(|e| anyhow::anyhow!("{}: {e}", p.name))? {
            out.insert(
                r.id,
                Expected {
                    body: r.body,
                    tombstoned: r.tombstoned,
                    member: member_of(key),
                    root: key.as_str().to_string(),
                },
            );
        }
    }
    Ok(out)
}

/// Ids of up to `n` live documents of `p`, rendered from the state store (rows that
/// cannot render are skipped): a sample to check that a sink still holds what it was sent.
pub fn sample_ids(store: &Store, p: &Projection, n: usize) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for k in store.live_keys(p.root_table(), n)? {
        if let Ok(Some(r)) = p.render(&k, store) {
            if r.body.is_some() && !r.tombstoned {
                out.push(r.id);
            }
        }
    }
    Ok(out)
}
