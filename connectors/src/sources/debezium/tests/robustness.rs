//! Error paths (what a dead letter says) and a no-panic sweep over mutated fixtures.

use super::*;

#[test]
fn errors_name_topic_path_and_problem() {
    let t = customers();
    let streaming = "postgres_create_streaming_2.1.payload.json";
    let e = decode_str(None, "{\"op\": ", &t).unwrap_err();
    assert_eq!((e.at.as_str(), matches!(e.kind, ErrorKind::Json(_))), ("value", true));
    assert!(
        e.to_string()
            .starts_with(&format!("topic {TOPIC}: value: malformed JSON")),
        "{e}"
    );
    let e = decode_str(None, &edited(streaming, |p| p["op"] = json!("x")), &t).unwrap_err();
    assert_eq!(
        (e.at.as_str(), e.kind.clone()),
        ("value.op", ErrorKind::UnknownOp("x".into()))
    );
    let e = decode_str(None, &edited(streaming, |p| p["op"] = json!(1)), &t).unwrap_err();
    assert!(matches!(e.kind, ErrorKind::Type { .. }), "{e}");
    let e = decode_str(None, &edited(streaming, |p| p["after"] = Value::Null), &t).unwrap_err();
    assert_eq!((e.at.as_str(), e.kind), ("value.after", ErrorKind::Missing));
    let e = decode_str(None, &fixture(streaming), &TopicTable::new("c", ["nope"])).unwrap_err();
    assert!(
        matches!(&e.kind, ErrorKind::MissingKeyColumn { column, .. } if column == "nope"),
        "{e}"
    );
    let hinted = customers().with_column_type("email", ColumnType::Decimal { scale: Some(2) });
    let e = decode_str(None, &fixture(streaming), &hinted).unwrap_err();
    assert_eq!(e.at, "value.after.email");
    assert!(e.to_string().contains("invalid base64"), "{e}");
    let e = decode_str(None, &edited(streaming, |p| p["source"]["lsn"] = Value::Null), &t).unwrap_err();
    assert_eq!((e.at.as_str(), e.kind), ("value.source.lsn", ErrorKind::Missing));
    // `sequence` orders nothing any more: a malformed one is no reason to refuse the record.
    assert!(decode_str(None, &edited(streaming, |p| p["source"]["sequence"] = json!("[1]")), &t).is_ok());
    let e = decode_str(None, &edited(streaming, |p| p["source"]["lsn"] = json!(-5)), &t).unwrap_err();
    assert!(matches!(e.kind, ErrorKind::Type { .. }), "{e}");
    let no_time = edited(streaming, |p| {
        p["source"]["ts_ms"] = Value::Null;
        p["ts_ms"] = Value::Null;
    });
    let e = decode_str(None, &no_time, &t).unwrap_err();
    assert_eq!((e.at.as_str(), e.kind), ("value.source.ts_ms", ErrorKind::Missing));
    // Paths inside a schema envelope say so.
    let bad = edited("generic_sqlserver_delete_decimal_value.with_schema.json", |p| {
        p["after"] = p["before"].take();
        p["after"]["sal"] = json!("%%");
        p["op"] = json!("r");
    });
    let e = decode_str(None, &bad, &TopicTable::new("emp", ["empno"])).unwrap_err();
    assert_eq!(e.at, "value.payload.after.sal");
    let mut bad: Value =
        serde_json::from_str(&fixture("generic_sqlserver_delete_decimal_value.with_schema.json")).unwrap();
    bad["schema"]["fields"][1]["fields"][6]["parameters"]["scale"] = json!("four");
    let e = decode_str(None, &bad.to_string(), &TopicTable::new("emp", ["empno"])).unwrap_err();
    assert_eq!(e.at, "value.schema.after.sal");
    assert!(
        matches!(&e.kind, ErrorKind::Schema(m) if m.to_string().contains("four")),
        "{e}"
    );
    // A delete with neither before nor message key.
    let del = edited("postgres_delete_replica_identity_default.payload.json", |p| {
        p["before"] = Value::Null
    });
    let e = decode_str(None, &del, &t).unwrap_err();
    assert_eq!(e.at, "value.before");
    assert!(e.to_string().contains("REPLICA IDENTITY"), "{e}");
    assert_eq!(change_of(Some(r#"{"id": 1}"#), &del, &t).key.as_str(), "[1]");
    // Dead letters keep the record and the reason.
    let dl = e.dead_letter(
        "customers",
        "customers[0]@7".into(),
        Some(b"{\"k\":1}"),
        Some(del.as_bytes()),
    );
    assert_eq!(
        (dl.reason, dl.payload, dl.key),
        (e.to_string(), del.clone(), "{\"k\":1}".to_owned())
    );
}

/// Every way of breaking a fixture must give an error or a result, never a panic.
#[test]
fn mutated_fixtures_never_panic() {
    let keys: [Option<&[u8]>; 3] = [
        None,
        Some(br#"{"id":1}"#),
        Some(b"{\"schema\":null,\"payload\":{\"id\":\"BOI=\"}"),
    ];
    let hinted = customers()
        .with_column_type("id", ColumnType::Decimal { scale: Some(2) })
        .with_column_type("created_at", ColumnType::ZonedTimestamp)
        .with_column_type("email", ColumnType::Bytes);
    let tables = [customers(), hinted, TopicTable::new("emp", ["empno", "fname"])];
    let mut runs = 0usize;
    // Each run uses one of the tables and keys in turn, to keep the sweep quick.
    let mut run = |bytes: &[u8], i: usize| {
        let (table, key) = (&tables[i % 3], keys[i / 3 % 3]);
        let _ = decode(TOPIC, key, Some(bytes), table);
        if let Some(k) = key {
            let _ = decode_key(TOPIC, k, table);
        }
        runs += 1;
    };
    for &(name, ..) in FIXTURES {
        for msg in messages(name) {
            let b = msg.as_bytes();
            // Every byte of small messages; an even spread of 2000 in the large ones.
            let stride = b.len().div_ceil(2000);
            for cut in (0..b.len()).step_by(stride) {
                run(&b[..cut], cut);
                run(&b[cut..], cut + 1);
            }
            for i in (0..b.len()).step_by(stride) {
                // One flip per byte, cycling through: a low bit, a high bit (invalid UTF-8),
                // a quote.
                let flip = [0x01u8, 0x80, b'"' ^ b[i]][i % 3];
                let mut m = b.to_vec();
                m[i] ^= flip;
                run(&m, i / 3);
            }
            // Structural mutations: every value in the tree replaced by each odd value.
            let tree: Value = match serde_json::from_str(&msg) {
                Ok(v) => v,
                Err(_) => continue,
            };
            let odd = [
                Value::Null,
                json!(-1),
                json!(u64::MAX),
                json!(1.5),
                json!("x"),
                json!(""),
                json!([]),
                json!({}),
                json!("__debezium_unavailable_value"),
                json!("[\"1\",\"2\",\"3\"]"),
            ];
            for path in 0..count_nodes(&tree) {
                for (j, o) in odd.iter().enumerate() {
                    let mut m = tree.clone();
                    replace_nth(&mut m, path, o);
                    run(m.to_string().as_bytes(), path + j);
                }
            }
        }
    }
    assert!(runs > 60_000, "only {runs} runs");
}

fn count_nodes(v: &Value) -> usize {
    1 + match v {
        Value::Array(a) => a.iter().map(count_nodes).sum(),
        Value::Object(o) => o.values().map(count_nodes).sum(),
        _ => 0,
    }
}

/// Replaces the `n`th node (pre-order) of `v` with `with`.
fn replace_nth(v: &mut Value, n: usize, with: &Value) {
    fn walk(v: &mut Value, n: &mut usize, with: &Value) -> bool {
        if *n == 0 {
            *v = with.clone();
            return true;
        }
        *n -= 1;
        let children: Vec<&mut Value> = match v {
            Value::Array(a) => a.iter_mut().collect(),
            Value::Object(o) => o.values_mut().collect(),
            _ => Vec::new(),
        };
        children.into_iter().any(|c| walk(c, n, with))
    }
    let mut n = n;
    walk(v, &mut n, with);
}
