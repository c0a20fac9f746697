//! Tests of `pgoutput.rs`.
use super::*;
use TupleValue::{Null, UnchangedToast as Toast};

/// Tiny big-endian encoder for building pgoutput payloads by hand.
enum P<'a> {
    B(u8),
    H(i16),
    W(i32),
    U(u32),
    Q(u64),
    S(&'a str),
    R(&'a [u8]),
    T(&'a [TupleValue]),
}
use P::*;

fn enc(tag: u8, parts: &[P<'_>]) -> Vec<u8> {
    let mut out = vec![tag];
    for p in parts {
        match p {
            B(v) => out.push(*v),
            H(v) => out.extend_from_slice(&v.to_be_bytes()),
            W(v) => out.extend_from_slice(&v.to_be_bytes()),
            U(v) => out.extend_from_slice(&v.to_be_bytes()),
            Q(v) => out.extend_from_slice(&v.to_be_bytes()),
            S(s) => out.extend(s.bytes().chain([0])),
            R(b) => out.extend_from_slice(b),
            T(values) => {
                out.extend_from_slice(&(values.len() as i16).to_be_bytes());
                for v in values.iter() {
                    let (kind, body): (u8, &[u8]) = match v {
                        Null => (b'n', &[]),
                        Toast => (b'u', &[]),
                        TupleValue::Text(b) => (b't', b),
                        TupleValue::Binary(b) => (b'b', b),
                    };
                    out.push(kind);
                    if matches!(kind, b't' | b'b') {
                        out.extend_from_slice(&(body.len() as i32).to_be_bytes());
                        out.extend_from_slice(body);
                    }
                }
            }
        }
    }
    out
}

fn t(s: &str) -> TupleValue {
    TupleValue::Text(s.as_bytes().to_vec())
}

fn tup(values: &[TupleValue]) -> TupleData {
    TupleData(values.to_vec())
}

fn col(is_key: bool, name: &str, type_oid: u32, type_modifier: i32) -> RelationColumn {
    RelationColumn {
        is_key,
        name: name.into(),
        type_oid,
        type_modifier,
    }
}

/// (label, payload, expected message) for every message type and tuple variant.
#[rustfmt::skip]
fn valid() -> Vec<(&'static str, Vec<u8>, PgOutputMessage)> {
    use PgOutputMessage as M;
    let ts = 760_000_000_000_000;
    vec![
        ("begin", enc(b'B', &[Q(0x16B_3748), Q(ts as u64), U(731)]),
            M::Begin { final_lsn: 0x16B_3748, commit_time_us: ts, xid: 731 }),
        ("commit", enc(b'C', &[B(0), Q(10), Q(20), Q(ts as u64)]),
            M::Commit { flags: 0, commit_lsn: 10, end_lsn: 20, commit_time_us: ts }),
        ("origin", enc(b'O', &[Q(99), S("node_a")]), M::Origin { commit_lsn: 99, name: "node_a".into() }),
        ("relation", enc(b'R', &[U(16385), S("public"), S("products"), B(b'd'), H(3),
            B(1), S("id"), U(20), W(-1), B(0), S("name"), U(25), W(-1), B(0), S("price"), U(1700), W(786_438)]),
            M::Relation(RelationBody { id: 16385, namespace: "public".into(), name: "products".into(),
                replica_identity: b'd', columns: vec![col(true, "id", 20, -1), col(false, "name", 25, -1),
                col(false, "price", 1700, 786_438)] })),
        ("relation in pg_catalog, no columns", enc(b'R', &[U(1), S(""), S("t"), B(b'f'), H(0)]),
            M::Relation(RelationBody { id: 1, namespace: "".into(), name: "t".into(), replica_identity: b'f', columns: vec![] })),
        ("type", enc(b'Y', &[U(16390), S("public"), S("mood")]),
            M::Type { oid: 16390, namespace: "public".into(), name: "mood".into() }),
        ("insert text/null/toast", enc(b'I', &[U(16385), B(b'N'), T(&[t("42"), Null, Toast, t("Widget X")])]),
            M::Insert { relation_id: 16385, new: tup(&[t("42"), Null, Toast, t("Widget X")]) }),
        ("insert empty text", enc(b'I', &[U(1), B(b'N'), T(&[t("")])]),
            M::Insert { relation_id: 1, new: tup(&[t("")]) }),
        ("insert no columns", enc(b'I', &[U(1), B(b'N'), T(&[])]), M::Insert { relation_id: 1, new: tup(&[]) }),
        ("update K", enc(b'U', &[U(7), B(b'K'), T(&[t("1"), Null]), B(b'N'), T(&[t("2"), t("x")])]),
            M::Update { relation_id: 7, old: Some(OldTuple::Key(tup(&[t("1"), Null]))), new: tup(&[t("2"), t("x")]) }),
        ("update O", enc(b'U', &[U(7), B(b'O'), T(&[t("1"), t("a")]), B(b'N'), T(&[t("1"), t("b")])]),
            M::Update { relation_id: 7, old: Some(OldTuple::Full(tup(&[t("1"), t("a")]))), new: tup(&[t("1"), t("b")]) }),
        ("update no old", enc(b'U', &[U(7), B(b'N'), T(&[t("1"), Toast])]),
            M::Update { relation_id: 7, old: None, new: tup(&[t("1"), Toast]) }),
        ("delete K", enc(b'D', &[U(7), B(b'K'), T(&[t("1"), Null])]),
            M::Delete { relation_id: 7, old: OldTuple::Key(tup(&[t("1"), Null])) }),
        ("delete O binary", enc(b'D', &[U(7), B(b'O'), T(&[TupleValue::Binary(vec![0, 1])])]),
            M::Delete { relation_id: 7, old: OldTuple::Full(tup(&[TupleValue::Binary(vec![0, 1])])) }),
        ("truncate cascade+restart", enc(b'T', &[W(2), B(3), U(7), U(8)]),
            M::Truncate { options: TRUNCATE_CASCADE | TRUNCATE_RESTART_IDENTITY, relation_ids: vec![7, 8] }),
        ("truncate plain", enc(b'T', &[W(1), B(0), U(9)]), M::Truncate { options: 0, relation_ids: vec![9] }),
        ("message transactional", enc(b'M', &[B(1), Q(5), S("vk"), W(3), R(b"abc")]),
            M::Message { transactional: true, lsn: 5, prefix: "vk".into(), content: b"abc".to_vec() }),
        ("message not transactional", enc(b'M', &[B(0), Q(6), S("p"), W(0)]),
            M::Message { transactional: false, lsn: 6, prefix: "p".into(), content: vec![] }),
    ]
}

/// (payload, expected error kind, expected offset, text the message must contain).
#[rustfmt::skip]
fn malformed() -> Vec<(Vec<u8>, DecodeErrorKind, usize, &'static str)> {
    let unexpected = |expected, found| K::UnexpectedByte { expected, found };
    vec![
        (vec![], K::Truncated { needed: 1, left: 0 }, 0, "expected 1-byte tag, 0 bytes left"),
        (b"Zabc".to_vec(), K::UnknownTag(b'Z'), 0, "unknown pgoutput message tag 'Z' (0x5a)"),
        (vec![0], K::UnknownTag(0), 0, "tag 0x00"),
        (b"S\0\0\0\x01\x01".to_vec(), K::UnknownTag(b'S'), 0, "'S'"), // stream start: protocol v2
        (enc(b'I', &[U(1), B(b'N'), H(1), B(b't'), R(&[0, 0])]), K::Truncated { needed: 4, left: 2 }, 9,
            "truncated new tuple in Insert at byte 9: expected 4-byte column length, 2 bytes left"),
        (enc(b'I', &[U(1), B(b'K'), T(&[])]), unexpected("'N'", b'K'), 5, "tuple marker must be 'N', found 'K'"),
        (enc(b'U', &[U(1), B(b'K'), T(&[]), B(b'K'), T(&[])]), unexpected("'N'", b'K'), 8, "in Update at byte 8"),
        (enc(b'U', &[U(1), B(b'X')]), unexpected("'K', 'O' or 'N'", b'X'), 5, "found 'X'"),
        (enc(b'D', &[U(1), B(b'N'), T(&[])]), unexpected("'K' or 'O'", b'N'), 5, "in Delete"),
        (enc(b'I', &[U(1), B(b'N'), H(1), B(b'q')]), unexpected("'n', 'u', 't' or 'b'", b'q'), 8,
            "column kind must be 'n', 'u', 't' or 'b', found 'q'"),
        (enc(b'R', &[U(1), S("public"), R(&[b'o', 0xff, 0xfe, 0]), B(b'd'), H(0)]), K::InvalidUtf8, 13,
            "invalid UTF-8 in Relation at byte 13: header relation name"),
        (enc(b'O', &[Q(1), R(b"no-nul")]), K::UnterminatedString { left: 6 }, 9, "origin name has no NUL"),
        (enc(b'I', &[U(1), B(b'N'), H(1), B(b't'), W(i32::MAX), R(b"abc")]),
            K::LengthExceedsInput { declared: i32::MAX as usize, left: 3 }, 9, "declares 2147483647 bytes, 3 bytes left"),
        (enc(b'I', &[U(1), B(b'N'), H(1), B(b'b'), W(-1)]), K::Negative(-1), 9, "column length is negative (-1)"),
        (enc(b'M', &[B(0), Q(1), S("p"), W(1 << 30)]), K::LengthExceedsInput { declared: 1 << 30, left: 0 }, 12, "content length"),
        (enc(b'T', &[W(i32::MAX), B(0), U(1)]),
            K::CountExceedsInput { count: i32::MAX as usize, min_bytes: 4 * i32::MAX as usize, left: 5 }, 1, "relation count"),
        (enc(b'T', &[W(-5), B(0)]), K::Negative(-5), 1, "relation count is negative"),
        (enc(b'I', &[U(1), B(b'N'), H(i16::MAX), B(b'n')]),
            K::CountExceedsInput { count: 32767, min_bytes: 32767, left: 1 }, 6, "column count 32767 needs"),
        (enc(b'I', &[U(1), B(b'N'), H(-1)]), K::Negative(-1), 6, "column count"),
        (enc(b'R', &[U(1), S(""), S("t"), B(b'd'), H(1000), R(&[0; 20])]),
            K::CountExceedsInput { count: 1000, min_bytes: 10_000, left: 20 }, 9, "in Relation"),
        (enc(b'C', &[B(0), Q(1), Q(2), Q(3), B(0)]), K::TrailingBytes { left: 1 }, 26, "1 bytes after the message"),
    ]
}

#[test]
fn decodes_every_message_type() {
    for (label, bytes, expected) in valid() {
        let got = decode(&bytes).unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(got, expected, "{label}");
        assert_eq!(got.tag(), bytes[0], "{label}");
    }
}

#[test]
fn helpers() {
    assert_eq!(pg_time_to_unix_us(0), PG_EPOCH_OFFSET_US);
    assert_eq!(t("42").as_text(), Some(&b"42"[..]));
    assert_eq!(Null.as_text(), None);
    assert_eq!(OldTuple::Full(tup(&[Null])).tuple(), &tup(&[Null]));
}

#[test]
fn malformed_inputs_give_precise_errors() {
    for (bytes, kind, offset, text) in malformed() {
        let err = decode(&bytes).expect_err(text);
        assert_eq!((&err.kind, err.offset), (&kind, offset), "{err}");
        assert!(err.to_string().contains(text), "{err:?} / {err} lacks {text:?}");
    }
}

#[test]
fn every_truncation_and_extension_of_every_valid_message_is_an_error() {
    for (label, full, _) in valid() {
        for cut in 0..full.len() {
            let err = decode(&full[..cut]).expect_err(label);
            assert!(err.offset <= cut, "{label} cut at {cut}: offset past the end: {err}");
        }
        let mut longer = full.clone();
        longer.push(0);
        let err = decode(&longer).expect_err(label);
        assert_eq!(
            (err.kind, err.offset),
            (K::TrailingBytes { left: 1 }, full.len()),
            "{label}"
        );
    }
}

#[test]
fn mutated_and_random_inputs_never_panic() {
    for (_, full, _) in valid() {
        for i in 0..full.len() {
            for v in [0u8, 1, 0x7f, 0x80, 0xff, b'N', b'K', b'n', b't'] {
                let mut m = full.clone();
                m[i] = v;
                let _ = decode(&m);
            }
        }
    }
    // Pseudo-random payloads (xorshift) starting with a plausible tag.
    let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
    let tags = b"BCORYIUDTMxS";
    for _ in 0..20_000 {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let mut buf: Vec<u8> = (0..s % 48).map(|k| (s.rotate_left(k as u32 * 5) >> 3) as u8).collect();
        if let Some(first) = buf.first_mut() {
            *first = tags[(s >> 40) as usize % tags.len()];
        }
        let _ = decode(&buf);
    }
}
