//! The engine over the shop's projections (a state store in a temp dir, no servers):
//! what it renders, and how it behaves when a sink fails, refuses, loses its data, or
//! answers batches out of order, with a sink whose answers the test scripts.

use super::*;
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use viewkeeper_core::model::{Cell, Change, Op, Position, Row};
use viewkeeper_core::sink::{Lost, Rejection, SinkDoc, SinkError};
use viewkeeper_core::Stage;

/// A sink that keeps documents as a versioned store would (an older version never
/// overwrites a newer one) and answers as the test scripts it.
#[derive(Default)]
struct Scripted {
    name: String,
    docs: Mutex<BTreeMap<String, (u64, Option<Row>)>>,
    /// Fail this many writes (transient).
    fail: AtomicUsize,
    /// Refuse these ids for good.
    refuse: Mutex<BTreeSet<String>>,
    /// Lose everything at the next write, and say so.
    lose: AtomicBool,
    /// Hold writes that carry this id until released.
    hold: Mutex<Option<(String, Arc<tokio::sync::Notify>)>>,
    writes: AtomicUsize,
}

impl Scripted {
    fn named(name: &str) -> Arc<Scripted> {
        Arc::new(Scripted {
            name: name.into(),
            ..Default::default()
        })
    }

    fn body(&self, id: &str) -> Option<Row> {
        self.docs.lock().unwrap().get(id).and_then(|d| d.1.clone())
    }
}

impl Sink for Scripted {
    fn name(&self) -> &str {
        &self.name
    }

    fn write<'a>(
        &'a self,
        _: &'a Target,
        docs: &'a [SinkDoc],
    ) -> futures_util::future::BoxFuture<'a, Result<Vec<Rejection>, SinkError>> {
        Box::pin(async move {
            self.writes.fetch_add(1, Ordering::SeqCst);
            let gate = self.hold.lock().unwrap().clone();
            if let Some((id, notify)) = gate {
                if docs.iter().any(|d| d.id == id) {
                    notify.notified().await;
                }
            }
            if self
                .fail
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(SinkError::new(&self.name, "scripted failure"));
            }
            if self.lose.swap(false, Ordering::SeqCst) {
                self.docs.lock().unwrap().clear();
                return Err(SinkError::lost(&self.name, Lost::Sink, "scripted loss"));
            }
            let refuse = self.refuse.lock().unwrap().clone();
            let mut out = Vec::new();
            let mut held = self.docs.lock().unwrap();
            for d in docs {
                if refuse.contains(&d.id) {
                    out.push(Rejection {
                        id: d.id.clone(),
                        reason: "scripted refusal".into(),
                    });
                    continue;
                }
                let e = held.entry(d.id.clone()).or_insert((0, None));
                if d.version >= e.0 {
                    *e = (d.version, d.body.clone());
                }
            }
            Ok(out)
        })
    }
}

fn config() -> crate::config::Config {
    crate::config::Config::load(std::path::Path::new("config/shop.toml")).unwrap()
}

/// The shop's engine, every sink a scripted one (returned by name).
fn engine_with(dir: &std::path::Path) -> (Engine, BTreeMap<String, Arc<Scripted>>) {
    let cfg = config();
    let (projections, catalog) = crate::commands::compile(&cfg).unwrap();
    let scripted: BTreeMap<String, Arc<Scripted>> = cfg.sinks.keys().map(|n| (n.clone(), Scripted::named(n))).collect();
    let sinks = scripted
        .iter()
        .map(|(n, s)| (n.clone(), s.clone() as Arc<dyn Sink>))
        .collect();
    let mut e = Engine::new(Store::open(dir, catalog).unwrap(), projections, sinks, &cfg.engine);
    e.retry_min = Duration::from_millis(1);
    e.retry_max = Duration::from_millis(5);
    (e, scripted)
}

fn engine(dir: &std::path::Path) -> Engine {
    engine_with(dir).0
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
        checkpoint: Some(Checkpoint::Lsn(pos)),
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
    assert_eq!(q.available(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_sink_is_retried_and_nothing_is_checkpointed_before_it_takes_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (mut e, sinks) = engine_with(dir.path());
    sinks["cache"].fail.store(3, Ordering::SeqCst);
    assert_eq!(
        docs_of(&mut e, batch("catalog", 10, vec![product("1.00", "Lamp", 10)])).await,
        2
    );
    assert!(sinks["cache"].writes.load(Ordering::SeqCst) >= 4, "retried");
    assert_eq!(e.store.checkpoint("catalog").unwrap(), Some(Checkpoint::Lsn(10)));
    assert_eq!(
        sinks["cache"].body("ordering:product:7").unwrap()["name"],
        json!("Lamp")
    );
    // Stopped while the sink keeps failing: nothing checkpointed, the documents still owed.
    sinks["cache"].fail.store(usize::MAX, Ordering::SeqCst);
    let stop = CancellationToken::new();
    let stopper = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            stop.cancel();
        })
    };
    assert!(!e
        .process(vec![batch("catalog", 11, vec![product("2.00", "Lamp", 11)])], &stop)
        .await
        .unwrap());
    stopper.await.unwrap();
    assert_eq!(e.store.checkpoint("catalog").unwrap(), Some(Checkpoint::Lsn(10)));
    assert_eq!(
        e.store.pending().unwrap().roots["ordering_products"],
        vec![Key::from_values(&[json!(7)])]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_document_is_a_dead_letter_of_its_sink_and_the_rest_flows() {
    let dir = tempfile::tempdir().unwrap();
    let (mut e, sinks) = engine_with(dir.path());
    sinks["cache"]
        .refuse
        .lock()
        .unwrap()
        .insert("storefront:product:7".into());
    assert_eq!(
        docs_of(&mut e, batch("catalog", 1, vec![product("1.00", "Lamp", 1)])).await,
        2
    );
    let letters = e.store.dead_letters(10).unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(
        letters[0].stage,
        Stage::Sink {
            sink: "cache".into(),
            projection: "storefront_products".into()
        }
    );
    assert_eq!(letters[0].key, "[7]");
    assert!(sinks["cache"].body("ordering:product:7").is_some());
    assert_eq!(e.store.checkpoint("catalog").unwrap(), Some(Checkpoint::Lsn(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_lost_everything_gets_every_document_of_its_projections_again() {
    let dir = tempfile::tempdir().unwrap();
    let (mut e, sinks) = engine_with(dir.path());
    let many: Vec<Change> = (1..=20)
        .map(|i| {
            upsert(
                "products",
                json!([i]),
                json!({"id": i, "sku": format!("S{i}"), "name": format!("P{i}"), "price": "1", "status": "active"}),
                1,
            )
        })
        .collect();
    docs_of(&mut e, batch("catalog", 1, many)).await;
    assert_eq!(sinks["cache"].docs.lock().unwrap().len(), 40);
    sinks["cache"].lose.store(true, Ordering::SeqCst);
    docs_of(&mut e, batch("catalog", 2, vec![product("3.00", "Lamp", 2)])).await;
    // Both cache projections, every product, and the new one.
    assert_eq!(sinks["cache"].docs.lock().unwrap().len(), 40);
    assert!(
        e.store.resyncs().unwrap().is_empty(),
        "the re-write's marks are cleared"
    );
    assert_eq!(e.store.checkpoint("catalog").unwrap(), Some(Checkpoint::Lsn(2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_written_concurrently_and_checkpointed_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (e, sinks) = engine_with(dir.path());
    let notify = Arc::new(tokio::sync::Notify::new());
    *sinks["cache"].hold.lock().unwrap() = Some(("ordering:product:1".into(), notify.clone()));
    let (tx, rx) = mpsc::channel(16);
    let (ack_tx, mut ack_rx) = watch::channel(None);
    let e = Engine {
        acks: BTreeMap::from([("catalog".to_string(), ack_tx)]),
        ..e
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(e.run(rx, stop.clone(), Duration::from_secs(5)));
    let p = |id: i64, pos: u64| {
        batch(
            "catalog",
            pos,
            vec![upsert(
                "products",
                json!([id]),
                json!({"id": id, "sku": "s", "name": "n", "price": "1", "status": "active"}),
                pos,
            )],
        )
    };
    // Batch 1's cache write is held; batch 2 (another product) is written meanwhile.
    let s = sinks["cache"].clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    tx.send(p(1, 100)).await.unwrap();
    while s.writes.load(Ordering::SeqCst) == 0 {
        assert!(std::time::Instant::now() < deadline, "batch 1 was not written");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tx.send(p(2, 200)).await.unwrap();
    while s.body("ordering:product:2").is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "batch 2 was not written while batch 1 was held"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Written, but not acknowledged: batch 1 is not durable yet.
    assert_eq!(*ack_rx.borrow(), None);
    notify.notify_one();
    ack_rx.wait_for(|a| *a == Some(Checkpoint::Lsn(200))).await.unwrap();
    stop.cancel();
    drop(tx);
    task.await.unwrap().unwrap();
}
