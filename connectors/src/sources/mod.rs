//! Sources: where committed row changes come from. Each implements
//! [`viewkeeper_core::source::Source`] and lives in its own folder with its config.
//!
//! * [`postgres`]: logical replication (pgoutput) from one database.
//! * [`debezium`]: a Debezium connector's topics in Kafka.

pub mod debezium;
pub mod postgres;
