//! viewkeeper's connectors, one folder each, one shape each (a config, a client, pure
//! request/decoding code, tests):
//!
//! * [`sources`]: turn committed row changes into [`viewkeeper_core::model::Change`]s
//!   (Postgres pgoutput, Debezium topics).
//! * [`sinks`]: write rendered documents (Redis, Elasticsearch/OpenSearch, a blackhole).
//!
//! They depend on `viewkeeper-core` (the vocabulary and contracts) only, not on the
//! renderer: what a sink needs of a projection comes as a [`viewkeeper_core::sink::Target`].

pub mod sinks;
pub mod sources;
pub mod tls;

#[cfg(test)]
mod fuzz_tests;
