//! The blackhole sink (`kind = "blackhole"`): takes every document, keeps none, counts
//! them (`viewkeeper_blackhole_documents_total{sink}`), to measure sources, joins and
//! rendering without a sink's cost. `verify` skips its projections.

use futures_util::future::BoxFuture;
use serde::Deserialize;
use viewkeeper_core::sink::{Rejection, Sink, SinkDoc, SinkError, Target};

/// `[sinks.NAME]` with `kind = "blackhole"`: nothing to set.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlackholeConfig {}

pub struct BlackholeSink {
    name: String,
}

impl BlackholeSink {
    pub fn new(name: &str) -> Self {
        BlackholeSink { name: name.to_string() }
    }
}

impl Sink for BlackholeSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn write<'a>(
        &'a self,
        _target: &'a Target,
        docs: &'a [SinkDoc],
    ) -> BoxFuture<'a, Result<Vec<Rejection>, SinkError>> {
        metrics::counter!("viewkeeper_blackhole_documents_total", "sink" => self.name.clone())
            .increment(docs.len() as u64);
        Box::pin(async { Ok(vec![]) })
    }
}
