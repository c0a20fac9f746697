//! Tests of the Debezium value conversions.

use super::*;
use serde_json::json;

/// Converts `v` as `ty`, expecting a value (not an unchanged placeholder).
pub(crate) fn value(v: Value, ty: ColumnType) -> Value {
    match convert(&v, &ty) {
        Ok(Cell::Value(out)) => out,
        other => panic!("{v} as {ty:?}: {other:?}"),
    }
}

#[test]
fn configured_hints_parse_or_say_what_is_expected() {
    let h = |s: &str| ColumnType::from_hint(s);
    assert_eq!(h("decimal(2)"), Ok(ColumnType::Decimal { scale: Some(2) }));
    assert_eq!(h(" decimal( -3 ) "), Ok(ColumnType::Decimal { scale: Some(-3) }));
    assert_eq!(h("decimal"), Ok(ColumnType::Decimal { scale: None }));
    assert_eq!(h("micro_timestamp"), Ok(ColumnType::MicroTimestamp));
    assert_eq!(h("uuid[]"), Ok(ColumnType::Array(Box::new(ColumnType::Uuid))));
    assert!(h("decimal(x)").unwrap_err().to_string().contains("integer"));
    assert!(h("decimal(99999)").unwrap_err().to_string().contains("scale"));
    assert!(h("money")
        .unwrap_err()
        .to_string()
        .contains("unknown column type 'money'"));
    // A hint decodes a precise decimal without a schema: 1234 unscaled, scale 2.
    assert_eq!(value(json!("BNI="), h("decimal(2)").unwrap()), json!("12.34"));
}

#[test]
fn schema_fields_map_to_column_types() {
    let t = |s: Value| ColumnType::from_schema(&s).unwrap();
    assert_eq!(
        t(json!({"type": "bytes", "name": "org.apache.kafka.connect.data.Decimal",
                 "parameters": {"scale": "4", "connect.decimal.precision": "19"}})),
        ColumnType::Decimal { scale: Some(4) }
    );
    assert_eq!(
        t(json!({"type": "struct", "name": "io.debezium.data.VariableScaleDecimal"})),
        ColumnType::Decimal { scale: None }
    );
    assert_eq!(
        t(json!({"type": "int64", "name": "io.debezium.time.MicroTimestamp"})),
        ColumnType::MicroTimestamp
    );
    assert_eq!(
        t(json!({"type": "int32", "name": "org.apache.kafka.connect.data.Date"})),
        ColumnType::Date
    );
    assert_eq!(t(json!({"type": "bytes"})), ColumnType::Bytes);
    assert_eq!(
        t(json!({"type": "string", "name": "io.debezium.data.Enum"})),
        ColumnType::Plain
    );
    assert_eq!(
        t(json!({"type": "bytes", "name": "io.debezium.data.Bits", "parameters": {"length": "10"}})),
        ColumnType::Bits { length: Some(10) }
    );
    assert_eq!(
        t(json!({"type": "array", "items": {"type": "string", "name": "io.debezium.data.Json"}})),
        ColumnType::Array(Box::new(ColumnType::Json))
    );
    for bad in [
        json!("int32"),
        json!({"name": "org.apache.kafka.connect.data.Decimal"}),
        json!({"name": "org.apache.kafka.connect.data.Decimal", "parameters": {"scale": "two"}}),
        json!({"name": "io.debezium.data.Bits", "parameters": {"length": -1}}),
        json!({"type": "array", "items": 5}),
    ] {
        assert!(ColumnType::from_schema(&bad).is_err(), "{bad}");
    }
}

#[test]
fn other_logical_types() {
    assert_eq!(value(json!("10:00:00.5Z"), ColumnType::ZonedTime), json!("10:00:00.5Z"));
    assert_eq!(value(json!(2024), ColumnType::Year), json!(2024));
    let u = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
    assert_eq!(value(json!(u), ColumnType::Uuid), json!(u));
    assert_eq!(
        value(json!(r#"{"city": "Berlin", "zip": "10115"}"#), ColumnType::Json),
        json!({"city": "Berlin", "zip": "10115"})
    );
    assert_eq!(value(json!({"a": 1}), ColumnType::Json), json!({"a": 1}));
    assert!(convert(&json!("{not json"), &ColumnType::Json).is_err());
    assert_eq!(value(json!("aGVsbG8="), ColumnType::Bytes), json!("aGVsbG8="));
    assert!(convert(&json!("aGVsbG8"), &ColumnType::Bytes).is_err());
    assert!(convert(&json!(5), &ColumnType::Bytes).is_err());
    // b'101' → bits 0 and 2 of byte 0; b'1000000001' → [0x01, 0x02].
    assert_eq!(value(json!("BQ=="), ColumnType::Bits { length: Some(3) }), json!("101"));
    assert_eq!(
        value(json!("AQI="), ColumnType::Bits { length: Some(10) }),
        json!("1000000001")
    );
    assert_eq!(
        value(json!("BQ=="), ColumnType::Bits { length: Some(12) }),
        json!("000000000101")
    );
    assert_eq!(
        value(json!("BQ=="), ColumnType::Bits { length: None }),
        json!("00000101")
    );
    assert_eq!(value(json!(true), ColumnType::Bits { length: Some(1) }), json!(true));
    assert_eq!(value(json!("x"), ColumnType::Plain), json!("x"));
    assert_eq!(value(json!({"wkb": "AQ=="}), ColumnType::Plain), json!({"wkb": "AQ=="}));
}

#[test]
fn arrays_convert_each_element() {
    let ty = ColumnType::Array(Box::new(ColumnType::Decimal { scale: Some(2) }));
    assert_eq!(
        value(json!(["BOI=", null, "+x4="]), ty.clone()),
        json!(["12.50", null, "-12.50"])
    );
    assert_eq!(value(json!([]), ty.clone()), json!([]));
    let e = convert(&json!(["BOI=", "!!"]), &ty).unwrap_err();
    assert!(e.to_string().starts_with("element 2: invalid base64"), "{e}");
    assert!(convert(&json!("BOI="), &ty).is_err());
    let nested = ColumnType::Array(Box::new(ColumnType::Array(Box::new(ColumnType::Date))));
    assert_eq!(value(json!([[0, 1]]), nested), json!([["1970-01-01", "1970-01-02"]]));
}

#[test]
fn toast_placeholders_are_unchanged() {
    assert_eq!(
        STANDARD.encode(UNAVAILABLE_VALUE),
        UNAVAILABLE_VALUE_BASE64,
        "the base64 form is the placeholder's bytes"
    );
    let text_array = ColumnType::Array(Box::new(ColumnType::Plain));
    let bytea_array = ColumnType::Array(Box::new(ColumnType::Bytes));
    for (v, ty) in [
        (json!(UNAVAILABLE_VALUE), ColumnType::Plain),
        (json!(UNAVAILABLE_VALUE), ColumnType::Json),
        (json!(UNAVAILABLE_VALUE), ColumnType::Decimal { scale: Some(2) }),
        (json!(UNAVAILABLE_VALUE), ColumnType::Unknown),
        (json!(UNAVAILABLE_VALUE_BASE64), ColumnType::Bytes),
        (json!(UNAVAILABLE_VALUE_BASE64), ColumnType::Unknown),
        (json!([UNAVAILABLE_VALUE]), text_array.clone()),
        (json!([UNAVAILABLE_VALUE_BASE64]), bytea_array),
        (json!([UNAVAILABLE_VALUE]), ColumnType::Unknown),
    ] {
        assert_eq!(convert(&v, &ty), Ok(Cell::Unchanged), "{v} as {ty:?}");
    }
    // The base64 form is plain text in a text column; a longer array is data.
    assert_eq!(
        value(json!(UNAVAILABLE_VALUE_BASE64), ColumnType::Plain),
        json!(UNAVAILABLE_VALUE_BASE64)
    );
    let two = json!([UNAVAILABLE_VALUE, "x"]);
    assert_eq!(value(two.clone(), text_array), two);
}

#[test]
fn garbage_never_panics() {
    let types = [
        ColumnType::Unknown,
        ColumnType::Bytes,
        ColumnType::Decimal { scale: Some(3) },
        ColumnType::Decimal { scale: None },
        ColumnType::Date,
        ColumnType::Time,
        ColumnType::MicroTime,
        ColumnType::NanoTime,
        ColumnType::Timestamp,
        ColumnType::MicroTimestamp,
        ColumnType::NanoTimestamp,
        ColumnType::ZonedTimestamp,
        ColumnType::Year,
        ColumnType::Json,
        ColumnType::Bits { length: Some(9) },
        ColumnType::Array(Box::new(ColumnType::Date)),
    ];
    let alphabet = [
        "2024", "-", "T", ":", ".", "Z", "+", "0", "9", "=", "A", "/", "{", "\"", "é", "99999",
    ];
    let mut s: u64 = 0x2545_F491_4F6C_DD1D;
    let mut samples = vec![
        json!(i64::MAX),
        json!(i64::MIN),
        json!(u64::MAX),
        json!(-0.0),
        json!(1e300),
        json!({"scale": i64::MIN, "value": ""}),
        json!({"scale": -5, "value": "/w=="}),
        json!([[[]]]),
    ];
    for _ in 0..3_000 {
        let mut text = String::new();
        for _ in 0..(s % 24) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            text.push_str(alphabet[(s % alphabet.len() as u64) as usize]);
        }
        samples.push(Value::String(text));
    }
    for v in &samples {
        for ty in &types {
            let _ = convert(v, ty);
        }
    }
}
