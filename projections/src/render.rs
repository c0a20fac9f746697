//! Rendering documents from stored rows, and finding which documents a row change
//! affects (fan-out). Both are pure over a [`RowLookup`]: synchronous, deterministic,
//! no network. The engine backs the lookup with the state store; tests with a map.
//!
//! Contract:
//! * A document is always rendered whole from the current rows: sinks get full
//!   documents, never patches, so every write is idempotent and order-insensitive
//!   given versions.
//! * A referenced row that was never seen renders as `{<remote key>: value,
//!   "unresolved": true}`; a tombstoned one keeps its last image (flagged).
//! * One-to-many children that are tombstones (deleted rows) are left out of lists.
//! * A nested one-to-one row that is a tombstone keeps its last image and shows it:
//!   the relation's `flag` field (always present), or else `deleted: true`.

use crate::spec::{
    parse_template, Cardinality, OnDelete, ProjectionSpec, RelationSpec, TableSpec, TemplateError, TemplatePart,
};
use serde_json::Value;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use viewkeeper_core::model::{format_ms, Key, Row, StoredRow, TombstoneKind};

/// Row access for rendering and fan-out.
pub trait RowLookup {
    /// The row of `table` with `key`, tombstones included.
    fn get(&self, table: &str, key: &Key) -> Result<Option<StoredRow>, LookupError>;
    /// Rows of `table` whose `columns` equal `values`, tombstones included.
    fn find(&self, table: &str, columns: &[String], values: &[Value]) -> Result<Vec<StoredRow>, LookupError>;
}

pub type LookupError = Box<dyn std::error::Error + Send + Sync>;

/// Remembers the answers of `get` over a store that does not change meanwhile (rendering
/// a batch looks up the same customers and products for order after order). Holds at most
/// `limit` rows; past that it starts over, so memory stays bounded.
pub struct MemoLookup<'a> {
    inner: &'a dyn RowLookup,
    gets: std::cell::RefCell<std::collections::HashMap<(String, Key), Option<StoredRow>>>,
    limit: usize,
}

impl<'a> MemoLookup<'a> {
    pub fn new(inner: &'a dyn RowLookup, limit: usize) -> Self {
        MemoLookup {
            inner,
            gets: Default::default(),
            limit: limit.max(1),
        }
    }
}

impl RowLookup for MemoLookup<'_> {
    fn get(&self, table: &str, key: &Key) -> Result<Option<StoredRow>, LookupError> {
        let k = (table.to_string(), key.clone());
        if let Some(r) = self.gets.borrow().get(&k) {
            return Ok(r.clone());
        }
        let r = self.inner.get(table, key)?;
        let mut gets = self.gets.borrow_mut();
        if gets.len() >= self.limit {
            gets.clear();
        }
        gets.insert(k, r.clone());
        Ok(r)
    }
    fn find(&self, table: &str, columns: &[String], values: &[Value]) -> Result<Vec<StoredRow>, LookupError> {
        self.inner.find(table, columns, values)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("state store lookup failed: {0}")]
    Lookup(#[from] LookupError),
    #[error("projection {projection}: table {table} row {key}: {message}")]
    Row {
        projection: String,
        table: String,
        key: String,
        message: String,
    },
}

/// A rendered document: its id (search `_id` or cache key) and body; `body: None`
/// removes the document.
#[derive(Clone, Debug, PartialEq)]
pub struct Rendered {
    pub id: String,
    pub body: Option<Row>,
    pub tombstoned: bool,
}

/// One node of a compiled projection tree: the root (index 0) or a relation.
#[derive(Clone, Debug)]
struct Node {
    table: String,
    parent: Option<usize>,
    /// Parent columns and this node's columns that join them (empty for the root).
    local: Vec<String>,
    remote: Vec<String>,
}

/// Why a projection cannot be compiled (a spec that skipped [`crate::spec::validate`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("projections.{projection}.root: unknown table '{root}'")]
    UnknownRoot { projection: String, root: String },
    #[error("projections.{projection}.key: {error}")]
    Key { projection: String, error: TemplateError },
}

/// A projection checked against its tables, ready to render.
#[derive(Clone, Debug)]
pub struct Projection {
    pub name: String,
    pub spec: ProjectionSpec,
    tables: BTreeMap<String, TableSpec>,
    key: Vec<TemplatePart>,
    nodes: Vec<Node>,
}

impl Projection {
    /// Compiles a validated spec (see [`crate::spec::validate`]).
    pub fn new(name: &str, spec: &ProjectionSpec, tables: &BTreeMap<String, TableSpec>) -> Result<Self, CompileError> {
        let root = tables.get(&spec.root).ok_or_else(|| CompileError::UnknownRoot {
            projection: name.to_owned(),
            root: spec.root.clone(),
        })?;
        let key = match &spec.key {
            Some(t) => parse_template(t).map_err(|error| CompileError::Key {
                projection: name.to_owned(),
                error,
            })?,
            None => {
                let mut parts = Vec::new();
                for (i, c) in root.primary_key.iter().enumerate() {
                    if i > 0 {
                        parts.push(TemplatePart::Lit(":".into()));
                    }
                    parts.push(TemplatePart::Col(c.clone()));
                }
                parts
            }
        };
        let mut nodes = vec![Node {
            table: spec.root.clone(),
            parent: None,
            local: vec![],
            remote: vec![],
        }];
        fn walk(nodes: &mut Vec<Node>, parent: usize, rels: &[RelationSpec]) {
            for r in rels {
                nodes.push(Node {
                    table: r.table.clone(),
                    parent: Some(parent),
                    local: r.local.clone(),
                    remote: r.remote.clone(),
                });
                let me = nodes.len() - 1;
                walk(nodes, me, &r.relations);
            }
        }
        walk(&mut nodes, 0, &spec.relations);
        Ok(Projection {
            name: name.to_string(),
            spec: spec.clone(),
            tables: tables.clone(),
            key,
            nodes,
        })
    }

    pub fn root_table(&self) -> &str {
        &self.spec.root
    }

    /// Whether `id` has the shape of this projection's document ids: its key template with
    /// each placeholder standing for one or more characters. (`p:{id}` matches `p:5` and,
    /// since ids may hold `:`, also `p:5:desc`: compare against the other projections'
    /// templates before counting a key as this one's.)
    pub fn id_matches(&self, id: &str) -> bool {
        fn matches(parts: &[TemplatePart], s: &str) -> bool {
            match parts.split_first() {
                None => s.is_empty(),
                Some((TemplatePart::Lit(l), rest)) => s.strip_prefix(l.as_str()).is_some_and(|s| matches(rest, s)),
                Some((TemplatePart::Col(_), rest)) => {
                    (1..=s.len()).any(|n| s.is_char_boundary(n) && matches(rest, &s[n..]))
                }
            }
        }
        matches(&self.key, id)
    }

    /// How many literal characters the key template has: of two templates an id matches,
    /// the one with more is the more specific (`p:{id}:desc` over `p:{id}`).
    pub fn id_literal_len(&self) -> usize {
        self.key
            .iter()
            .map(|p| match p {
                TemplatePart::Lit(l) => l.len(),
                TemplatePart::Col(_) => 0,
            })
            .sum()
    }

    /// The `SCAN` pattern of the ids (`ordering:product:{id}` → `ordering:product:*`), with
    /// Redis glob characters of literal parts escaped.
    pub fn id_pattern(&self) -> String {
        let mut out = String::new();
        for part in &self.key {
            match part {
                TemplatePart::Lit(l) => {
                    for ch in l.chars() {
                        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
                            out.push('\\');
                        }
                        out.push(ch);
                    }
                }
                TemplatePart::Col(_) => out.push('*'),
            }
        }
        out
    }

    /// Whether a change to `table` can affect this projection's documents.
    /// The sources of the tables the projection reads.
    pub fn sources(&self) -> BTreeSet<&str> {
        self.nodes
            .iter()
            .filter_map(|n| self.tables.get(&n.table).map(|t| t.source.as_str()))
            .collect()
    }

    pub fn uses_table(&self, table: &str) -> bool {
        self.nodes.iter().any(|n| n.table == table)
    }

    /// Columns of each table this projection reads: fields, join columns, keys, the
    /// decommission column. The state store keeps only these.
    pub fn needed_columns(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut add = |t: &str, cols: &mut dyn Iterator<Item = &String>| {
            out.entry(t.to_string()).or_default().extend(cols.cloned());
        };
        for part in &self.key {
            if let TemplatePart::Col(c) = part {
                add(&self.spec.root, &mut std::iter::once(c));
            }
        }
        add(&self.spec.root, &mut self.spec.fields.iter());
        if let Some(c) = &self.spec.active_when {
            add(&self.spec.root, &mut std::iter::once(&c.column));
        }
        fn rels(parent: &str, rs: &[RelationSpec], add: &mut dyn FnMut(&str, &mut dyn Iterator<Item = &String>)) {
            for r in rs {
                add(parent, &mut r.local.iter());
                add(&r.table, &mut r.remote.iter());
                add(&r.table, &mut r.fields.iter());
                add(&r.table, &mut r.order_by.iter());
                rels(&r.table, &r.relations, add);
            }
        }
        rels(&self.spec.root, &self.spec.relations, &mut add);
        for (t, cols) in out.iter_mut() {
            if let Some(ts) = self.tables.get(t) {
                cols.extend(ts.primary_key.iter().cloned());
                if let Some(d) = &ts.decommissioned {
                    cols.insert(d.column.clone());
                }
            }
        }
        out
    }

    /// Column sets of each table that joins look up by (other than the primary key):
    /// the state store keeps a reverse index for each.
    pub fn join_indexes(&self) -> BTreeSet<(String, Vec<String>)> {
        let mut out = BTreeSet::new();
        for n in &self.nodes {
            let Some(p) = n.parent else { continue };
            let parent = &self.nodes[p];
            for (t, cols) in [(&parent.table, &n.local), (&n.table, &n.remote)] {
                let pk = self.tables.get(t).map(|s| &s.primary_key);
                if pk != Some(cols) {
                    out.insert((t.clone(), cols.clone()));
                }
            }
        }
        out
    }

    /// The keys of root rows whose documents depend on a row of `table` with any of
    /// the given images (pass the old and the new image of a change).
    pub fn affected_roots(
        &self,
        table: &str,
        images: &[&Row],
        lookup: &dyn RowLookup,
    ) -> Result<BTreeSet<Key>, LookupError> {
        let mut roots = BTreeSet::new();
        let root_pk = &self.tables[&self.spec.root].primary_key;
        for (i, node) in self.nodes.iter().enumerate() {
            if node.table != table {
                continue;
            }
            if node.parent.is_none() {
                // The root table: the rows are the roots (no copies of the images).
                roots.extend(images.iter().filter_map(|r| Key::of_row(r, root_pk)));
                continue;
            }
            let mut rows: Vec<Row> = images.iter().map(|r| (*r).clone()).collect();
            let mut at = i;
            while let Some(p) = self.nodes[at].parent {
                let n = &self.nodes[at];
                let parent = &self.nodes[p];
                let mut next = Vec::new();
                let mut seen = BTreeSet::new();
                for r in &rows {
                    let vals: Option<Vec<Value>> = n.remote.iter().map(|c| r.get(c).cloned()).collect();
                    let Some(vals) = vals else { continue };
                    if vals.iter().any(Value::is_null) || !seen.insert(Key::from_values(&vals)) {
                        continue;
                    }
                    next.extend(
                        lookup
                            .find(&parent.table, &n.local, &vals)?
                            .into_iter()
                            .map(|s| s.image),
                    );
                }
                rows = next;
                at = p;
            }
            roots.extend(rows.iter().filter_map(|r| Key::of_row(r, root_pk)));
        }
        Ok(roots)
    }

    /// The id of the document of the root row `key` (`None`: no such row).
    pub fn doc_id(&self, key: &Key, lookup: &dyn RowLookup) -> Result<Option<String>, RenderError> {
        match lookup.get(&self.spec.root, key)? {
            Some(row) => self.render_key(&row).map(Some),
            None => Ok(None),
        }
    }

    /// Renders the document of the root row `key`; `Ok(None)` when the state store
    /// has no such row (nothing to write).
    pub fn render(&self, key: &Key, lookup: &dyn RowLookup) -> Result<Option<Rendered>, RenderError> {
        let Some(row) = lookup.get(&self.spec.root, key)? else {
            return Ok(None);
        };
        let id = self.render_key(&row)?;
        let tombstoned = row.tombstone.is_some();
        if let Some(t) = &row.tombstone {
            if t.kind == TombstoneKind::Deleted && self.spec.on_delete == OnDelete::Delete {
                return Ok(Some(Rendered {
                    id,
                    body: None,
                    tombstoned,
                }));
            }
        }
        let table = &self.tables[&self.spec.root];
        let mut body = copy_fields(table, &row, &self.spec.fields, &self.spec.rename);
        if let Some(t) = &row.tombstone {
            // An unknown time (a row already decommissioned when the snapshot read it) is
            // left out rather than made up.
            let at = t.at_ms.map(|ms| Value::String(format_ms(ms)));
            if table.decommissioned.is_some() {
                if let Some(at) = at {
                    body.insert("decommissioned_at".into(), at);
                }
            } else {
                body.insert("deleted".into(), Value::Bool(true));
                if let Some(at) = at {
                    body.insert("deleted_at".into(), at);
                }
            }
        }
        self.render_relations(&row, &self.spec.relations, &mut body, lookup)?;
        Ok(Some(Rendered {
            id,
            body: Some(body),
            tombstoned,
        }))
    }

    fn render_key(&self, row: &StoredRow) -> Result<String, RenderError> {
        let mut id = String::new();
        for part in &self.key {
            match part {
                TemplatePart::Lit(s) => id.push_str(s),
                TemplatePart::Col(c) => match row.image.get(c) {
                    Some(Value::String(s)) => id.push_str(s),
                    Some(v @ (Value::Number(_) | Value::Bool(_))) => id.push_str(&v.to_string()),
                    other => {
                        return Err(RenderError::Row {
                            projection: self.name.clone(),
                            table: self.spec.root.clone(),
                            key: row.key.to_string(),
                            message: format!(
                                "key column '{c}' is {}: cannot build the document id",
                                other.map_or("missing".to_string(), |v| format!("{v}"))
                            ),
                        })
                    }
                },
            }
        }
        Ok(id)
    }

    fn render_relations(
        &self,
        parent: &StoredRow,
        rels: &[RelationSpec],
        body: &mut Row,
        lookup: &dyn RowLookup,
    ) -> Result<(), RenderError> {
        for r in rels {
            let table = &self.tables[&r.table];
            let vals: Vec<Value> = r
                .local
                .iter()
                .map(|c| parent.image.get(c).cloned().unwrap_or(Value::Null))
                .collect();
            if vals.iter().any(Value::is_null) {
                body.insert(
                    r.name.clone(),
                    if r.kind == Cardinality::Many {
                        Value::Array(vec![])
                    } else {
                        Value::Null
                    },
                );
                if let Some(c) = &r.count {
                    body.insert(c.clone(), Value::from(0));
                }
                continue;
            }
            let found = if r.remote == table.primary_key {
                let key = Key::from_values(vals_in_pk_order(&r.remote, &vals, &table.primary_key).iter());
                lookup.get(&r.table, &key)?.into_iter().collect()
            } else {
                lookup.find(&r.table, &r.remote, &vals)?
            };
            match r.kind {
                Cardinality::One => {
                    let v = match found.into_iter().next() {
                        Some(child) => Value::Object(self.render_nested(r, table, &child, lookup)?),
                        None => {
                            let mut m = Row::new();
                            for (col, v) in r.remote.iter().zip(vals) {
                                m.insert(r.rename.get(col).unwrap_or(col).clone(), v);
                            }
                            m.insert("unresolved".into(), Value::Bool(true));
                            Value::Object(m)
                        }
                    };
                    body.insert(r.name.clone(), v);
                }
                Cardinality::Many => {
                    let mut children: Vec<StoredRow> = found.into_iter().filter(|c| c.tombstone.is_none()).collect();
                    let order: &[String] = if r.order_by.is_empty() {
                        &table.primary_key
                    } else {
                        &r.order_by
                    };
                    children.sort_by(|a, b| {
                        for c in order {
                            let o = cmp_values(a.image.get(c), b.image.get(c));
                            if o != Ordering::Equal {
                                return o;
                            }
                        }
                        a.key.cmp(&b.key)
                    });
                    if let Some(c) = &r.count {
                        body.insert(c.clone(), Value::from(children.len()));
                    }
                    let mut list = Vec::with_capacity(children.len());
                    for child in &children {
                        list.push(Value::Object(self.render_nested(r, table, child, lookup)?));
                    }
                    body.insert(r.name.clone(), Value::Array(list));
                }
            }
        }
        Ok(())
    }

    fn render_nested(
        &self,
        r: &RelationSpec,
        table: &TableSpec,
        row: &StoredRow,
        lookup: &dyn RowLookup,
    ) -> Result<Row, RenderError> {
        let mut m = copy_fields(table, row, &r.fields, &r.rename);
        match (&r.flag, &row.tombstone) {
            (Some(f), t) => {
                m.insert(f.clone(), Value::Bool(t.is_some()));
            }
            // Without a configured flag a tombstone still shows (DESIGN §3: documents
            // keep the last snapshot and show the flag), only when it is one.
            (None, Some(_)) => {
                m.insert("deleted".into(), Value::Bool(true));
            }
            (None, None) => {}
        }
        self.render_relations(row, &r.relations, &mut m, lookup)?;
        Ok(m)
    }
}

fn vals_in_pk_order(cols: &[String], vals: &[Value], pk: &[String]) -> Vec<Value> {
    pk.iter()
        .map(|p| {
            cols.iter()
                .position(|c| c == p)
                .map_or(Value::Null, |i| vals[i].clone())
        })
        .collect()
}

/// Copies `fields` of the row (renamed), applying the tombstone rule: a hard-deleted
/// row of a table with a decommission rule shows the rule's first value.
fn copy_fields(table: &TableSpec, row: &StoredRow, fields: &[String], rename: &BTreeMap<String, String>) -> Row {
    let mut out = Row::new();
    for f in fields {
        let mut v = row.image.get(f).cloned().unwrap_or(Value::Null);
        if let (Some(t), Some(d)) = (&row.tombstone, &table.decommissioned) {
            if &d.column == f && (t.kind == TombstoneKind::Deleted || !d.values.contains(&v)) {
                v = d.values[0].clone();
            }
        }
        out.insert(rename.get(f).unwrap_or(f).clone(), v);
    }
    out
}

/// Orders JSON values: null first, then numbers numerically (exact numerics held
/// as strings compare as numbers when both parse), then strings.
fn cmp_values(a: Option<&Value>, b: Option<&Value>) -> Ordering {
    let num = |v: &Value| match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse::<f64>().ok(),
        _ => None,
    };
    match (a, b) {
        (None | Some(Value::Null), None | Some(Value::Null)) => Ordering::Equal,
        (None | Some(Value::Null), _) => Ordering::Less,
        (_, None | Some(Value::Null)) => Ordering::Greater,
        (Some(x), Some(y)) => match (num(x), num(y)) {
            (Some(p), Some(q)) => p.partial_cmp(&q).unwrap_or(Ordering::Equal),
            _ => x.to_string().cmp(&y.to_string()),
        },
    }
}
