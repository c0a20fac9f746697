//! Turns decoded pgoutput messages of one transaction into [`Change`]s: maps relation
//! ids to configured tables, converts text values, builds keys, and reports what
//! cannot be converted as dead letters instead of dropping it. Pure: no I/O.
//!
//! Positions: `(final LSN of the transaction, ordinal of the change in it)`, so a
//! replayed transaction yields the same positions and is a no-op in the state store.

use super::pgoutput::{OldTuple, PgOutputMessage, RelationBody, TupleData, TupleValue};
use super::values;
use serde_json::Value;
use std::collections::HashMap;
use thiserror::Error;
use viewkeeper_core::model::{Cell, Change, Key, Op, Position};
use viewkeeper_core::source::SourceDeadLetter;

/// A configured table of this source: its alias and primary key.
#[derive(Clone, Debug)]
pub struct TableBinding {
    pub alias: String,
    pub primary_key: Vec<String>,
}

struct Relation {
    /// `None` for a published table no projection reads.
    binding: Option<TableBinding>,
    body: RelationBody,
    /// Index of each primary-key column in the relation's columns.
    pk_idx: Option<Vec<usize>>,
}

/// Per-connection decoding state (relations are re-sent on every new connection).
pub struct TxDecoder {
    tables: HashMap<String, TableBinding>,
    relations: HashMap<u32, Relation>,
    /// Problems that are not about one row (unknown types, key mismatches), to log.
    pub warnings: Vec<String>,
}

/// What one transaction-scoped message produced.
#[derive(Debug, Default, PartialEq)]
pub struct Decoded {
    pub changes: Vec<Change>,
    pub dead_letters: Vec<SourceDeadLetter>,
}

impl TxDecoder {
    /// `tables`: `schema.table` → binding.
    pub fn new(tables: HashMap<String, TableBinding>) -> Self {
        TxDecoder {
            tables,
            relations: HashMap::new(),
            warnings: Vec::new(),
        }
    }

    /// Handles one message inside a transaction. `ordinal` is advanced for each change.
    pub fn on_message(
        &mut self,
        msg: PgOutputMessage,
        final_lsn: u64,
        commit_time_ms: i64,
        ordinal: &mut u64,
    ) -> Decoded {
        let mut out = Decoded::default();
        let mut pos = || {
            *ordinal += 1;
            Position::new(final_lsn, *ordinal)
        };
        match msg {
            PgOutputMessage::Relation(body) => self.on_relation(body),
            PgOutputMessage::Insert { relation_id, new } => {
                let p = pos();
                self.row_change(relation_id, None, Some(&new), p, commit_time_ms, &mut out);
            }
            PgOutputMessage::Update { relation_id, old, new } => {
                let p = pos();
                self.row_change(relation_id, old.as_ref(), Some(&new), p, commit_time_ms, &mut out);
            }
            PgOutputMessage::Delete { relation_id, old } => {
                let p = pos();
                self.row_change(relation_id, Some(&old), None, p, commit_time_ms, &mut out);
            }
            PgOutputMessage::Truncate { relation_ids, .. } => {
                for id in relation_ids {
                    let p = pos();
                    match self.relations.get(&id) {
                        Some(Relation { binding: Some(b), .. }) => out.changes.push(Change {
                            table: b.alias.clone(),
                            key: Key::from_values(&[]),
                            old_key: None,
                            op: Op::Truncate,
                            position: p,
                            commit_time_ms,
                            origin: None,
                        }),
                        Some(_) => {}
                        None => out.dead_letters.push(SourceDeadLetter {
                            position: p.to_string(),
                            table: format!("relation {id}"),
                            key: String::new(),
                            reason: "TRUNCATE of a relation that was never described (no Relation message)".into(),
                            payload: String::new(),
                        }),
                    }
                }
            }
            // Begin/Commit/Message are handled by the stream; Type and Origin carry
            // nothing a projection needs.
            PgOutputMessage::Begin { .. }
            | PgOutputMessage::Commit { .. }
            | PgOutputMessage::Message { .. }
            | PgOutputMessage::Type { .. }
            | PgOutputMessage::Origin { .. } => {}
        }
        out
    }

    fn on_relation(&mut self, body: RelationBody) {
        let qualified = format!(
            "{}.{}",
            if body.namespace.is_empty() {
                "pg_catalog"
            } else {
                &body.namespace
            },
            body.name
        );
        let binding = self.tables.get(&qualified).cloned();
        let mut pk_idx = None;
        if let Some(b) = &binding {
            let idx: Option<Vec<usize>> = b
                .primary_key
                .iter()
                .map(|c| body.columns.iter().position(|rc| &rc.name == c))
                .collect();
            if idx.is_none() {
                self.warnings.push(format!(
                    "table {qualified}: primary_key {:?} of [tables.{}] is not among its columns {:?}; its changes go to the dead-letter store until the config names the key columns",
                    b.primary_key,
                    b.alias,
                    body.columns.iter().map(|c| &c.name).collect::<Vec<_>>()
                ));
            }
            pk_idx = idx;
            for c in &body.columns {
                if !values::is_known(c.type_oid) {
                    self.warnings.push(format!(
                        "table {qualified} column {}: type oid {} has no specific conversion; values are kept as text",
                        c.name, c.type_oid
                    ));
                }
            }
        }
        self.relations.insert(body.id, Relation { binding, body, pk_idx });
    }

    fn row_change(
        &self,
        relation_id: u32,
        old: Option<&OldTuple>,
        new: Option<&TupleData>,
        position: Position,
        commit_time_ms: i64,
        out: &mut Decoded,
    ) {
        let dead = |table: String, key: String, reason: String, payload: String| SourceDeadLetter {
            position: position.to_string(),
            table,
            key,
            reason,
            payload,
        };
        let Some(rel) = self.relations.get(&relation_id) else {
            out.dead_letters.push(dead(
                format!("relation {relation_id}"),
                String::new(),
                "row change for a relation that was never described (no Relation message)".into(),
                String::new(),
            ));
            return;
        };
        let Some(binding) = &rel.binding else { return };
        let qualified = format!("{}.{}", rel.body.namespace, rel.body.name);
        let payload = || raw_payload(&rel.body, old, new);
        let Some(pk_idx) = &rel.pk_idx else {
            out.dead_letters.push(dead(
                qualified,
                String::new(),
                format!(
                    "primary_key {:?} of [tables.{}] is not among the table's columns",
                    binding.primary_key, binding.alias
                ),
                payload(),
            ));
            return;
        };
        let key_of = |t: &TupleData| -> Result<Key, KeyError> {
            let mut vals = Vec::with_capacity(pk_idx.len());
            for &i in pk_idx {
                let col = &rel.body.columns[i];
                match t.0.get(i) {
                    Some(TupleValue::Text(b)) => {
                        let s = std::str::from_utf8(b).map_err(|error| KeyError::Utf8 {
                            column: col.name.clone(),
                            error,
                        })?;
                        vals.push(values::text_to_json(col.type_oid, s).map_err(|error| KeyError::Value {
                            column: col.name.clone(),
                            error,
                        })?);
                    }
                    other => {
                        return Err(KeyError::NotAValue {
                            column: col.name.clone(),
                            kind: other.map(kind_name),
                        })
                    }
                }
            }
            Ok(Key::from_values(&vals))
        };
        let old_key = match old.map(|o| key_of(o.tuple())) {
            Some(Err(e)) => {
                out.dead_letters
                    .push(dead(qualified, String::new(), format!("old row: {e}"), payload()));
                return;
            }
            Some(Ok(k)) => Some(k),
            None => None,
        };
        let Some(new) = new else {
            // Delete.
            if let Some(key) = old_key {
                out.changes.push(Change {
                    table: binding.alias.clone(),
                    key,
                    old_key: None,
                    op: Op::Delete,
                    position,
                    commit_time_ms,
                    origin: None,
                });
            }
            return;
        };
        let key = match key_of(new) {
            Ok(k) => k,
            Err(e) => {
                out.dead_letters
                    .push(dead(qualified, String::new(), e.to_string(), payload()));
                return;
            }
        };
        let mut cells = Vec::with_capacity(rel.body.columns.len());
        for (col, v) in rel.body.columns.iter().zip(&new.0) {
            let cell = match v {
                TupleValue::Null => Cell::Value(Value::Null),
                TupleValue::UnchangedToast => Cell::Unchanged,
                TupleValue::Text(b) => match std::str::from_utf8(b)
                    .map_err(|e| e.to_string())
                    .and_then(|s| values::text_to_json(col.type_oid, s).map_err(|e| e.to_string()))
                {
                    Ok(v) => Cell::Value(v),
                    Err(e) => {
                        out.dead_letters.push(dead(
                            qualified,
                            key.to_string(),
                            format!("column {}: {e}", col.name),
                            payload(),
                        ));
                        return;
                    }
                },
                TupleValue::Binary(_) => {
                    out.dead_letters.push(dead(
                        qualified,
                        key.to_string(),
                        format!(
                            "column {}: binary format value; viewkeeper reads pgoutput text format",
                            col.name
                        ),
                        payload(),
                    ));
                    return;
                }
            };
            cells.push((col.name.clone(), cell));
        }
        if new.0.len() != rel.body.columns.len() {
            out.dead_letters.push(dead(
                qualified,
                key.to_string(),
                format!(
                    "tuple has {} columns, relation has {}",
                    new.0.len(),
                    rel.body.columns.len()
                ),
                payload(),
            ));
            return;
        }
        out.changes.push(Change {
            table: binding.alias.clone(),
            old_key: old_key.filter(|k| *k != key),
            key,
            op: Op::Upsert { cells },
            position,
            commit_time_ms,
            origin: None,
        });
    }
}

/// Why a row's key could not be built.
#[derive(Debug, Error)]
enum KeyError {
    #[error("key column {column}: {error}")]
    Utf8 { column: String, error: std::str::Utf8Error },
    #[error("key column {column}: {error}")]
    Value { column: String, error: values::ValueError },
    #[error("key column {column} is {kind:?}, not a value")]
    NotAValue { column: String, kind: Option<&'static str> },
}

fn kind_name(v: &TupleValue) -> &'static str {
    match v {
        TupleValue::Null => "null",
        TupleValue::UnchangedToast => "unchanged TOAST",
        TupleValue::Text(_) => "text",
        TupleValue::Binary(_) => "binary",
    }
}

/// The raw column texts of a change, as JSON, for the dead-letter store.
fn raw_payload(rel: &RelationBody, old: Option<&OldTuple>, new: Option<&TupleData>) -> String {
    let render = |t: &TupleData| {
        let mut m = serde_json::Map::new();
        for (c, v) in rel.columns.iter().zip(&t.0) {
            let v = match v {
                TupleValue::Null => Value::Null,
                TupleValue::UnchangedToast => Value::String("<unchanged toast>".into()),
                TupleValue::Text(b) => Value::String(String::from_utf8_lossy(b).into_owned()),
                TupleValue::Binary(b) => Value::String(format!("<{} binary bytes>", b.len())),
            };
            m.insert(c.name.clone(), v);
        }
        Value::Object(m)
    };
    let mut m = serde_json::Map::new();
    if let Some(o) = old {
        m.insert("old".into(), render(o.tuple()));
    }
    if let Some(n) = new {
        m.insert("new".into(), render(n));
    }
    Value::Object(m).to_string()
}

#[cfg(test)]
mod tests {
    use super::super::pgoutput::RelationColumn;
    use super::*;
    use serde_json::json;

    fn decoder() -> TxDecoder {
        let mut t = HashMap::new();
        t.insert(
            "public.products".to_string(),
            TableBinding {
                alias: "products".into(),
                primary_key: vec!["id".into()],
            },
        );
        let mut d = TxDecoder::new(t);
        let col = |name: &str, oid| RelationColumn {
            is_key: name == "id",
            name: name.into(),
            type_oid: oid,
            type_modifier: -1,
        };
        let mut o = 0;
        d.on_message(
            PgOutputMessage::Relation(RelationBody {
                id: 7,
                namespace: "public".into(),
                name: "products".into(),
                replica_identity: b'd',
                columns: vec![
                    col("id", 20),
                    col("price", 1700),
                    col("description", 25),
                    col("mood", 99999),
                ],
            }),
            0,
            0,
            &mut o,
        );
        d
    }

    fn text(s: &str) -> TupleValue {
        TupleValue::Text(s.as_bytes().to_vec())
    }

    #[test]
    fn insert_update_delete_become_changes_with_positions() {
        let mut d = decoder();
        assert_eq!(d.warnings.len(), 1, "unknown type oid warned: {:?}", d.warnings);
        let mut ord = 0;
        let ins = d.on_message(
            PgOutputMessage::Insert {
                relation_id: 7,
                new: TupleData(vec![text("42"), text("12.50"), TupleValue::Null, text("happy")]),
            },
            100,
            5,
            &mut ord,
        );
        let c = &ins.changes[0];
        assert_eq!(
            (c.table.as_str(), c.key.as_str(), c.position),
            ("products", "[42]", Position::new(100, 1))
        );
        let Op::Upsert { cells } = &c.op else { panic!() };
        assert_eq!(cells[1], ("price".into(), Cell::Value(json!("12.50"))));
        assert_eq!(cells[3], ("mood".into(), Cell::Value(json!("happy"))));
        let upd = d.on_message(
            PgOutputMessage::Update {
                relation_id: 7,
                old: Some(OldTuple::Key(TupleData(vec![
                    text("41"),
                    TupleValue::Null,
                    TupleValue::Null,
                    TupleValue::Null,
                ]))),
                new: TupleData(vec![
                    text("42"),
                    text("13.00"),
                    TupleValue::UnchangedToast,
                    TupleValue::Null,
                ]),
            },
            100,
            5,
            &mut ord,
        );
        let c = &upd.changes[0];
        assert_eq!(
            c.old_key.as_ref().map(Key::as_str),
            Some("[41]"),
            "key change carries the old key"
        );
        assert_eq!(c.position, Position::new(100, 2));
        let Op::Upsert { cells } = &c.op else { panic!() };
        assert_eq!(cells[2].1, Cell::Unchanged);
        let del = d.on_message(
            PgOutputMessage::Delete {
                relation_id: 7,
                old: OldTuple::Key(TupleData(vec![
                    text("42"),
                    TupleValue::Null,
                    TupleValue::Null,
                    TupleValue::Null,
                ])),
            },
            100,
            5,
            &mut ord,
        );
        assert_eq!(del.changes[0].op, Op::Delete);
        assert_eq!(del.changes[0].key.as_str(), "[42]");
    }

    #[test]
    fn bad_values_and_unknown_relations_become_dead_letters() {
        let mut d = decoder();
        let mut ord = 0;
        let bad = d.on_message(
            PgOutputMessage::Insert {
                relation_id: 7,
                new: TupleData(vec![text("1"), text("twelve"), TupleValue::Null, TupleValue::Null]),
            },
            1,
            0,
            &mut ord,
        );
        assert!(bad.changes.is_empty());
        let dl = &bad.dead_letters[0];
        assert_eq!((dl.table.as_str(), dl.key.as_str()), ("public.products", "[1]"));
        assert!(
            dl.reason.contains("column price") && dl.reason.contains("twelve"),
            "{}",
            dl.reason
        );
        assert!(dl.payload.contains("twelve"));
        let unknown = d.on_message(
            PgOutputMessage::Insert {
                relation_id: 8,
                new: TupleData(vec![]),
            },
            1,
            0,
            &mut ord,
        );
        assert!(unknown.dead_letters[0].reason.contains("never described"));
        let nokey = d.on_message(
            PgOutputMessage::Insert {
                relation_id: 7,
                new: TupleData(vec![TupleValue::Null]),
            },
            1,
            0,
            &mut ord,
        );
        assert!(nokey.dead_letters[0].reason.contains("key column id"), "{:?}", nokey);
    }

    #[test]
    fn truncate_of_configured_tables_only() {
        let mut d = decoder();
        let mut ord = 0;
        let mut o2 = 0;
        d.on_message(
            PgOutputMessage::Relation(RelationBody {
                id: 9,
                namespace: "public".into(),
                name: "other".into(),
                replica_identity: b'd',
                columns: vec![],
            }),
            0,
            0,
            &mut o2,
        );
        let t = d.on_message(
            PgOutputMessage::Truncate {
                options: 0,
                relation_ids: vec![7, 9],
            },
            3,
            0,
            &mut ord,
        );
        assert_eq!(t.changes.len(), 1);
        assert_eq!(t.changes[0].op, Op::Truncate);
    }
}
