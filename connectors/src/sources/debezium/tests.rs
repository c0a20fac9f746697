//! Decoding tests over every published Debezium sample in `connectors/tests/fixtures/debezium`
//! (see its `SOURCES.md`), plus synthetic events for what Debezium publishes no sample
//! of (Postgres decimals, temporal, JSON, UUID, array and bytea values), error paths,
//! and a no-panic sweep over mutated fixtures.

use super::envelope::{ErrorKind, TRANSACTION_TOPIC_SUFFIX};
use super::*;
use serde_json::{json, Value};
use std::path::PathBuf;
use viewkeeper_core::model::{Cell, Change, Key, Op, Position};

const TOPIC: &str = "dbserver1.inventory.customers";

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/debezium")
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(fixture_dir().join(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

fn customers() -> TopicTable {
    TopicTable::new("customers", ["id"])
}

fn decode_str(key: Option<&str>, value: &str, table: &TopicTable) -> Result<Decoded, DecodeError> {
    decode(TOPIC, key.map(str::as_bytes), Some(value.as_bytes()), table)
}

fn change_of(key: Option<&str>, value: &str, table: &TopicTable) -> Change {
    match decode_str(key, value, table) {
        Ok(Decoded::Change(c)) => c,
        other => panic!("expected a change, got {other:?}"),
    }
}

fn change(name: &str, table: &TopicTable) -> Change {
    change_of(None, &fixture(name), table)
}

fn skip(name: &str) -> Skip {
    match decode_str(None, &fixture(name), &customers()) {
        Ok(Decoded::Skip(s)) => s,
        other => panic!("{name}: expected a skip, got {other:?}"),
    }
}

fn error(name: &str) -> DecodeError {
    decode_str(None, &fixture(name), &customers()).expect_err(name)
}

fn cells(c: &Change) -> &[(String, Cell)] {
    match &c.op {
        Op::Upsert { cells } => cells,
        other => panic!("expected an upsert, got {other:?}"),
    }
}

fn cell<'c>(c: &'c Change, column: &str) -> &'c Cell {
    let found = cells(c).iter().find(|(name, _)| name == column);
    &found.unwrap_or_else(|| panic!("no column {column} in {c:?}")).1
}

fn val<'c>(c: &'c Change, column: &str) -> &'c Value {
    match cell(c, column) {
        Cell::Value(v) => v,
        Cell::Unchanged => panic!("{column} is unchanged"),
    }
}

/// Edits a fixture's JSON (its payload when it has a schema envelope).
fn edited(name: &str, edit: impl FnOnce(&mut Value)) -> String {
    let mut v: Value = serde_json::from_str(&fixture(name)).unwrap();
    match v.get_mut("payload") {
        Some(payload) => edit(payload),
        None => edit(&mut v),
    }
    v.to_string()
}

/// Every fixture file, with what decoding it as a value of a table topic gives
/// (`upsert`, `delete`, `truncate`, `skip: <why>` or `error: <kind>`).
#[rustfmt::skip]
const FIXTURES: &[(&str, &str, &str)] = &[
    // (file, primary key, outcome)
    ("generic_key_with_schema_mysql_tutorial.json",                   "id",    "error: not an envelope"),
    ("generic_mysql_create_schemaless.serde_test.json",               "id",    "upsert"),
    ("generic_mysql_create_with_schema.serde_test.json",              "id",    "upsert"),
    ("generic_mysql_snapshot_read_3.0.schemaless.json",               "id",    "upsert"),
    ("generic_mysql_update_3.0.schemaless.json",                      "id",    "upsert"),
    ("generic_mysql_update_schemaless.serde_test.json",               "id",    "upsert"),
    ("generic_mysql_update_unknown_property.serde_test.json",         "id",    "upsert"),
    ("generic_sqlserver_delete_decimal_key.with_schema.json",         "empno", "error: not an envelope"),
    ("generic_sqlserver_delete_decimal_value.with_schema.json",       "empno", "delete"),
    ("generic_tombstone_legacy_jsonconverter_rendering.json",         "id",    "skip: tombstone"),
    ("generic_unwrapped_row.serde_test.json",                         "id",    "error: not an envelope"),
    ("postgres_create_streaming_2.1.payload.json",                    "id",    "upsert"),
    ("postgres_create_with_schema.json",                              "id",    "upsert"),
    ("postgres_create_with_transaction_block.docs_illustrative.json", "pk",    "upsert"),
    ("postgres_delete_replica_identity_default.payload.json",         "id",    "delete"),
    ("postgres_message_key.schemaless.json",                          "id",    "error: not an envelope"),
    ("postgres_message_nontransactional.payload.json",                "id",    "skip: logical decoding message"),
    ("postgres_message_transactional.payload.json",                   "id",    "skip: logical decoding message"),
    ("postgres_message_value.schemaless.json",                        "id",    "skip: logical decoding message"),
    ("postgres_snapshot_read_2.1.payloads.jsonl",                     "id",    "upsert"),
    ("postgres_truncate.payload.json",                                "id",    "truncate"),
    ("postgres_txmeta_begin.json",                                    "id",    "skip: transaction metadata"),
    ("postgres_txmeta_end.json",                                      "id",    "skip: transaction metadata"),
    ("postgres_update_replica_identity_default.payload.json",         "id",    "upsert"),
    ("postgres_update_toast_unavailable_value.schemaless.json",       "id",    "upsert"),
    ("smt_decode_logical_message_after.value.json",                   "id",    "upsert"),
    ("smt_outbox_input_postgres_create.schemaless.json",              "id",    "upsert"),
    ("smt_outbox_routed_value_escaped_string.json",                   "id",    "error: not an envelope"),
    ("smt_outbox_routed_value_expanded.json",                         "id",    "error: not an envelope"),
    ("smt_timezone_converter_input_postgres_create.schemaless.json",  "id",    "upsert"),
    ("smt_timezone_converter_output.schemaless.json",                 "id",    "upsert"),
    ("smt_unwrap_add_fields_fragment.docs_illustrative.json",         "id",    "error: not an envelope"),
    ("smt_unwrap_delete_rewrite_output.value.json",                   "id",    "error: not an envelope"),
    ("smt_unwrap_update_output.value.json",                           "id",    "error: not an envelope"),
];

/// The messages of a fixture: one per line for `.jsonl`, else the whole file.
fn messages(name: &str) -> Vec<String> {
    let text = fixture(name);
    if name.ends_with(".jsonl") {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect()
    } else {
        vec![text]
    }
}

fn outcome(r: &Result<Decoded, DecodeError>) -> String {
    match r {
        Ok(Decoded::Change(c)) => match c.op {
            Op::Upsert { .. } => "upsert".into(),
            Op::Delete => "delete".into(),
            Op::Truncate => "truncate".into(),
        },
        Ok(Decoded::Skip(s)) => format!("skip: {}", s.as_str()),
        Err(DecodeError {
            kind: ErrorKind::NotAnEnvelope(_),
            ..
        }) => "error: not an envelope".into(),
        Err(e) => format!("error: {e}"),
    }
}

#[test]
fn every_fixture_file_is_listed() {
    let mut on_disk: Vec<String> = std::fs::read_dir(fixture_dir())
        .expect("connectors/tests/fixtures/debezium")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".json") || n.ends_with(".jsonl"))
        .collect();
    on_disk.sort();
    let listed: Vec<String> = FIXTURES.iter().map(|f| f.0.to_owned()).collect();
    assert_eq!(on_disk, listed, "a fixture was added or removed: list it in FIXTURES");
}

#[test]
fn every_fixture_decodes_to_its_expected_outcome() {
    for &(name, pk, expected) in FIXTURES {
        let table = TopicTable::new("t", [pk]);
        for (i, msg) in messages(name).iter().enumerate() {
            let got = decode_str(None, msg, &table);
            assert_eq!(outcome(&got), expected, "{name} message {i}: {got:?}");
        }
    }
}

#[test]
fn postgres_streaming_create() {
    let c = change("postgres_create_streaming_2.1.payload.json", &customers());
    assert_eq!(
        (c.table.as_str(), c.key.as_str(), c.old_key.as_ref()),
        ("customers", "[1005]", None)
    );
    assert_eq!(c.position, Position::new(34_466_480, 1), "(lsn, 1): streamed");
    assert_eq!(c.commit_time_ms, 1_733_906_311_010, "source.ts_ms");
    let names: Vec<&str> = cells(&c).iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["id", "first_name", "last_name", "email"],
        "column order is kept"
    );
    assert_eq!(val(&c, "id"), &json!(1005));
    assert_eq!(val(&c, "email"), &json!("bob@marley.com"));
}

#[test]
fn postgres_create_with_schema() {
    let c = change("postgres_create_with_schema.json", &customers());
    assert_eq!(c.key.as_str(), "[1]");
    assert_eq!(c.position, Position::new(24_023_128, 1));
    assert_eq!(c.commit_time_ms, 1_559_033_904_863);
    assert_eq!(val(&c, "first_name"), &json!("Anne"));
    // The same payload without its schema decodes the same.
    let bare =
        serde_json::from_str::<Value>(&fixture("postgres_create_with_schema.json")).unwrap()["payload"].to_string();
    assert_eq!(change_of(None, &bare, &customers()), c);
}

#[test]
fn schema_and_schemaless_mysql_events_agree() {
    let with = change("generic_mysql_create_with_schema.serde_test.json", &customers());
    let without = change("generic_mysql_create_schemaless.serde_test.json", &customers());
    assert_eq!(with, without);
    assert_eq!(with.key.as_str(), "[1004]");
    // source.ts_ms is 0 in this old MySQL sample: the envelope's ts_ms is used.
    assert_eq!(with.commit_time_ms, 1_465_491_411_815);
    assert_eq!(
        with.position,
        Position::new(3, 154 << 16),
        "binlog mysql-bin.000003 pos 154 row 0"
    );
    assert_eq!(val(&with, "last_name"), &json!("Kretchmar"));
}

#[test]
fn mysql_snapshot_read_and_updates() {
    let r = change("generic_mysql_snapshot_read_3.0.schemaless.json", &customers());
    assert_eq!(
        (r.key.as_str(), r.commit_time_ms),
        ("[1004]", 0),
        "a snapshot read has no commit time"
    );
    assert_eq!(r.position, Position::new(3, 797 << 16));
    assert_eq!(val(&r, "first_name"), &json!("Anne"));
    let u = change("generic_mysql_update_3.0.schemaless.json", &customers());
    assert_eq!((u.key.as_str(), u.old_key.as_ref()), ("[1001]", None));
    assert_eq!(val(&u, "first_name"), &json!("Sarah"));
    assert_eq!(u.position, Position::new(3, 1041 << 16));
    let u = change("generic_mysql_update_schemaless.serde_test.json", &customers());
    assert_eq!((u.key.as_str(), val(&u, "first_name")), ("[1004]", &json!("Anne")));
    // Unknown columns are carried along like any other.
    let u = change("generic_mysql_update_unknown_property.serde_test.json", &customers());
    assert_eq!(val(&u, "middle_name"), &json!("L"));
    assert_eq!(cells(&u).len(), 5);
}

#[test]
fn sqlserver_delete_with_decimals_and_keys() {
    let emp = TopicTable::new("emp", ["empno"]);
    let value = fixture("generic_sqlserver_delete_decimal_value.with_schema.json");
    let key = fixture("generic_sqlserver_delete_decimal_key.with_schema.json");
    let d = change_of(Some(&key), &value, &emp);
    assert_eq!((d.op.clone(), d.key.as_str()), (Op::Delete, "[11]"));
    assert_eq!(d.commit_time_ms, 1_637_859_764_960);
    assert_eq!(
        d.position,
        Position::new(1_637_859_764_960, 0),
        "no lsn, no binlog: commit time"
    );
    assert_eq!(decode_key(TOPIC, key.as_bytes(), &emp).unwrap().as_str(), "[11]");
    // Without `before`, the delete's key comes from the message key.
    let no_before = edited("generic_sqlserver_delete_decimal_value.with_schema.json", |p| {
        p["before"] = Value::Null
    });
    assert_eq!(change_of(Some(&key), &no_before, &emp).key.as_str(), "[11]");
    let e = decode_str(None, &no_before, &emp).unwrap_err();
    assert!(
        matches!(&e.kind, ErrorKind::MissingKeyColumn { column, .. } if column == "empno"),
        "{e}"
    );
    // The `before` image's values, decoded through the schema (as a create).
    let as_create = edited("generic_sqlserver_delete_decimal_value.with_schema.json", |p| {
        p["after"] = p["before"].take();
        p["op"] = json!("c");
    });
    let c = change_of(None, &as_create, &emp);
    assert_eq!(
        val(&c, "sal"),
        &json!("200000.0000"),
        "dzWUAA== = 2000000000 at scale 4"
    );
    assert_eq!(val(&c, "comm"), &json!("10.0000"), "AYag = 100000 at scale 4");
    assert_eq!(
        val(&c, "hiredate"),
        &json!("2019-07-09T00:00:00"),
        "io.debezium.time.Timestamp"
    );
    assert_eq!(val(&c, "fname"), &json!("Yossi"));
    // Without schemas, hints give the same cells; without hints the base64 stays.
    let bare = serde_json::from_str::<Value>(&as_create).unwrap()["payload"].to_string();
    let hinted = emp
        .clone()
        .with_column_type("sal", ColumnType::Decimal { scale: Some(4) })
        .with_column_type("comm", ColumnType::Decimal { scale: Some(4) })
        .with_column_type("hiredate", ColumnType::Timestamp);
    assert_eq!(cells(&change_of(None, &bare, &hinted)), cells(&c));
    assert_eq!(val(&change_of(None, &bare, &emp), "sal"), &json!("dzWUAA=="));
}

#[test]
fn tombstones_are_skipped() {
    assert_eq!(
        skip("generic_tombstone_legacy_jsonconverter_rendering.json"),
        Skip::Tombstone
    );
    let t = customers();
    for value in [
        None,
        Some(&b""[..]),
        Some(b" \n"),
        Some(b"null"),
        Some(br#"{"schema":{"type":"struct"},"payload":null}"#),
    ] {
        assert_eq!(
            decode(TOPIC, Some(br#"{"id":1}"#), value, &t),
            Ok(Decoded::Skip(Skip::Tombstone))
        );
    }
}

#[test]
fn transformed_records_are_rejected() {
    for name in [
        "generic_unwrapped_row.serde_test.json",
        "smt_unwrap_update_output.value.json",
        "smt_unwrap_delete_rewrite_output.value.json",
        "smt_unwrap_add_fields_fragment.docs_illustrative.json",
        "smt_outbox_routed_value_expanded.json",
    ] {
        let e = error(name);
        assert_eq!(e.at, "value", "{name}");
        assert!(e.to_string().contains("ExtractNewRecordState"), "{name}: {e}");
    }
    let e = error("smt_outbox_routed_value_escaped_string.json");
    assert!(matches!(e.kind, ErrorKind::NotAnEnvelope(_)), "{e}");
    assert!(e.to_string().contains("a string, not an object"), "{e}");
}

#[test]
fn illustrative_transaction_block_decodes_leniently() {
    let c = change(
        "postgres_create_with_transaction_block.docs_illustrative.json",
        &TopicTable::new("t", ["pk"]),
    );
    assert_eq!(c.key.as_str(), r#"["2"]"#);
    assert_eq!(c.commit_time_ms, 1_580_390_884_335, "ts_ms given as a string");
    assert_eq!(
        c.position,
        Position::new(1_580_390_884_335, 0),
        "empty source: commit time"
    );
    assert_eq!(val(&c, "aa"), &json!("1"));
}

#[test]
fn postgres_delete_and_update_under_replica_identity_default() {
    let d = change("postgres_delete_replica_identity_default.payload.json", &customers());
    assert_eq!(
        (d.op.clone(), d.key.as_str(), d.old_key.as_ref()),
        (Op::Delete, "[1]", None)
    );
    assert_eq!(d.position, Position::new(46_523_128, 1), "no sequence needed");
    assert_eq!(d.commit_time_ms, 1_559_033_904_863);
    let u = change("postgres_update_replica_identity_default.payload.json", &customers());
    assert_eq!(
        (u.key.as_str(), u.old_key.as_ref()),
        ("[1]", None),
        "same key in before"
    );
    assert_eq!(val(&u, "first_name"), &json!("Anne Marie"));
    assert_eq!(u.position, Position::new(24_023_128, 1));
    // An update whose before holds another full key moves the row.
    let moved = edited("postgres_update_replica_identity_default.payload.json", |p| {
        p["before"]["id"] = json!(7)
    });
    assert_eq!(
        change_of(None, &moved, &customers()).old_key,
        Some(Key::from_values(&[json!(7)]))
    );
}

#[test]
fn primary_key_change_is_a_delete_then_a_create() {
    let event = |op: &str, id: i64, lsn: u64| {
        json!({"before": if op == "d" { json!({"id": id}) } else { Value::Null },
               "after": if op == "c" { json!({"id": id, "name": "x"}) } else { Value::Null },
               "source": {"connector": "postgresql", "ts_ms": 1_700_000_000_000_i64,
                          "sequence": format!("[\"100\",\"{lsn}\"]"), "lsn": lsn},
               "op": op, "ts_ms": 1_700_000_000_100_i64})
        .to_string()
    };
    let d = change_of(Some(r#"{"id":1}"#), &event("d", 1, 200), &customers());
    let c = change_of(Some(r#"{"id":2}"#), &event("c", 2, 201), &customers());
    assert_eq!((d.op, d.key.as_str()), (Op::Delete, "[1]"));
    assert_eq!((c.key.as_str(), c.old_key), ("[2]", None));
    assert!(d.position < c.position);
}

#[test]
fn logical_messages_are_skipped() {
    for name in [
        "postgres_message_transactional.payload.json",
        "postgres_message_nontransactional.payload.json",
        "postgres_message_value.schemaless.json",
    ] {
        assert_eq!(skip(name), Skip::LogicalMessage, "{name}");
    }
    let key = fixture("postgres_message_key.schemaless.json");
    let value = fixture("postgres_message_value.schemaless.json");
    assert_eq!(
        decode_str(Some(&key), &value, &customers()),
        Ok(Decoded::Skip(Skip::LogicalMessage))
    );
    // The message key names no row.
    let e = decode_key(TOPIC, key.as_bytes(), &customers()).unwrap_err();
    assert_eq!(e.at, "key");
    assert!(
        matches!(&e.kind, ErrorKind::MissingKeyColumn { column, .. } if column == "id"),
        "{e}"
    );
}

#[test]
fn postgres_snapshot_reads_and_their_replay() {
    let lines = messages("postgres_snapshot_read_2.1.payloads.jsonl");
    let changes: Vec<Change> = lines.iter().map(|l| change_of(None, l, &customers())).collect();
    let keys: Vec<&str> = changes.iter().map(|c| c.key.as_str()).collect();
    assert_eq!(keys, ["[1001]", "[1002]", "[1003]", "[1004]"]);
    // Reads: what the rows are, not since when (source.ts_ms is when they were read).
    assert!(changes.iter().all(|c| c.commit_time_ms == 0));
    for c in &changes {
        assert!(matches!(c.op, Op::Upsert { .. }));
        assert_eq!(
            c.position,
            Position::new(33_816_576, 0),
            "snapshot: (the snapshot's LSN, 0), below what streams from there"
        );
    }
    assert_eq!(val(&changes[1], "email"), &json!("gbailey@foobar.com"));
    // A replay decodes to identical changes and positions.
    let replay: Vec<Change> = lines.iter().map(|l| change_of(None, l, &customers())).collect();
    assert_eq!(replay, changes);
}

#[test]
fn postgres_truncate() {
    let t = change("postgres_truncate.payload.json", &customers());
    assert_eq!((t.op.clone(), t.key.as_str()), (Op::Truncate, "[]"));
    assert_eq!(t.position, Position::new(46_523_128, 1));
    assert_eq!(t.commit_time_ms, 1_559_033_904_863);
}

#[test]
fn transaction_metadata_and_heartbeats_are_skipped() {
    let t = customers();
    for name in ["postgres_txmeta_begin.json", "postgres_txmeta_end.json"] {
        let v = fixture(name);
        let key = br#"{"id":"571:53195829"}"#;
        for topic in ["dbserver1.transaction", TOPIC] {
            let got = decode(topic, Some(key), Some(v.as_bytes()), &t);
            assert_eq!(got, Ok(Decoded::Skip(Skip::TransactionMetadata)), "{name} on {topic}");
        }
        let with_schema = json!({"schema": {"type": "struct"}, "payload": serde_json::from_str::<Value>(&v).unwrap()});
        assert_eq!(
            decode_str(None, &with_schema.to_string(), &t),
            Ok(Decoded::Skip(Skip::TransactionMetadata))
        );
    }
    let beat = br#"{"ts_ms":1700000000000}"#;
    let key = br#"{"serverName":"dbserver1"}"#;
    assert_eq!(
        decode("__debezium-heartbeat.dbserver1", Some(key), Some(beat), &t),
        Ok(Decoded::Skip(Skip::Heartbeat))
    );
    assert_eq!(
        decode(TOPIC, Some(key), Some(beat), &t),
        Ok(Decoded::Skip(Skip::Heartbeat))
    );
}

#[test]
fn topic_kinds() {
    assert_eq!(topic_kind("__debezium-heartbeat.dbserver1"), TopicKind::Heartbeat);
    assert_eq!(topic_kind("__debezium-heartbeat"), TopicKind::Heartbeat);
    assert_eq!(
        topic_kind(&format!("dbserver1{TRANSACTION_TOPIC_SUFFIX}")),
        TopicKind::TransactionMetadata
    );
    assert_eq!(topic_kind(TOPIC), TopicKind::Data);
    assert_eq!(
        topic_kind("shop.public.transaction"),
        TopicKind::Data,
        "a table named transaction"
    );
    assert_eq!(topic_kind(".transaction"), TopicKind::Data);
    assert_eq!(topic_kind("__debezium-heartbeats.x"), TopicKind::Data);
}

#[test]
fn toast_placeholder_becomes_unchanged() {
    let c = change("postgres_update_toast_unavailable_value.schemaless.json", &customers());
    assert_eq!(cell(&c, "biography"), &Cell::Unchanged);
    assert_eq!(val(&c, "first_name"), &json!("Dana"));
    assert_eq!((c.key.as_str(), c.old_key.as_ref()), ("[1004]", None), "before is null");
    assert_eq!(c.position, Position::new(34_650_016, 1));
    assert_eq!(c.commit_time_ms, 1_570_448_151_151);
}

#[test]
fn smt_inputs_and_outputs_that_are_envelopes() {
    let c = change("smt_decode_logical_message_after.value.json", &customers());
    assert_eq!(c.key.as_str(), "[1]");
    assert_eq!(val(&c, "totalPrice"), &json!(39.98), "a plain number stays a number");
    assert_eq!(c.position, Position::new(26_717_576, 1));
    assert_eq!(c.commit_time_ms, 1_723_115_415_640);

    let outbox = TopicTable::new("outbox", ["id"]);
    let c = change("smt_outbox_input_postgres_create.schemaless.json", &outbox);
    assert_eq!(c.key.as_str(), r#"["406c07f3-26f0-4eea-a50c-109940064b8f"]"#);
    assert_eq!(
        c.commit_time_ms, 1_556_890_294_484,
        "no source.ts_ms (ts_usec era): envelope ts_ms"
    );
    assert_eq!(c.position, Position::new(24_064_704, 1));
    assert!(val(&c, "payload").is_string(), "unhinted JSON text stays text");
    let hinted = outbox
        .with_column_type("payload", ColumnType::Json)
        .with_column_type("id", ColumnType::Uuid);
    let c = change("smt_outbox_input_postgres_create.schemaless.json", &hinted);
    assert_eq!(val(&c, "payload")["customerId"], json!(123));
    assert_eq!(val(&c, "payload")["lineItems"][1]["totalPrice"], json!(29.99));

    let zoned = customers().with_column_type("created_at", ColumnType::ZonedTimestamp);
    let input = change("smt_timezone_converter_input_postgres_create.schemaless.json", &zoned);
    let output = change("smt_timezone_converter_output.schemaless.json", &zoned);
    let utc = json!("2011-01-11T16:40:30.123456789+00:00");
    assert_eq!((val(&input, "created_at"), val(&output, "created_at")), (&utc, &utc));
    assert_eq!(input.position, Position::new(24_023_128, 1));
    let raw = change("smt_timezone_converter_output.schemaless.json", &customers());
    assert_eq!(val(&raw, "created_at"), &json!("2011-01-11T11:40:30.123456789-05:00"));
}

mod robustness;
mod typed;
