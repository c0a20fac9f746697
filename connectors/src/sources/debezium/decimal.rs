//! Exact decimals from Kafka Connect's encodings: `org.apache.kafka.connect.data.Decimal`
//! (a big-endian two's-complement unscaled integer of any size, base64 in JSON, with the
//! scale in the schema) and `io.debezium.data.VariableScaleDecimal` (`{scale, value}`),
//! rendered as exact decimal text with the scale kept (`1250`, scale 2 → `"12.50"`),
//! the way Postgres prints a `numeric`. No floating point is involved anywhere.
//!
//! Contract: pure and never panics; sizes are unbounded (a Postgres numeric may have
//! 147,455 digits) but scales are limited to ±[`MAX_SCALE`](super::values::MAX_SCALE),
//! so that a corrupt scale cannot ask for gigabytes of zeros.

use super::values::{base64, check_scale, cut, kind_of, ValueError};
use serde_json::{Map, Value};

/// A decimal column's value: base64 with a known `scale` (precise mode), `{scale, value}`
/// (variable scale), decimal text (string mode, `scale` unknown) or a number (double
/// mode, kept as the number it is).
pub(crate) fn decimal(value: &Value, scale: Option<i32>) -> Result<Value, ValueError> {
    match (value, scale) {
        // decimal.handling.mode=double.
        (Value::Number(_), _) => Ok(value.clone()),
        (Value::String(s), Some(scale)) => Ok(Value::String(unscaled_to_decimal(&base64(s)?, scale)?)),
        // decimal.handling.mode=string.
        (Value::String(s), None) if is_decimal_text(s) => Ok(value.clone()),
        (Value::String(s), None) => Err(ValueError::NotDecimalText(cut(s))),
        (Value::Object(o), _) => variable_scale(o),
        _ => Err(ValueError::Expected {
            expected: "a decimal (base64 string, {scale, value} or number)",
            found: kind_of(value).to_owned(),
        }),
    }
}

/// `io.debezium.data.VariableScaleDecimal`: `{"scale": 2, "value": "BOI="}`.
fn variable_scale(o: &Map<String, Value>) -> Result<Value, ValueError> {
    let scale = o
        .get("scale")
        .and_then(Value::as_i64)
        .ok_or(ValueError::VariableScale("an integer scale"))?;
    let value = o
        .get("value")
        .and_then(Value::as_str)
        .ok_or(ValueError::VariableScale("a base64 value"))?;
    Ok(Value::String(unscaled_to_decimal(
        &base64(value)?,
        check_scale(scale)?,
    )?))
}

/// `[+-]digits[.digits][e[+-]digits]` (or `.digits`), `NaN`, `Infinity`, `-Infinity`.
fn is_decimal_text(s: &str) -> bool {
    if matches!(s, "NaN" | "Infinity" | "-Infinity") {
        return true;
    }
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    let unsigned = s.strip_prefix(['-', '+']).unwrap_or(s);
    let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e.strip_prefix(['-', '+']).unwrap_or(e))),
        None => (unsigned, None),
    };
    let mantissa_ok = match mantissa.split_once('.') {
        Some((int, frac)) => (int.is_empty() || digits(int)) && (frac.is_empty() || digits(frac)) && mantissa != ".",
        None => digits(mantissa),
    };
    mantissa_ok && exponent.is_none_or(digits)
}

/// The exact decimal text of a big-endian two's-complement unscaled integer of any size
/// with `scale` digits after the point (`[0x04, 0xE2]`, 2 → `"12.50"`; a negative scale
/// appends zeros). Empty input is an error, as in Connect.
pub fn unscaled_to_decimal(bytes: &[u8], scale: i32) -> Result<String, ValueError> {
    let Some(&first) = bytes.first() else {
        return Err(ValueError::EmptyUnscaled);
    };
    let scale = check_scale(scale.into())?;
    let negative = first & 0x80 != 0;
    let mut magnitude = bytes.to_vec();
    if negative {
        // Two's complement: invert and add one; the result is read as unsigned.
        for b in magnitude.iter_mut() {
            *b = !*b;
        }
        for b in magnitude.iter_mut().rev() {
            let (sum, carry) = b.overflowing_add(1);
            *b = sum;
            if !carry {
                break;
            }
        }
    }
    let mut digits = magnitude_to_decimal(&magnitude);
    let zero = digits == "0";
    if scale < 0 {
        if !zero {
            digits.extend(std::iter::repeat_n('0', scale.unsigned_abs() as usize));
        }
    } else if scale > 0 {
        let k = scale as usize;
        if digits.len() <= k {
            let pad = k + 1 - digits.len();
            digits.insert_str(0, &"0".repeat(pad));
        }
        digits.insert(digits.len() - k, '.');
    }
    if negative && !zero {
        digits.insert(0, '-');
    }
    Ok(digits)
}

/// Decimal digits of an unsigned big-endian integer, by repeated division by 10⁹ over
/// 32-bit limbs.
fn magnitude_to_decimal(bytes: &[u8]) -> String {
    const CHUNK: u64 = 1_000_000_000;
    let skip = bytes.iter().take_while(|&&b| b == 0).count();
    let bytes = bytes.get(skip..).unwrap_or_default();
    let lead = (4 - bytes.len() % 4) % 4;
    let padded: Vec<u8> = std::iter::repeat_n(0u8, lead).chain(bytes.iter().copied()).collect();
    let mut limbs: Vec<u32> = padded
        .chunks_exact(4)
        .map(|c| c.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b)))
        .collect();
    let mut start = 0;
    let mut chunks: Vec<u32> = Vec::new();
    while start < limbs.len() {
        let mut rem: u64 = 0;
        for limb in limbs.iter_mut().skip(start) {
            let cur = (rem << 32) | u64::from(*limb);
            *limb = (cur / CHUNK) as u32;
            rem = cur % CHUNK;
        }
        chunks.push(rem as u32);
        while limbs.get(start) == Some(&0) {
            start += 1;
        }
    }
    let mut out = match chunks.pop() {
        Some(top) => top.to_string(),
        None => return "0".into(),
    };
    for c in chunks.iter().rev() {
        out.push_str(&format!("{c:09}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::debezium::values::{convert, ColumnType};
    use serde_json::json;
    use viewkeeper_core::model::Cell;

    fn dec(bytes: &[u8], scale: i32) -> String {
        unscaled_to_decimal(bytes, scale).unwrap_or_else(|e| panic!("{bytes:?} {scale}: {e}"))
    }

    fn value(v: Value, ty: ColumnType) -> Value {
        match convert(&v, &ty) {
            Ok(Cell::Value(out)) => out,
            other => panic!("{v} as {ty:?}: {other:?}"),
        }
    }

    #[test]
    fn unscaled_integers_become_exact_decimal_text() {
        assert_eq!(dec(&[0x04, 0xE2], 2), "12.50");
        assert_eq!(dec(&[0xFB, 0x1E], 2), "-12.50");
        assert_eq!(dec(&[0x00], 0), "0");
        assert_eq!(dec(&[0x00], 2), "0.00");
        assert_eq!(dec(&[0x00, 0x00, 0x00], 3), "0.000");
        assert_eq!(dec(&[0x7B], 0), "123");
        assert_eq!(dec(&[0x05], 3), "0.005");
        assert_eq!(dec(&[0xFB], 3), "-0.005");
        assert_eq!(dec(&[0x0C], -2), "1200");
        assert_eq!(dec(&[0x00], -2), "0");
        assert_eq!(dec(&[0xFF], 0), "-1");
        assert_eq!(dec(&[0x80], 0), "-128");
        assert_eq!(dec(&[0x00, 0xFF], 0), "255");
        assert_eq!(dec(&[0xFF, 0x00], 1), "-25.6");
        // Leading zero bytes (and sign-extension bytes) do not change the value.
        assert_eq!(dec(&[0x00, 0x00, 0x00, 0x01], 0), "1");
        assert_eq!(dec(&[0xFF, 0xFF, 0xFF, 0xFF], 2), "-0.01");
        // SQL Server fixture values: 2000000000 and 100000 at scale 4.
        assert_eq!(dec(&[0x77, 0x35, 0x94, 0x00], 4), "200000.0000");
        assert_eq!(dec(&[0x01, 0x86, 0xA0], 4), "10.0000");
        // Beyond 64 bits.
        assert_eq!(dec(&[1, 0, 0, 0, 0, 0, 0, 0, 0], 0), "18446744073709551616");
        assert_eq!(dec(&[1, 0, 0, 0, 0, 0, 0, 0, 0], 4), "1844674407370955.1616");
        assert_eq!(dec(&[0xFF, 0, 0, 0, 0, 0, 0, 0, 0], 0), "-18446744073709551616");
        let mut max256 = vec![0x00];
        max256.extend([0xFF; 32]);
        assert_eq!(
            dec(&max256, 0),
            "115792089237316195423570985008687907853269984665640564039457584007913129639935"
        );
        let mut min256 = vec![0x80];
        min256.extend([0x00; 31]);
        assert_eq!(
            dec(&min256, 0),
            "-57896044618658097711785492504343953926634992332820282019728792003956564819968"
        );
        assert!(unscaled_to_decimal(&[], 0).is_err());
        assert!(unscaled_to_decimal(&[1], 20_000).is_err());
    }

    #[test]
    fn unscaled_integers_agree_with_i128() {
        let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let specials = [
            0i128,
            1,
            -1,
            i128::MAX,
            i128::MIN,
            i64::MAX.into(),
            i64::MIN.into(),
            1 << 64,
        ];
        for i in 0..2_000 {
            let n = match specials.get(i) {
                Some(&n) => n,
                None => (((u128::from(next()) << 64) | u128::from(next())) as i128) >> (next() % 127),
            };
            // Minimal two's-complement bytes, and the full 16 with sign extension.
            let full = n.to_be_bytes();
            let keep = full
                .windows(2)
                .take_while(|w| (w[0] == 0 && w[1] < 0x80) || (w[0] == 0xFF && w[1] >= 0x80))
                .count();
            for bytes in [&full[..], &full[keep..]] {
                assert_eq!(dec(bytes, 0), n.to_string(), "{bytes:?}");
            }
        }
    }

    #[test]
    fn decimal_modes() {
        let precise = ColumnType::Decimal { scale: Some(2) };
        let variable = ColumnType::Decimal { scale: None };
        assert_eq!(value(json!("BOI="), precise.clone()), json!("12.50"));
        assert_eq!(
            value(json!({"scale": 3, "value": "BOI="}), variable.clone()),
            json!("1.250")
        );
        assert_eq!(
            value(json!({"scale": 0, "value": "AA=="}), variable.clone()),
            json!("0")
        );
        assert_eq!(value(json!("12.50"), variable.clone()), json!("12.50"));
        assert_eq!(value(json!("-1.5e-3"), variable.clone()), json!("-1.5e-3"));
        assert_eq!(value(json!("NaN"), variable.clone()), json!("NaN"));
        assert_eq!(value(json!(12.5), precise.clone()), json!(12.5));
        assert_eq!(value(json!(null), precise.clone()), json!(null));
        for (v, ty) in [
            (json!("not base64!"), &precise),
            (json!(""), &precise),
            (json!("BOI="), &variable),
            (json!("."), &variable),
            (json!(true), &precise),
            (json!({"scale": "x", "value": "BOI="}), &variable),
            (json!({"scale": 99_999, "value": "BOI="}), &variable),
            (json!({"scale": 1}), &variable),
        ] {
            assert!(convert(&v, ty).is_err(), "{v} as {ty:?}");
        }
    }
}
