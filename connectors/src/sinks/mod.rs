//! Sinks: where rendered documents go. Each implements [`viewkeeper_core::sink::Sink`]
//! and lives in its own folder with its config.
//!
//! * [`redis`]: per-service caches, one hash per document, compare-and-set by version.
//! * [`elasticsearch`]: Elasticsearch 8 / OpenSearch 2, bulk writes through an alias.
//! * [`blackhole`]: counts and discards (measurements).

pub mod blackhole;
pub mod elasticsearch;
pub mod redis;
