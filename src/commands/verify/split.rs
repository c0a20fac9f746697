//! A source split between workers by Kafka partition: the state store's `meta` record
//! `ownership` says which partitions of which tables this data dir's worker answers for.
//! For a projection rooted in a governed table, verify compares only the documents of
//! root rows whose origin partition (modulo `partitions`) is owned; the others are other
//! workers' (their rows may be stale here, or absent).
//!
//! The record and the origin query are read here through a connection of their own (a
//! read-only one; the worker writes the record, verify only reads it).

use crate::store::STATE_FILE;
use anyhow::Context;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use super::truth::Expected;

/// The `meta` key of the record.
pub(super) const OWNERSHIP_META: &str = "ownership";

pub use crate::store::streams::OwnershipRecord;

/// Parses the `ownership` meta value.
pub(super) fn parse_ownership(text: &str) -> anyhow::Result<OwnershipRecord> {
    let r: OwnershipRecord = serde_json::from_str(text).context("the state store's ownership record")?;
    anyhow::ensure!(r.partitions > 0, "ownership record: partitions must be at least 1");
    if let Some(p) = r.owned.iter().find(|p| **p >= r.partitions) {
        anyhow::bail!(
            "ownership record: owned partition {p} is not below partitions ({})",
            r.partitions
        );
    }
    Ok(r)
}

/// A read-only connection to the data dir's state store.
pub(super) fn open(data_dir: &Path) -> anyhow::Result<Connection> {
    let path = data_dir.join(STATE_FILE);
    let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("state store {}", path.display()))?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    Ok(conn)
}

/// The store's ownership record, if it has one.
pub(super) fn read_ownership(conn: &Connection) -> anyhow::Result<Option<OwnershipRecord>> {
    let v: Option<String> = conn
        .query_row("SELECT v FROM meta WHERE k = ?1", params![OWNERSHIP_META], |r| r.get(0))
        .optional()?;
    v.as_deref().map(parse_ownership).transpose()
}

/// Origin stream of every stored row of `table`, by canonical key.
pub(super) fn origins(conn: &Connection, table: &str) -> anyhow::Result<HashMap<String, Option<String>>> {
    let mut st = conn.prepare_cached("SELECT key, origin FROM rows WHERE tbl = ?1")?;
    let rows = st.query_map(params![table], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Splits what the truth renders: the documents of owned root rows (compared), and the
/// ids of the others (other workers').
pub(super) fn mine(
    want: BTreeMap<String, Expected>,
    owned_root: impl Fn(&str) -> bool,
) -> (BTreeMap<String, Expected>, BTreeSet<String>) {
    let mut mine = BTreeMap::new();
    let mut theirs = BTreeSet::new();
    for (id, e) in want {
        if owned_root(&e.root) {
            mine.insert(id, e);
        } else {
            theirs.insert(id);
        }
    }
    (mine, theirs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECORD: &str = r#"{"source":"ordering","partitions":4,"owned":[0,2],
        "governed":["orders","order_items","products","customers"],"since_ms":1764710000000}"#;

    #[test]
    fn parses_the_record_and_owns_by_partition_modulo() {
        let r = parse_ownership(RECORD).unwrap();
        assert_eq!(
            r,
            OwnershipRecord {
                source: "ordering".into(),
                partitions: 4,
                owned: vec![0, 2],
                governed: ["orders", "order_items", "products", "customers"]
                    .map(String::from)
                    .to_vec(),
                since_ms: 1_764_710_000_000,
            }
        );
        assert!(r.owns(Some("ordering.public.orders[0]")));
        assert!(r.owns(Some("ordering.public.orders[2]")));
        assert!(r.owns(Some("ordering.public.orders[6]")), "6 mod 4 = 2");
        assert!(!r.owns(Some("ordering.public.orders[1]")));
        assert!(!r.owns(Some("ordering.public.orders[7]")));
        assert!(!r.owns(Some("orders")), "no partition");
        assert!(!r.owns(Some("orders[x]")));
        assert!(!r.owns(None), "no origin: not known to be ours");
    }

    #[test]
    fn refuses_malformed_records() {
        assert!(parse_ownership("{").is_err());
        assert!(parse_ownership(r#"{"source":"s","partitions":0,"owned":[],"governed":[],"since_ms":0}"#).is_err());
        let e = parse_ownership(r#"{"source":"s","partitions":2,"owned":[2],"governed":[],"since_ms":0}"#).unwrap_err();
        assert!(e.to_string().contains("owned partition 2"), "{e}");
    }

    /// A state store with rows of two partitions: only the owned root rows' documents
    /// are compared, the others are counted as other workers'.
    #[test]
    fn selects_the_documents_of_owned_root_rows_from_a_state_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path(), Default::default()).unwrap();
        drop(store);
        let w = Connection::open(dir.path().join(STATE_FILE)).unwrap();
        for (key, origin) in [
            ("1", Some("t[0]")),
            ("2", Some("t[1]")),
            ("3", Some("t[0]")),
            ("4", None),
        ] {
            w.execute(
                "INSERT INTO rows(tbl, key, image, pos_major, pos_minor, origin) VALUES ('orders', ?1, '{}', 0, 0, ?2)",
                params![key, origin],
            )
            .unwrap();
        }
        let conn = open(dir.path()).unwrap();
        assert_eq!(read_ownership(&conn).unwrap(), None, "no record: not split");
        w.execute(
            "INSERT INTO meta(k, v) VALUES ('ownership', ?1)",
            params![r#"{"source":"o","partitions":2,"owned":[0],"governed":["orders"],"since_ms":1}"#],
        )
        .unwrap();
        let rec = read_ownership(&conn).unwrap().unwrap();
        let origins = origins(&conn, "orders").unwrap();
        let want: BTreeMap<String, Expected> = ["1", "2", "3", "4", "5"]
            .into_iter()
            .map(|k| {
                let e = Expected {
                    body: Some(Default::default()),
                    tombstoned: false,
                    member: k.into(),
                    root: k.into(),
                };
                (format!("doc{k}"), e)
            })
            .collect();
        let (mine, theirs) = mine(want, |root| rec.owns(origins.get(root).and_then(|o| o.as_deref())));
        assert_eq!(mine.keys().collect::<Vec<_>>(), ["doc1", "doc3"]);
        assert_eq!(theirs.iter().collect::<Vec<_>>(), ["doc2", "doc4", "doc5"]);
    }
}
