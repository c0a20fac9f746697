//! Declarative specs from the config file: tables (where rows come from, their keys,
//! what "decommissioned" means) and projections (a root table, nested relations, the
//! fields to copy, the document key, sink options).
//!
//! Specs are plain data deserialized with `deny_unknown_fields`; [`validate`] checks
//! their cross references and names the config key path of every problem.

use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use thiserror::Error;

fn default_pk() -> Vec<String> {
    vec!["id".to_string()]
}

/// `[tables.NAME]`: one table of one source.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TableSpec {
    /// The source (a key of `[sources]`) that carries this table.
    pub source: String,
    /// The table's name in the source, `schema.table` (e.g. `public.products`).
    pub name: String,
    /// Primary-key columns, in key order (default `["id"]`).
    #[serde(default = "default_pk")]
    pub primary_key: Vec<String>,
    /// When set, an update into this state makes the row a tombstone (and a hard
    /// delete renders the column as the first of `values`).
    #[serde(default)]
    pub decommissioned: Option<Condition>,
}

/// `column IN (values)`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    pub column: String,
    pub values: Vec<Value>,
}

impl Condition {
    pub fn matches(&self, row: &serde_json::Map<String, Value>) -> bool {
        row.get(&self.column)
            .is_some_and(|v| self.values.iter().any(|x| x == v))
    }
}

/// What a hard-deleted root row does to its document.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnDelete {
    /// Keep the document from the last image, flagged (`deleted: true`, `deleted_at`).
    #[default]
    Tombstone,
    /// Remove the document from the sink.
    Delete,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Cardinality {
    #[default]
    One,
    Many,
}

/// A nested relation: rows of `table` whose `remote` columns equal the parent's
/// `local` columns.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RelationSpec {
    /// The field name in the parent document.
    pub name: String,
    pub table: String,
    #[serde(default)]
    pub kind: Cardinality,
    /// Columns of the parent row.
    pub local: Vec<String>,
    /// Columns of this relation's rows, matched with `local` in order.
    pub remote: Vec<String>,
    #[serde(default)]
    pub fields: Vec<String>,
    /// Source column → document field.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    #[serde(default)]
    pub relations: Vec<RelationSpec>,
    /// `many` only: sort children by these columns (default: by primary key).
    #[serde(default)]
    pub order_by: Vec<String>,
    /// `many` only: a field of the parent that gets the number of children.
    #[serde(default)]
    pub count: Option<String>,
    /// A boolean field set on each nested row: whether it is a tombstone.
    #[serde(default)]
    pub flag: Option<String>,
}

/// `[projections.NAME]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProjectionSpec {
    pub root: String,
    /// The sink (a key of `[sinks]`) that receives the documents.
    pub sink: String,
    /// Document id / cache key template over root columns, e.g.
    /// `ordering:product:{id}`. Default: the primary-key values joined by `:`.
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub fields: Vec<String>,
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    #[serde(default)]
    pub relations: Vec<RelationSpec>,
    #[serde(default)]
    pub on_delete: OnDelete,
    /// Redis: a set holding the ids of rows that match `active_when` (and are not
    /// tombstones).
    #[serde(default)]
    pub active_set: Option<String>,
    #[serde(default)]
    pub active_when: Option<Condition>,
    /// Redis: expire tombstoned entries after this many seconds (default: keep).
    #[serde(default)]
    pub tombstone_ttl_ms: Option<u64>,
    /// Search sinks: the alias, index version, settings and mappings.
    #[serde(default)]
    pub index: Option<IndexSpec>,
    /// Add a `_meta` field to every document (a JSON text field in a cache entry): the
    /// position of each source the document reflects, commit time, when it was rendered.
    #[serde(default)]
    pub meta: bool,
}

fn one() -> u32 {
    1
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

/// `[projections.NAME.index]`: readers query `alias`; documents live in the versioned
/// index `{alias}_v{version}` behind it, so a rebuild can fill `_v{version+1}` and swap.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IndexSpec {
    pub alias: String,
    #[serde(default = "one")]
    pub version: u32,
    #[serde(default = "empty_object")]
    pub settings: Value,
    #[serde(default = "empty_object")]
    pub mappings: Value,
    /// After a rebuild swapped the alias, keep the previous index (default) or drop it.
    #[serde(default = "keep")]
    pub keep_old_index: bool,
}

fn keep() -> bool {
    true
}

impl IndexSpec {
    pub fn index_name(&self) -> String {
        format!("{}_v{}", self.alias, self.version)
    }
}

/// A config problem, with the key path it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

fn known(names: impl Iterator<Item = impl AsRef<str>>) -> String {
    let v: Vec<String> = names.map(|s| s.as_ref().to_string()).collect();
    if v.is_empty() {
        "none declared".into()
    } else {
        v.join(", ")
    }
}

/// Checks tables and projections against each other; returns every problem found.
pub fn validate(
    tables: &BTreeMap<String, TableSpec>,
    projections: &BTreeMap<String, ProjectionSpec>,
) -> Vec<SpecError> {
    let mut errs = Vec::new();
    let mut err = |path: String, message: String| errs.push(SpecError { path, message });
    for (name, t) in tables {
        let p = format!("tables.{name}");
        if t.primary_key.is_empty() {
            err(format!("{p}.primary_key"), "must name at least one column".into());
        }
        if t.name.split('.').count() != 2 || t.name.split('.').any(str::is_empty) {
            err(
                format!("{p}.name"),
                format!("'{}' must be schema-qualified, e.g. \"public.{}\"", t.name, t.name),
            );
        }
        if let Some(d) = &t.decommissioned {
            if d.values.is_empty() {
                err(
                    format!("{p}.decommissioned.values"),
                    "must list at least one value".into(),
                );
            }
        }
    }
    for (name, proj) in projections {
        let p = format!("projections.{name}");
        let Some(root) = tables.get(&proj.root) else {
            err(
                format!("{p}.root"),
                format!(
                    "unknown table '{}' (declared: {}); declare it under [tables.{}]",
                    proj.root,
                    known(tables.keys()),
                    proj.root
                ),
            );
            continue;
        };
        if let Some(tpl) = &proj.key {
            match parse_template(tpl) {
                Err(m) => err(format!("{p}.key"), m.to_string()),
                Ok(parts) => {
                    // An id over other columns is not the row's for good: after the column
                    // changes, the entry under the old id could not be found (it would stay,
                    // still active), and a deleted row's tombstone could take over the id of
                    // a new row with the same value.
                    let others: Vec<&str> = parts
                        .iter()
                        .filter_map(|part| match part {
                            TemplatePart::Col(c) if !root.primary_key.contains(c) => Some(c.as_str()),
                            _ => None,
                        })
                        .collect();
                    let lacking: Vec<&str> = root
                        .primary_key
                        .iter()
                        .filter(|c| !parts.contains(&TemplatePart::Col((*c).clone())))
                        .map(String::as_str)
                        .collect();
                    if others.is_empty() && !lacking.is_empty() {
                        err(
                            format!("{p}.key"),
                            format!(
                                "'{tpl}' leaves out primary-key column(s) {} of table {}: two rows would share one entry; add them (e.g. \"{}\")",
                                lacking.join(", "),
                                proj.root,
                                example_key(tpl, &root.primary_key)
                            ),
                        );
                    }
                    if !others.is_empty() {
                        err(
                            format!("{p}.key"),
                            format!(
                                "'{tpl}' uses {} not in the primary key of table {} ({}): an entry keyed by a column that can change would stay behind under its old key; build the key from primary-key columns only (e.g. \"{}\")",
                                others.iter().map(|c| format!("column '{c}'")).collect::<Vec<_>>().join(", "),
                                proj.root,
                                root.primary_key.join(", "),
                                example_key(tpl, &root.primary_key)
                            ),
                        );
                    }
                }
            }
        }
        if proj.active_set.is_some() != proj.active_when.is_some() {
            err(
                format!("{p}.active_set"),
                "active_set and active_when go together: set both or neither".into(),
            );
        }
        check_relations(&p, root, &proj.relations, tables, &mut err);
    }
    errs
}

fn check_relations(
    path: &str,
    parent: &TableSpec,
    rels: &[RelationSpec],
    tables: &BTreeMap<String, TableSpec>,
    err: &mut impl FnMut(String, String),
) {
    let mut seen = BTreeSet::new();
    for (i, r) in rels.iter().enumerate() {
        let p = format!("{path}.relations[{i}]");
        if !seen.insert(&r.name) {
            err(format!("{p}.name"), format!("duplicate relation name '{}'", r.name));
        }
        if r.local.is_empty() || r.local.len() != r.remote.len() {
            err(
                format!("{p}.local"),
                "local and remote must list the same, non-zero number of columns".into(),
            );
        }
        if r.kind == Cardinality::One && (!r.order_by.is_empty() || r.count.is_some()) {
            err(format!("{p}.kind"), "order_by and count need kind = \"many\"".into());
        }
        let _ = parent;
        match tables.get(&r.table) {
            None => err(
                format!("{p}.table"),
                format!("unknown table '{}' (declared: {})", r.table, known(tables.keys())),
            ),
            Some(t) => check_relations(&p, t, &r.relations, tables, err),
        }
    }
}

/// `tpl`'s literal prefix followed by the primary-key placeholders, for error messages.
fn example_key(tpl: &str, pk: &[String]) -> String {
    let prefix = tpl.split('{').next().unwrap_or_default();
    let cols: Vec<String> = pk.iter().map(|c| format!("{{{c}}}")).collect();
    format!("{prefix}{}", cols.join(":"))
}

/// A key template: literal text with `{column}` placeholders.
#[derive(Clone, Debug, PartialEq)]
pub enum TemplatePart {
    Lit(String),
    Col(String),
}

/// Why a key template cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum TemplateError {
    #[error("'{0}': unclosed '{{'")]
    Unclosed(String),
    #[error("'{0}': empty or nested placeholder")]
    EmptyPlaceholder(String),
    #[error("'{0}': '}}' without '{{'")]
    StrayClose(String),
    #[error("'{0}' has no {{column}} placeholder: every row would share one key")]
    NoPlaceholder(String),
}

pub fn parse_template(tpl: &str) -> Result<Vec<TemplatePart>, TemplateError> {
    let mut parts = Vec::new();
    let mut rest = tpl;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            parts.push(TemplatePart::Lit(rest[..open].to_string()));
        }
        let after = &rest[open + 1..];
        let close = after.find('}').ok_or_else(|| TemplateError::Unclosed(tpl.to_owned()))?;
        let col = &after[..close];
        if col.is_empty() || col.contains('{') {
            return Err(TemplateError::EmptyPlaceholder(tpl.to_owned()));
        }
        parts.push(TemplatePart::Col(col.to_string()));
        rest = &after[close + 1..];
    }
    if rest.contains('}') {
        return Err(TemplateError::StrayClose(tpl.to_owned()));
    }
    if !rest.is_empty() {
        parts.push(TemplatePart::Lit(rest.to_string()));
    }
    if !parts.iter().any(|p| matches!(p, TemplatePart::Col(_))) {
        return Err(TemplateError::NoPlaceholder(tpl.to_owned()));
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(source: &str, name: &str) -> TableSpec {
        TableSpec {
            source: source.into(),
            name: name.into(),
            primary_key: default_pk(),
            decommissioned: None,
        }
    }

    /// A cache projection of `root` with nothing but its key.
    fn cache_spec(root: &str, key: Option<&str>) -> ProjectionSpec {
        ProjectionSpec {
            root: root.into(),
            sink: "redis".into(),
            key: key.map(str::to_string),
            fields: vec![],
            rename: BTreeMap::new(),
            relations: vec![],
            on_delete: OnDelete::Tombstone,
            active_set: None,
            active_when: None,
            tombstone_ttl_ms: None,
            index: None,
            meta: false,
        }
    }

    #[test]
    fn template_parses_and_rejects() {
        assert_eq!(
            parse_template("ordering:product:{id}").unwrap(),
            vec![
                TemplatePart::Lit("ordering:product:".into()),
                TemplatePart::Col("id".into())
            ]
        );
        assert!(parse_template("static").is_err());
        assert!(parse_template("a:{id").is_err());
        assert!(parse_template("a:{}").is_err());
        assert!(parse_template("a}{id}").is_ok_and(|p| p.len() == 2));
    }

    #[test]
    fn validate_names_key_paths() {
        let mut tables = BTreeMap::new();
        tables.insert("products".to_string(), table("catalog", "products"));
        let mut projections = BTreeMap::new();
        projections.insert("cache".to_string(), cache_spec("product", None));
        let errs = validate(&tables, &projections);
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, vec!["tables.products.name", "projections.cache.root"]);
        assert!(errs[1].message.contains("declared: products"), "{}", errs[1]);
    }

    #[test]
    fn key_templates_use_only_primary_key_columns() {
        let mut tables = BTreeMap::new();
        tables.insert("products".to_string(), table("catalog", "public.products"));
        let spec = |key: &str| cache_spec("products", Some(key));
        let check = |key: &str| validate(&tables, &BTreeMap::from([("cache".to_string(), spec(key))]));
        assert!(check("p:{id}").is_empty());
        let mut keyed = tables.clone();
        keyed.get_mut("products").unwrap().primary_key = vec!["id".into(), "day".into()];
        let two = |key: &str| validate(&keyed, &BTreeMap::from([("cache".to_string(), spec(key))]));
        assert!(two("p:{id}:{day}").is_empty());
        let errs = two("p:{id}");
        assert!(
            errs.len() == 1 && errs[0].message.contains("leaves out primary-key column(s) day"),
            "{errs:?}"
        );
        let errs = check("p:{sku}");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].path, "projections.cache.key");
        assert!(
            errs[0]
                .message
                .contains("column 'sku' not in the primary key of table products (id)")
                && errs[0].message.contains("\"p:{id}\""),
            "{}",
            errs[0]
        );
    }
}
