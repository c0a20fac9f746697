//! Decodes one Kafka record of a Debezium topic (JsonConverter, with or without
//! schemas) into a [`Change`], or says why it carries no change ([`Skip`]), or why it
//! cannot be decoded ([`DecodeError`], which the caller turns into a dead letter).
//!
//! Contract: pure (no I/O) and never panics, whatever the bytes. The same record always
//! decodes to the same result, so a replayed record gives the same change and position.
//!
//! * Envelopes: `{"schema": …, "payload": …}` (`schemas.enable=true`) or the bare payload.
//!   With a schema, column types come from it; without one, from
//!   [`TopicTable::column_types`] hints (anything else is kept as sent).
//! * Ops: `c`, `r` (snapshot read) and `u` → [`Op::Upsert`] of the whole `after` image;
//!   `d` → [`Op::Delete`]; `t` → [`Op::Truncate`]; `m` (logical decoding message) → skip.
//!   A primary-key change arrives as `d` (old key) then `c` (new key); both decode as
//!   they are. An `u` whose `before` holds a different full key sets `old_key`.
//! * Keys are built from the configured `primary_key` columns of `after` (`c`/`r`/`u`) or
//!   `before` (`d`); a `d` whose `before` lacks them (REPLICA IDENTITY NOTHING, or `before`
//!   null) falls back to the message key. The message key is not used otherwise, because
//!   `message.key.columns` may key a topic by something else (e.g. `order_items` by
//!   `order_id`).
//! * Skipped, not errors: Kafka tombstones (null or empty value, `null`, or the legacy
//!   `{"schema":null,"payload":null}` rendering), heartbeat and transaction-metadata
//!   records (by topic name, see [`topic_kind`], and by shape), logical messages.
//! * Rejected: anything that is not a change-event envelope, notably rows flattened by
//!   the `ExtractNewRecordState` (unwrap) transform and outbox-routed payloads: they have
//!   no `op` and no source position, so viewkeeper cannot order or delete by them.
//!
//! Positions ([`Position`]):
//! * Postgres (`source.lsn` present): `(source.lsn, 1)` for a streamed change, and
//!   `(source.lsn, 0)` for a snapshot read (`op = r`, whose `lsn` is where the snapshot
//!   was taken). Positions are only ever compared for one row (and a TRUNCATE against the
//!   rows of its table), and for one row the change LSN grows in commit order: a second
//!   transaction can write a row only after the first one that wrote it committed (row
//!   locks; a TRUNCATE waits for every writer of its table and makes later ones wait). So
//!   a snapshot read orders against streamed changes by where it was taken: a re-created
//!   connector's snapshot wins over the older streamed images, and a change streamed after
//!   the snapshot point wins over the read. `source.sequence` is not needed for that (its
//!   `lastCommitLsn` is not comparable with a snapshot's LSN, and is null in snapshots and
//!   in the first transaction after a start). Both numbers come from the record, so a
//!   replayed record has the same position.
//! * MySQL (`source.file` and `source.pos`): `(binlog file number, pos << 16 | row)`.
//! * Anything else: `(commit_time_ms, 0)`. Such positions order only coarsely; they exist
//!   so that other connectors' fixtures decode, not for production ordering.
//!
//! `commit_time_ms` is `source.ts_ms` (the commit time in the source database), else the
//! envelope's `ts_ms` (when Debezium processed it); a non-positive `source.ts_ms` counts
//! as missing (old MySQL snapshots write 0). Numeric strings are accepted for both.

use super::values::{self, cut, kind_of, lenient_i64, ColumnType};
use serde_json::{Map, Value};
use std::collections::HashMap;
use viewkeeper_core::model::{Cell, Change, Key, Op, Position};
use viewkeeper_core::source::SourceDeadLetter;

/// Debezium's default `topic.heartbeat.prefix`.
pub const HEARTBEAT_TOPIC_PREFIX: &str = "__debezium-heartbeat";
/// Debezium's transaction-metadata topic is `<topic.prefix>` followed by this.
pub const TRANSACTION_TOPIC_SUFFIX: &str = ".transaction";

/// The configured table a data topic feeds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TopicTable {
    /// The table's alias under `[tables.NAME]`, used as [`Change::table`].
    pub alias: String,
    /// Primary-key columns, in key order.
    pub primary_key: Vec<String>,
    /// Types of columns for messages without schemas (a schema, when present, wins):
    /// e.g. `price` → [`ColumnType::Decimal`] `{ scale: Some(2) }` to decode precise-mode
    /// base64 decimals. Columns not listed are kept as sent.
    pub column_types: HashMap<String, ColumnType>,
}

impl TopicTable {
    pub fn new<S: Into<String>>(alias: impl Into<String>, primary_key: impl IntoIterator<Item = S>) -> Self {
        TopicTable {
            alias: alias.into(),
            primary_key: primary_key.into_iter().map(Into::into).collect(),
            column_types: HashMap::new(),
        }
    }

    /// Adds a column type hint for messages without schemas.
    pub fn with_column_type(mut self, column: impl Into<String>, ty: ColumnType) -> Self {
        self.column_types.insert(column.into(), ty);
        self
    }
}

/// What a topic carries, judged by its name alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopicKind {
    /// Change events of a table (or anything not recognized below).
    Data,
    /// `__debezium-heartbeat.<prefix>`.
    Heartbeat,
    /// `<prefix>.transaction` (transaction BEGIN/END markers).
    TransactionMetadata,
}

/// Classifies a topic by Debezium's default naming. A transaction topic is
/// `<prefix>.transaction` with a dot-free prefix; longer names such as
/// `shop.public.transaction` are table topics (a table may be named `transaction`).
/// [`decode`] also recognizes transaction markers and heartbeats by their shape, so a
/// dotted prefix or a renamed topic is still skipped.
pub fn topic_kind(topic: &str) -> TopicKind {
    let heartbeat = topic
        .strip_prefix(HEARTBEAT_TOPIC_PREFIX)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'));
    if heartbeat {
        return TopicKind::Heartbeat;
    }
    match topic.strip_suffix(TRANSACTION_TOPIC_SUFFIX) {
        Some(prefix) if !prefix.is_empty() && !prefix.contains('.') => TopicKind::TransactionMetadata,
        _ => TopicKind::Data,
    }
}

/// Why a record carries no change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// A Kafka tombstone (compaction marker after a delete).
    Tombstone,
    Heartbeat,
    TransactionMetadata,
    /// A logical decoding message (`op: "m"`, `pg_logical_emit_message`).
    LogicalMessage,
}

impl Skip {
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::Tombstone => "tombstone",
            Skip::Heartbeat => "heartbeat",
            Skip::TransactionMetadata => "transaction metadata",
            Skip::LogicalMessage => "logical decoding message",
        }
    }
}

/// The outcome of decoding one record.
#[derive(Clone, Debug, PartialEq)]
pub enum Decoded {
    Change(Change),
    Skip(Skip),
}

/// A record that cannot be decoded: which topic, where in the record (`value.after.price`,
/// `key.payload.id`, …) and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("topic {topic}: {at}: {kind}")]
pub struct DecodeError {
    pub topic: String,
    /// Path of the offending part: `key` or `value`, then fields.
    pub at: String,
    pub kind: ErrorKind,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ErrorKind {
    #[error("malformed JSON: {0}")]
    Json(String),
    #[error("not a Debezium change event: {0}")]
    NotAnEnvelope(String),
    #[error("missing")]
    Missing,
    #[error("expected {expected}, found {found}")]
    Type { expected: &'static str, found: String },
    #[error("unknown op {0:?} (expected c, r, u, d, t or m)")]
    UnknownOp(String),
    #[error("primary-key column {column:?} is missing, null or unavailable; {hint}")]
    MissingKeyColumn { column: String, hint: &'static str },
    #[error("invalid value: {0}")]
    Value(super::values::ValueError),
    #[error("invalid schema: {0}")]
    Schema(super::values::TypeError),
}

impl DecodeError {
    /// The dead letter that keeps the undecodable record with its reason. `position` is
    /// the caller's (the record's own could not be read: `topic[partition]@offset`); key
    /// and value are kept as text.
    pub fn dead_letter(
        &self,
        table: &str,
        position: String,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> SourceDeadLetter {
        let text = |b: Option<&[u8]>| b.map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
        SourceDeadLetter {
            position,
            table: table.to_owned(),
            key: text(key),
            reason: self.to_string(),
            payload: text(value),
        }
    }
}

/// Decodes one record of `topic` for `table`. `key` and `value` are the raw Kafka bytes
/// (`None` for null).
pub fn decode(
    topic: &str,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    table: &TopicTable,
) -> Result<Decoded, DecodeError> {
    match topic_kind(topic) {
        TopicKind::Heartbeat => return Ok(Decoded::Skip(Skip::Heartbeat)),
        TopicKind::TransactionMetadata => return Ok(Decoded::Skip(Skip::TransactionMetadata)),
        TopicKind::Data => {}
    }
    let Some(bytes) = value.filter(|b| !b.iter().all(u8::is_ascii_whitespace)) else {
        return Ok(Decoded::Skip(Skip::Tombstone));
    };
    let ctx = Ctx { topic, table };
    let root: Value = serde_json::from_slice(bytes).map_err(|e| ctx.err("value", ErrorKind::Json(e.to_string())))?;
    let Converted { payload, schema, at } = unwrap_converter(root, "value");
    match payload {
        Value::Null => Ok(Decoded::Skip(Skip::Tombstone)),
        Value::Object(event) => ctx.event(&event, schema.as_ref(), &at, key),
        other => Err(ctx.err(
            at,
            ErrorKind::NotAnEnvelope(format!(
                "the value is {}, not an object (an outbox-routed or otherwise transformed payload?)",
                kind_of(&other)
            )),
        )),
    }
}

/// The row key named by a record's message key (with or without schema), built from
/// the table's primary-key columns.
pub fn decode_key(topic: &str, key: &[u8], table: &TopicTable) -> Result<Key, DecodeError> {
    Ctx { topic, table }.message_key(key)
}

/// A JsonConverter message taken apart.
struct Converted {
    payload: Value,
    /// The schema, when `schemas.enable=true`.
    schema: Option<Value>,
    /// Path of the payload, for errors.
    at: String,
}

fn unwrap_converter(root: Value, side: &str) -> Converted {
    match root {
        Value::Object(mut m) if m.len() == 2 && m.contains_key("schema") && m.contains_key("payload") => {
            let payload = m.remove("payload").unwrap_or(Value::Null);
            let schema = m.remove("schema").filter(|s| !s.is_null());
            Converted {
                payload,
                schema,
                at: format!("{side}.payload"),
            }
        }
        other => Converted {
            payload: other,
            schema: None,
            at: side.to_owned(),
        },
    }
}

static UNKNOWN: ColumnType = ColumnType::Unknown;

/// Column types of one image: from the schema, else from the table's hints.
struct ColumnTypes<'a> {
    schema: HashMap<String, ColumnType>,
    hints: &'a HashMap<String, ColumnType>,
}

impl ColumnTypes<'_> {
    fn get(&self, column: &str) -> &ColumnType {
        self.schema
            .get(column)
            .or_else(|| self.hints.get(column))
            .unwrap_or(&UNKNOWN)
    }
}

fn struct_fields(schema: &Value) -> impl Iterator<Item = &Map<String, Value>> {
    schema
        .get("fields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
}

fn field_name(field: &Map<String, Value>) -> Option<&str> {
    field.get("field").and_then(Value::as_str)
}

const DELETE_KEY_HINT: &str = "a delete needs the key columns in `before` (REPLICA IDENTITY DEFAULT or FULL) or in the message key (check message.key.columns)";
const IMAGE_KEY_HINT: &str = "the row image must hold every primary_key column configured for this table";

struct Ctx<'a> {
    topic: &'a str,
    table: &'a TopicTable,
}

impl Ctx<'_> {
    fn err(&self, at: impl Into<String>, kind: ErrorKind) -> DecodeError {
        DecodeError {
            topic: self.topic.to_owned(),
            at: at.into(),
            kind,
        }
    }

    fn type_err(&self, at: impl Into<String>, expected: &'static str, found: &Value) -> DecodeError {
        let found = match found {
            Value::Null | Value::Object(_) | Value::Array(_) => kind_of(found).to_owned(),
            _ => format!("{} {}", kind_of(found), cut(&found.to_string())),
        };
        self.err(at, ErrorKind::Type { expected, found })
    }

    /// Column types of the message's rows: `schema` is the struct schema of the rows
    /// (a key schema), or with `images` the envelope schema whose `images` fields hold them.
    /// `side` (`key` or `value`) starts the paths of schema errors.
    fn column_types(
        &self,
        schema: Option<&Value>,
        images: &[&str],
        side: &str,
    ) -> Result<ColumnTypes<'_>, DecodeError> {
        let mut types = HashMap::new();
        let Some(schema) = schema else {
            return Ok(ColumnTypes {
                schema: types,
                hints: &self.table.column_types,
            });
        };
        let mut row_schemas: Vec<(String, &Value)> = Vec::new();
        if images.is_empty() {
            row_schemas.push((format!("{side}.schema"), schema));
        }
        for image in images {
            let found = schema.get("fields").and_then(Value::as_array).and_then(|fields| {
                fields
                    .iter()
                    .find(|f| f.as_object().and_then(field_name) == Some(*image))
            });
            if let Some(s) = found {
                row_schemas.push((format!("{side}.schema.{image}"), s));
            }
        }
        for (path, row_schema) in row_schemas {
            for field in struct_fields(row_schema) {
                let Some(name) = field_name(field) else { continue };
                if types.contains_key(name) {
                    continue;
                }
                let ty = ColumnType::from_schema_object(field)
                    .map_err(|e| self.err(format!("{path}.{name}"), ErrorKind::Schema(e)))?;
                types.insert(name.to_owned(), ty);
            }
        }
        Ok(ColumnTypes {
            schema: types,
            hints: &self.table.column_types,
        })
    }

    /// One change-event payload (or transaction marker / heartbeat without `op`).
    fn event(
        &self,
        ev: &Map<String, Value>,
        schema: Option<&Value>,
        at: &str,
        key: Option<&[u8]>,
    ) -> Result<Decoded, DecodeError> {
        let op = match ev.get("op") {
            Some(Value::String(op)) => op.as_str(),
            Some(other) => return Err(self.type_err(format!("{at}.op"), "an op string", other)),
            None => return self.without_op(ev, at),
        };
        if op == "m" {
            return Ok(Decoded::Skip(Skip::LogicalMessage));
        }
        if !matches!(op, "c" | "r" | "u" | "d" | "t") {
            return Err(self.err(format!("{at}.op"), ErrorKind::UnknownOp(cut(op))));
        }
        // A snapshot read (`r`) tells what the row is, not since when: no commit time, so a
        // row read already decommissioned gets no made-up decommission time.
        let commit_time_ms = if op == "r" { 0 } else { self.commit_time(ev, at)? };
        let position = self.position(ev, at, commit_time_ms, op == "r")?;
        let change = |key, old_key, op| {
            Decoded::Change(Change {
                table: self.table.alias.clone(),
                key,
                old_key,
                op,
                position,
                commit_time_ms,
                origin: None,
            })
        };
        if op == "t" {
            return Ok(change(Key::from_values(&[]), None, Op::Truncate));
        }
        // Schema paths start at the record's side: `value.schema.after.price`.
        let types = self.column_types(schema, &["after", "before"], "value")?;
        let before = ev.get("before").filter(|v| !v.is_null());
        if op == "d" {
            let key = self.delete_key(before, &types, at, key)?;
            return Ok(change(key, None, Op::Delete));
        }
        let after_at = format!("{at}.after");
        let after = match ev.get("after") {
            Some(Value::Object(after)) => after,
            None | Some(Value::Null) => return Err(self.err(after_at, ErrorKind::Missing)),
            Some(other) => return Err(self.type_err(after_at, "the row image object", other)),
        };
        let mut cells = Vec::with_capacity(after.len());
        for (column, v) in after {
            let cell = values::convert(v, types.get(column))
                .map_err(|e| self.err(format!("{after_at}.{column}"), ErrorKind::Value(e)))?;
            cells.push((column.clone(), cell));
        }
        let key = key_of_cells(&cells, &self.table.primary_key)
            .map_err(|column| self.missing_key(&after_at, column, IMAGE_KEY_HINT))?;
        let old_key = match before {
            Some(Value::Object(before)) if op == "u" => {
                match self.key_of_image(before, &types, &format!("{at}.before"))? {
                    Ok(old) if old != key => Some(old),
                    _ => None,
                }
            }
            _ => None,
        };
        Ok(change(key, old_key, Op::Upsert { cells }))
    }

    fn missing_key(&self, at: &str, column: &str, hint: &'static str) -> DecodeError {
        self.err(
            at,
            ErrorKind::MissingKeyColumn {
                column: column.to_owned(),
                hint,
            },
        )
    }

    /// A payload without `op`: a transaction marker or heartbeat under an unexpected
    /// topic name, or not a change event at all.
    fn without_op(&self, ev: &Map<String, Value>, at: &str) -> Result<Decoded, DecodeError> {
        let status = ev.get("status").and_then(Value::as_str);
        if matches!(status, Some("BEGIN" | "END")) && ev.contains_key("id") {
            return Ok(Decoded::Skip(Skip::TransactionMetadata));
        }
        if ev.len() == 1 && ev.contains_key("ts_ms") {
            return Ok(Decoded::Skip(Skip::Heartbeat));
        }
        if ["before", "after", "source"].iter().any(|k| ev.contains_key(*k)) {
            return Err(self.err(format!("{at}.op"), ErrorKind::Missing));
        }
        Err(self.err(
            at,
            ErrorKind::NotAnEnvelope(
                "no `op`, `before`, `after` or `source`: a row flattened by ExtractNewRecordState (unwrap) \
                 or an outbox payload? viewkeeper needs the full change-event envelope; remove the transform \
                 for this topic"
                    .into(),
            ),
        ))
    }

    fn delete_key(
        &self,
        before: Option<&Value>,
        types: &ColumnTypes<'_>,
        at: &str,
        key: Option<&[u8]>,
    ) -> Result<Key, DecodeError> {
        let before_at = format!("{at}.before");
        let missing = match before {
            Some(Value::Object(before)) => match self.key_of_image(before, types, &before_at)? {
                Ok(key) => return Ok(key),
                Err(column) => column,
            },
            Some(other) => return Err(self.type_err(before_at, "the row image object", other)),
            None => self.table.primary_key.first().map(String::as_str).unwrap_or_default(),
        };
        match key {
            // REPLICA IDENTITY NOTHING, or a `before` without the key: the message key.
            Some(bytes) if !bytes.iter().all(u8::is_ascii_whitespace) => self.message_key(bytes),
            _ => Err(self.missing_key(&before_at, missing, DELETE_KEY_HINT)),
        }
    }

    fn message_key(&self, bytes: &[u8]) -> Result<Key, DecodeError> {
        let root: Value = serde_json::from_slice(bytes).map_err(|e| self.err("key", ErrorKind::Json(e.to_string())))?;
        let Converted { payload, schema, at } = unwrap_converter(root, "key");
        let Value::Object(columns) = payload else {
            return Err(self.type_err(at, "an object of key columns", &payload));
        };
        let types = self.column_types(schema.as_ref(), &[], "key")?;
        self.key_of_image(&columns, &types, &at)?
            .map_err(|column| self.missing_key(&at, column, DELETE_KEY_HINT))
    }

    /// The key of a row image; `Ok(Err(column))` names the first key column it lacks.
    fn key_of_image<'t>(
        &'t self,
        image: &Map<String, Value>,
        types: &ColumnTypes<'_>,
        at: &str,
    ) -> Result<Result<Key, &'t str>, DecodeError> {
        let mut values = Vec::with_capacity(self.table.primary_key.len());
        for column in &self.table.primary_key {
            let Some(v) = image.get(column).filter(|v| !v.is_null()) else {
                return Ok(Err(column));
            };
            match values::convert(v, types.get(column)) {
                Ok(Cell::Value(v)) if !v.is_null() => values.push(v),
                Ok(_) => return Ok(Err(column)),
                Err(e) => return Err(self.err(format!("{at}.{column}"), ErrorKind::Value(e))),
            }
        }
        Ok(Ok(Key::from_values(&values)))
    }

    fn commit_time(&self, ev: &Map<String, Value>, at: &str) -> Result<i64, DecodeError> {
        let source = ev.get("source").and_then(Value::as_object);
        let candidates = [
            (source.and_then(|s| s.get("ts_ms")), "source.ts_ms"),
            (ev.get("ts_ms"), "ts_ms"),
        ];
        for (v, field) in candidates {
            match v {
                None | Some(Value::Null) => {}
                Some(v) => match lenient_i64(v) {
                    Some(ms) if ms > 0 => return Ok(ms),
                    Some(_) => {}
                    None => {
                        return Err(self.type_err(format!("{at}.{field}"), "milliseconds since the epoch", v));
                    }
                },
            }
        }
        Err(self.err(format!("{at}.source.ts_ms"), ErrorKind::Missing))
    }

    fn position(
        &self,
        ev: &Map<String, Value>,
        at: &str,
        commit_time_ms: i64,
        snapshot: bool,
    ) -> Result<Position, DecodeError> {
        let empty = Map::new();
        let source = ev.get("source").and_then(Value::as_object).unwrap_or(&empty);
        let path = |field: &str| format!("{at}.source.{field}");
        if let Some(v) = source.get("lsn").filter(|v| !v.is_null()) {
            let lsn = lenient_u64(v).ok_or_else(|| self.type_err(path("lsn"), "an LSN (unsigned integer)", v))?;
            return Ok(Position::new(lsn, if snapshot { 0 } else { 1 }));
        }
        if source.get("connector").and_then(Value::as_str) == Some("postgresql") {
            return Err(self.err(path("lsn"), ErrorKind::Missing));
        }
        if let Some(p) = binlog_position(source) {
            return Ok(p);
        }
        Ok(Position::new(u64::try_from(commit_time_ms).unwrap_or(0), 0))
    }
}

/// The key of an `after` image's converted cells, or the first key column it lacks.
fn key_of_cells<'k>(cells: &[(String, Cell)], primary_key: &'k [String]) -> Result<Key, &'k str> {
    let mut values = Vec::with_capacity(primary_key.len());
    for column in primary_key {
        match cells.iter().find(|(name, _)| name == column) {
            Some((_, Cell::Value(v))) if !v.is_null() => values.push(v),
            _ => return Err(column),
        }
    }
    Ok(Key::from_values(values))
}

fn lenient_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// MySQL: `(binlog file number, pos << 16 | row)`; `None` unless both are usable.
fn binlog_position(source: &Map<String, Value>) -> Option<Position> {
    let file = source.get("file")?.as_str()?;
    let pos = source.get("pos")?.as_u64()?;
    let row = source.get("row").and_then(Value::as_u64).unwrap_or(0).min(0xFFFF);
    let index = file.rsplit('.').next()?.parse::<u64>().ok()?;
    let minor = pos.checked_mul(1 << 16)?.checked_add(row)?;
    Some(Position::new(index, minor))
}
