//! viewkeeper's data model and projections: rows in, documents out, no I/O.
//!
//! The vocabulary (changes, keys, positions, tombstones) is `viewkeeper-core`'s.
//! * [`spec`]: the declarative table and projection specs of the config file.
//! * [`render`]: rendering whole documents from rows, and fan-out (which documents a
//!   row change affects).
//! * [`mem`]: an in-memory row set implementing the lookup, for tests and tools.

pub mod mem;
pub mod render;
pub mod spec;

#[cfg(test)]
mod render_tests;
