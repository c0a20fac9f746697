//! `[sinks.NAME]` with `kind = "elasticsearch"` (or `"opensearch"`: the same).

use serde::Deserialize;
use std::path::PathBuf;
use viewkeeper_core::secret::{Secret, SecretUrl};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchConfig {
    /// `http(s)://[user:password@]host:port`: a user and password in the URL are sent as
    /// HTTP basic authentication.
    pub url: SecretUrl,
    /// An Elasticsearch API key (the base64 `encoded` form the API returns), sent as
    /// `Authorization: ApiKey …`; instead of a user and password.
    #[serde(default)]
    pub api_key: Option<Secret>,
    /// A PEM file of the CA certificates that sign the server's (HTTPS); without it the
    /// Mozilla roots. The host name is always checked.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A bulk request is cut once it passes this size.
    #[serde(default = "SearchConfig::default_max_bulk_bytes")]
    pub max_bulk_bytes: usize,
    /// Rounds of retrying only the items refused with 429/5xx within one write.
    #[serde(default = "SearchConfig::default_item_retries")]
    pub item_retries: usize,
    #[serde(default = "SearchConfig::default_request_timeout_ms")]
    pub request_timeout_ms: u64,
}

impl SearchConfig {
    fn default_max_bulk_bytes() -> usize {
        5 * 1024 * 1024
    }
    fn default_item_retries() -> usize {
        3
    }
    fn default_request_timeout_ms() -> u64 {
        30_000
    }

    /// Problems of this sink, each starting with its key path `path`.
    pub fn validate(&self, path: &str, out: &mut Vec<String>) {
        let url = self.url.expose();
        if !url.starts_with("http://") && !url.starts_with("https://") {
            out.push(format!("{path}.url: must start with http:// or https://"));
        }
        if let Some(ca) = &self.ca_file {
            if !url.starts_with("https://") {
                out.push(format!("{path}.ca_file: only for HTTPS; use an https:// URL"));
            }
            if let Err(err) = crate::tls::load_roots(ca) {
                out.push(format!("{path}.ca_file: {err}"));
            }
        }
        if self.api_key.is_some() && self.url.redacted() != *self.url.expose() {
            out.push(format!(
                "{path}.api_key: give either an API key or a user and password in the URL, not both"
            ));
        }
    }
}
