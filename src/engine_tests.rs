//! The engine over the shop's projections, with blackhole sinks (pure: a state store in a
//! temp dir, no servers).

use super::*;
use serde_json::json;
use viewkeeper_projections::model::{Cell, Change, Op};

fn engine(dir: &std::path::Path) -> Engine {
    let cfg = crate::config::Config::load(std::path::Path::new("config/shop.toml")).unwrap();
    let (projections, catalog) = crate::worker::compile(&cfg).unwrap();
    let sinks = cfg
        .sinks
        .keys()
        .map(|n| (n.clone(), Arc::new(Sink::Blackhole(n.clone()))))
        .collect();
    Engine::new(Store::open(dir, catalog).unwrap(), projections, sinks, &cfg.engine)
}

fn upsert(table: &str, key: serde_json::Value, cells: serde_json::Value, pos: u64) -> Change {
    Change {
        table: table.into(),
        key: Key::from_values(key.as_array().unwrap()),
        old_key: None,
        op: Op::Upsert {
            cells: cells
                .as_object()
                .unwrap()
                .iter()
                .map(|(c, v)| (c.clone(), Cell::Value(v.clone())))
                .collect(),
        },
        position: Position::new(pos, 0),
        commit_time_ms: 0,
        origin: None,
    }
}

fn batch(source: &str, pos: u64, changes: Vec<Change>) -> SourceBatch {
    SourceBatch {
        source: source.into(),
        changes,
        checkpoint: Position::new(pos, 0),
        ..Default::default()
    }
}

fn product(price: &str, name: &str, pos: u64) -> Change {
    upsert(
        "products",
        json!([7]),
        json!({"id": 7, "sku": "S7", "name": name, "price": price, "status": "active"}),
        pos,
    )
}

/// Documents written by processing one batch.
async fn docs_of(e: &mut Engine, b: SourceBatch) -> u64 {
    let before = e.stats.documents;
    assert!(e.process(vec![b], &CancellationToken::new()).await.unwrap());
    e.stats.documents - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn updates_render_only_the_projections_that_read_a_changed_column() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = engine(dir.path());
    // Two cache entries (ordering_products, storefront_products) for the product.
    assert_eq!(
        docs_of(&mut e, batch("catalog", 1, vec![product("9.99", "Lamp", 1)])).await,
        2
    );
    let mut ordering = vec![upsert(
        "customers",
        json!([1]),
        json!({"id": 1, "name": "Ana", "email": "a@x"}),
        2,
    )];
    for o in 1..=3 {
        ordering.push(upsert(
            "orders",
            json!([o]),
            json!({"id": o, "customer_id": 1, "status": "new", "total": "9.99"}),
            2,
        ));
        ordering.push(upsert(
            "order_items",
            json!([o, 1]),
            json!({"order_id": o, "line_no": 1, "product_id": 7, "qty": 1, "unit_price": "9.99"}),
            2,
        ));
    }
    assert_eq!(
        docs_of(&mut e, batch("ordering", 2, ordering)).await,
        3,
        "one document per order"
    );
    // The price is in both caches, not in orders_view: the three orders are not rendered.
    assert_eq!(
        docs_of(&mut e, batch("catalog", 3, vec![product("5.00", "Lamp", 3)])).await,
        2
    );
    // The name is in orders_view (items.product.name) and in both caches.
    assert_eq!(
        docs_of(&mut e, batch("catalog", 4, vec![product("5.00", "Desk lamp", 4)])).await,
        5
    );
    // A replayed older change still re-renders (idempotent re-write), as before.
    assert_eq!(
        docs_of(&mut e, batch("catalog", 5, vec![product("5.00", "Desk lamp", 4)])).await,
        5
    );
    // A change of a column no projection reads (description) renders nothing.
    let d = upsert(
        "products",
        json!([7]),
        json!({"id": 7, "sku": "S7", "name": "Desk lamp", "price": "5.00", "status": "active", "description": "x"}),
        6,
    );
    assert_eq!(docs_of(&mut e, batch("catalog", 6, vec![d])).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn queue_permits_bound_the_changes_waiting_and_let_a_big_batch_pass_alone() {
    let q = QueuePermits::new(10);
    let of = |n: usize| SourceBatch {
        changes: (0..n).map(|i| product("1", "x", i as u64)).collect(),
        ..Default::default()
    };
    assert!(q.take(&of(6)).await);
    assert!(q.take(&of(4)).await);
    // Full: the next batch waits until the engine hands permits back.
    let more = of(1);
    let waiting = q.take(&more);
    tokio::pin!(waiting);
    assert!(tokio::time::timeout(Duration::from_millis(50), &mut waiting)
        .await
        .is_err());
    q.give_back(q.cost(&[of(6)]));
    assert!(waiting.await);
    // A batch larger than the bound takes every permit, so it passes alone.
    q.give_back(q.cost(&[of(4), of(1)]));
    assert!(q.take(&of(25)).await);
    assert_eq!(q.sem.available_permits(), 0);
}
