//! Conversion of one pgoutput text-format column value, given its type OID, into a
//! [`serde_json::Value`].
//!
//! Contract: pure (no I/O, no global state) and never panics, whatever the text.
//! Input is what Postgres's type output functions produce with `DateStyle = ISO`.
//! Known types (see [`type_name`] / [`is_known`]) are converted by their rules below
//! and malformed text for them yields a [`ValueError`] naming the type and the text.
//! Any other OID is returned unchanged as a JSON string; [`text_to_json`] does not
//! fail for it, so a caller that needs to know (to warn, say) asks [`is_known`].
//!
//! | type | JSON |
//! |---|---|
//! | bool | `true`/`false` from `t`/`f` |
//! | int2, int4, int8, oid | integer (i64) |
//! | float4, float8 | number; `NaN`, `Infinity`, `-Infinity` stay strings |
//! | numeric | Postgres's exact text as a string (never via f64) |
//! | text, varchar, bpchar, name, char, uuid, date, time, timetz, interval | string as sent |
//! | json, jsonb | parsed JSON |
//! | bytea | base64 (standard alphabet) of the bytes, from hex or legacy escape format |
//! | timestamp | `YYYY-MM-DDTHH:MM:SS[.f]` |
//! | timestamptz | `YYYY-MM-DDTHH:MM:SS[.f]±HH:MM` (`+05` becomes `+05:00`) |
//! | arrays of all the above | (nested) JSON arrays of converted elements, `NULL` → null |
//!
//! Timestamps `infinity`/`-infinity` and BC timestamps (` BC` suffix) stay as sent.

use base64::Engine as _;
use serde_json::Value;
use thiserror::Error;

/// Postgres's limit on array dimensions (`MAXDIM`); deeper literals are rejected.
pub const MAX_ARRAY_DIMS: usize = 6;

/// Type OIDs with a specific conversion rule.
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const CHAR: u32 = 18;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const INTERVAL: u32 = 1186;
    pub const TIMETZ: u32 = 1266;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

#[derive(Clone, Copy)]
enum Rule {
    Bool,
    Int,
    Float,
    Numeric,
    Verbatim,
    Uuid,
    Json,
    Bytea,
    Timestamp,
    TimestampTz,
}

/// (oid, name, rule) of the scalar types.
const SCALARS: &[(u32, &str, Rule)] = &[
    (oid::BOOL, "bool", Rule::Bool),
    (oid::BYTEA, "bytea", Rule::Bytea),
    (oid::CHAR, "char", Rule::Verbatim),
    (oid::NAME, "name", Rule::Verbatim),
    (oid::INT8, "int8", Rule::Int),
    (oid::INT2, "int2", Rule::Int),
    (oid::INT4, "int4", Rule::Int),
    (oid::TEXT, "text", Rule::Verbatim),
    (oid::OID, "oid", Rule::Int),
    (oid::JSON, "json", Rule::Json),
    (oid::FLOAT4, "float4", Rule::Float),
    (oid::FLOAT8, "float8", Rule::Float),
    (oid::BPCHAR, "bpchar", Rule::Verbatim),
    (oid::VARCHAR, "varchar", Rule::Verbatim),
    (oid::DATE, "date", Rule::Verbatim),
    (oid::TIME, "time", Rule::Verbatim),
    (oid::TIMESTAMP, "timestamp", Rule::Timestamp),
    (oid::TIMESTAMPTZ, "timestamptz", Rule::TimestampTz),
    (oid::INTERVAL, "interval", Rule::Verbatim),
    (oid::TIMETZ, "timetz", Rule::Verbatim),
    (oid::NUMERIC, "numeric", Rule::Numeric),
    (oid::UUID, "uuid", Rule::Uuid),
    (oid::JSONB, "jsonb", Rule::Json),
];

/// (array oid, name, element oid) of the array types.
const ARRAYS: &[(u32, &str, u32)] = &[
    (199, "json[]", oid::JSON),
    (1000, "bool[]", oid::BOOL),
    (1001, "bytea[]", oid::BYTEA),
    (1002, "char[]", oid::CHAR),
    (1003, "name[]", oid::NAME),
    (1005, "int2[]", oid::INT2),
    (1007, "int4[]", oid::INT4),
    (1009, "text[]", oid::TEXT),
    (1014, "bpchar[]", oid::BPCHAR),
    (1015, "varchar[]", oid::VARCHAR),
    (1016, "int8[]", oid::INT8),
    (1021, "float4[]", oid::FLOAT4),
    (1022, "float8[]", oid::FLOAT8),
    (1028, "oid[]", oid::OID),
    (1115, "timestamp[]", oid::TIMESTAMP),
    (1182, "date[]", oid::DATE),
    (1183, "time[]", oid::TIME),
    (1185, "timestamptz[]", oid::TIMESTAMPTZ),
    (1187, "interval[]", oid::INTERVAL),
    (1231, "numeric[]", oid::NUMERIC),
    (1270, "timetz[]", oid::TIMETZ),
    (2951, "uuid[]", oid::UUID),
    (3807, "jsonb[]", oid::JSONB),
];

fn scalar(type_oid: u32) -> Option<(&'static str, Rule)> {
    SCALARS.iter().find(|(o, ..)| *o == type_oid).map(|&(_, n, r)| (n, r))
}

fn array(type_oid: u32) -> Option<(&'static str, u32)> {
    ARRAYS.iter().find(|(o, ..)| *o == type_oid).map(|&(_, n, e)| (n, e))
}

/// The SQL name of a type this module has a rule for (`"int4"`, `"text[]"`, ...).
pub fn type_name(type_oid: u32) -> Option<&'static str> {
    scalar(type_oid)
        .map(|(n, _)| n)
        .or_else(|| array(type_oid).map(|(n, _)| n))
}

/// Whether [`text_to_json`] has a specific rule for this OID (otherwise it passes the
/// text through as a JSON string).
pub fn is_known(type_oid: u32) -> bool {
    type_name(type_oid).is_some()
}

/// The element type OID of a known array type.
pub fn array_element_oid(type_oid: u32) -> Option<u32> {
    array(type_oid).map(|(_, e)| e)
}

/// A known type's text could not be converted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid {type_name} value {text:?}: {reason}")]
pub struct ValueError {
    pub type_oid: u32,
    pub type_name: &'static str,
    /// The offending text, cut to [`ValueError::MAX_TEXT_CHARS`] characters (then `…`).
    pub text: String,
    pub reason: String,
}

impl ValueError {
    /// How much of the offending text an error keeps.
    pub const MAX_TEXT_CHARS: usize = 100;

    fn new(type_oid: u32, type_name: &'static str, text: &str, reason: impl Into<String>) -> Self {
        let text = match text.char_indices().nth(Self::MAX_TEXT_CHARS) {
            Some((cut, _)) => format!("{}…", text.get(..cut).unwrap_or_default()),
            None => text.to_owned(),
        };
        Self {
            type_oid,
            type_name,
            text,
            reason: reason.into(),
        }
    }
}

/// Converts the text-format value `text` of a column of type `type_oid` to JSON.
///
/// Unknown OIDs are passed through as `Value::String` (check with [`is_known`]).
/// JSON text (json, jsonb, Debezium's `Json`) parsed. Nested deeper than the parser's
/// limit (128 levels; deeper would risk the stack), it is kept as its text, a string:
/// the row still flows and the value is all there.
pub fn json_text(text: &str) -> Result<Value, String> {
    match serde_json::from_str(text) {
        Ok(v) => Ok(v),
        Err(e) if e.to_string().starts_with("recursion limit exceeded") => Ok(Value::String(text.to_owned())),
        Err(e) => Err(e.to_string()),
    }
}

pub fn text_to_json(type_oid: u32, text: &str) -> Result<Value, ValueError> {
    if let Some((name, rule)) = scalar(type_oid) {
        return convert_scalar(rule, text).map_err(|r| ValueError::new(type_oid, name, text, r));
    }
    if let Some((name, element)) = array(type_oid) {
        let parser = ArrayParser {
            b: text.as_bytes(),
            pos: 0,
            element,
            count: 0,
        };
        return parser.parse().map_err(|r| ValueError::new(type_oid, name, text, r));
    }
    Ok(Value::String(text.to_owned()))
}

fn convert_scalar(rule: Rule, text: &str) -> Result<Value, String> {
    Ok(match rule {
        Rule::Bool => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => return Err("expected 't' or 'f'".into()),
        },
        Rule::Int => Value::from(text.parse::<i64>().map_err(|e| e.to_string())?),
        Rule::Float => match text {
            "NaN" | "Infinity" | "-Infinity" => Value::String(text.to_owned()),
            _ => {
                let f = text.parse::<f64>().map_err(|e| e.to_string())?;
                Value::Number(serde_json::Number::from_f64(f).ok_or("not a finite number")?)
            }
        },
        Rule::Numeric => {
            if !is_numeric(text) {
                return Err("expected a decimal number, NaN, Infinity or -Infinity".into());
            }
            Value::String(text.to_owned())
        }
        Rule::Verbatim => Value::String(text.to_owned()),
        Rule::Uuid => {
            if !is_uuid(text) {
                return Err("expected xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx (hex)".into());
            }
            Value::String(text.to_owned())
        }
        Rule::Json => json_text(text)?,
        Rule::Bytea => Value::String(base64::engine::general_purpose::STANDARD.encode(decode_bytea(text)?)),
        Rule::Timestamp => Value::String(timestamp(text, false)?),
        Rule::TimestampTz => Value::String(timestamp(text, true)?),
    })
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// `[+-]digits[.digits][e[+-]digits]`, `.digits` too, or the special values.
fn is_numeric(s: &str) -> bool {
    if matches!(s, "NaN" | "Infinity" | "-Infinity") {
        return true;
    }
    let unsigned = s.strip_prefix(['-', '+']).unwrap_or(s);
    let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e.strip_prefix(['-', '+']).unwrap_or(e))),
        None => (unsigned, None),
    };
    let mantissa_ok = match mantissa.split_once('.') {
        Some((int, frac)) => {
            (int.is_empty() || all_digits(int))
                && (frac.is_empty() || all_digits(frac))
                && !(int.is_empty() && frac.is_empty())
        }
        None => all_digits(mantissa),
    };
    mantissa_ok && exponent.is_none_or(all_digits)
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Hex format (`\x0a1b`) or, without the `\x` prefix, the legacy escape format.
fn decode_bytea(text: &str) -> Result<Vec<u8>, String> {
    if let Some(hex) = text.strip_prefix("\\x") {
        let digits = hex.as_bytes();
        if digits.len() % 2 != 0 {
            return Err("odd number of hex digits".into());
        }
        return digits
            .chunks(2)
            .enumerate()
            .map(|(i, pair)| match pair {
                [h, l] => match (hex_val(*h), hex_val(*l)) {
                    (Some(h), Some(l)) => Ok(h << 4 | l),
                    _ => Err(format!("invalid hex digit at position {}", 2 + 2 * i)),
                },
                _ => Err("odd number of hex digits".into()),
            })
            .collect();
    }
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c != b'\\' {
            out.push(c);
            i += 1;
            continue;
        }
        if b.get(i + 1) == Some(&b'\\') {
            out.push(b'\\');
            i += 2;
            continue;
        }
        match b.get(i + 1..i + 4) {
            Some(&[o1 @ b'0'..=b'3', o2 @ b'0'..=b'7', o3 @ b'0'..=b'7']) => {
                out.push((o1 - b'0') << 6 | (o2 - b'0') << 3 | (o3 - b'0'));
                i += 4;
            }
            _ => return Err(format!("invalid escape at position {i}")),
        }
    }
    Ok(out)
}

/// ISO `YYYY-MM-DD HH:MM:SS[.f][±HH[:MM[:SS]]]` → `YYYY-MM-DDTHH:MM:SS[.f][±HH:MM[:SS]]`.
fn timestamp(text: &str, with_zone: bool) -> Result<String, String> {
    if matches!(text, "infinity" | "-infinity") || text.ends_with(" BC") {
        return Ok(text.to_owned());
    }
    let zone = if with_zone { "+HH[:MM]" } else { "" };
    let bad = || format!("expected 'YYYY-MM-DD HH:MM:SS[.ffffff]{zone}' (DateStyle ISO)");
    let (date, rest) = text.split_once(' ').ok_or_else(bad)?;
    let date_ok = date.split('-').count() == 3 && date.split('-').all(all_digits);
    let (clock, offset) = match rest.find(['+', '-']) {
        Some(at) if with_zone => rest.split_at_checked(at).ok_or_else(bad)?,
        None if !with_zone => (rest, ""),
        _ => return Err(bad()),
    };
    let clock_ok = clock.starts_with(|c: char| c.is_ascii_digit())
        && clock.bytes().all(|b| b.is_ascii_digit() || b == b':' || b == b'.');
    if !date_ok || !clock_ok {
        return Err(bad());
    }
    if !with_zone {
        return Ok(format!("{date}T{clock}"));
    }
    // offset is "+HH", "+HH:MM" or "+HH:MM:SS" (sign included).
    let groups: Vec<&str> = offset.get(1..).unwrap_or_default().split(':').collect();
    if groups.len() > 3 || !groups.iter().all(|g| g.len() == 2 && all_digits(g)) {
        return Err(bad());
    }
    let minutes = if groups.len() == 1 { ":00" } else { "" };
    Ok(format!("{date}T{clock}{offset}{minutes}"))
}

/// Parser for Postgres array literals (`array_out` syntax, accepting what `array_in`
/// accepts for whitespace and escapes).
struct ArrayParser<'a> {
    b: &'a [u8],
    pos: usize,
    element: u32,
    count: usize,
}

impl<'a> ArrayParser<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }

    fn parse(mut self) -> Result<Value, String> {
        self.skip_ws();
        if self.peek() == Some(b'[') {
            // Dimension decoration such as "[0:1]" or "[1:2][1:3]", ended by '='.
            let eq = self.b.iter().position(|&c| c == b'=');
            let eq = eq.ok_or("dimension decoration without '='")?;
            let deco = self.b.get(self.pos..eq).unwrap_or_default();
            if !deco.iter().all(|c| c.is_ascii_digit() || b"[]:-+".contains(c)) {
                return Err("invalid dimension decoration".into());
            }
            self.pos = eq + 1;
            self.skip_ws();
        }
        if self.peek() != Some(b'{') {
            return Err(format!("expected '{{' at position {}", self.pos));
        }
        self.pos += 1;
        let value = self.level(1)?;
        self.skip_ws();
        match self.peek() {
            None => Ok(value),
            Some(_) => Err(format!("text after the array at position {}", self.pos)),
        }
    }

    /// Parses the items of one `{...}` level; the `{` has been consumed.
    fn level(&mut self, depth: usize) -> Result<Value, String> {
        if depth > MAX_ARRAY_DIMS {
            return Err(format!("more than {MAX_ARRAY_DIMS} dimensions"));
        }
        let mut items = Vec::new();
        let mut nested: Option<bool> = None;
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(Value::Array(items));
        }
        loop {
            self.skip_ws();
            let is_sub = self.peek() == Some(b'{');
            if *nested.get_or_insert(is_sub) != is_sub {
                return Err(format!("mixed sub-arrays and elements at {}", self.pos));
            }
            let item = match self.peek() {
                Some(b'{') => {
                    self.pos += 1;
                    self.level(depth + 1)?
                }
                Some(b'"') => {
                    self.pos += 1;
                    let s = self.quoted()?;
                    self.element_value(&s)?
                }
                Some(b',' | b'}') => return Err(format!("empty element at position {}", self.pos)),
                None => return Err("unterminated array".into()),
                Some(_) => match self.unquoted()? {
                    None => Value::Null,
                    Some(s) => self.element_value(&s)?,
                },
            };
            items.push(item);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Value::Array(items));
                }
                None => return Err("unterminated array".into()),
                Some(c) => {
                    return Err(format!(
                        "expected ',' or '}}' at position {}, found {:?}",
                        self.pos, c as char
                    ))
                }
            }
        }
    }

    fn element_value(&mut self, s: &str) -> Result<Value, String> {
        self.count += 1;
        text_to_json(self.element, s).map_err(|e| format!("element {}: {e}", self.count))
    }

    /// The byte after a backslash at the current position.
    fn escaped(&mut self) -> Result<u8, String> {
        let c = self.b.get(self.pos + 1).copied();
        self.pos += 2;
        c.ok_or_else(|| "backslash at the end of the array".to_owned())
    }

    /// A quoted element; the opening `"` has been consumed.
    fn quoted(&mut self) -> Result<String, String> {
        let start = self.pos;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err(format!("unterminated quoted element from {start}")),
                Some(b'"') => {
                    self.pos += 1;
                    break;
                }
                Some(b'\\') => out.push(self.escaped()?),
                Some(c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
        String::from_utf8(out).map_err(|e| e.to_string())
    }

    /// An unquoted element up to `,` or `}`; `None` for an unescaped `NULL`.
    fn unquoted(&mut self) -> Result<Option<String>, String> {
        let mut out = Vec::new();
        let mut escaped = false;
        // Length of `out` up to its last escaped byte: trailing whitespace after it is trimmed.
        let mut keep = 0;
        loop {
            match self.peek() {
                None | Some(b',' | b'}') => break,
                Some(c @ (b'{' | b'"')) => return Err(format!("{:?} in unquoted element at {}", c as char, self.pos)),
                Some(b'\\') => {
                    out.push(self.escaped()?);
                    escaped = true;
                    keep = out.len();
                }
                Some(c) => {
                    out.push(c);
                    if !c.is_ascii_whitespace() {
                        keep = out.len();
                    }
                    self.pos += 1;
                }
            }
        }
        out.truncate(keep);
        if !escaped && out.eq_ignore_ascii_case(b"NULL") {
            return Ok(None);
        }
        String::from_utf8(out).map(Some).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
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
        assert!(e.reason.starts_with("element 1: invalid jsonb value"), "{e}");
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
}
