//! Conversion of one column value of a Debezium change event (as Kafka's JsonConverter
//! writes it) into the project's value conventions, given the column's [`ColumnType`].
//!
//! Contract: pure (no I/O, no global state) and never panics, whatever the input. The
//! output is what the pgoutput source produces for the same Postgres column (see
//! `crate::sources::postgres::values`), except where listed below, so a read model renders a row
//! the same way whichever source delivered it:
//!
//! | Debezium (Connect) type | JSON |
//! |---|---|
//! | `org.apache.kafka.connect.data.Decimal` (base64 big-endian two's-complement unscaled integer, `scale` parameter) | exact decimal text as a string, scale kept: `"12.50"` |
//! | `io.debezium.data.VariableScaleDecimal` (`{scale, value}`) | same |
//! | decimal in `decimal.handling.mode=string` / `double` | kept as sent (string / number) |
//! | `io.debezium.time.Date`, connect `Date` (days since epoch) | `"YYYY-MM-DD"` |
//! | `io.debezium.time.Time` (ms), `MicroTime` (µs), `NanoTime` (ns), connect `Time` | `"HH:MM:SS[.f]"` |
//! | `io.debezium.time.Timestamp` (ms), `MicroTimestamp`, `NanoTimestamp`, connect `Timestamp` | `"YYYY-MM-DDTHH:MM:SS[.f]"` (no offset: a `timestamp without time zone`) |
//! | `io.debezium.time.ZonedTimestamp` (ISO-8601 string) | converted to UTC: `"YYYY-MM-DDTHH:MM:SS[.f]+00:00"` |
//! | `io.debezium.time.ZonedTime`, `io.debezium.data.Uuid`, `Year`, intervals, enums, … | kept as sent |
//! | `io.debezium.data.Json` (a string holding JSON) | parsed JSON |
//! | `bytes` (base64 in JSON) | kept: standard base64 (validated) |
//! | `io.debezium.data.Bits` (little-endian bytes, `length` parameter) | the bit string, `"101"` (`bit(1)` arrives as a boolean: kept) |
//! | `array` | JSON array of the converted elements |
//!
//! Fractions of a second are printed with trailing zeros removed (as Postgres prints
//! them) and omitted when zero. Years before 1 AD use Postgres's own text
//! (`"0044-03-15 BC"`, `"0044-03-15 12:00:00 BC"`), which the pgoutput source passes on
//! unchanged. `null` is `null` for every type.
//!
//! Where the pgoutput source and this one still differ (Debezium loses the information
//! or its configuration decides): `timetz` (Debezium sends it in UTC, `…Z`), `varbit`
//! (padded to the declared length), intervals (`interval.handling.mode`), decimals in
//! `double` mode (a JSON number), `time.precision.mode=connect` (millisecond precision),
//! and messages without schemas whose typed columns have no hint (kept as sent: a
//! precise-mode decimal stays base64, a timestamp stays a number).
//!
//! The TOAST placeholder [`UNAVAILABLE_VALUE`], its base64 form for bytes
//! ([`UNAVAILABLE_VALUE_BASE64`]) and a one-element array holding either become
//! [`Cell::Unchanged`]. The base64 form counts only for columns that are bytes, bits or of
//! unknown type, so that a text column can never be mistaken for it.

use super::decimal::decimal;
pub use super::decimal::unscaled_to_decimal;
use super::time::{format_date, time_of_day, timestamp, zoned_timestamp};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::{Map, Value};
use thiserror::Error;
use viewkeeper_core::model::Cell;

/// Debezium's default `unavailable.value.placeholder`: the value of a column whose
/// unchanged TOASTed value Postgres did not send.
pub const UNAVAILABLE_VALUE: &str = "__debezium_unavailable_value";
/// [`UNAVAILABLE_VALUE`] as a bytes column carries it (base64 of its UTF-8 bytes).
pub const UNAVAILABLE_VALUE_BASE64: &str = "X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ==";
/// Largest accepted decimal scale (either sign): Postgres's maximum display scale.
pub const MAX_SCALE: u32 = 16_383;
/// Largest accepted `io.debezium.data.Bits` length: Postgres's maximum bit length.
pub const MAX_BITS: u32 = 83_886_080;

/// How a column's JSON value is to be read: from the field's Connect schema (see
/// [`ColumnType::from_schema`]), or, for messages without schemas, from a configured
/// hint (`TopicTable::column_types`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ColumnType {
    /// No schema and no hint: kept as sent (any placeholder form is still `Unchanged`).
    Unknown,
    /// A schema type without a logical name (string, integers, floats, boolean, struct,
    /// map): kept as sent.
    Plain,
    /// `bytes`: standard base64 text, kept.
    Bytes,
    /// A decimal. `scale: Some(s)`: `org.apache.kafka.connect.data.Decimal`, a base64
    /// unscaled integer with scale `s` (negative scales multiply by a power of ten).
    /// `scale: None`: `io.debezium.data.VariableScaleDecimal` `{scale, value}`, or (for a
    /// hint) decimal text in `decimal.handling.mode=string`. JSON numbers
    /// (`decimal.handling.mode=double`) are kept for both.
    Decimal { scale: Option<i32> },
    /// Days since the epoch.
    Date,
    /// Milliseconds since midnight.
    Time,
    /// Microseconds since midnight.
    MicroTime,
    /// Nanoseconds since midnight.
    NanoTime,
    /// Milliseconds since the epoch, no time zone.
    Timestamp,
    /// Microseconds since the epoch, no time zone.
    MicroTimestamp,
    /// Nanoseconds since the epoch, no time zone.
    NanoTimestamp,
    /// ISO-8601 timestamp with an offset.
    ZonedTimestamp,
    /// ISO-8601 time with an offset: kept.
    ZonedTime,
    /// A year number: kept.
    Year,
    /// A string holding JSON.
    Json,
    /// A UUID string: kept.
    Uuid,
    /// A bit string; `length` is the declared number of bits.
    Bits { length: Option<u32> },
    /// An array of elements of the given type.
    Array(Box<ColumnType>),
}

/// A column type hint or a field schema that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum TypeError {
    #[error("'{0}': the scale must be an integer, e.g. decimal(2)")]
    HintScale(String),
    #[error("'{0}': scale beyond {MAX_SCALE}")]
    HintScaleRange(String),
    #[error(
        "unknown column type '{0}' (expected decimal(S), decimal, date, time, micro_time, nano_time, timestamp, \
         micro_timestamp, nano_timestamp, zoned_timestamp, json, uuid, bytes, or T[])"
    )]
    UnknownHint(String),
    #[error("field schema is {0}, not an object")]
    NotAnObject(&'static str),
    #[error("parameter {name} is {value}, not an integer")]
    Parameter { name: String, value: String },
    #[error("Decimal schema without a scale parameter")]
    MissingScale,
    #[error("Bits length {0} is out of range 0..={MAX_BITS}")]
    BitsLength(i64),
    #[error("{0}")]
    Scale(#[from] ScaleOutOfRange),
    #[error("array items: {0}")]
    ArrayItems(Box<TypeError>),
}

/// A decimal scale beyond what Postgres allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[error("decimal scale {0} is out of range ±{MAX_SCALE}")]
pub struct ScaleOutOfRange(pub i64);

/// What is wrong with one column value.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ValueError {
    #[error("expected {expected}, found {found}")]
    Expected { expected: &'static str, found: String },
    #[error("invalid base64 {text:?}: {error}")]
    Base64 { text: String, error: base64::DecodeError },
    /// serde_json's message (its error type is neither `Clone` nor `Eq`).
    #[error("invalid JSON text: {0}")]
    Json(String),
    #[error("element {index}: {error}")]
    Element { index: usize, error: Box<ValueError> },
    #[error("{0}")]
    Scale(#[from] ScaleOutOfRange),
    #[error("{0:?} is not decimal text; for base64 (precise mode) decimals the column's scale must be configured")]
    NotDecimalText(String),
    #[error("empty unscaled decimal value")]
    EmptyUnscaled,
    #[error("VariableScaleDecimal without {0}")]
    VariableScale(&'static str),
    #[error("day {0} is out of range")]
    Day(i64),
    #[error("time of day {0} is out of range (0 to 24:00:00)")]
    TimeOfDay(i64),
    #[error("expected an ISO-8601 timestamp with an offset, found {0:?}")]
    Zoned(String),
}

impl ColumnType {
    /// A configured hint for messages without schemas: `decimal(S)` (precise decimals,
    /// base64 unscaled with scale `S`), `decimal` (string mode or `VariableScaleDecimal`),
    /// `date`, `time`, `micro_time`, `nano_time`, `timestamp`, `micro_timestamp`,
    /// `nano_timestamp`, `zoned_timestamp`, `json`, `uuid`, `bytes`, or `T[]` for arrays.
    pub fn from_hint(hint: &str) -> Result<ColumnType, TypeError> {
        let h = hint.trim();
        if let Some(elem) = h.strip_suffix("[]") {
            return Ok(ColumnType::Array(Box::new(ColumnType::from_hint(elem)?)));
        }
        if let Some(scale) = h.strip_prefix("decimal(").and_then(|r| r.strip_suffix(')')) {
            let scale: i32 = scale
                .trim()
                .parse()
                .map_err(|_| TypeError::HintScale(hint.to_owned()))?;
            if scale.unsigned_abs() > MAX_SCALE {
                return Err(TypeError::HintScaleRange(hint.to_owned()));
            }
            return Ok(ColumnType::Decimal { scale: Some(scale) });
        }
        Ok(match h {
            "decimal" => ColumnType::Decimal { scale: None },
            "date" => ColumnType::Date,
            "time" => ColumnType::Time,
            "micro_time" => ColumnType::MicroTime,
            "nano_time" => ColumnType::NanoTime,
            "timestamp" => ColumnType::Timestamp,
            "micro_timestamp" => ColumnType::MicroTimestamp,
            "nano_timestamp" => ColumnType::NanoTimestamp,
            "zoned_timestamp" => ColumnType::ZonedTimestamp,
            "json" => ColumnType::Json,
            "uuid" => ColumnType::Uuid,
            "bytes" => ColumnType::Bytes,
            _ => return Err(TypeError::UnknownHint(hint.to_owned())),
        })
    }

    /// The type of one field of a Connect struct schema as JsonConverter writes it
    /// (`{"type": "bytes", "name": "org.apache.kafka.connect.data.Decimal",
    /// "parameters": {"scale": "2"}, "field": "price"}`). Unknown logical names are
    /// [`ColumnType::Plain`]; the error is for known ones with bad parameters.
    pub fn from_schema(schema: &Value) -> Result<ColumnType, TypeError> {
        match schema.as_object() {
            Some(obj) => ColumnType::from_schema_object(obj),
            None => Err(TypeError::NotAnObject(kind_of(schema))),
        }
    }

    /// [`ColumnType::from_schema`] of a schema object.
    pub fn from_schema_object(obj: &Map<String, Value>) -> Result<ColumnType, TypeError> {
        let name = obj.get("name").and_then(Value::as_str).unwrap_or_default();
        Ok(match name {
            "org.apache.kafka.connect.data.Decimal" => ColumnType::Decimal {
                scale: Some(scale_parameter(obj)?),
            },
            "io.debezium.data.VariableScaleDecimal" => ColumnType::Decimal { scale: None },
            "io.debezium.time.Date" | "org.apache.kafka.connect.data.Date" => ColumnType::Date,
            "io.debezium.time.Time" | "org.apache.kafka.connect.data.Time" => ColumnType::Time,
            "io.debezium.time.MicroTime" => ColumnType::MicroTime,
            "io.debezium.time.NanoTime" => ColumnType::NanoTime,
            "io.debezium.time.Timestamp" | "org.apache.kafka.connect.data.Timestamp" => ColumnType::Timestamp,
            "io.debezium.time.MicroTimestamp" => ColumnType::MicroTimestamp,
            "io.debezium.time.NanoTimestamp" => ColumnType::NanoTimestamp,
            "io.debezium.time.ZonedTimestamp" => ColumnType::ZonedTimestamp,
            "io.debezium.time.ZonedTime" => ColumnType::ZonedTime,
            "io.debezium.time.Year" => ColumnType::Year,
            "io.debezium.data.Json" => ColumnType::Json,
            "io.debezium.data.Uuid" => ColumnType::Uuid,
            "io.debezium.data.Bits" => ColumnType::Bits {
                length: length_parameter(obj)?,
            },
            _ => match obj.get("type").and_then(Value::as_str) {
                Some("bytes") => ColumnType::Bytes,
                Some("array") => ColumnType::Array(Box::new(match obj.get("items") {
                    Some(items) => ColumnType::from_schema(items).map_err(|e| TypeError::ArrayItems(Box::new(e)))?,
                    None => ColumnType::Plain,
                })),
                _ => ColumnType::Plain,
            },
        })
    }
}

fn parameter<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get("parameters")
        .and_then(Value::as_object)
        .and_then(|p| p.get(name))
}

/// Connect writes parameters as strings (`"scale": "2"`); numbers are accepted too.
fn int_parameter(obj: &Map<String, Value>, name: &str) -> Result<Option<i64>, TypeError> {
    match parameter(obj, name) {
        None => Ok(None),
        Some(v) => lenient_i64(v).map(Some).ok_or_else(|| TypeError::Parameter {
            name: name.to_owned(),
            value: v.to_string(),
        }),
    }
}

fn scale_parameter(obj: &Map<String, Value>) -> Result<i32, TypeError> {
    let scale = int_parameter(obj, "scale")?.ok_or(TypeError::MissingScale)?;
    Ok(check_scale(scale)?)
}

fn length_parameter(obj: &Map<String, Value>) -> Result<Option<u32>, TypeError> {
    match int_parameter(obj, "length")? {
        None => Ok(None),
        Some(n) => match u32::try_from(n) {
            Ok(n) if n <= MAX_BITS => Ok(Some(n)),
            _ => Err(TypeError::BitsLength(n)),
        },
    }
}

pub(crate) fn check_scale(scale: i64) -> Result<i32, ScaleOutOfRange> {
    match i32::try_from(scale) {
        Ok(s) if s.unsigned_abs() <= MAX_SCALE => Ok(s),
        _ => Err(ScaleOutOfRange(scale)),
    }
}

/// An integer, or a string holding one (Connect parameters, lenient envelope fields).
pub(crate) fn lenient_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// A short name of a JSON value's kind, for error messages.
pub(crate) fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Converts one column value; the error says what is wrong with it.
pub fn convert(value: &Value, ty: &ColumnType) -> Result<Cell, ValueError> {
    if is_unavailable(value, ty) {
        return Ok(Cell::Unchanged);
    }
    to_json(value, ty).map(Cell::Value)
}

fn is_placeholder(value: &Value, ty: &ColumnType) -> bool {
    match value {
        Value::String(s) => {
            s == UNAVAILABLE_VALUE
                || (s == UNAVAILABLE_VALUE_BASE64
                    && matches!(ty, ColumnType::Bytes | ColumnType::Bits { .. } | ColumnType::Unknown))
        }
        _ => false,
    }
}

fn is_unavailable(value: &Value, ty: &ColumnType) -> bool {
    match value {
        Value::Array(items) => {
            let element = match ty {
                ColumnType::Array(e) => e,
                _ => ty,
            };
            matches!(items.as_slice(), [only] if is_placeholder(only, element))
        }
        _ => is_placeholder(value, ty),
    }
}

fn to_json(value: &Value, ty: &ColumnType) -> Result<Value, ValueError> {
    if value.is_null() {
        return Ok(Value::Null);
    }
    let string = |expected: &'static str| {
        value.as_str().ok_or_else(|| ValueError::Expected {
            expected,
            found: kind_of(value).to_owned(),
        })
    };
    let integer = |expected: &'static str| {
        value.as_i64().ok_or_else(|| ValueError::Expected {
            expected,
            found: value.to_string(),
        })
    };
    Ok(match ty {
        ColumnType::Unknown | ColumnType::Plain => value.clone(),
        ColumnType::Bytes => {
            base64(string("a base64 string")?)?;
            value.clone()
        }
        ColumnType::Decimal { scale } => decimal(value, *scale)?,
        ColumnType::Date => Value::String(format_date(integer("days since the epoch")?)?),
        ColumnType::Time => Value::String(time_of_day(integer("milliseconds since midnight")?, 1_000_000)?),
        ColumnType::MicroTime => Value::String(time_of_day(integer("microseconds since midnight")?, 1_000)?),
        ColumnType::NanoTime => Value::String(time_of_day(integer("nanoseconds since midnight")?, 1)?),
        ColumnType::Timestamp => Value::String(timestamp(integer("milliseconds since the epoch")?, 1_000)?),
        ColumnType::MicroTimestamp => Value::String(timestamp(integer("microseconds since the epoch")?, 1_000_000)?),
        ColumnType::NanoTimestamp => Value::String(timestamp(integer("nanoseconds since the epoch")?, 1_000_000_000)?),
        ColumnType::ZonedTimestamp => Value::String(zoned_timestamp(string("an ISO-8601 timestamp string")?)?),
        ColumnType::ZonedTime | ColumnType::Uuid => {
            string("a string")?;
            value.clone()
        }
        ColumnType::Year => {
            integer("a year")?;
            value.clone()
        }
        ColumnType::Json => match value {
            Value::String(s) => {
                crate::sources::postgres::values::json_text(s).map_err(|e| ValueError::Json(e.to_string()))?
            }
            // Already structured (a converter other than Debezium's string encoding).
            _ => value.clone(),
        },
        ColumnType::Bits { length } => match value {
            Value::Bool(_) => value.clone(),
            _ => Value::String(bit_string(&base64(string("base64 bits")?)?, *length)),
        },
        ColumnType::Array(element) => match value {
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        to_json(v, element).map_err(|e| ValueError::Element {
                            index: i + 1,
                            error: Box::new(e),
                        })
                    })
                    .collect::<Result<_, _>>()?,
            ),
            _ => {
                return Err(ValueError::Expected {
                    expected: "an array",
                    found: kind_of(value).to_owned(),
                })
            }
        },
    })
}

pub(crate) fn base64(s: &str) -> Result<Vec<u8>, ValueError> {
    STANDARD
        .decode(s)
        .map_err(|error| ValueError::Base64 { text: cut(s), error })
}

/// The first 40 characters of `s`, for error messages.
pub(crate) fn cut(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((at, _)) => format!("{}…", s.get(..at).unwrap_or_default()),
        None => s.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------
// Bits

/// Debezium's bytes hold the bit string little-endian: its last character is bit 0 of
/// byte 0. Missing trailing bytes are zero bits (Debezium trims them for `varbit`).
fn bit_string(bytes: &[u8], length: Option<u32>) -> String {
    let n = length.map_or(bytes.len().saturating_mul(8), |l| l as usize);
    (0..n)
        .map(|i| {
            let bit = n - 1 - i;
            let set = bytes.get(bit / 8).is_some_and(|b| (b >> (bit % 8)) & 1 == 1);
            if set {
                '1'
            } else {
                '0'
            }
        })
        .collect()
}

#[cfg(test)]
#[path = "values_tests.rs"]
pub(crate) mod tests;
