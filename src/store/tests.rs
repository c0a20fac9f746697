//! State store semantics on a real SQLite file in a temp dir.

use super::*;
use serde_json::{json, Value};
use viewkeeper_core::model::{format_ms, Cell, Change, Key, Op, Position, StoredRow, TombstoneKind};
use viewkeeper_core::Checkpoint;
use viewkeeper_projections::render::RowLookup;
use viewkeeper_projections::spec::Condition;

fn catalog() -> Catalog {
    let mut c = Catalog::default();
    c.tables.insert(
        "products".into(),
        TableSpec {
            source: "catalog".into(),
            name: "public.products".into(),
            primary_key: vec!["id".into()],
            decommissioned: Some(Condition {
                column: "status".into(),
                values: vec![json!("decommissioned")],
            }),
        },
    );
    c.tables.insert(
        "items".into(),
        TableSpec {
            source: "ordering".into(),
            name: "public.order_items".into(),
            primary_key: vec!["order_id".into(), "line_no".into()],
            decommissioned: None,
        },
    );
    c.needed_columns.insert(
        "products".into(),
        ["id", "name", "status", "description"].map(String::from).into(),
    );
    c.needed_columns.insert(
        "items".into(),
        ["order_id", "line_no", "product_id"].map(String::from).into(),
    );
    c.indexes.insert(("items".into(), vec!["product_id".into()]));
    c
}

fn upsert(table: &str, key: Value, cells: Vec<(&str, Cell)>, pos: u64) -> Change {
    Change {
        table: table.into(),
        key: Key::from_values(key.as_array().unwrap()),
        old_key: None,
        op: Op::Upsert {
            cells: cells.into_iter().map(|(c, v)| (c.to_string(), v)).collect(),
        },
        position: Position::new(pos, 0),
        commit_time_ms: pos as i64 * 1000,
        origin: None,
    }
}

fn v(x: Value) -> Cell {
    Cell::Value(x)
}

fn get(store: &Store, table: &str, key: Value) -> Option<StoredRow> {
    store.get(table, &Key::from_values(key.as_array().unwrap())).unwrap()
}

fn apply(store: &mut Store, c: &Change) -> Applied {
    let tx = store.begin().unwrap();
    let a = tx.apply(c).unwrap();
    tx.commit().unwrap();
    a
}

#[test]
fn upsert_keeps_needed_columns_and_older_positions_are_noops() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), catalog()).unwrap();
    let c = upsert(
        "products",
        json!([1]),
        vec![
            ("id", v(json!(1))),
            ("name", v(json!("A"))),
            ("price", v(json!("1.00"))),
            ("status", v(json!("active"))),
        ],
        10,
    );
    apply(&mut s, &c);
    let r = get(&s, "products", json!([1])).unwrap();
    assert_eq!(
        r.image,
        json!({"id": 1, "name": "A", "status": "active"})
            .as_object()
            .unwrap()
            .clone(),
        "price is not needed"
    );
    // A replayed older change does not win, but still names the row for re-rendering.
    let old = upsert(
        "products",
        json!([1]),
        vec![
            ("id", v(json!(1))),
            ("name", v(json!("OLD"))),
            ("status", v(json!("active"))),
        ],
        9,
    );
    let a = apply(&mut s, &old);
    assert_eq!(get(&s, "products", json!([1])).unwrap().image["name"], json!("A"));
    assert_eq!(a.images.len(), 1);
    assert_eq!(a.images[0]["name"], json!("A"));
}

#[test]
fn unchanged_toast_is_merged_from_the_stored_image() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), catalog()).unwrap();
    let big = "x".repeat(20_000);
    apply(
        &mut s,
        &upsert(
            "products",
            json!([1]),
            vec![
                ("id", v(json!(1))),
                ("description", v(json!(big))),
                ("status", v(json!("active"))),
            ],
            1,
        ),
    );
    let a = apply(
        &mut s,
        &upsert(
            "products",
            json!([1]),
            vec![
                ("id", v(json!(1))),
                ("description", Cell::Unchanged),
                ("status", v(json!("draft"))),
            ],
            2,
        ),
    );
    assert!(a.missing_unchanged.is_empty());
    let r = get(&s, "products", json!([1])).unwrap();
    assert_eq!(r.image["description"].as_str().unwrap().len(), 20_000);
    assert_eq!(r.image["status"], json!("draft"));
    // No stored image: the column is reported, never stored as a placeholder.
    let a = apply(
        &mut s,
        &upsert(
            "products",
            json!([2]),
            vec![
                ("id", v(json!(2))),
                ("description", Cell::Unchanged),
                ("status", v(json!("new"))),
            ],
            3,
        ),
    );
    assert_eq!(a.missing_unchanged, vec!["description".to_string()]);
    assert!(get(&s, "products", json!([2]))
        .unwrap()
        .image
        .get("description")
        .is_none());
    // An older whole image (a snapshot row read after the catch-up streamed the update)
    // fills in what is missing and changes nothing else.
    let a = apply(
        &mut s,
        &upsert(
            "products",
            json!([2]),
            vec![
                ("id", v(json!(2))),
                ("description", v(json!("whole"))),
                ("status", v(json!("old"))),
            ],
            1,
        ),
    );
    assert!(a.missing_unchanged.is_empty());
    let r = get(&s, "products", json!([2])).unwrap();
    assert_eq!(r.image["description"], json!("whole"));
    assert_eq!(r.image["status"], json!("new"), "newer values kept");
}

#[test]
fn decommission_delete_and_revival() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), catalog()).unwrap();
    let row = |st: &str, pos| {
        upsert(
            "products",
            json!([1]),
            vec![("id", v(json!(1))), ("name", v(json!("A"))), ("status", v(json!(st)))],
            pos,
        )
    };
    apply(&mut s, &row("active", 1));
    apply(&mut s, &row("decommissioned", 2));
    let t = get(&s, "products", json!([1])).unwrap().tombstone.unwrap();
    assert_eq!((t.kind, t.at_ms), (TombstoneKind::Decommissioned, Some(2000)));
    apply(&mut s, &row("decommissioned", 3));
    assert_eq!(
        get(&s, "products", json!([1])).unwrap().tombstone.unwrap().at_ms,
        Some(2000),
        "first time kept"
    );
    apply(&mut s, &row("active", 4));
    assert!(get(&s, "products", json!([1])).unwrap().tombstone.is_none(), "revived");
    let mut del = row("active", 5);
    del.op = Op::Delete;
    apply(&mut s, &del);
    let r = get(&s, "products", json!([1])).unwrap();
    assert_eq!(r.tombstone.unwrap().kind, TombstoneKind::Deleted);
    assert_eq!(r.image["name"], json!("A"), "last image kept");
    apply(&mut s, &row("active", 6));
    assert!(
        get(&s, "products", json!([1])).unwrap().tombstone.is_none(),
        "re-insert revives"
    );
    assert_eq!(format_ms(2000), "1970-01-01T00:00:02.000Z");
}

#[test]
fn truncate_tombstones_every_row_and_key_change_moves() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), catalog()).unwrap();
    for id in 1..=3 {
        apply(
            &mut s,
            &upsert(
                "products",
                json!([id]),
                vec![("id", v(json!(id))), ("status", v(json!("active")))],
                id as u64,
            ),
        );
    }
    let mut moved = upsert(
        "products",
        json!([30]),
        vec![("id", v(json!(30))), ("status", v(json!("active")))],
        4,
    );
    moved.old_key = Some(Key::from_values(&[json!(3)]));
    let a = apply(&mut s, &moved);
    assert_eq!(a.images.len(), 2);
    assert_eq!(
        get(&s, "products", json!([3])).unwrap().tombstone.unwrap().kind,
        TombstoneKind::Deleted
    );
    assert!(get(&s, "products", json!([30])).unwrap().tombstone.is_none());
    let mut t = upsert("products", json!([]), vec![], 5);
    t.op = Op::Truncate;
    let a = apply(&mut s, &t);
    assert_eq!(a.images.len(), 4);
    for id in [1, 2, 3, 30] {
        assert!(get(&s, "products", json!([id])).unwrap().tombstone.is_some(), "{id}");
    }
}

#[test]
fn reverse_index_follows_updates_and_is_built_for_new_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let mut cat = catalog();
    cat.indexes.clear();
    {
        let mut s = Store::open(dir.path(), cat.clone()).unwrap();
        apply(
            &mut s,
            &upsert(
                "items",
                json!([1, 1]),
                vec![
                    ("order_id", v(json!(1))),
                    ("line_no", v(json!(1))),
                    ("product_id", v(json!(42))),
                ],
                1,
            ),
        );
    }
    let mut s = Store::open(dir.path(), catalog()).unwrap();
    let find = |s: &Store, pid: i64| {
        s.find("items", &["product_id".to_string()], &[json!(pid)])
            .unwrap()
            .len()
    };
    assert_eq!(find(&s, 42), 1, "index built on open from existing rows");
    apply(
        &mut s,
        &upsert(
            "items",
            json!([1, 1]),
            vec![
                ("order_id", v(json!(1))),
                ("line_no", v(json!(1))),
                ("product_id", v(json!(43))),
            ],
            2,
        ),
    );
    assert_eq!((find(&s, 42), find(&s, 43)), (0, 1));
}

#[test]
fn clock_is_monotonic_and_hybrid() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), catalog()).unwrap();
    let tx = s.begin().unwrap();
    let a = tx.next_versions(10).unwrap();
    let b = tx.next_versions(1).unwrap();
    tx.commit().unwrap();
    assert!(b >= a + 10);
    assert!(a >= (now_ms() as u64 - 60_000) << 20);
}

#[test]
fn checkpoints_only_move_forward_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut s = Store::open(dir.path(), catalog()).unwrap();
        s.set_checkpoints(&[("catalog".to_string(), Checkpoint::Lsn(100))].into(), None)
            .unwrap();
        s.set_checkpoints(&[("catalog".to_string(), Checkpoint::Lsn(50))].into(), None)
            .unwrap();
    }
    let s = Store::open_read_only(dir.path(), catalog()).unwrap();
    assert_eq!(s.checkpoint("catalog").unwrap(), Some(Checkpoint::Lsn(100)));
    assert_eq!(s.checkpoint("nope").unwrap(), None);
}

#[test]
fn in_place_marks_updates_that_keep_key_and_tombstone() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), catalog()).unwrap();
    let row = |name: &str, status: &str, pos| {
        upsert(
            "products",
            json!([1]),
            vec![
                ("id", v(json!(1))),
                ("name", v(json!(name))),
                ("status", v(json!(status))),
            ],
            pos,
        )
    };
    let a = apply(&mut s, &row("a", "active", 1));
    assert!(!a.in_place, "an insert is not in place");
    let a = apply(&mut s, &row("b", "active", 2));
    assert!(a.in_place);
    assert_eq!(a.images.len(), 2);
    assert_eq!(a.images[0]["name"], json!("a"));
    assert_eq!(a.images[1]["name"], json!("b"));
    let a = apply(&mut s, &row("b", "decommissioned", 3));
    assert!(!a.in_place, "decommissioning changes the tombstone");
    let a = apply(&mut s, &row("c", "decommissioned", 4));
    assert!(a.in_place, "an update of a decommissioned row keeps its tombstone");
    let del = Change {
        op: Op::Delete,
        ..row("c", "decommissioned", 5)
    };
    apply(&mut s, &del);
    let a = apply(&mut s, &row("c", "decommissioned", 6));
    assert!(!a.in_place, "a row inserted again after its delete is not in place");
    let mut moved = row("d", "active", 7);
    moved.old_key = Some(moved.key.clone());
    moved.key = Key::from_values(&[json!(2)]);
    let a = apply(&mut s, &moved);
    assert!(!a.in_place, "a key change moves the row");
}

#[test]
fn a_second_writer_waits_instead_of_breaking_a_transaction_in_progress() {
    // The worker's apply transaction reads, then writes; a rebuild in another process
    // commits in between. The worker's transaction must not fail at its first write.
    let dir = tempfile::tempdir().unwrap();
    let mut a = Store::open(dir.path(), catalog()).unwrap();
    let path = dir.path().to_path_buf();
    apply(
        &mut a,
        &upsert(
            "products",
            json!([1]),
            vec![("id", v(json!(1))), ("name", v(json!("a")))],
            1,
        ),
    );
    let tx = a.begin().unwrap();
    assert!(tx.get("products", &Key::from_values(&[json!(1)])).unwrap().is_some());
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let other = std::thread::spawn(move || {
        let mut b = Store::open(&path, catalog()).unwrap();
        let btx = b.begin().unwrap();
        let first = btx.next_versions(1).unwrap();
        btx.commit().unwrap();
        done_tx.send(()).unwrap();
        first
    });
    // The other writer cannot commit while this transaction is open.
    assert!(done_rx.recv_timeout(std::time::Duration::from_millis(500)).is_err());
    let mine = tx
        .next_versions(1)
        .expect("the first write of a transaction in progress");
    tx.apply(&upsert(
        "products",
        json!([1]),
        vec![("id", v(json!(1))), ("name", v(json!("b")))],
        2,
    ))
    .unwrap();
    tx.commit().unwrap();
    let theirs = other.join().unwrap();
    assert!(theirs > mine, "versions stay ordered across writers: {theirs} > {mine}");
    assert_eq!(get(&a, "products", json!([1])).unwrap().image["name"], json!("b"));
}

#[test]
fn pending_roots_survive_until_their_batch_is_checkpointed() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), catalog()).unwrap();
    let k = |i: i64| Key::from_values(&[json!(i)]);
    {
        let tx = s.begin().unwrap();
        tx.add_pending("p", [&k(1), &k(2)], 10).unwrap();
        tx.commit().unwrap();
        let tx = s.begin().unwrap();
        tx.add_pending("p", [&k(2), &k(3)], 11).unwrap();
        tx.add_pending("q", [&k(1)], 11).unwrap();
        tx.commit().unwrap();
    }
    drop(s);
    let mut s = Store::open(dir.path(), catalog()).unwrap();
    let p = s.pending().unwrap();
    assert_eq!(p.through, 11);
    assert_eq!(p.roots["p"], vec![k(1), k(2), k(3)]);
    // Batch 10 durable: what batch 11 also wrote stays.
    s.set_checkpoints(&[("catalog".to_string(), Checkpoint::Lsn(5))].into(), Some(10))
        .unwrap();
    let p = s.pending().unwrap();
    assert_eq!(p.roots["p"], vec![k(2), k(3)]);
    assert_eq!(p.roots["q"], vec![k(1)]);
    s.clear_pending(11).unwrap();
    assert_eq!(s.pending().unwrap(), checkpoints::Pending::default());
}

#[test]
fn a_row_older_than_a_truncate_reads_as_deleted_by_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), catalog()).unwrap();
    let mut t = upsert("products", json!([]), vec![], 5);
    t.op = Op::Truncate;
    apply(&mut s, &t);
    // From another partition: inserted before the TRUNCATE, arriving after it.
    apply(
        &mut s,
        &upsert(
            "products",
            json!([1]),
            vec![("id", v(json!(1))), ("name", v(json!("A")))],
            3,
        ),
    );
    let r = get(&s, "products", json!([1])).unwrap();
    assert_eq!(r.image["name"], json!("A"), "last image kept");
    let tomb = r.tombstone.unwrap();
    assert_eq!((tomb.kind, tomb.at_ms), (TombstoneKind::Deleted, Some(5000)));
    // Inserted after the TRUNCATE: live.
    apply(
        &mut s,
        &upsert(
            "products",
            json!([1]),
            vec![("id", v(json!(1))), ("name", v(json!("B")))],
            6,
        ),
    );
    assert!(get(&s, "products", json!([1])).unwrap().tombstone.is_none());
}

#[test]
fn shape_growth_is_recorded_with_its_reloads_and_other_writers_must_fit() {
    let dir = tempfile::tempdir().unwrap();
    let mut small = catalog();
    small.needed_columns.get_mut("products").unwrap().remove("description");
    {
        let mut s = Store::open(dir.path(), small.clone()).unwrap();
        assert!(s.shape_growth().unwrap().is_empty(), "a new store adopts its catalog");
        s.adopt_shape(&shape::Adoption::default()).unwrap();
    }
    // A writer beside the worker with a bigger config is refused, naming what is missing.
    let err = Store::open_beside(dir.path(), catalog()).err().unwrap().to_string();
    assert!(err.contains("table products lacks column(s) description"), "{err}");
    assert!(Store::open_beside(dir.path(), small.clone()).is_ok());
    // The worker with the bigger config: growth, recorded with the re-read in one step.
    let mut s = Store::open(dir.path(), catalog()).unwrap();
    let growth = s.shape_growth().unwrap();
    assert_eq!(growth["products"], ["description".to_string()].into());
    s.adopt_shape(&shape::Adoption {
        reloads: vec![("catalog".into(), "public.products".into())],
        ..Default::default()
    })
    .unwrap();
    assert!(s.shape_growth().unwrap().is_empty());
    assert!(s.reloads_pending(Some("catalog")).unwrap());
    assert!(!s.reloads_pending(Some("ordering")).unwrap());
    assert!(Store::open_beside(dir.path(), catalog()).is_ok());
    // Indexes: a config that needs an index the store does not keep is refused beside it.
    let mut more = catalog();
    more.indexes.insert(("products".into(), vec!["name".into()]));
    let err = Store::open_beside(dir.path(), more).err().unwrap().to_string();
    assert!(err.contains("no reverse index on products(name)"), "{err}");
}

#[test]
fn one_worker_per_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let lock = WorkerLock::acquire(dir.path()).unwrap();
    let err = WorkerLock::acquire(dir.path()).err().unwrap().to_string();
    assert!(
        err.contains(&format!("(pid {})", std::process::id())) && err.contains("one worker per data dir"),
        "{err}"
    );
    drop(lock);
    assert!(WorkerLock::acquire(dir.path()).is_ok());
}

/// The row as a write transaction sees it (through the row cache).
fn get_in_tx(store: &mut Store, table: &str, key: Value) -> Option<StoredRow> {
    let tx = store.begin().unwrap();
    tx.get(table, &Key::from_values(key.as_array().unwrap())).unwrap()
}

fn name_of(row: Option<StoredRow>) -> Option<Value> {
    row.and_then(|r| r.image.get("name").cloned())
}

#[test]
fn the_row_cache_forgets_what_a_rolled_back_transaction_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(dir.path(), catalog()).unwrap();
    apply(
        &mut s,
        &upsert(
            "products",
            json!([1]),
            vec![("id", v(json!(1))), ("name", v(json!("kept")))],
            10,
        ),
    );
    {
        let tx = s.begin().unwrap();
        tx.apply(&upsert(
            "products",
            json!([1]),
            vec![("id", v(json!(1))), ("name", v(json!("undone")))],
            11,
        ))
        .unwrap();
        let t = Change {
            op: Op::Truncate,
            ..upsert("products", json!([1]), vec![], 12)
        };
        tx.apply(&t).unwrap();
        assert_eq!(
            name_of(tx.get("products", &Key::from_values(&[json!(1)])).unwrap()),
            Some(json!("undone"))
        );
        // dropped: rolled back
    }
    let row = get_in_tx(&mut s, "products", json!([1])).unwrap();
    assert_eq!(row.image["name"], json!("kept"));
    assert!(row.tombstone.is_none(), "the rolled-back TRUNCATE is not remembered");
}

#[test]
fn the_row_cache_sees_what_another_process_committed() {
    let dir = tempfile::tempdir().unwrap();
    let mut worker = Store::open(dir.path(), catalog()).unwrap();
    apply(
        &mut worker,
        &upsert(
            "products",
            json!([1]),
            vec![("id", v(json!(1))), ("name", v(json!("old")))],
            10,
        ),
    );
    assert_eq!(
        name_of(get_in_tx(&mut worker, "products", json!([1]))),
        Some(json!("old"))
    );
    // A `dlq replay` or `verify --repair` beside the worker writes the row.
    let mut beside = Store::open_beside(dir.path(), catalog()).unwrap();
    apply(
        &mut beside,
        &upsert(
            "products",
            json!([1]),
            vec![("id", v(json!(1))), ("name", v(json!("new")))],
            11,
        ),
    );
    let t = Change {
        op: Op::Truncate,
        ..upsert("products", json!([1]), vec![], 12)
    };
    apply(&mut beside, &t);
    let row = get_in_tx(&mut worker, "products", json!([1])).unwrap();
    assert_eq!(row.image["name"], json!("new"));
    assert_eq!(row.tombstone.map(|t| t.kind), Some(TombstoneKind::Deleted));
}
