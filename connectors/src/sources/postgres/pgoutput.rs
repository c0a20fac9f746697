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
#[path = "pgoutput_tests.rs"]
mod tests;
