//! `[sources.NAME]` with `kind = "postgres"`: one database, read through its own slot
//! and publication. Defaults are named; [`PostgresConfig::validate`] names the key path of
//! every problem.

use super::connect::PgConnector;
use serde::Deserialize;
use viewkeeper_core::secret::SecretUrl;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user[:password]@host:port/database[?sslmode=verify-full&sslrootcert=/ca.crt]`
    /// (TLS as in libpq: see [`super::connect`]).
    pub url: SecretUrl,
    /// Logical replication slot (created when missing).
    pub slot: String,
    /// Publication over the source's tables (created when missing).
    pub publication: String,
    /// How often standby status updates report the checkpoint.
    #[serde(default = "PostgresConfig::default_status_interval_ms")]
    pub status_interval_ms: u64,
    /// `initial` (default): when the slot is created, read the rows that already exist,
    /// then stream. `never`: stream only what changes from then on.
    #[serde(default)]
    pub snapshot: SnapshotMode,
    /// Warn when the slot retains more WAL than this (and see
    /// `viewkeeper_slot_retained_wal_bytes`); an initial snapshot pauses to stream the
    /// slot when it does. Default 1 GiB.
    #[serde(default = "PostgresConfig::default_max_retained_wal_bytes")]
    pub max_retained_wal_bytes: u64,
    /// Heartbeat while streaming (`pg_logical_emit_message`; 0: off), so the slot of a
    /// database whose published tables do not change still advances.
    #[serde(default = "PostgresConfig::default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// Rows per chunk of the initial snapshot and of re-reads (one batch each; progress is
    /// stored per chunk).
    #[serde(default = "PostgresConfig::default_snapshot_chunk_rows")]
    pub snapshot_chunk_rows: usize,
    /// A transaction with more changes than this goes to the engine in chunks of this
    /// many (checkpointed at its commit), so memory stays bounded whatever its size.
    #[serde(default = "PostgresConfig::default_transaction_chunk_changes")]
    pub transaction_chunk_changes: usize,
}

#[derive(Debug, Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMode {
    #[default]
    Initial,
    Never,
}

impl PostgresConfig {
    fn default_status_interval_ms() -> u64 {
        1_000
    }
    fn default_max_retained_wal_bytes() -> u64 {
        1 << 30
    }
    fn default_heartbeat_interval_ms() -> u64 {
        60_000
    }
    fn default_snapshot_chunk_rows() -> usize {
        super::chunks::CHUNK_ROWS
    }
    fn default_transaction_chunk_changes() -> usize {
        5_000
    }

    /// The connector for the URL (its TLS settings parsed, the CA file read).
    pub fn connector(&self) -> Result<PgConnector, super::connect::BadUrl> {
        PgConnector::parse(self.url.expose())
    }

    /// Connects to the source's database; the connection is driven by the returned task.
    pub async fn connect(
        &self,
    ) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), super::connect::PgConnectError> {
        self.connector()
            .map_err(super::connect::PgConnectError::from)?
            .connect()
            .await
    }

    /// Problems of this source, each starting with its key path `path`.
    pub fn validate(&self, path: &str, out: &mut Vec<String>) {
        if let Err(e) = self.connector() {
            out.push(format!("{path}.url: not a usable Postgres connection string ({e}); e.g. postgres://postgres@127.0.0.1:54329/catalog?sslmode=verify-full&sslrootcert=/etc/viewkeeper/ca.crt"));
        }
        if self.snapshot_chunk_rows == 0 {
            out.push(format!("{path}.snapshot_chunk_rows: must be at least 1"));
        }
        if self.transaction_chunk_changes == 0 {
            out.push(format!("{path}.transaction_chunk_changes: must be at least 1"));
        }
    }
}
