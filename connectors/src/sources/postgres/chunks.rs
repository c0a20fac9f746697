//! Keyset reads of a table in chunks, shared by the initial snapshot (when a source's
//! slot is created, the rows that already exist are read, so that the read models start
//! complete: Debezium's `snapshot.mode = initial`), re-reads and `verify`.
//!
//! The slot is created first; its consistent point `cp` is where streaming resumes.
//! Each table is then read in primary-key order in chunks (keyset pagination:
//! `WHERE (pk) > (last) ORDER BY pk LIMIT n`), each chunk one batch, sent as upserts at
//! the position `(cp, 0)`, below every streamed change. The reads are not under one
//! snapshot, and need not be: every change committed after `cp` is streamed afterwards
//! and applied on top (it has a higher position), so the state converges to the
//! database's. Each batch carries its progress (table, last key), which the engine
//! stores with the rows, so an interrupted snapshot resumes after the last stored chunk.
//! Only the final batch carries the checkpoint `cp`.

use super::decode::TableBinding;
use super::values;
use serde_json::Value;
use tokio_postgres::{Client, SimpleQueryMessage};
use viewkeeper_core::model::{Cell, Change, Key, Op, Position};
use viewkeeper_core::source::{SourceBatch, SourceDeadLetter};
use viewkeeper_core::ErrorKind;

/// A chunk that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("{table}: {}", super::connect::error_chain(.source))]
    Sql {
        table: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// The table does not fit the config (a primary-key column it lacks).
    #[error("{0}")]
    Unfit(String),
}

impl ChunkError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ChunkError::Sql { source, .. } => super::errors::kind_of_sql(source),
            ChunkError::Unfit(_) => ErrorKind::Unfit,
        }
    }
}

/// Default rows per chunk, and so per batch sent to the engine.
pub const CHUNK_ROWS: usize = 2_000;

/// Session settings that make text output match the replication session's.
pub const SESSION_SETTINGS: &str =
    "SET datestyle = ISO, YMD; SET timezone = 'UTC'; SET extra_float_digits = 3; SET intervalstyle = iso_8601";

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Turns one snapshot row into an upsert, or a dead letter naming what failed.
pub fn row_change(
    binding: &TableBinding,
    table: &str,
    columns: &[(String, u32)],
    texts: &[Option<&str>],
    position: Position,
) -> Result<Change, SourceDeadLetter> {
    let payload = || {
        let m: serde_json::Map<String, Value> = columns
            .iter()
            .zip(texts)
            .map(|((c, _), t)| (c.clone(), t.map_or(Value::Null, |s| Value::String(s.to_string()))))
            .collect();
        Value::Object(m).to_string()
    };
    let mut cells = Vec::with_capacity(columns.len());
    let mut row = serde_json::Map::new();
    for ((name, oid), text) in columns.iter().zip(texts) {
        let v = match text {
            None => Value::Null,
            Some(t) => values::text_to_json(*oid, t).map_err(|e| SourceDeadLetter {
                position: position.to_string(),
                table: table.to_string(),
                key: String::new(),
                reason: format!("snapshot: column {name}: {e}"),
                payload: payload(),
            })?,
        };
        row.insert(name.clone(), v.clone());
        cells.push((name.clone(), Cell::Value(v)));
    }
    let key = Key::of_row(&row, &binding.primary_key).ok_or_else(|| SourceDeadLetter {
        position: position.to_string(),
        table: table.to_string(),
        key: String::new(),
        reason: format!("snapshot: primary key {:?} is missing or null", binding.primary_key),
        payload: payload(),
    })?;
    Ok(Change {
        table: binding.alias.clone(),
        key,
        old_key: None,
        op: Op::Upsert { cells },
        position,
        commit_time_ms: 0,
        origin: None,
    })
}

/// One table's columns: name, type OID, SQL type (for casting key literals).
pub struct TableColumns {
    pub cols: Vec<(String, u32, String)>,
    /// Index in `cols` of each primary-key column.
    pub pk: Vec<usize>,
}

pub async fn columns(c: &Client, table: &str, binding: &TableBinding) -> Result<TableColumns, ChunkError> {
    let rows = c
        .query(
            "SELECT attname::text, atttypid::oid, format_type(atttypid, atttypmod) FROM pg_attribute
             WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&qualified(table)],
        )
        .await
        .map_err(|source| ChunkError::Sql {
            table: table.to_string(),
            source,
        })?;
    let cols: Vec<(String, u32, String)> = rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, u32>(1), r.get::<_, String>(2)))
        .collect();
    let pk = binding
        .primary_key
        .iter()
        .map(|k| cols.iter().position(|(n, _, _)| n == k))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| {
            ChunkError::Unfit(format!(
                "{table}: primary_key {:?} is not among its columns",
                binding.primary_key
            ))
        })?;
    Ok(TableColumns { cols, pk })
}

fn qualified(table: &str) -> String {
    table.split('.').map(quote_ident).collect::<Vec<_>>().join(".")
}

fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The keyset query for the chunk after `last` (the key's column texts).
pub fn chunk_query(table: &str, tc: &TableColumns, last: Option<&[String]>, limit: usize) -> String {
    let list = tc
        .cols
        .iter()
        .map(|(n, _, _)| quote_ident(n))
        .collect::<Vec<_>>()
        .join(", ");
    let pk = tc
        .pk
        .iter()
        .map(|&i| quote_ident(&tc.cols[i].0))
        .collect::<Vec<_>>()
        .join(", ");
    let filter = match last {
        None => String::new(),
        Some(vals) => {
            let lits = tc
                .pk
                .iter()
                .zip(vals)
                .map(|(&i, v)| format!("{}::{}", literal(v), tc.cols[i].2))
                .collect::<Vec<_>>()
                .join(", ");
            format!(" WHERE ({pk}) > ({lits})")
        }
    };
    format!(
        "SELECT {list} FROM {}{filter} ORDER BY {pk} LIMIT {limit}",
        qualified(table)
    )
}

/// Reads the chunk after `last`: the changes (or dead letters) and the new last key
/// (`None` when the table is exhausted).
#[allow(clippy::type_complexity)]
pub async fn read_chunk(
    c: &Client,
    source: &str,
    (table, binding, tc): (&str, &TableBinding, &TableColumns),
    last: Option<&[String]>,
    position: Position,
    limit: usize,
) -> Result<(SourceBatch, Option<Vec<String>>), ChunkError> {
    let msgs = c
        .simple_query(&chunk_query(table, tc, last, limit))
        .await
        .map_err(|source| ChunkError::Sql {
            table: table.to_string(),
            source,
        })?;
    let mut batch = SourceBatch {
        source: source.to_string(),
        ..Default::default()
    };
    let cols: Vec<(String, u32)> = tc.cols.iter().map(|(n, o, _)| (n.clone(), *o)).collect();
    let mut next = None;
    for m in &msgs {
        if let SimpleQueryMessage::Row(r) = m {
            let texts: Vec<Option<&str>> = (0..cols.len()).map(|i| r.get(i)).collect();
            match row_change(binding, table, &cols, &texts, position) {
                Ok(ch) => batch.changes.push(ch),
                Err(dl) => batch.dead_letters.push(dl),
            }
            next = tc
                .pk
                .iter()
                .map(|&i| texts[i].map(str::to_string))
                .collect::<Option<Vec<_>>>();
        }
    }
    Ok((batch, next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn snapshot_rows_become_upserts_or_dead_letters() {
        let b = TableBinding {
            alias: "products".into(),
            primary_key: vec!["id".into()],
        };
        let cols = vec![
            ("id".to_string(), 20),
            ("price".to_string(), 1700),
            ("tags".to_string(), 1009),
        ];
        let c = row_change(
            &b,
            "public.products",
            &cols,
            &[Some("7"), Some("12.50"), Some("{a,\"b c\"}")],
            Position::new(9, 0),
        )
        .unwrap();
        assert_eq!(c.key.as_str(), "[7]");
        let Op::Upsert { cells } = &c.op else { panic!() };
        assert_eq!(cells[1].1, Cell::Value(json!("12.50")));
        assert_eq!(cells[2].1, Cell::Value(json!(["a", "b c"])));
        let bad = row_change(
            &b,
            "public.products",
            &cols,
            &[Some("7"), Some("x"), None],
            Position::new(9, 0),
        )
        .unwrap_err();
        assert!(bad.reason.contains("column price"), "{}", bad.reason);
        let nokey = row_change(&b, "public.products", &cols, &[None, None, None], Position::new(9, 0)).unwrap_err();
        assert!(nokey.reason.contains("primary key"));
    }
}

#[cfg(test)]
mod keyset_tests {
    use super::*;

    #[test]
    fn chunk_queries_page_by_primary_key() {
        let tc = TableColumns {
            cols: vec![
                ("order_id".into(), 20, "bigint".into()),
                ("line_no".into(), 23, "integer".into()),
                ("qty".into(), 23, "integer".into()),
            ],
            pk: vec![0, 1],
        };
        assert_eq!(
            chunk_query("public.order_items", &tc, None, 10),
            "SELECT \"order_id\", \"line_no\", \"qty\" FROM \"public\".\"order_items\" ORDER BY \"order_id\", \"line_no\" LIMIT 10"
        );
        let q = chunk_query("public.order_items", &tc, Some(&["7".into(), "o'k".into()]), 10);
        assert!(
            q.contains("WHERE (\"order_id\", \"line_no\") > ('7'::bigint, 'o''k'::integer)"),
            "{q}"
        );
    }
}
