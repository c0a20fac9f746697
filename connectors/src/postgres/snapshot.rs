//! Initial snapshot: when a source's slot is created, the rows that already exist are
//! read under the slot's exported snapshot, so that streaming from the slot continues
//! exactly where the snapshot ends: nothing lost, nothing doubled in effect (what
//! Debezium calls `snapshot.mode = initial`).
//!
//! Rows are read in text format through a cursor (bounded memory), converted with the
//! same rules as pgoutput values, and sent as upserts at the position
//! `(consistent point, 0)`, below every streamed change. Every snapshot batch carries the
//! zero checkpoint except the last, which carries the consistent point: a crash in the
//! middle leaves no checkpoint, and the next start takes a fresh snapshot.

use super::decode::TableBinding;
use super::values;
use crate::source::{SourceBatch, SourceDeadLetter};
use serde_json::Value;
use std::collections::HashMap;
use tokio_postgres::{Client, SimpleQueryMessage};
use viewkeeper_projections::model::{Cell, Change, Key, Op, Position};

/// Rows per FETCH, and so per batch sent to the engine.
pub const FETCH_ROWS: usize = 2_000;

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
                position,
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
        position,
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
    })
}

/// Reads every configured table under `snapshot` and hands the rows to `send` in
/// batches of [`FETCH_ROWS`]. Returns the number of rows read.
pub async fn read_tables<F, Fut>(
    c: &Client,
    source: &str,
    snapshot: &str,
    tables: &HashMap<String, TableBinding>,
    position: Position,
    mut send: F,
) -> Result<u64, tokio_postgres::Error>
where
    F: FnMut(SourceBatch) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    c.batch_execute(SESSION_SETTINGS).await?;
    c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    c.batch_execute(&format!("SET TRANSACTION SNAPSHOT '{}'", snapshot.replace('\'', "''")))
        .await?;
    let mut total = 0;
    let mut names: Vec<&String> = tables.keys().collect();
    names.sort();
    for table in names {
        let binding = &tables[table];
        let cols: Vec<(String, u32)> = c
            .query(
                "SELECT attname::text, atttypid::oid FROM pg_attribute
                 WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                &[&table.split('.').map(quote_ident).collect::<Vec<_>>().join(".")],
            )
            .await?
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, u32>(1)))
            .collect();
        let list = cols.iter().map(|(n, _)| quote_ident(n)).collect::<Vec<_>>().join(", ");
        let qualified = table.split('.').map(quote_ident).collect::<Vec<_>>().join(".");
        c.batch_execute(&format!(
            "DECLARE vk_snapshot NO SCROLL CURSOR FOR SELECT {list} FROM {qualified}"
        ))
        .await?;
        loop {
            let msgs = c.simple_query(&format!("FETCH {FETCH_ROWS} FROM vk_snapshot")).await?;
            let mut batch = SourceBatch {
                source: source.to_string(),
                ..Default::default()
            };
            for m in &msgs {
                if let SimpleQueryMessage::Row(r) = m {
                    let texts: Vec<Option<&str>> = (0..cols.len()).map(|i| r.get(i)).collect();
                    match row_change(binding, table, &cols, &texts, position) {
                        Ok(ch) => batch.changes.push(ch),
                        Err(dl) => batch.dead_letters.push(dl),
                    }
                }
            }
            let n = batch.changes.len() + batch.dead_letters.len();
            total += n as u64;
            if n == 0 {
                break;
            }
            if !send(batch).await {
                return Ok(total);
            }
        }
        c.batch_execute("CLOSE vk_snapshot").await?;
    }
    c.batch_execute("COMMIT").await?;
    Ok(total)
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
