//! `[sinks.NAME]` with `kind = "redis"`.

use serde::Deserialize;
use std::path::PathBuf;
use viewkeeper_core::secret::SecretUrl;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`, or `rediss://…` for TLS (the host name
    /// is checked against the server's certificate).
    pub url: SecretUrl,
    /// A PEM file of the CA certificates that sign the server's (with `rediss://`);
    /// without it the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Commands per pipelined round trip.
    #[serde(default = "RedisConfig::default_pipeline")]
    pub pipeline: usize,
}

impl RedisConfig {
    fn default_pipeline() -> usize {
        256
    }

    /// Problems of this sink, each starting with its key path `path`.
    pub fn validate(&self, path: &str, out: &mut Vec<String>) {
        let url = self.url.expose();
        if !url.starts_with("redis://") && !url.starts_with("rediss://") {
            out.push(format!("{path}.url: must start with redis:// or rediss://"));
        }
        if self.pipeline == 0 {
            out.push(format!("{path}.pipeline: must be at least 1"));
        }
        if let Some(ca) = &self.ca_file {
            if !url.starts_with("rediss://") {
                out.push(format!("{path}.ca_file: only for TLS; use a rediss:// URL"));
            }
            if let Err(e) = crate::tls::load_roots(ca) {
                out.push(format!("{path}.ca_file: {e}"));
            }
        }
    }
}
