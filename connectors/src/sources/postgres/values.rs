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
    pub reason: Malformed,
}

/// What is wrong with a known type's text.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Malformed {
    #[error("expected 't' or 'f'")]
    Bool,
    #[error("{0}")]
    Int(#[from] std::num::ParseIntError),
    #[error("{0}")]
    Float(#[from] std::num::ParseFloatError),
    #[error("not a finite number")]
    NotFinite,
    #[error("expected a decimal number, NaN, Infinity or -Infinity")]
    Numeric,
    #[error("expected xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx (hex)")]
    Uuid,
    /// serde_json's message (its error type is neither `Clone` nor `Eq`).
    #[error("{0}")]
    Json(String),
    #[error("odd number of hex digits")]
    OddHexDigits,
    #[error("invalid hex digit at position {0}")]
    HexDigit(usize),
    #[error("invalid escape at position {0}")]
    Escape(usize),
    #[error("expected 'YYYY-MM-DD HH:MM:SS[.ffffff]{}' (DateStyle ISO)", if *with_zone { "+HH[:MM]" } else { "" })]
    Timestamp { with_zone: bool },
    #[error("{0}")]
    Array(#[from] ArrayFault),
    #[error("element {index}: {error}")]
    Element { index: usize, error: Box<ValueError> },
    #[error("{0}")]
    Utf8(#[from] std::string::FromUtf8Error),
}

/// Where and how an array literal breaks its syntax.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ArrayFault {
    #[error("dimension decoration without '='")]
    DecorationWithoutEquals,
    #[error("invalid dimension decoration")]
    Decoration,
    #[error("expected '{{' at position {0}")]
    ExpectedBrace(usize),
    #[error("text after the array at position {0}")]
    TrailingText(usize),
    #[error("more than {MAX_ARRAY_DIMS} dimensions")]
    TooDeep,
    #[error("mixed sub-arrays and elements at {0}")]
    Mixed(usize),
    #[error("empty element at position {0}")]
    EmptyElement(usize),
    #[error("unterminated array")]
    Unterminated,
    #[error("expected ',' or '}}' at position {at}, found {found:?}")]
    ExpectedSeparator { at: usize, found: char },
    #[error("backslash at the end of the array")]
    TrailingBackslash,
    #[error("unterminated quoted element from {0}")]
    UnterminatedQuote(usize),
    #[error("{found:?} in unquoted element at {at}")]
    InUnquoted { at: usize, found: char },
}

impl ValueError {
    /// How much of the offending text an error keeps.
    pub const MAX_TEXT_CHARS: usize = 100;

    fn new(type_oid: u32, type_name: &'static str, text: &str, reason: Malformed) -> Self {
        let text = match text.char_indices().nth(Self::MAX_TEXT_CHARS) {
            Some((cut, _)) => format!("{}…", text.get(..cut).unwrap_or_default()),
            None => text.to_owned(),
        };
        Self {
            type_oid,
            type_name,
            text,
            reason,
        }
    }
}

/// Converts the text-format value `text` of a column of type `type_oid` to JSON.
///
/// Unknown OIDs are passed through as `Value::String` (check with [`is_known`]).
/// JSON text (json, jsonb, Debezium's `Json`) parsed. Nested deeper than the parser's
/// limit (128 levels; deeper would risk the stack), it is kept as its text, a string:
/// the row still flows and the value is all there.
pub fn json_text(text: &str) -> Result<Value, serde_json::Error> {
    match serde_json::from_str(text) {
        Ok(v) => Ok(v),
        Err(e) if e.to_string().starts_with("recursion limit exceeded") => Ok(Value::String(text.to_owned())),
        Err(e) => Err(e),
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

fn convert_scalar(rule: Rule, text: &str) -> Result<Value, Malformed> {
    Ok(match rule {
        Rule::Bool => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => return Err(Malformed::Bool),
        },
        Rule::Int => Value::from(text.parse::<i64>()?),
        Rule::Float => match text {
            "NaN" | "Infinity" | "-Infinity" => Value::String(text.to_owned()),
            _ => {
                let f = text.parse::<f64>()?;
                Value::Number(serde_json::Number::from_f64(f).ok_or(Malformed::NotFinite)?)
            }
        },
        Rule::Numeric => {
            if !is_numeric(text) {
                return Err(Malformed::Numeric);
            }
            Value::String(text.to_owned())
        }
        Rule::Verbatim => Value::String(text.to_owned()),
        Rule::Uuid => {
            if !is_uuid(text) {
                return Err(Malformed::Uuid);
            }
            Value::String(text.to_owned())
        }
        Rule::Json => json_text(text).map_err(|e| Malformed::Json(e.to_string()))?,
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
fn decode_bytea(text: &str) -> Result<Vec<u8>, Malformed> {
    if let Some(hex) = text.strip_prefix("\\x") {
        let digits = hex.as_bytes();
        if digits.len() % 2 != 0 {
            return Err(Malformed::OddHexDigits);
        }
        return digits
            .chunks(2)
            .enumerate()
            .map(|(i, pair)| match pair {
                [h, l] => match (hex_val(*h), hex_val(*l)) {
                    (Some(h), Some(l)) => Ok(h << 4 | l),
                    _ => Err(Malformed::HexDigit(2 + 2 * i)),
                },
                _ => Err(Malformed::OddHexDigits),
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
            _ => return Err(Malformed::Escape(i)),
        }
    }
    Ok(out)
}

/// ISO `YYYY-MM-DD HH:MM:SS[.f][±HH[:MM[:SS]]]` → `YYYY-MM-DDTHH:MM:SS[.f][±HH:MM[:SS]]`.
fn timestamp(text: &str, with_zone: bool) -> Result<String, Malformed> {
    if matches!(text, "infinity" | "-infinity") || text.ends_with(" BC") {
        return Ok(text.to_owned());
    }
    let bad = || Malformed::Timestamp { with_zone };
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

    fn parse(mut self) -> Result<Value, Malformed> {
        self.skip_ws();
        if self.peek() == Some(b'[') {
            // Dimension decoration such as "[0:1]" or "[1:2][1:3]", ended by '='.
            let eq = self.b.iter().position(|&c| c == b'=');
            let eq = eq.ok_or(ArrayFault::DecorationWithoutEquals)?;
            let deco = self.b.get(self.pos..eq).unwrap_or_default();
            if !deco.iter().all(|c| c.is_ascii_digit() || b"[]:-+".contains(c)) {
                return Err(ArrayFault::Decoration.into());
            }
            self.pos = eq + 1;
            self.skip_ws();
        }
        if self.peek() != Some(b'{') {
            return Err(ArrayFault::ExpectedBrace(self.pos).into());
        }
        self.pos += 1;
        let value = self.level(1)?;
        self.skip_ws();
        match self.peek() {
            None => Ok(value),
            Some(_) => Err(ArrayFault::TrailingText(self.pos).into()),
        }
    }

    /// Parses the items of one `{...}` level; the `{` has been consumed.
    fn level(&mut self, depth: usize) -> Result<Value, Malformed> {
        if depth > MAX_ARRAY_DIMS {
            return Err(ArrayFault::TooDeep.into());
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
                return Err(ArrayFault::Mixed(self.pos).into());
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
                Some(b',' | b'}') => return Err(ArrayFault::EmptyElement(self.pos).into()),
                None => return Err(ArrayFault::Unterminated.into()),
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
                None => return Err(ArrayFault::Unterminated.into()),
                Some(c) => {
                    return Err(ArrayFault::ExpectedSeparator {
                        at: self.pos,
                        found: c as char,
                    }
                    .into())
                }
            }
        }
    }

    fn element_value(&mut self, s: &str) -> Result<Value, Malformed> {
        self.count += 1;
        text_to_json(self.element, s).map_err(|e| Malformed::Element {
            index: self.count,
            error: Box::new(e),
        })
    }

    /// The byte after a backslash at the current position.
    fn escaped(&mut self) -> Result<u8, ArrayFault> {
        let c = self.b.get(self.pos + 1).copied();
        self.pos += 2;
        c.ok_or(ArrayFault::TrailingBackslash)
    }

    /// A quoted element; the opening `"` has been consumed.
    fn quoted(&mut self) -> Result<String, Malformed> {
        let start = self.pos;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err(ArrayFault::UnterminatedQuote(start).into()),
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
        Ok(String::from_utf8(out)?)
    }

    /// An unquoted element up to `,` or `}`; `None` for an unescaped `NULL`.
    fn unquoted(&mut self) -> Result<Option<String>, Malformed> {
        let mut out = Vec::new();
        let mut escaped = false;
        // Length of `out` up to its last escaped byte: trailing whitespace after it is trimmed.
        let mut keep = 0;
        loop {
            match self.peek() {
                None | Some(b',' | b'}') => break,
                Some(c @ (b'{' | b'"')) => {
                    return Err(ArrayFault::InUnquoted {
                        at: self.pos,
                        found: c as char,
                    }
                    .into())
                }
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
        Ok(Some(String::from_utf8(out)?))
    }
}

#[cfg(test)]
#[path = "values_tests.rs"]
mod tests;
