//! Ground truth for `orders_view`: the documents expected from a join over the three
//! databases, compared field by field with what the search server holds.

use super::{servers, Shop};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// What the databases no longer show but the read model must still know.
#[derive(Default, Clone)]
pub struct Remembered {
    /// Hard-deleted products: id → (sku, name) of their last image.
    pub deleted_products: HashMap<i64, (String, String)>,
    /// Hard-deleted orders (their documents stay, flagged).
    pub deleted_orders: BTreeSet<i64>,
}

fn ts_micros(v: &Value) -> Value {
    match v {
        Value::String(s) => chrono::DateTime::parse_from_rfc3339(s)
            .map(|t| json!(t.timestamp_micros()))
            .unwrap_or_else(|_| json!(format!("unparsable date {s}"))),
        other => other.clone(),
    }
}

/// Dates become µs since the epoch so that equal instants compare equal.
fn normalize(mut doc: Value) -> Value {
    if let Some(m) = doc.as_object_mut() {
        for k in ["created_at", "updated_at", "deleted_at"] {
            if let Some(v) = m.get_mut(k) {
                *v = ts_micros(v);
            }
        }
    }
    doc
}

/// Expected documents by `_id`, joined in SQL.
pub async fn expected(shop: &Shop, mem: &Remembered) -> BTreeMap<String, Value> {
    let identity = shop.pg("identity").await;
    let catalog = shop.pg("catalog").await;
    let ordering = shop.pg("ordering").await;
    let mut customers = HashMap::new();
    for r in identity
        .query("SELECT id, name, email FROM customers", &[])
        .await
        .unwrap()
    {
        let id: i64 = r.get(0);
        customers.insert(
            id,
            json!({"id": id, "name": r.get::<_, String>(1), "email": r.get::<_, Option<String>>(2)}),
        );
    }
    let mut products = HashMap::new();
    for r in catalog
        .query("SELECT id, sku, name, status FROM products", &[])
        .await
        .unwrap()
    {
        let id: i64 = r.get(0);
        let status: String = r.get(3);
        products.insert(
            id,
            json!({"id": id, "sku": r.get::<_, String>(1), "name": r.get::<_, String>(2),
                   "decommissioned": status == "decommissioned", "status": status}),
        );
    }
    for (id, (sku, name)) in &mem.deleted_products {
        products.entry(*id).or_insert_with(
            || json!({"id": id, "sku": sku, "name": name, "status": "decommissioned", "decommissioned": true}),
        );
    }
    let mut items: HashMap<i64, Vec<(i32, Value)>> = HashMap::new();
    for r in ordering
        .query(
            "SELECT order_id, line_no, product_id, qty, unit_price::text FROM order_items",
            &[],
        )
        .await
        .unwrap()
    {
        let pid: Option<i64> = r.get(2);
        let product = match pid {
            None => Value::Null,
            Some(p) => products
                .get(&p)
                .cloned()
                .unwrap_or_else(|| json!({"id": p, "unresolved": true})),
        };
        let line: i32 = r.get(1);
        items.entry(r.get(0)).or_default().push((
            line,
            json!({"line_no": line, "qty": r.get::<_, Option<i32>>(3), "unit_price": r.get::<_, Option<String>>(4), "product": product}),
        ));
    }
    let mut out = BTreeMap::new();
    for r in ordering
        .query(
            "SELECT id, customer_id, status, total::text, (extract(epoch FROM created_at) * 1000000)::bigint, (extract(epoch FROM updated_at) * 1000000)::bigint, shipping_address::text FROM orders",
            &[],
        )
        .await
        .unwrap()
    {
        let id: i64 = r.get(0);
        let cid: i64 = r.get(1);
        let mut lines = items.remove(&id).unwrap_or_default();
        lines.sort_by_key(|(l, _)| *l);
        let doc = json!({
            "order_id": id,
            "status": r.get::<_, String>(2),
            "total": r.get::<_, String>(3),
            "created_at": r.get::<_, Option<i64>>(4),
            "updated_at": r.get::<_, Option<i64>>(5),
            "shipping_address": r.get::<_, Option<String>>(6).map(|s| serde_json::from_str::<Value>(&s).unwrap()),
            "item_count": lines.len(),
            "customer": customers.get(&cid).cloned().unwrap_or_else(|| json!({"id": cid, "unresolved": true})),
            "items": lines.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
        });
        out.insert(id.to_string(), doc);
    }
    out
}

/// Every document behind the alias, by `_id` (after a refresh, so nothing hides).
pub async fn actual(shop: &Shop) -> Result<BTreeMap<String, Value>, String> {
    let http = reqwest::Client::new();
    let base = format!("{}/{}", servers().search, shop.alias());
    http.post(format!("{base}/_refresh"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    // Pages of 5000 by order_id (one search stops at 10k hits).
    let mut all = BTreeMap::new();
    let mut after: Option<Value> = None;
    loop {
        let mut q = json!({"size": 5000, "query": {"match_all": {}}, "sort": [{"order_id": "asc"}]});
        if let Some(a) = after.take() {
            q["search_after"] = a;
        }
        let v: Value = http
            .post(format!("{base}/_search"))
            .json(&q)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        let hits = v["hits"]["hits"].as_array().ok_or_else(|| format!("no hits in {v}"))?;
        for h in hits {
            all.insert(
                h["_id"].as_str().unwrap_or_default().to_string(),
                normalize(h["_source"].clone()),
            );
        }
        match hits.last() {
            Some(h) if hits.len() == 5000 => after = Some(h["sort"].clone()),
            _ => return Ok(all),
        }
    }
}

/// `Ok` when every document equals the truth (deleted orders: flagged, kept).
pub async fn matches_truth(shop: &Shop, mem: &Remembered) -> Result<(), String> {
    let want = expected(shop, mem).await;
    let have = actual(shop).await?;
    for (id, w) in &want {
        let Some(h) = have.get(id) else {
            return Err(format!("order {id}: missing document"));
        };
        let mut h = h.clone();
        if let Some(m) = h.as_object_mut() {
            if m.contains_key("deleted") {
                return Err(format!("order {id}: flagged deleted but present in Postgres"));
            }
            // Fields not in the design (none expected) would show up here.
            let wk: BTreeSet<&String> = w.as_object().unwrap().keys().collect();
            let hk: BTreeSet<&String> = m.keys().collect();
            if wk != hk {
                return Err(format!("order {id}: fields {hk:?}, want {wk:?}"));
            }
        }
        if &h != w {
            return Err(format!("order {id}: differs\n have {h}\n want {w}"));
        }
    }
    for (id, h) in &have {
        if want.contains_key(id) {
            continue;
        }
        let oid: i64 = id.parse().unwrap_or(-1);
        if !mem.deleted_orders.contains(&oid) {
            return Err(format!(
                "document {id} has no order in Postgres and was not deleted by the test"
            ));
        }
        if h.get("deleted") != Some(&json!(true)) || !h.get("deleted_at").is_some_and(|v| v.is_i64()) {
            return Err(format!("deleted order {id}: not flagged: {h}"));
        }
    }
    for id in &mem.deleted_orders {
        if !have.contains_key(&id.to_string()) {
            return Err(format!("deleted order {id}: document gone (it must stay, flagged)"));
        }
    }
    Ok(())
}

/// Waits until the documents equal the truth; panics with the last difference.
pub async fn converge_orders(shop: &Shop, mem: &Remembered, timeout: Duration) {
    let start = Instant::now();
    loop {
        match matches_truth(shop, mem).await {
            Ok(()) => return,
            Err(e) if start.elapsed() > timeout => panic!("orders_view did not converge within {timeout:?}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Runs a search request against the alias.
pub async fn search(shop: &Shop, body: Value) -> Value {
    let http = reqwest::Client::new();
    let base = format!("{}/{}", servers().search, shop.alias());
    http.post(format!("{base}/_refresh")).send().await.unwrap();
    http.post(format!("{base}/_search"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

pub fn obj(v: &Value) -> &Map<String, Value> {
    v.as_object().unwrap()
}
