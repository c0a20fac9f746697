//! Postgres types through a schema and through hints, and positions.

use super::*;

/// What Debezium's Postgres connector sends for the demo shop's types (no published
/// sample exists; shapes per the connector's documentation).
fn postgres_typed_event(with_schema: bool) -> String {
    let after = json!({
        "id": 42, "price": "BOI=", "weight": {"scale": 3, "value": "+x4="},
        "created_at": "2024-01-31T10:00:00.123456Z", "updated_at": 1_706_695_200_123_456_i64,
        "born": 19_753, "opens": 36_000_000_000_i64,
        "shipping_address": "{\"city\": \"Berlin\", \"zip\": \"10115\"}",
        "uid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "photo": "X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ==", "tags": ["__debezium_unavailable_value"],
        "prices": ["BOI=", null], "description": null,
    });
    let payload = json!({"before": null, "after": after,
        "source": {"connector": "postgresql", "ts_ms": 1_706_695_200_500_i64,
                   "sequence": "[\"24023119\",\"24023128\"]", "lsn": 24_023_128},
        "op": "u", "ts_ms": 1_706_695_200_600_i64});
    if !with_schema {
        return payload.to_string();
    }
    let f = |field: &str, ty: &str, name: Option<&str>, params: Option<Value>| {
        let mut s = json!({"type": ty, "optional": true, "field": field});
        if let Some(n) = name {
            s["name"] = json!(n);
        }
        if let Some(p) = params {
            s["parameters"] = p;
        }
        s
    };
    let decimal = Some("org.apache.kafka.connect.data.Decimal");
    let fields = json!([
        f("id", "int64", None, None),
        f("price", "bytes", decimal, Some(json!({"scale": "2", "connect.decimal.precision": "12"}))),
        f("weight", "struct", Some("io.debezium.data.VariableScaleDecimal"), None),
        f("created_at", "string", Some("io.debezium.time.ZonedTimestamp"), None),
        f("updated_at", "int64", Some("io.debezium.time.MicroTimestamp"), None),
        f("born", "int32", Some("io.debezium.time.Date"), None),
        f("opens", "int64", Some("io.debezium.time.MicroTime"), None),
        f("shipping_address", "string", Some("io.debezium.data.Json"), None),
        f("uid", "string", Some("io.debezium.data.Uuid"), None),
        f("photo", "bytes", None, None),
        {"type": "array", "optional": true, "field": "tags", "items": {"type": "string"}},
        {"type": "array", "optional": true, "field": "prices",
         "items": {"type": "bytes", "name": "org.apache.kafka.connect.data.Decimal", "parameters": {"scale": "2"}}},
        f("description", "string", None, None),
    ]);
    let row = json!({"type": "struct", "optional": true, "fields": fields});
    let mut before = row.clone();
    before["field"] = json!("before");
    let mut after_schema = row;
    after_schema["field"] = json!("after");
    let schema = json!({"type": "struct", "name": "shop.public.products.Envelope",
                        "fields": [before, after_schema, {"type": "string", "field": "op"}]});
    json!({"schema": schema, "payload": payload}).to_string()
}

#[test]
fn postgres_types_through_schema_and_hints() {
    let products = TopicTable::new("products", ["id"]);
    let c = change_of(None, &postgres_typed_event(true), &products);
    let expected = [
        ("id", Cell::Value(json!(42))),
        ("price", Cell::Value(json!("12.50"))),
        ("weight", Cell::Value(json!("-1.250"))),
        ("created_at", Cell::Value(json!("2024-01-31T10:00:00.123456+00:00"))),
        ("updated_at", Cell::Value(json!("2024-01-31T10:00:00.123456"))),
        ("born", Cell::Value(json!("2024-01-31"))),
        ("opens", Cell::Value(json!("10:00:00"))),
        (
            "shipping_address",
            Cell::Value(json!({"city": "Berlin", "zip": "10115"})),
        ),
        ("uid", Cell::Value(json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"))),
        ("photo", Cell::Unchanged),
        ("tags", Cell::Unchanged),
        ("prices", Cell::Value(json!(["12.50", null]))),
        ("description", Cell::Value(Value::Null)),
    ];
    let expected: Vec<(String, Cell)> = expected.into_iter().map(|(n, c)| (n.to_owned(), c)).collect();
    assert_eq!(cells(&c), expected.as_slice());
    assert_eq!((c.key.as_str(), c.position), ("[42]", Position::new(24_023_128, 1)));
    // The same event without schema, with hints for every typed column.
    let hinted = [
        ("price", ColumnType::Decimal { scale: Some(2) }),
        ("weight", ColumnType::Decimal { scale: None }),
        ("created_at", ColumnType::ZonedTimestamp),
        ("updated_at", ColumnType::MicroTimestamp),
        ("born", ColumnType::Date),
        ("opens", ColumnType::MicroTime),
        ("shipping_address", ColumnType::Json),
        ("uid", ColumnType::Uuid),
        ("photo", ColumnType::Bytes),
        (
            "prices",
            ColumnType::Array(Box::new(ColumnType::Decimal { scale: Some(2) })),
        ),
    ]
    .into_iter()
    .fold(products.clone(), |t, (col, ty)| t.with_column_type(col, ty));
    assert_eq!(
        cells(&change_of(None, &postgres_typed_event(false), &hinted)),
        expected.as_slice()
    );
}

#[test]
fn positions_are_the_change_lsn_and_a_snapshot_read_sits_just_below_its_lsn() {
    let event = |op: &str, seq: &str, lsn: u64| {
        json!({"after": {"id": 1}, "op": op,
               "source": {"connector": "postgresql", "ts_ms": 1, "sequence": seq, "lsn": lsn}})
        .to_string()
    };
    // One row's changes: a later transaction writes it only after the earlier committed,
    // so its change LSN is higher; `sequence` (whatever it holds) does not matter.
    let first = change_of(None, &event("u", r#"[null,"90"]"#, 90), &customers()).position;
    let later = change_of(None, &event("u", r#"["300","350"]"#, 350), &customers()).position;
    assert!(first < later, "{first} < {later}");
    assert_eq!(first, Position::new(90, 1));
    // A snapshot read at 350 is older than a change at 350 and newer than one before.
    let read = change_of(None, &event("r", "", 350), &customers()).position;
    assert!(first < read && read < later, "{first} < {read} < {later}");
    assert_eq!(read, Position::new(350, 0));
}
