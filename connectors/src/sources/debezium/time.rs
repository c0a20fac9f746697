//! Rendering of Debezium's temporal encodings as the text the pgoutput source produces
//! for the same Postgres column (`DateStyle = ISO`, `TimeZone = UTC`).
//!
//! Contract: pure and never panics; every `i64` input renders or is a clean error (no
//! overflow). Calendar arithmetic is proleptic Gregorian, as in Postgres and Java.
//! * dates: `YYYY-MM-DD` (years past 9999 get more digits; years before 1 AD are
//!   Postgres's `YYYY-MM-DD BC`);
//! * times of day: `HH:MM:SS[.f]`, at most `24:00:00`;
//! * local timestamps: `YYYY-MM-DDTHH:MM:SS[.f]` (BC: `YYYY-MM-DD HH:MM:SS[.f] BC`);
//! * zoned timestamps: converted to UTC, `YYYY-MM-DDTHH:MM:SS[.f]+00:00`
//!   (BC: `YYYY-MM-DD HH:MM:SS[.f]+00 BC`), as Postgres prints a `timestamptz` in a UTC
//!   session and the pgoutput source reformats it.
//!
//! Fractions keep up to nine digits, lose trailing zeros and vanish when zero.

use super::values::{cut, ValueError};

const NANOS_PER_SEC: u64 = 1_000_000_000;
const SECS_PER_DAY: i64 = 86_400;

/// Proleptic Gregorian (year, month, day) of a day count since 1970-01-01 (H. Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> Result<(i64, u32, u32), ValueError> {
    let z = days.checked_add(719_468).ok_or(ValueError::Day(days))?;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    let year = era * 400 + yoe + i64::from(month <= 2);
    Ok((year, month, day))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (`days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// `(YYYY-MM-DD, BC)` as Postgres prints it: year 0 is 1 BC.
fn ymd(year: i64, month: u32, day: u32) -> (String, bool) {
    if year >= 1 {
        (format!("{year:04}-{month:02}-{day:02}"), false)
    } else {
        (format!("{:04}-{month:02}-{day:02}", 1 - year), true)
    }
}

pub(crate) fn format_date(days: i64) -> Result<String, ValueError> {
    let (y, m, d) = civil_from_days(days)?;
    Ok(match ymd(y, m, d) {
        (date, false) => date,
        (date, true) => format!("{date} BC"),
    })
}

/// `.fffffffff` without trailing zeros; empty for a whole second.
fn fraction(nanos: u64) -> String {
    if nanos == 0 {
        return String::new();
    }
    let s = format!(".{nanos:09}");
    s.trim_end_matches('0').to_owned()
}

fn clock(nanos_of_day: u64) -> String {
    let secs = nanos_of_day / NANOS_PER_SEC;
    format!(
        "{:02}:{:02}:{:02}{}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        fraction(nanos_of_day % NANOS_PER_SEC)
    )
}

/// `value` units since midnight, `nanos_per_unit` nanoseconds each; `24:00:00` is the
/// largest time Postgres has.
pub(crate) fn time_of_day(value: i64, nanos_per_unit: u64) -> Result<String, ValueError> {
    const DAY_NANOS: u64 = 86_400 * NANOS_PER_SEC;
    let nanos = u64::try_from(value)
        .ok()
        .and_then(|v| v.checked_mul(nanos_per_unit))
        .filter(|&n| n <= DAY_NANOS)
        .ok_or(ValueError::TimeOfDay(value))?;
    Ok(clock(nanos))
}

/// `value` units since the epoch, `units_per_sec` of them per second, as a local
/// timestamp (no offset).
pub(crate) fn timestamp(value: i64, units_per_sec: i64) -> Result<String, ValueError> {
    let secs = value.div_euclid(units_per_sec);
    let sub = value.rem_euclid(units_per_sec) as u64 * (NANOS_PER_SEC / units_per_sec as u64);
    render_timestamp(secs, sub, false)
}

/// `YYYY-MM-DDTHH:MM:SS[.f][+00:00]`, or Postgres's BC form `YYYY-MM-DD HH:MM:SS[.f][+00] BC`.
fn render_timestamp(secs: i64, nanos: u64, utc: bool) -> Result<String, ValueError> {
    let (y, m, d) = civil_from_days(secs.div_euclid(SECS_PER_DAY))?;
    let clock = clock(secs.rem_euclid(SECS_PER_DAY) as u64 * NANOS_PER_SEC + nanos);
    Ok(match ymd(y, m, d) {
        (date, false) => format!("{date}T{clock}{}", if utc { "+00:00" } else { "" }),
        (date, true) => format!("{date} {clock}{} BC", if utc { "+00" } else { "" }),
    })
}

/// A tiny cursor over ASCII text.
struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn eat(&mut self, c: u8) -> bool {
        let hit = self.s.get(self.i) == Some(&c);
        self.i += usize::from(hit);
        hit
    }

    /// `min..=max` ASCII digits: (value, how many).
    fn digits(&mut self, min: usize, max: usize) -> Option<(u64, usize)> {
        let run = self
            .s
            .get(self.i..)?
            .iter()
            .take(max)
            .take_while(|b| b.is_ascii_digit())
            .count();
        if run < min {
            return None;
        }
        let text = self.s.get(self.i..self.i + run)?;
        self.i += run;
        let v = text.iter().fold(0u64, |acc, &b| acc * 10 + u64::from(b - b'0'));
        Some((v, run))
    }

    fn done(&self) -> bool {
        self.i >= self.s.len()
    }
}

/// Parses `[±]YYYY-MM-DDTHH:MM[:SS[.f]](Z|±HH[:MM[:SS]]|±HHMM)` and renders it in UTC.
/// `infinity` / `-infinity` stay as sent.
pub(crate) fn zoned_timestamp(text: &str) -> Result<String, ValueError> {
    if matches!(text, "infinity" | "-infinity") {
        return Ok(text.to_owned());
    }
    parse_zoned(text)
        .and_then(|(secs, nanos)| render_timestamp(secs, nanos, true).ok())
        .ok_or_else(|| ValueError::Zoned(cut(text)))
}

/// (seconds since the epoch in UTC, nanoseconds).
fn parse_zoned(text: &str) -> Option<(i64, u64)> {
    let mut c = Cursor {
        s: text.as_bytes(),
        i: 0,
    };
    let sign = if c.eat(b'-') {
        -1
    } else {
        c.eat(b'+');
        1
    };
    let year = sign * c.digits(4, 9)?.0 as i64;
    let month = c.eat(b'-').then(|| c.digits(2, 2))??.0 as u32;
    let day = c.eat(b'-').then(|| c.digits(2, 2))??.0 as u32;
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) || !c.eat(b'T') {
        return None;
    }
    let hour = c.digits(2, 2)?.0;
    let minute = c.eat(b':').then(|| c.digits(2, 2))??.0;
    let mut second = 0;
    let mut nanos = 0;
    if c.eat(b':') {
        second = c.digits(2, 2)?.0;
        if c.eat(b'.') {
            let (f, n) = c.digits(1, 9)?;
            nanos = f * 10u64.pow(9 - n as u32);
        }
    }
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let offset = if c.eat(b'Z') {
        0
    } else {
        let sign = if c.eat(b'+') {
            1
        } else if c.eat(b'-') {
            -1
        } else {
            return None;
        };
        let (h, n) = c.digits(2, 4)?;
        let (h, mut m) = if n == 4 { (h / 100, h % 100) } else { (h, 0) };
        let mut s = 0;
        if n == 2 && c.eat(b':') {
            m = c.digits(2, 2)?.0;
            if c.eat(b':') {
                s = c.digits(2, 2)?.0;
            }
        }
        if n == 3 || h > 18 || m > 59 || s > 59 {
            return None;
        }
        sign * (h * 3600 + m * 60 + s) as i64
    };
    if !c.done() {
        return None;
    }
    let local = days_from_civil(year, month, day) * SECS_PER_DAY + (hour * 3600 + minute * 60 + second) as i64;
    Some((local - offset, nanos))
}

#[cfg(test)]
mod tests {
    use crate::sources::debezium::values::tests::value;
    use crate::sources::debezium::values::{convert, ColumnType};
    use serde_json::json;

    #[test]
    fn dates() {
        for (days, text) in [
            (0, "1970-01-01"),
            (19_753, "2024-01-31"),
            (-1, "1969-12-31"),
            (11_016, "2000-02-29"),
            (-719_162, "0001-01-01"),
            (-719_163, "0001-12-31 BC"),
            (2_932_897, "10000-01-01"),
        ] {
            assert_eq!(value(json!(days), ColumnType::Date), json!(text), "{days}");
        }
        assert!(convert(&json!(i64::MAX), &ColumnType::Date).is_err());
        assert!(convert(&json!("2024-01-31"), &ColumnType::Date).is_err());
    }

    #[test]
    fn times_of_day() {
        for (v, ty, text) in [
            (0_i64, ColumnType::Time, "00:00:00"),
            (36_000_123, ColumnType::Time, "10:00:00.123"),
            (36_000_123_456, ColumnType::MicroTime, "10:00:00.123456"),
            (500_000, ColumnType::MicroTime, "00:00:00.5"),
            (86_400_000_000, ColumnType::MicroTime, "24:00:00"),
            (36_000_123_456_789, ColumnType::NanoTime, "10:00:00.123456789"),
            (86_399_999_999_999, ColumnType::NanoTime, "23:59:59.999999999"),
        ] {
            assert_eq!(value(json!(v), ty.clone()), json!(text), "{v} {ty:?}");
        }
        for (v, ty) in [
            (-1, ColumnType::Time),
            (86_400_001, ColumnType::Time),
            (i64::MAX, ColumnType::MicroTime),
        ] {
            assert!(convert(&json!(v), &ty).is_err(), "{v} {ty:?}");
        }
    }

    #[test]
    fn local_timestamps() {
        for (v, ty, text) in [
            (1_562_630_400_000_i64, ColumnType::Timestamp, "2019-07-09T00:00:00"),
            (1_706_695_200_123, ColumnType::Timestamp, "2024-01-31T10:00:00.123"),
            (
                1_706_695_200_123_000,
                ColumnType::MicroTimestamp,
                "2024-01-31T10:00:00.123",
            ),
            (
                1_706_695_200_000_001,
                ColumnType::MicroTimestamp,
                "2024-01-31T10:00:00.000001",
            ),
            (-1, ColumnType::MicroTimestamp, "1969-12-31T23:59:59.999999"),
            (
                1_706_695_200_123_456_789,
                ColumnType::NanoTimestamp,
                "2024-01-31T10:00:00.123456789",
            ),
            (-62_135_596_800_000, ColumnType::Timestamp, "0001-01-01T00:00:00"),
            (-62_135_596_800_001, ColumnType::Timestamp, "0001-12-31 23:59:59.999 BC"),
            (253_402_300_800_000, ColumnType::Timestamp, "10000-01-01T00:00:00"),
        ] {
            assert_eq!(value(json!(v), ty.clone()), json!(text), "{v} {ty:?}");
        }
        // Extremes render without overflow.
        for ty in [
            ColumnType::Timestamp,
            ColumnType::MicroTimestamp,
            ColumnType::NanoTimestamp,
        ] {
            assert!(convert(&json!(i64::MAX), &ty).is_ok());
            assert!(convert(&json!(i64::MIN), &ty).is_ok());
        }
        assert!(convert(&json!(1.5), &ColumnType::Timestamp).is_err());
    }

    #[test]
    fn zoned_timestamps_are_normalized_to_utc() {
        for (text, utc) in [
            ("2024-01-31T10:00:00Z", "2024-01-31T10:00:00+00:00"),
            ("2024-01-31T10:00:00.120Z", "2024-01-31T10:00:00.12+00:00"),
            (
                "2011-01-11T16:40:30.123456789+00:00",
                "2011-01-11T16:40:30.123456789+00:00",
            ),
            (
                "2011-01-11T11:40:30.123456789-05:00",
                "2011-01-11T16:40:30.123456789+00:00",
            ),
            ("2024-01-01T00:30:00+05:30", "2023-12-31T19:00:00+00:00"),
            ("2024-01-01T00:30+0530", "2023-12-31T19:00:00+00:00"),
            ("2024-02-29T23:00:00-01", "2024-03-01T00:00:00+00:00"),
            ("1850-01-01T00:00:00+00:53:28", "1849-12-31T23:06:32+00:00"),
            ("+12024-01-31T10:00:00Z", "12024-01-31T10:00:00+00:00"),
            ("-0043-03-15T12:00:00Z", "0044-03-15 12:00:00+00 BC"),
            ("infinity", "infinity"),
            ("-infinity", "-infinity"),
        ] {
            assert_eq!(value(json!(text), ColumnType::ZonedTimestamp), json!(utc), "{text}");
        }
        for bad in [
            "",
            "2024-13-01T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2024-01-31 10:00:00Z",
            "2024-01-31T10:00:00",
            "2024-01-31T24:00:00Z",
            "2024-01-31T10:00:00+19:00",
            "2024-01-31T10:00:00.1234567890Z",
            "2024-01-31T10:00:00Zx",
            "2024-01-31T10:00:00+053",
            "24-01-31T10:00:00Z",
        ] {
            assert!(convert(&json!(bad), &ColumnType::ZonedTimestamp).is_err(), "{bad}");
        }
        assert!(convert(&json!(5), &ColumnType::ZonedTimestamp).is_err());
    }
}
