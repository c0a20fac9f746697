//! Postgres failures, classified once: by SQLSTATE where the server sent one (the
//! replication client passes it as `… (SQLSTATE xxxxx)` in its text), by the client's own
//! error kinds otherwise. What each kind makes the runtime do is
//! [`viewkeeper_core::error`]'s table.

use super::PgSource;
use viewkeeper_core::source::SourceError;
use viewkeeper_core::ErrorKind;

/// The kind of a server error by its SQLSTATE (`None`: no code, a client-side failure).
pub fn kind_of_state(code: &str) -> ErrorKind {
    match code {
        // The slot does not exist (undefined_object at START_REPLICATION), or can no
        // longer give changes (invalidated: object_not_in_prerequisite_state).
        "42704" | "55000" => ErrorKind::SlotLost,
        // A table, database or publication that is not there; a bad parameter.
        "42P01" | "3D000" | "22023" | "42601" => ErrorKind::Unfit,
        "42501" => ErrorKind::Denied,
        c if c.starts_with("28") => ErrorKind::Denied,
        // Connection exceptions, operator intervention (shutdown, restart), insufficient
        // resources, system errors: the server is expected back.
        c if ["08", "57", "53", "58"].iter().any(|class| c.starts_with(class)) => ErrorKind::Unavailable,
        _ => ErrorKind::Remote,
    }
}

/// The kind of a tokio-postgres error.
pub fn kind_of_sql(e: &tokio_postgres::Error) -> ErrorKind {
    match e.code() {
        Some(state) => kind_of_state(state.code()),
        // No server code: the connection itself failed (refused, reset, closed, timed out).
        None => ErrorKind::Unavailable,
    }
}

/// The SQLSTATE in a server error's text (`… (SQLSTATE 42704)`).
fn sqlstate_in(text: &str) -> Option<&str> {
    let at = text.find("SQLSTATE ")? + "SQLSTATE ".len();
    text.get(at..at + 5)
}

/// The kind of a replication-stream error.
pub fn kind_of_wire(e: &pgwire_replication::PgWireError) -> ErrorKind {
    use pgwire_replication::PgWireError as W;
    match e {
        W::Io(_) | W::Task(_) => ErrorKind::Unavailable,
        W::Tls(_) => ErrorKind::Tls,
        W::Auth(_) => ErrorKind::Denied,
        W::Server(text) => sqlstate_in(text).map_or(ErrorKind::Remote, kind_of_state),
        _ => ErrorKind::Remote,
    }
}

impl PgSource {
    /// A replication-stream failure as a source error, with the fix for the kinds that
    /// stop the worker.
    pub(super) fn classify(&self, e: pgwire_replication::PgWireError) -> SourceError {
        let msg = e.to_string();
        let kind = kind_of_wire(&e);
        let message = match kind {
            ErrorKind::Tls => match &self.pg {
                Ok(pg) => format!("replication connection: {}", pg.error(&msg)),
                Err(_) => msg,
            },
            ErrorKind::SlotLost => format!(
                "{msg}: the replication slot {} is gone or invalidated; rebuild with `viewkeeper backfill` (into a new data dir)",
                self.cfg.slot
            ),
            _ => msg,
        };
        self.error(kind, message)
    }

    /// A SQL failure while `what`, as a source error.
    pub(super) fn sql_error(&self, what: &str, e: &tokio_postgres::Error) -> SourceError {
        self.error(kind_of_sql(e), format!("{what}: {}", super::connect::error_chain(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_decide_the_kind() {
        assert_eq!(kind_of_state("42704"), ErrorKind::SlotLost);
        assert_eq!(kind_of_state("42501"), ErrorKind::Denied);
        assert_eq!(kind_of_state("28P01"), ErrorKind::Denied);
        assert_eq!(kind_of_state("57P01"), ErrorKind::Unavailable);
        assert_eq!(kind_of_state("08006"), ErrorKind::Unavailable);
        assert_eq!(kind_of_state("XX000"), ErrorKind::Remote);
        assert_eq!(
            kind_of_wire(&pgwire_replication::PgWireError::Server(
                "replication slot \"s\" does not exist (SQLSTATE 42704)".into()
            )),
            ErrorKind::SlotLost
        );
        assert_eq!(
            kind_of_wire(&pgwire_replication::PgWireError::Server("no code".into())),
            ErrorKind::Remote
        );
    }
}
