//! Tests of `values.rs`.
use super::*;
use serde_json::json;

fn b64(bytes: &[u8]) -> Value {
    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// (oid, text, expected JSON): one or more cases for every rule.
#[rustfmt::skip]
fn conversions() -> Vec<(u32, &'static str, Value)> {
    let u = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
    let mut cases = vec![
        (16, "t", json!(true)), (16, "f", json!(false)),
        (21, "-32768", json!(-32768)), (23, "42", json!(42)), (26, "4294967295", json!(4_294_967_295u32)),
        (20, "9223372036854775807", json!(i64::MAX)), (20, "-9223372036854775808", json!(i64::MIN)),
        (701, "1.5", json!(1.5)), (700, "0.1", json!(0.1)), (701, "-2.5e-05", json!(-2.5e-05)),
        (701, "1e+100", json!(1e100)), (701, "NaN", json!("NaN")), (700, "Infinity", json!("Infinity")),
        (701, "-Infinity", json!("-Infinity")),
        (1700, "12.50", json!("12.50")), (1700, "NaN", json!("NaN")), (1700, "-Infinity", json!("-Infinity")),
        (1700, "-0.000000000000000000001", json!("-0.000000000000000000001")),
        (1700, "123456789012345678901234567890.10", json!("123456789012345678901234567890.10")),
        (2950, u, json!(u)),
        (3802, r#"{"city": "Berlin", "zip": "10115"}"#, json!({"city": "Berlin", "zip": "10115"})),
        (114, "[1, null, true]", json!([1, null, true])), (3802, "\"s\"", json!("s")),
        (17, "\\x", json!("")), (17, "\\x0a1bFF", b64(&[0x0a, 0x1b, 0xff])), (17, "\\x68656c6c6f", json!("aGVsbG8=")),
        (17, "a\\000\\\\b\\377", b64(b"a\0\\b\xff")), (17, "hello", json!("aGVsbG8=")), (17, "", json!("")),
        (1082, "2024-01-31", json!("2024-01-31")), (1082, "infinity", json!("infinity")),
        (1082, "-infinity", json!("-infinity")), (1083, "10:00:00.123", json!("10:00:00.123")),
        (1266, "10:00:00+05:30", json!("10:00:00+05:30")),
        (1186, "1 year 2 mons 3 days 04:05:06", json!("1 year 2 mons 3 days 04:05:06")),
        (1114, "2024-01-31 10:00:00.123", json!("2024-01-31T10:00:00.123")),
        (1114, "2024-01-31 10:00:00", json!("2024-01-31T10:00:00")),
        (1114, "12024-01-31 10:00:00", json!("12024-01-31T10:00:00")),
        (1114, "infinity", json!("infinity")), (1114, "-infinity", json!("-infinity")),
        (1114, "0044-03-15 12:00:00 BC", json!("0044-03-15 12:00:00 BC")),
        (1184, "2024-01-31 10:00:00.123+00", json!("2024-01-31T10:00:00.123+00:00")),
        (1184, "2024-01-31 10:00:00+05:30", json!("2024-01-31T10:00:00+05:30")),
        (1184, "2024-01-31 10:00:00+05", json!("2024-01-31T10:00:00+05:00")),
        (1184, "2024-01-31 10:00:00.5-03", json!("2024-01-31T10:00:00.5-03:00")),
        (1184, "1850-01-01 00:00:00+00:53:28", json!("1850-01-01T00:00:00+00:53:28")),
        (1184, "infinity", json!("infinity")), (1184, "-infinity", json!("-infinity")),
        (1184, "0044-03-15 12:00:00+00 BC", json!("0044-03-15 12:00:00+00 BC")),
        // Arrays of every element rule.
        (1007, "{}", json!([])), (1007, "{1,2,NULL}", json!([1, 2, null])),
        (1016, "{9223372036854775807}", json!([i64::MAX])), (1005, "{-1}", json!([-1])),
        (1000, "{t,f,NULL}", json!([true, false, null])), (1021, "{0.25}", json!([0.25])),
        (1022, "{1.5,NaN,-Infinity}", json!([1.5, "NaN", "-Infinity"])),
        (1231, "{12.50,NaN}", json!(["12.50", "NaN"])), (2951, "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}", json!([u])),
        (1182, "{2024-01-31,infinity}", json!(["2024-01-31", "infinity"])),
        (1185, r#"{"2024-01-31 10:00:00+00","2024-01-31 10:00:00.5+05:30"}"#,
            json!(["2024-01-31T10:00:00+00:00", "2024-01-31T10:00:00.5+05:30"])),
        (1115, r#"{"2024-01-31 10:00:00"}"#, json!(["2024-01-31T10:00:00"])),
        (1001, r#"{"\\x0a1b",NULL}"#, json!(["Chs=", null])),
        (3807, r#"{"{\"a\": 1}","[2]",NULL}"#, json!([{"a": 1}, [2], null])), (199, r#"{"\"s\"",3}"#, json!(["s", 3])),
        // Tricky literals: quoting, escapes, NULL spellings, whitespace, unicode.
        (1009, r#"{"a,b","c\"d"}"#, json!(["a,b", "c\"d"])),
        (1009, r#"{NULL,"NULL",null,\NULL}"#, json!([null, "NULL", null, "NULL"])),
        (1009, r#"{"","  x ","back\\slash","{}"}"#, json!(["", "  x ", "back\\slash", "{}"])),
        (1015, "{plain,ünïcödé,x y}", json!(["plain", "ünïcödé", "x y"])),
        (1009, "{ a , b }", json!(["a", "b"])), (1009, r#"{a\ ,b}"#, json!(["a ", "b"])), (1009, r#"{"\é"}"#, json!(["é"])),
        // Multidimensional and decorated.
        (1007, "{{1,2},{3,4}}", json!([[1, 2], [3, 4]])), (1009, r#"{{{"a"}},{{NULL}}}"#, json!([[["a"]], [[null]]])),
        (1007, "[0:1]={1,2}", json!([1, 2])), (1007, "[1:2][-1:0]={{1,2},{3,4}}", json!([[1, 2], [3, 4]])),
        (1007, "{{}}", json!([[]])), (1007, "{{{{{{1}}}}}}", json!([[[[[[1]]]]]])),
        // Unknown OIDs pass through.
        (869, "192.168.0.1/32", json!("192.168.0.1/32")), (999_999, "{not,parsed}", json!("{not,parsed}")),
    ];
    for oid in [25, 1043, 1042, 19, 18] {
        cases.extend([(oid, "Widget X  ", json!("Widget X  ")), (oid, "", json!(""))]);
    }
    cases
}

/// (oid, text) pairs that must be errors.
#[rustfmt::skip]
const INVALID: &[(u32, &str)] = &[
    (16, "yes"), (16, ""), (23, "12x"), (23, ""), (23, "1.5"), (20, "9223372036854775808"),
    (701, "inf"), (701, "nan"), (701, "abc"), (700, "1e999"),
    (1700, ""), (1700, "1.2.3"), (1700, "abc"), (1700, "-"), (1700, "."), (1700, "1e"), (1700, "12,5"),
    (2950, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1"), (2950, "a0eebc99x9c0b-4ef8-bb6d-6bb9bd380a11"),
    (3802, "{not json"), (114, ""),
    (17, "\\x0"), (17, "\\xzz"), (17, "\\x0g"), (17, "a\\9"), (17, "a\\"), (17, "\\400"),
    (1114, "2024-01-31T10:00:00"), (1114, "2024-01-31 10:00:00+00"), (1114, "Wed Jan 31 10:00:00 2024"), (1114, ""),
    (1184, "2024-01-31 10:00:00"), (1184, "2024-01-31 10:00:00+5"), (1184, "2024-01-31 10:00:00+05:3"),
    (1184, "x 10:00:00+00"), (1184, "2024-01-31 +00"),
    (1007, ""), (1007, "1,2"), (1007, "{1,2"), (1007, "{1,,2}"), (1007, "{1,}"), (1007, "{,1}"), (1007, "{1}x"),
    (1007, "{1,{2}}"), (1007, "{{1},2}"), (1007, "{\"a}"), (1007, "{a\"b}"), (1007, "{1 2}"), (1007, "[0:1]{1}"),
    (1007, "[a]={1}"), (1007, "{\\"), (1007, "{\"\\"), (1007, "}"), (1007, "{{1}"), (1007, "{1}}"), (1007, "{x}"),
    (1007, "{{{{{{{1}}}}}}}"), (3807, r#"{"{bad"}"#), (1001, "{\"\\\\xZZ\"}"),
];

#[test]
fn converts_every_rule() {
    for (oid, text, expected) in conversions() {
        let got = text_to_json(oid, text).unwrap_or_else(|e| panic!("{oid} {text:?}: {e}"));
        assert_eq!(got, expected, "{oid} {text:?}");
    }
    assert!(text_to_json(20, "9223372036854775807").unwrap().is_i64());
    let deep = format!("{}1{}", "[".repeat(300), "]".repeat(300));
    assert_eq!(
        text_to_json(3802, &deep).unwrap(),
        json!(deep),
        "too deep: kept as text"
    );
    // jsonb key order is preserved.
    let v = text_to_json(3802, r#"{"z": 1, "a": 2}"#).unwrap();
    assert_eq!(v.as_object().unwrap().keys().collect::<Vec<_>>(), ["z", "a"]);
}

#[test]
fn rejects_invalid_text_of_known_types() {
    for &(oid, text) in INVALID {
        let e = text_to_json(oid, text).expect_err(text);
        assert_eq!((e.type_oid, Some(e.type_name)), (oid, type_name(oid)), "{e}");
        assert!(
            e.to_string().starts_with(&format!("invalid {} value", e.type_name)),
            "{e}"
        );
    }
}

#[test]
fn errors_name_type_text_and_element() {
    let e = text_to_json(23, "12x").unwrap_err();
    assert_eq!((e.type_oid, e.type_name, e.text.as_str()), (23, "int4", "12x"));
    assert!(e.to_string().starts_with("invalid int4 value \"12x\": "), "{e}");
    let e = text_to_json(1007, "{1,x}").unwrap_err();
    assert!(e.to_string().contains("element 2: invalid int4 value \"x\""), "{e}");
    let e = text_to_json(3807, r#"{"{bad"}"#).unwrap_err();
    assert!(
        e.reason.to_string().starts_with("element 1: invalid jsonb value"),
        "{e}"
    );
    // Long text is cut to 100 characters.
    let e = text_to_json(23, &"é".repeat(300)).unwrap_err();
    assert_eq!(e.text.chars().count(), ValueError::MAX_TEXT_CHARS + 1);
    assert!(e.text.ends_with('…') && e.to_string().len() < 400);
}

#[test]
fn known_oids_and_names() {
    assert!(!is_known(869));
    assert_eq!(type_name(999_999), None);
    assert_eq!(type_name(1007), Some("int4[]"));
    assert_eq!(type_name(1184), Some("timestamptz"));
    assert_eq!(array_element_oid(1185), Some(oid::TIMESTAMPTZ));
    assert_eq!(array_element_oid(23), None);
    assert!(SCALARS.iter().all(|s| is_known(s.0)));
    assert!(ARRAYS
        .iter()
        .all(|a| is_known(a.0) && is_known(a.2) && array(a.2).is_none()));
}

#[test]
fn garbage_never_panics() {
    // Deep nesting is refused, not a stack overflow.
    let deep = format!("{}{}", "{".repeat(100_000), "}".repeat(100_000));
    assert!(text_to_json(1009, &deep).is_err());
    let alphabet = [
        "{", "}", ",", "\"", "\\", "NULL", "1", "[", "]", "=", ":", " ", "x", "é", "\\x", "+", "-",
    ];
    let oids: Vec<u32> = SCALARS.iter().map(|t| t.0).chain(ARRAYS.iter().map(|t| t.0)).collect();
    let mut s: u64 = 0x2545_F491_4F6C_DD1D;
    for _ in 0..5_000 {
        let mut text = String::new();
        for _ in 0..(s % 16) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            text.push_str(alphabet[(s % alphabet.len() as u64) as usize]);
        }
        for &o in &oids {
            let _ = text_to_json(o, &text);
        }
    }
}
