//! The state rules: how a change meets the stored row. Pure: the decisions need only the
//! stored row, the change and the table's rules; where rows live is [`Rows`]'s business
//! (SQLite in the worker, a map in the property tests).
//!
//! Invariants (each a rule below):
//! * **Newer wins.** A change whose position is not newer than the stored row's leaves the
//!   row as it is, except that it *fills* needed columns the stored image lacks (an
//!   unchanged-TOAST update streamed before a snapshot or re-read supplied the row whole);
//!   it still names the row, so its documents are rendered again (a replay after a crash
//!   must reach the sinks).
//! * **Unchanged TOAST** cells take the value the row had: from the old key's image when
//!   the change moves the row to a new key, else from the stored image; without either
//!   the column stays missing and is reported.
//! * **Tombstones, not holes.** A delete keeps the last image with a `Deleted` tombstone
//!   (and remembers a never-seen row's key, so an older replay cannot resurrect it); an
//!   update into the table's decommissioned state keeps the image with a `Decommissioned`
//!   tombstone whose time is when it first became one. A time of 0 (a snapshot read: it
//!   cannot know when) stays unknown.
//! * **Truncate watermarks.** A TRUNCATE is remembered with its position; a row whose
//!   position is older than a TRUNCATE of its table is read as deleted by the first such
//!   TRUNCATE ([`effective`]), with its last image. So an insert that reached us after the
//!   TRUNCATE (from another Kafka partition, say) was removed by it, whatever order the two
//!   arrived in. One thing a late TRUNCATE cannot correct: a row decommissioned before it
//!   and written again, decommissioned, after it keeps the earlier decommission time when
//!   the TRUNCATE arrives after the later write.
//!
//! Per row, these rules make the stored state a function of the set of changes seen, as
//! long as each row's own changes arrive in their order with any replays of earlier ones
//! (Postgres streams in commit order; Kafka keeps a key's records in one partition): the
//! property test in `merge_tests.rs` checks exactly that.

use super::StoreError;
use std::collections::BTreeSet;
use viewkeeper_core::model::{Cell, Change, Key, Op, Origin, Position, Row, StoredRow, Tombstone, TombstoneKind};
use viewkeeper_projections::spec::TableSpec;

/// A stored row with the position (and log place) of the change that wrote it.
#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    pub row: StoredRow,
    pub pos: Position,
    pub origin: Option<Origin>,
}

/// Where rows are kept, as the rules need them. `save` also maintains reverse indexes
/// (it gets the image being replaced).
pub trait Rows {
    fn load(&self, table: &str, key: &Key) -> Result<Option<Stored>, StoreError>;
    fn save(&self, table: &str, s: &Stored, replaced: Option<&Row>) -> Result<(), StoreError>;
    fn keys(&self, table: &str) -> Result<Vec<Key>, StoreError>;
    /// The table's first TRUNCATE after `pos`: its position and commit time.
    fn truncated_after(&self, table: &str, pos: Position) -> Result<Option<(Position, i64)>, StoreError>;
    fn add_truncation(&self, table: &str, pos: Position, at_ms: i64) -> Result<(), StoreError>;
}

/// What the rules know of a table.
#[derive(Clone, Copy)]
pub struct TableRules<'a> {
    pub spec: &'a TableSpec,
    /// The columns projections read: the only ones kept.
    pub needed: &'a BTreeSet<String>,
}

/// The outcome of applying one change: row images whose documents must be
/// re-rendered (old and new image; the stored image for a no-op).
#[derive(Debug, Default, PartialEq)]
pub struct Applied {
    /// The row's images before and after (several for a key change or a truncate).
    pub images: Vec<Row>,
    /// An update of a stored row in place: same key, same tombstone; `images` holds
    /// exactly the stored image and the new one. Projections whose columns of this table
    /// are equal in both need not render anything for it.
    pub in_place: bool,
    /// Columns sent as "unchanged TOAST" for which no stored value exists.
    pub missing_unchanged: Vec<String>,
}

/// The tombstone time of a change: its commit time, unknown for 0 (snapshot reads).
fn time_of(change: &Change) -> Option<i64> {
    (change.commit_time_ms > 0).then_some(change.commit_time_ms)
}

/// Whether a change at `pos` (read at `origin`) is newer than the stored row: its position
/// is higher, or the stored row is a snapshot read (minor 0) and the change was streamed
/// after it in the same log (see [`Origin`]).
pub fn supersedes(pos: Position, origin: Option<&Origin>, stored: &Stored) -> bool {
    if stored.pos.minor == 0 && pos.minor != 0 {
        if let (Some(read), Some(now)) = (&stored.origin, origin) {
            if read.stream == now.stream {
                return now.offset > read.offset;
            }
        }
    }
    pos > stored.pos
}

/// Applies one change to `rows` under `rules`.
pub fn apply(rows: &impl Rows, rules: TableRules<'_>, change: &Change) -> Result<Applied, StoreError> {
    let table = change.table.as_str();
    let mut applied = Applied::default();
    match &change.op {
        Op::Upsert { cells } => upsert(rows, rules, change, cells, &mut applied)?,
        Op::Delete => delete(rows, rules, table, &change.key, change, &mut applied)?,
        Op::Truncate => {
            // Rows keep their own positions: a row older than the TRUNCATE reads as deleted
            // by it ([`effective`]), and its later changes from before the TRUNCATE (that
            // may still arrive from another partition) still apply to its last image.
            for k in rows.keys(table)? {
                if let Some(s) = rows.load(table, &k)? {
                    applied.images.push(s.row.image);
                }
            }
            rows.add_truncation(table, change.position, change.commit_time_ms)?;
        }
    }
    Ok(applied)
}

fn upsert(
    rows: &impl Rows,
    rules: TableRules<'_>,
    change: &Change,
    cells: &[(String, Cell)],
    applied: &mut Applied,
) -> Result<(), StoreError> {
    let table = change.table.as_str();
    let needed = rules.needed;
    // A primary-key change moves the row: the old key becomes a tombstone, and its image
    // supplies the unchanged TOAST values (the new key has none, or a former row's).
    let moved_from = change.old_key.as_ref().filter(|k| **k != change.key);
    let mut prior: Option<Row> = None;
    if let Some(old_key) = moved_from {
        prior = rows.load(table, old_key)?.map(|s| s.row.image);
        delete(rows, rules, table, old_key, change, applied)?;
    }
    let stored = rows.load(table, &change.key)?;
    if let Some(st) = &stored {
        if !supersedes(change.position, change.origin.as_ref(), st) {
            let s = &st.row;
            let mut image = s.image.clone();
            for (col, cell) in cells {
                if let Cell::Value(v) = cell {
                    if needed.contains(col) && !image.contains_key(col) {
                        image.insert(col.clone(), v.clone());
                    }
                }
            }
            if image.len() > s.image.len() {
                let filled = Stored {
                    row: StoredRow { image, ..s.clone() },
                    ..st.clone()
                };
                rows.save(table, &filled, Some(&s.image))?;
                applied.images.push(s.image.clone());
                applied.images.push(filled.row.image);
            } else {
                applied.images.push(image);
            }
            return Ok(());
        }
    }
    let mut image = Row::new();
    for (col, cell) in cells {
        if !needed.contains(col) {
            continue;
        }
        match cell {
            Cell::Value(v) => {
                image.insert(col.clone(), v.clone());
            }
            Cell::Unchanged => {
                let had = match &prior {
                    Some(p) => p.get(col),
                    None => stored.as_ref().and_then(|s| s.row.image.get(col)),
                };
                match had {
                    Some(v) => {
                        image.insert(col.clone(), v.clone());
                    }
                    None => applied.missing_unchanged.push(col.clone()),
                }
            }
        }
    }
    // The stored row as readers see it now, and as it was just before this change (a
    // TRUNCATE between the two deleted it).
    let truncated = match &stored {
        Some(s) => rows.truncated_after(table, s.pos)?,
        None => None,
    };
    let was = stored.as_ref().map(|s| effective(s.row.clone(), truncated).tombstone);
    let before_change = truncated.filter(|(t, _)| *t < change.position);
    let old_tomb = stored
        .as_ref()
        .and_then(|s| effective(s.row.clone(), before_change).tombstone);
    let tombstone = match &rules.spec.decommissioned {
        Some(rule) if rule.matches(&image) => Some(match old_tomb {
            Some(t) if t.kind == TombstoneKind::Decommissioned => t,
            _ => Tombstone {
                kind: TombstoneKind::Decommissioned,
                at_ms: time_of(change),
            },
        }),
        _ => None,
    };
    let row = StoredRow {
        key: change.key.clone(),
        image,
        tombstone,
    };
    // In place: the same key and, as readers see it, the same tombstone.
    let is = effective(row.clone(), rows.truncated_after(table, change.position)?).tombstone;
    let old_image = stored.map(|s| s.row.image);
    let new = Stored {
        row,
        pos: change.position,
        origin: change.origin.clone(),
    };
    rows.save(table, &new, old_image.as_ref())?;
    let row = new.row;
    applied.in_place = moved_from.is_none() && was.is_some_and(|w| w == is);
    applied.images.extend(old_image);
    applied.images.push(row.image);
    Ok(())
}

/// The row as readers see it. `truncated`: the first TRUNCATE of its table after the row's
/// position (position and commit time), which deleted it, at the time it stopped being
/// live (decommissioned), else at the TRUNCATE's.
pub fn effective(mut row: StoredRow, truncated: Option<(Position, i64)>) -> StoredRow {
    if let Some((_, tat)) = truncated {
        let live_until = row.tombstone.as_ref().and_then(|t| t.at_ms);
        let at_ms = live_until.or((tat > 0).then_some(tat));
        row.tombstone = Some(Tombstone {
            kind: TombstoneKind::Deleted,
            at_ms,
        });
    }
    row
}

fn delete(
    rows: &impl Rows,
    rules: TableRules<'_>,
    table: &str,
    key: &Key,
    change: &Change,
    applied: &mut Applied,
) -> Result<(), StoreError> {
    match rows.load(table, key)? {
        Some(st) if !supersedes(change.position, change.origin.as_ref(), &st) => applied.images.push(st.row.image),
        Some(st) => {
            let mut s = st.row;
            let image = s.image.clone();
            if !matches!(&s.tombstone, Some(t) if t.kind == TombstoneKind::Deleted) {
                s.tombstone = Some(Tombstone {
                    kind: TombstoneKind::Deleted,
                    // Decommissioned before: that is when it stopped being live.
                    at_ms: s.tombstone.and_then(|t| t.at_ms).or(time_of(change)),
                });
            }
            let new = Stored {
                row: s,
                pos: change.position,
                origin: change.origin.clone(),
            };
            rows.save(table, &new, Some(&image))?;
            applied.images.push(new.row.image);
        }
        None => {
            // Never seen: remember the tombstone (so an older replay cannot resurrect
            // it), with the key columns as its only image.
            let mut image = Row::new();
            for (c, v) in rules.spec.primary_key.iter().zip(key.values()) {
                image.insert(c.clone(), v);
            }
            let new = Stored {
                row: StoredRow {
                    key: key.clone(),
                    image,
                    tombstone: Some(Tombstone {
                        kind: TombstoneKind::Deleted,
                        at_ms: time_of(change),
                    }),
                },
                pos: change.position,
                origin: change.origin.clone(),
            };
            rows.save(table, &new, None)?;
            applied.images.push(new.row.image);
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "merge_tests.rs"]
mod tests;
