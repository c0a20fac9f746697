//! Rendering and fan-out over in-memory rows: no server involved.

use crate::mem::MemRows;
use crate::render::Projection;
use crate::spec::{ProjectionSpec, TableSpec};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use viewkeeper_core::model::{Key, Row, Tombstone, TombstoneKind};

fn row(v: Value) -> Row {
    v.as_object().unwrap().clone()
}

fn tables() -> BTreeMap<String, TableSpec> {
    let t: BTreeMap<String, TableSpec> = serde_json::from_value(json!({
        "customers": {"source": "identity", "name": "public.customers"},
        "products": {"source": "catalog", "name": "public.products",
                     "decommissioned": {"column": "status", "values": ["decommissioned"]}},
        "orders": {"source": "ordering", "name": "public.orders"},
        "order_items": {"source": "ordering", "name": "public.order_items",
                        "primary_key": ["order_id", "line_no"]}
    }))
    .unwrap();
    t
}

fn orders_view() -> Projection {
    let spec: ProjectionSpec = serde_json::from_value(json!({
        "root": "orders", "sink": "search",
        "fields": ["id", "status", "total", "created_at"],
        "rename": {"id": "order_id"},
        "relations": [
            {"name": "customer", "table": "customers", "local": ["customer_id"], "remote": ["id"],
             "fields": ["id", "name", "email"]},
            {"name": "items", "table": "order_items", "kind": "many", "local": ["id"],
             "remote": ["order_id"], "fields": ["line_no", "qty", "unit_price"],
             "order_by": ["line_no"], "count": "item_count",
             "relations": [
                {"name": "product", "table": "products", "local": ["product_id"], "remote": ["id"],
                 "fields": ["id", "sku", "name", "status"], "flag": "decommissioned"}
             ]}
        ]
    }))
    .unwrap();
    Projection::new("orders_view", &spec, &tables()).unwrap()
}

fn cache(key: &str, fields: &[&str]) -> Projection {
    let spec: ProjectionSpec = serde_json::from_value(json!({
        "root": "products", "sink": "cache", "key": key, "fields": fields,
    }))
    .unwrap();
    Projection::new("cache", &spec, &tables()).unwrap()
}

fn shop() -> MemRows {
    let mut m = MemRows::default();
    m.put(
        "customers",
        &["id"],
        row(json!({"id": 7, "name": "Ada", "email": "ada@example.com"})),
        None,
    );
    m.put(
        "products",
        &["id"],
        row(json!({"id": 42, "sku": "W-X", "name": "Widget X", "status": "active", "price": "9.99"})),
        None,
    );
    m.put(
        "products",
        &["id"],
        row(json!({"id": 43, "sku": "G-1", "name": "Gadget", "status": "active", "price": "1.00"})),
        None,
    );
    m.put("orders", &["id"], row(json!({"id": 1001, "customer_id": 7, "status": "paid", "total": "21.98", "created_at": "2026-01-02T03:04:05+00:00"})), None);
    for (line, pid) in [(2, 43), (1, 42), (10, 42)] {
        m.put(
            "order_items",
            &["order_id", "line_no"],
            row(json!({"order_id": 1001, "line_no": line, "product_id": pid, "qty": 1, "unit_price": "9.99"})),
            None,
        );
    }
    m
}

fn key(v: Value) -> Key {
    Key::from_values(v.as_array().unwrap().iter())
}

#[test]
fn renders_joined_order_with_sorted_items_and_count() {
    let doc = orders_view().render(&key(json!([1001])), &shop()).unwrap().unwrap();
    assert_eq!(doc.id, "1001");
    let b = Value::Object(doc.body.unwrap());
    assert_eq!(b["order_id"], json!(1001));
    assert_eq!(
        b["customer"],
        json!({"id": 7, "name": "Ada", "email": "ada@example.com"})
    );
    assert_eq!(b["item_count"], json!(3));
    let lines: Vec<&Value> = b["items"].as_array().unwrap().iter().map(|i| &i["line_no"]).collect();
    assert_eq!(
        lines,
        vec![&json!(1), &json!(2), &json!(10)],
        "numeric, not text, order"
    );
    assert_eq!(
        b["items"][0]["product"],
        json!({"id": 42, "sku": "W-X", "name": "Widget X", "status": "active", "decommissioned": false})
    );
}

#[test]
fn tombstoned_product_keeps_snapshot_and_flag() {
    let mut m = shop();
    let t = Some(Tombstone {
        kind: TombstoneKind::Deleted,
        at_ms: Some(1_000),
    });
    m.put(
        "products",
        &["id"],
        row(json!({"id": 42, "sku": "W-X", "name": "Widget X", "status": "active"})),
        t,
    );
    let b = orders_view()
        .render(&key(json!([1001])), &m)
        .unwrap()
        .unwrap()
        .body
        .unwrap();
    assert_eq!(
        b["items"][0]["product"],
        json!({"id": 42, "sku": "W-X", "name": "Widget X", "status": "decommissioned", "decommissioned": true})
    );
}

#[test]
fn missing_customer_and_product_render_unresolved() {
    let mut m = shop();
    m.put(
        "orders",
        &["id"],
        row(json!({"id": 1002, "customer_id": 99, "status": "new", "total": "0"})),
        None,
    );
    m.put(
        "order_items",
        &["order_id", "line_no"],
        row(json!({"order_id": 1002, "line_no": 1, "product_id": 777, "qty": 2})),
        None,
    );
    let b = orders_view()
        .render(&key(json!([1002])), &m)
        .unwrap()
        .unwrap()
        .body
        .unwrap();
    assert_eq!(b["customer"], json!({"id": 99, "unresolved": true}));
    assert_eq!(b["items"][0]["product"], json!({"id": 777, "unresolved": true}));
}

#[test]
fn deleted_items_leave_the_list_and_deleted_order_is_flagged() {
    let mut m = shop();
    let t = Some(Tombstone {
        kind: TombstoneKind::Deleted,
        at_ms: Some(1_700_000_000_000),
    });
    m.put(
        "order_items",
        &["order_id", "line_no"],
        row(json!({"order_id": 1001, "line_no": 2, "product_id": 43})),
        t.clone(),
    );
    m.put(
        "orders",
        &["id"],
        row(json!({"id": 1001, "customer_id": 7, "status": "paid", "total": "21.98"})),
        t,
    );
    let b = orders_view()
        .render(&key(json!([1001])), &m)
        .unwrap()
        .unwrap()
        .body
        .unwrap();
    assert_eq!(b["item_count"], json!(2));
    assert_eq!(b["deleted"], json!(true));
    assert_eq!(b["deleted_at"], json!("2023-11-14T22:13:20.000Z"));
}

#[test]
fn cache_entry_of_hard_deleted_product_shows_decommissioned() {
    let mut m = shop();
    let p = cache("ordering:product:{id}", &["sku", "name", "price", "status"]);
    let live = p.render(&key(json!([42])), &m).unwrap().unwrap();
    assert_eq!(live.id, "ordering:product:42");
    assert!(!live.tombstoned);
    assert_eq!(
        Value::Object(live.body.unwrap()),
        json!({"sku": "W-X", "name": "Widget X", "price": "9.99", "status": "active"})
    );
    m.put(
        "products",
        &["id"],
        row(json!({"id": 42, "sku": "W-X", "name": "Widget X", "status": "active", "price": "9.99"})),
        Some(Tombstone {
            kind: TombstoneKind::Deleted,
            at_ms: Some(0),
        }),
    );
    let gone = p.render(&key(json!([42])), &m).unwrap().unwrap();
    assert!(gone.tombstoned);
    assert_eq!(
        Value::Object(gone.body.unwrap()),
        json!({"sku": "W-X", "name": "Widget X", "price": "9.99", "status": "decommissioned", "decommissioned_at": "1970-01-01T00:00:00.000Z"})
    );
    assert!(
        p.render(&key(json!([5])), &m).unwrap().is_none(),
        "unknown row renders nothing"
    );
    // Decommissioned when a snapshot first read it: since when is unknown, and left out.
    m.put(
        "products",
        &["id"],
        row(json!({"id": 43, "sku": "W-Y", "name": "Widget Y", "status": "decommissioned", "price": "1.00"})),
        Some(Tombstone {
            kind: TombstoneKind::Decommissioned,
            at_ms: None,
        }),
    );
    let old = p.render(&key(json!([43])), &m).unwrap().unwrap();
    assert!(old.tombstoned);
    assert_eq!(
        Value::Object(old.body.unwrap()),
        json!({"sku": "W-Y", "name": "Widget Y", "price": "1.00", "status": "decommissioned"})
    );
}

#[test]
fn fan_out_walks_from_product_and_customer_to_orders() {
    let mut m = shop();
    m.put(
        "orders",
        &["id"],
        row(json!({"id": 1003, "customer_id": 7, "status": "new", "total": "0"})),
        None,
    );
    let p = orders_view();
    let product = row(json!({"id": 42}));
    let roots = p.affected_roots("products", &[&product], &m).unwrap();
    assert_eq!(roots.into_iter().collect::<Vec<_>>(), vec![key(json!([1001]))]);
    let customer = row(json!({"id": 7}));
    let roots = p.affected_roots("customers", &[&customer], &m).unwrap();
    assert_eq!(roots.len(), 2);
    // An item moved between orders affects both.
    let old = row(json!({"order_id": 1001, "line_no": 1}));
    let new = row(json!({"order_id": 1003, "line_no": 1}));
    let roots = p.affected_roots("order_items", &[&old, &new], &m).unwrap();
    assert_eq!(roots.len(), 2);
    // A root change affects itself even before the row is stored.
    let o = row(json!({"id": 5000}));
    assert_eq!(p.affected_roots("orders", &[&o], &m).unwrap().len(), 1);
    assert!(p.affected_roots("unrelated", &[&o], &m).unwrap().is_empty());
}

#[test]
fn needed_columns_and_join_indexes() {
    let p = orders_view();
    let need = p.needed_columns();
    assert!(need["order_items"].contains("product_id"));
    assert!(need["products"].contains("status"));
    assert!(!need["products"].contains("price"), "orders_view never reads price");
    let idx = p.join_indexes();
    assert!(idx.contains(&("order_items".to_string(), vec!["order_id".to_string()])));
    assert!(idx.contains(&("order_items".to_string(), vec!["product_id".to_string()])));
    assert!(idx.contains(&("orders".to_string(), vec!["customer_id".to_string()])));
    assert!(
        !idx.iter().any(|(t, _)| t == "products" || t == "customers"),
        "pk lookups need no index"
    );
}

#[test]
fn deleted_customer_keeps_snapshot_and_shows_deleted() {
    let mut m = shop();
    m.put(
        "customers",
        &["id"],
        row(json!({"id": 7, "name": "Ada", "email": "ada@example.com"})),
        Some(Tombstone {
            kind: TombstoneKind::Deleted,
            at_ms: Some(5),
        }),
    );
    let b = orders_view()
        .render(&key(json!([1001])), &m)
        .unwrap()
        .unwrap()
        .body
        .unwrap();
    assert_eq!(
        b["customer"],
        json!({"id": 7, "name": "Ada", "email": "ada@example.com", "deleted": true})
    );
}

/// Counts the lookups that reach the store.
struct Counting<'a>(&'a MemRows, std::cell::Cell<usize>);

impl crate::render::RowLookup for Counting<'_> {
    fn get(&self, t: &str, k: &Key) -> Result<Option<viewkeeper_core::model::StoredRow>, crate::render::LookupError> {
        self.1.set(self.1.get() + 1);
        self.0.get(t, k)
    }
    fn find(
        &self,
        t: &str,
        c: &[String],
        v: &[Value],
    ) -> Result<Vec<viewkeeper_core::model::StoredRow>, crate::render::LookupError> {
        self.0.find(t, c, v)
    }
}

#[test]
fn memo_lookup_renders_the_same_and_asks_the_store_once_per_row() {
    use crate::render::{MemoLookup, RowLookup};
    let rows = shop();
    let plain = orders_view().render(&key(json!([1001])), &rows).unwrap();
    let counting = Counting(&rows, Default::default());
    let memo = MemoLookup::new(&counting, 100);
    for _ in 0..3 {
        assert_eq!(orders_view().render(&key(json!([1001])), &memo).unwrap(), plain);
    }
    // order, customer, two products: four rows, each fetched once over three renders.
    assert_eq!(counting.1.get(), 4);
    // Bounded: with room for one row it starts over instead of growing.
    let counting = Counting(&rows, Default::default());
    let small = MemoLookup::new(&counting, 1);
    assert_eq!(orders_view().render(&key(json!([1001])), &small).unwrap(), plain);
    assert!(small.get("products", &key(json!([42]))).unwrap().is_some());
    assert!(counting.1.get() >= 5);
}

#[test]
fn ids_match_their_template_and_its_scan_pattern() {
    let p = cache("p:{id}", &["name"]);
    assert!(p.id_matches("p:5"));
    assert!(p.id_matches("p:5:desc"), "an id value may hold ':'");
    assert!(!p.id_matches("p:"));
    assert!(!p.id_matches("q:5"));
    let desc = cache("p:{id}:desc", &["name"]);
    assert!(desc.id_matches("p:5:desc"));
    assert!(!desc.id_matches("p:5"));
    assert_eq!(p.id_pattern(), "p:*");
    assert_eq!(cache("a*[b]:{id}", &["name"]).id_pattern(), "a\\*\\[b\\]:*");
    let items: ProjectionSpec = serde_json::from_value(json!({
        "root": "order_items", "sink": "cache", "key": "i:{order_id}/{line_no}", "fields": ["qty"],
    }))
    .unwrap();
    let items = Projection::new("items", &items, &tables()).unwrap();
    assert!(items.id_matches("i:1/2"));
    assert!(!items.id_matches("i:1/"));
}
