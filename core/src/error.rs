//! Failures are classified once, where they happen, into an [`ErrorKind`]; what the
//! runtime does about each kind is decided here, in one exhaustive table
//! ([`ErrorKind::policy`]), with the hint an operator reads.
//!
//! Rules: a remote failure we know nothing about is transient (`Remote`: retried);
//! data that can never apply is not an error here at all but a dead letter; a source that
//! cannot work as configured stops the worker with its fix, because waiting would not heal
//! it; a sink that refuses keeps being retried (nothing is acknowledged meanwhile, so
//! nothing is lost, and the write goes through once the sink is fixed).

use crate::sink::Lost;

/// Where the failure happened: the same kind can call for another reaction at a source
/// than at a sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Source,
    Sink,
}

/// What the runtime does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Try again with backoff; nothing is acknowledged meanwhile.
    Retry,
    /// Stop the worker with the message and the hint: waiting would not heal it.
    Stop,
    /// The remote lost what it had acknowledged: re-create it and re-write from the state
    /// store, then retry.
    Recreate,
}

/// Every kind of failure, from the operator's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The remote is down, restarting, overloaded or unreachable; it is expected back.
    Unavailable,
    /// A remote failure of no known kind: treated as transient.
    Remote,
    /// TLS could not be set up (an untrusted certificate, a wrong host name, TLS refused).
    Tls,
    /// Authentication failed or a permission is missing.
    Denied,
    /// The source cannot work as configured (wal_level, replica identity, a missing table,
    /// a slot of another plugin, a bad connection string).
    Unfit,
    /// The replication slot is gone or invalidated while the state store has a checkpoint:
    /// the changes since are lost to it.
    SlotLost,
    /// A sink lost documents it had acknowledged.
    Lost(Lost),
    /// The local state store failed (disk full, corruption).
    Storage,
}

impl ErrorKind {
    /// The one policy table.
    pub fn policy(self, side: Side) -> Policy {
        match (self, side) {
            (ErrorKind::Unavailable | ErrorKind::Remote, _) => Policy::Retry,
            (ErrorKind::Lost(_), _) => Policy::Recreate,
            (ErrorKind::Tls | ErrorKind::Denied, Side::Sink) => Policy::Retry,
            (ErrorKind::Tls | ErrorKind::Denied | ErrorKind::Unfit | ErrorKind::SlotLost, Side::Source) => Policy::Stop,
            (ErrorKind::Unfit, Side::Sink) => Policy::Retry,
            (ErrorKind::SlotLost, Side::Sink) => Policy::Stop,
            (ErrorKind::Storage, _) => Policy::Stop,
        }
    }

    /// What an operator can do about it.
    pub fn hint(self) -> &'static str {
        match self {
            ErrorKind::Unavailable => "it is retried with backoff; check that the server is up and reachable",
            ErrorKind::Remote => "it is retried with backoff; the server's message says more",
            ErrorKind::Tls => "check sslmode/sslrootcert (Postgres), ca_file and the host name in the URL",
            ErrorKind::Denied => "check the user, its password and its permissions (see the README's least-privilege section)",
            ErrorKind::Unfit => "fix the database or the config as the message says, then start again",
            ErrorKind::SlotLost => "rebuild with `viewkeeper backfill` into a new data dir; viewkeeper never silently restarts from a new slot",
            ErrorKind::Lost(_) => "every document the sink lost is written again from the state store",
            ErrorKind::Storage => "check the data dir (free space, permissions), then start again",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_stop_where_waiting_would_not_heal_and_sinks_keep_retrying() {
        assert_eq!(ErrorKind::Remote.policy(Side::Source), Policy::Retry);
        assert_eq!(ErrorKind::Tls.policy(Side::Source), Policy::Stop);
        assert_eq!(ErrorKind::Tls.policy(Side::Sink), Policy::Retry);
        assert_eq!(ErrorKind::SlotLost.policy(Side::Source), Policy::Stop);
        assert_eq!(ErrorKind::Lost(Lost::Sink).policy(Side::Sink), Policy::Recreate);
        assert_eq!(ErrorKind::Storage.policy(Side::Sink), Policy::Stop);
        assert!(ErrorKind::SlotLost.hint().contains("backfill"));
    }
}
