//! viewkeeper keeps denormalized read models (Elasticsearch/OpenSearch documents and
//! Redis caches) in step with the databases of many services, from PostgreSQL logical
//! replication. See DESIGN.md for the contract; each module states its invariants.

pub mod admin;
pub mod config;
pub mod engine;
pub mod failpoint;
pub mod http;
pub mod logging;
pub mod store;
pub mod verify;
pub mod worker;
