//! viewkeeper's vocabulary and contracts, shared by every other crate and depending on
//! none of them: the pgoutput decoder, the renderer and the sinks meet here.
//!
//! * [`model`]: changes, keys, positions, row images, tombstones.
//! * [`checkpoint`]: where a source resumes (an LSN, or a Kafka batch sequence).
//! * [`source`] and [`sink`]: the [`source::Source`] and [`sink::Sink`] traits and what
//!   flows through them, each with its ordering, durability and duplicate rules.
//! * [`durable`]: how far each source is durable everywhere (read-your-writes waits).
//! * [`dead_letter`]: what could not apply, render or be written, and at which stage.
//! * [`error`]: every failure's kind and the one policy table (retry, stop, recreate).
//! * [`retry`]: the one backoff every retry loop uses.
//! * [`secret`]: connection strings and keys that never reach a log.

pub mod checkpoint;
pub mod dead_letter;
pub mod durable;
pub mod error;
pub mod model;
pub mod retry;
pub mod secret;
pub mod sink;
pub mod source;

pub use checkpoint::Checkpoint;
pub use dead_letter::{DeadLetter, Stage};
pub use durable::{Durable, DurableTx};
pub use error::{ErrorKind, Policy, Side};
