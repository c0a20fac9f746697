//! PostgreSQL logical replication source (pgoutput over `pgwire-replication`).
//!
//! * [`pgoutput`]: the wire decoder (bytes → messages), pure and panic-free.
//! * [`values`]: text-format values → JSON, by type OID.
//! * [`decode`]: messages of a transaction → [`viewkeeper_projections::model::Change`]s.
//! * [`snapshot`]: the initial snapshot under a new slot's exported snapshot.
//! * [`connect`]: connections with the URL's TLS settings (`sslmode`, `sslrootcert`).
//! * [`source`]: publication/slot setup, streaming, acknowledgement.

pub mod connect;
pub mod decode;
pub mod pgoutput;
pub mod reload;
pub mod snapshot;
pub mod source;
pub mod values;

pub use connect::{PgConnectError, PgConnector};
