//! viewkeeper keeps denormalized read models (Elasticsearch/OpenSearch documents and
//! Redis caches) in step with the databases of many services, from PostgreSQL logical
//! replication or Debezium topics. Each module states its contract.
//!
//! The data flow, in folders: `viewkeeper-connectors`' sources → [`engine`] (apply to the
//! [`store`], render with `viewkeeper-projections`, write) → the connectors' sinks; the
//! [`commands`] wire them for each subcommand; [`config`] is the one config file.

pub mod commands;
pub mod config;
pub mod engine;
pub mod failpoint;
pub mod http;
pub mod logging;
pub mod status_page;
pub mod store;
pub mod wait;
