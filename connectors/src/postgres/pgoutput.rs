//! Decoder for PostgreSQL's logical replication `pgoutput` protocol, version 1
//! (no streaming, text-format values), from the raw bytes of one XLogData payload.
//!
//! Contract: [`decode`] is pure (no I/O, no global state) and never panics, whatever
//! the bytes. Every length or count read from the wire is checked against the bytes
//! that remain before anything is allocated, so a hostile length cannot make it
//! allocate more than the input's size. A message must be consumed exactly: trailing
//! bytes are an error. Malformed input yields a [`DecodeError`] that names the message,
//! the byte offset (from the start of the payload, the tag being byte 0) and what was
//! wrong. Timestamps are kept as Postgres sends them: microseconds since 2000-01-01
//! UTC (see [`pg_time_to_unix_us`]). Messages of protocol versions 2+ (stream and
//! two-phase messages) are reported as unknown tags.

use std::fmt;

use DecodeErrorKind as K;

use thiserror::Error;

/// Microseconds between the Unix epoch and the Postgres epoch (2000-01-01 UTC).
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// Converts a pgoutput timestamp (µs since 2000-01-01 UTC) to µs since the Unix epoch.
pub fn pg_time_to_unix_us(pg_us: i64) -> i64 {
    pg_us.saturating_add(PG_EPOCH_OFFSET_US)
}

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgOutputMessage {
    /// 'B': start of a transaction. `commit_time_us` is µs since 2000-01-01 UTC.
    Begin {
        final_lsn: u64,
        commit_time_us: i64,
        xid: u32,
    },
    /// 'C': end of a transaction. `flags` is currently unused by Postgres (0).
    Commit {
        flags: u8,
        commit_lsn: u64,
        end_lsn: u64,
        commit_time_us: i64,
    },
    /// 'O': the transaction originated on another node (replication origin).
    Origin { commit_lsn: u64, name: String },
    /// 'R': describes a relation; sent before the first change to it in a session
    /// and again whenever its definition changes.
    Relation(RelationBody),
    /// 'Y': describes a non-built-in data type.
    Type { oid: u32, namespace: String, name: String },
    /// 'I': a new row.
    Insert { relation_id: u32, new: TupleData },
    /// 'U': a changed row. `old` is present when the key changed ('K') or the
    /// relation has `REPLICA IDENTITY FULL` ('O').
    Update {
        relation_id: u32,
        old: Option<OldTuple>,
        new: TupleData,
    },
    /// 'D': a deleted row, identified by its key ('K') or its full old image ('O').
    Delete { relation_id: u32, old: OldTuple },
    /// 'T': TRUNCATE of one or more relations; see [`TRUNCATE_CASCADE`] and
    /// [`TRUNCATE_RESTART_IDENTITY`] for `options`.
    Truncate { options: u8, relation_ids: Vec<u32> },
    /// 'M': a `pg_logical_emit_message` message.
    Message {
        transactional: bool,
        lsn: u64,
        prefix: String,
        content: Vec<u8>,
    },
}

/// Truncate option bit: `TRUNCATE ... CASCADE`.
pub const TRUNCATE_CASCADE: u8 = 1;
/// Truncate option bit: `TRUNCATE ... RESTART IDENTITY`.
pub const TRUNCATE_RESTART_IDENTITY: u8 = 2;

impl PgOutputMessage {
    /// The protocol tag byte of this message (`b'B'`, `b'I'`, ...).
    pub fn tag(&self) -> u8 {
        match self {
            Self::Begin { .. } => b'B',
            Self::Commit { .. } => b'C',
            Self::Origin { .. } => b'O',
            Self::Relation(_) => b'R',
            Self::Type { .. } => b'Y',
            Self::Insert { .. } => b'I',
            Self::Update { .. } => b'U',
            Self::Delete { .. } => b'D',
            Self::Truncate { .. } => b'T',
            Self::Message { .. } => b'M',
        }
    }
}

/// Body of a Relation ('R') message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationBody {
    /// The relation's OID, used by the row messages that follow.
    pub id: u32,
    /// Schema name; empty for `pg_catalog`.
    pub namespace: String,
    pub name: String,
    /// `REPLICA IDENTITY` setting as sent: `b'd'` default, `b'n'` nothing,
    /// `b'f'` full, `b'i'` index. Not validated.
    pub replica_identity: u8,
    pub columns: Vec<RelationColumn>,
}

/// One column of a [`RelationBody`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Whether the column is part of the replica identity key (flag bit 1).
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// The old image carried by an Update or Delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// 'K': only the replica identity key columns are set; the others are null.
    Key(TupleData),
    /// 'O': the full old row (`REPLICA IDENTITY FULL`).
    Full(TupleData),
}

impl OldTuple {
    /// The tuple, whichever kind it is.
    pub fn tuple(&self) -> &TupleData {
        match self {
            Self::Key(t) | Self::Full(t) => t,
        }
    }
}

/// Column values of one row, in the relation's column order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TupleData(pub Vec<TupleValue>);

/// One column value of a [`TupleData`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// 'n': SQL NULL.
    Null,
    /// 'u': an unchanged TOASTed value; the actual value is not sent.
    UnchangedToast,
    /// 't': the value in the type's text output format (client encoding, normally UTF-8).
    Text(Vec<u8>),
    /// 'b': the value in binary format (only with the `binary` option).
    Binary(Vec<u8>),
}

impl TupleValue {
    /// The bytes of a text-format value, `None` for every other kind.
    pub fn as_text(&self) -> Option<&[u8]> {
        match self {
            Self::Text(b) => Some(b),
            _ => None,
        }
    }
}

/// What was malformed, where, and in which message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub struct DecodeError {
    /// Message kind ("Insert", "Relation", ...), or "payload" before the tag is known.
    pub message: &'static str,
    /// Byte offset of the problem from the start of the payload (the tag is byte 0).
    pub offset: usize,
    /// Part of the message being read: "header", "new tuple", "relation column", ...
    pub section: &'static str,
    /// Field being read: "column length", "relation name", ...
    pub field: &'static str,
    pub kind: DecodeErrorKind,
}

/// The kind of a [`DecodeError`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeErrorKind {
    /// The tag byte is not a protocol-v1 message.
    UnknownTag(u8),
    /// Fewer bytes left than a fixed-size field needs (an empty payload included).
    Truncated {
        needed: usize,
        left: usize,
    },
    /// A declared byte length is longer than what is left.
    LengthExceedsInput {
        declared: usize,
        left: usize,
    },
    /// A declared element count cannot fit in what is left.
    CountExceedsInput {
        count: usize,
        min_bytes: usize,
        left: usize,
    },
    /// A length or count is negative.
    Negative(i64),
    /// No NUL terminator before the end of the payload.
    UnterminatedString {
        left: usize,
    },
    InvalidUtf8,
    UnexpectedByte {
        expected: &'static str,
        found: u8,
    },
    /// The message was complete before the end of the payload.
    TrailingBytes {
        left: usize,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            message: m,
            offset: o,
            section: s,
            field: fl,
            kind,
        } = self;
        match kind {
            K::UnknownTag(t) => {
                write!(f, "unknown pgoutput message tag {} at byte {o}", show_byte(*t))
            }
            K::Truncated { needed, left } => write!(
                f,
                "truncated {s} in {m} at byte {o}: expected {needed}-byte {fl}, {left} bytes left"
            ),
            K::LengthExceedsInput { declared, left } => write!(
                f,
                "truncated {s} in {m} at byte {o}: {fl} declares {declared} bytes, {left} bytes left"
            ),
            K::CountExceedsInput { count, min_bytes, left } => write!(
                f,
                "truncated {s} in {m} at byte {o}: {fl} {count} needs at least {min_bytes} bytes, \
                 {left} bytes left"
            ),
            K::Negative(v) => {
                write!(f, "invalid {s} in {m} at byte {o}: {fl} is negative ({v})")
            }
            K::UnterminatedString { left } => write!(
                f,
                "unterminated string in {m} at byte {o}: {s} {fl} has no NUL in the {left} bytes left"
            ),
            K::InvalidUtf8 => write!(f, "invalid UTF-8 in {m} at byte {o}: {s} {fl}"),
            K::UnexpectedByte { expected, found } => write!(
                f,
                "unexpected byte in {m} at byte {o}: {s} {fl} must be {expected}, found {}",
                show_byte(*found)
            ),
            K::TrailingBytes { left } => {
                write!(f, "trailing bytes in {m} at byte {o}: {left} bytes after the message")
            }
        }
    }
}

fn show_byte(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("'{}' (0x{b:02x})", b as char)
    } else {
        format!("0x{b:02x}")
    }
}

fn message_name(tag: u8) -> Option<&'static str> {
    Some(match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        _ => return None,
    })
}

/// Decodes one pgoutput message (the whole XLogData payload, starting at the tag).
pub fn decode(data: &[u8]) -> Result<PgOutputMessage, DecodeError> {
    let mut r = Reader {
        buf: data,
        pos: 0,
        message: "payload",
        section: "header",
    };
    let tag = r.u8("tag")?;
    r.message = message_name(tag).ok_or_else(|| r.err(0, "tag", K::UnknownTag(tag)))?;
    let msg = match tag {
        b'B' => PgOutputMessage::Begin {
            final_lsn: r.u64("final LSN")?,
            commit_time_us: r.i64("commit timestamp")?,
            xid: r.u32("xid")?,
        },
        b'C' => PgOutputMessage::Commit {
            flags: r.u8("flags")?,
            commit_lsn: r.u64("commit LSN")?,
            end_lsn: r.u64("end LSN")?,
            commit_time_us: r.i64("commit timestamp")?,
        },
        b'O' => PgOutputMessage::Origin {
            commit_lsn: r.u64("commit LSN")?,
            name: r.cstring("origin name")?,
        },
        b'R' => PgOutputMessage::Relation(relation(&mut r)?),
        b'Y' => PgOutputMessage::Type {
            oid: r.u32("type OID")?,
            namespace: r.cstring("namespace")?,
            name: r.cstring("type name")?,
        },
        b'I' => {
            let relation_id = r.u32("relation id")?;
            r.marker("'N'", |b| b == b'N')?;
            PgOutputMessage::Insert {
                relation_id,
                new: tuple(&mut r, "new tuple")?,
            }
        }
        b'U' => {
            let relation_id = r.u32("relation id")?;
            let old = match r.marker("'K', 'O' or 'N'", |b| matches!(b, b'K' | b'O' | b'N'))? {
                b'K' => Some(OldTuple::Key(tuple(&mut r, "old key tuple")?)),
                b'O' => Some(OldTuple::Full(tuple(&mut r, "old tuple")?)),
                _ => None,
            };
            if old.is_some() {
                r.marker("'N'", |b| b == b'N')?;
            }
            PgOutputMessage::Update {
                relation_id,
                old,
                new: tuple(&mut r, "new tuple")?,
            }
        }
        b'D' => {
            let relation_id = r.u32("relation id")?;
            let old = match r.marker("'K' or 'O'", |b| matches!(b, b'K' | b'O'))? {
                b'K' => OldTuple::Key(tuple(&mut r, "old key tuple")?),
                _ => OldTuple::Full(tuple(&mut r, "old tuple")?),
            };
            PgOutputMessage::Delete { relation_id, old }
        }
        b'T' => {
            let count = r.count("relation count", true, 4)?;
            let options = r.u8("options")?;
            r.section = "relation id list";
            let mut relation_ids = Vec::with_capacity(count);
            for _ in 0..count {
                relation_ids.push(r.u32("relation id")?);
            }
            PgOutputMessage::Truncate { options, relation_ids }
        }
        _ => {
            // b'M' (message_name accepted the tag).
            let transactional = r.u8("flags")? & 1 != 0;
            let lsn = r.u64("LSN")?;
            let prefix = r.cstring("prefix")?;
            let len = r.len32("content length")?;
            r.section = "content";
            let content = r.take(len, "content")?.to_vec();
            PgOutputMessage::Message {
                transactional,
                lsn,
                prefix,
                content,
            }
        }
    };
    match r.left() {
        0 => Ok(msg),
        left => Err(r.err(r.pos, "end", K::TrailingBytes { left })),
    }
}

fn relation(r: &mut Reader<'_>) -> Result<RelationBody, DecodeError> {
    let id = r.u32("relation id")?;
    let namespace = r.cstring("namespace")?;
    let name = r.cstring("relation name")?;
    let replica_identity = r.u8("replica identity")?;
    // Each column needs at least flags(1) + name NUL(1) + type OID(4) + modifier(4).
    let ncols = r.count("column count", false, 10)?;
    r.section = "relation column";
    let mut columns = Vec::with_capacity(ncols);
    for _ in 0..ncols {
        columns.push(RelationColumn {
            is_key: r.u8("flags")? & 1 != 0,
            name: r.cstring("column name")?,
            type_oid: r.u32("type OID")?,
            type_modifier: r.i32("type modifier")?,
        });
    }
    Ok(RelationBody {
        id,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn tuple(r: &mut Reader<'_>, section: &'static str) -> Result<TupleData, DecodeError> {
    let outer = std::mem::replace(&mut r.section, section);
    // Each column needs at least its kind byte.
    let ncols = r.count("column count", false, 1)?;
    let mut values = Vec::with_capacity(ncols);
    for _ in 0..ncols {
        let at = r.pos;
        values.push(match r.u8("column kind")? {
            b'n' => TupleValue::Null,
            b'u' => TupleValue::UnchangedToast,
            b't' => TupleValue::Text(r.bytes32("column length")?),
            b'b' => TupleValue::Binary(r.bytes32("column length")?),
            found => {
                let expected = "'n', 'u', 't' or 'b'";
                let kind = K::UnexpectedByte { expected, found };
                return Err(r.err(at, "column kind", kind));
            }
        });
    }
    r.section = outer;
    Ok(TupleData(values))
}

/// `fn u32(&mut self, field) -> Result<u32, DecodeError>` etc.: big-endian integers.
macro_rules! be_getters {
    ($($t:ident),*) => {$(
        fn $t(&mut self, field: &'static str) -> Result<$t, DecodeError> {
            Ok($t::from_be_bytes(self.fixed(field)?))
        }
    )*};
}

/// Bounds-checked cursor over one payload; every read reports errors with context.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    message: &'static str,
    section: &'static str,
}

impl<'a> Reader<'a> {
    fn err(&self, offset: usize, field: &'static str, kind: DecodeErrorKind) -> DecodeError {
        DecodeError {
            message: self.message,
            offset,
            section: self.section,
            field,
            kind,
        }
    }

    fn left(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let Some(bytes) = rest.get(..n) else {
            let kind = K::Truncated {
                needed: n,
                left: rest.len(),
            };
            return Err(self.err(self.pos, field, kind));
        };
        self.pos += n;
        Ok(bytes)
    }

    fn fixed<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let at = self.pos;
        let bytes = self.take(N, field)?;
        let kind = K::Truncated {
            needed: N,
            left: bytes.len(),
        };
        bytes.try_into().map_err(|_| self.err(at, field, kind))
    }

    be_getters!(u8, i16, u32, i32, u64, i64);

    /// An Int16 (or, if `wide`, Int32) count of elements needing at least `min_each`
    /// bytes each, checked to be non-negative and to fit in what is left, so that a
    /// hostile count never drives an allocation.
    fn count(&mut self, field: &'static str, wide: bool, min_each: usize) -> Result<usize, DecodeError> {
        let at = self.pos;
        let raw = if wide {
            self.i32(field)?
        } else {
            self.i16(field)?.into()
        };
        let count = usize::try_from(raw).map_err(|_| self.err(at, field, K::Negative(raw.into())))?;
        let (min_bytes, left) = (count.saturating_mul(min_each), self.left());
        if min_bytes > left {
            let kind = K::CountExceedsInput { count, min_bytes, left };
            return Err(self.err(at, field, kind));
        }
        Ok(count)
    }

    /// An Int32 byte length, checked to be non-negative and to fit in what is left.
    fn len32(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let at = self.pos;
        let (declared, left) = (self.count(field, true, 0)?, self.left());
        if declared > left {
            return Err(self.err(at, field, K::LengthExceedsInput { declared, left }));
        }
        Ok(declared)
    }

    fn bytes32(&mut self, field: &'static str) -> Result<Vec<u8>, DecodeError> {
        let len = self.len32(field)?;
        Ok(self.take(len, "column value")?.to_vec())
    }

    /// A NUL-terminated UTF-8 string.
    fn cstring(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            let kind = K::UnterminatedString { left: rest.len() };
            return Err(self.err(self.pos, field, kind));
        };
        let bytes = rest.get(..nul).unwrap_or_default();
        let s = std::str::from_utf8(bytes).map_err(|e| self.err(self.pos + e.valid_up_to(), field, K::InvalidUtf8))?;
        self.pos += nul + 1;
        Ok(s.to_owned())
    }

    /// A tuple marker byte that must satisfy `ok`.
    fn marker(&mut self, expected: &'static str, ok: fn(u8) -> bool) -> Result<u8, DecodeError> {
        let at = self.pos;
        match self.u8("tuple marker")? {
            b if ok(b) => Ok(b),
            found => {
                let kind = K::UnexpectedByte { expected, found };
                Err(self.err(at, "tuple marker", kind))
            }
        }
    }
}

#[cfg(test)]
mod tests {
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
}
