//! viewkeeper's connectors: sources that turn committed row changes into
//! [`viewkeeper_projections::model::Change`]s, and sinks that write rendered
//! documents. Each connector lives in its own folder.

pub mod debezium;
pub mod elasticsearch;
pub mod kafka;
pub mod postgres;
pub mod redis;
pub mod sink;
pub mod source;
pub mod tls;

#[cfg(test)]
mod fuzz_tests;
