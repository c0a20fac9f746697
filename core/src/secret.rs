//! Secrets in the config: connection strings whose password never reaches a log, keys
//! shown as `***`, librdkafka properties whose secret values are redacted. Each may be
//! given inline or as `{ file = "…" }` (Docker/Kubernetes secrets).

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

/// A connection string whose password never reaches logs. In the config either the
/// string itself or `{ file = "/run/secrets/pg_url" }`: the file's content (one line,
/// surrounding whitespace trimmed), so the secret need not sit in the config or the
/// environment (Docker/Kubernetes secrets).
#[derive(Clone)]
pub struct SecretUrl(pub String);

impl<'de> Deserialize<'de> for SecretUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Inline(String),
            File { file: PathBuf },
        }
        match Form::deserialize(d)? {
            Form::Inline(s) => Ok(SecretUrl(s)),
            Form::File { file } => std::fs::read_to_string(&file)
                .map(|s| SecretUrl(s.trim().to_string()))
                .map_err(|e| serde::de::Error::custom(format!("cannot read the secret file {}: {e}", file.display()))),
        }
    }
}

impl SecretUrl {
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        let s = &self.0;
        if let Some(scheme_end) = s.find("://") {
            let rest = &s[scheme_end + 3..];
            let auth_end = rest.find('/').unwrap_or(rest.len());
            if let Some(at) = rest[..auth_end].rfind('@') {
                if let Some(colon) = rest[..at].find(':') {
                    return format!("{}{}:***{}", &s[..scheme_end + 3], &rest[..colon], &rest[at..]);
                }
            }
        }
        // key=value form: password=...
        s.split_whitespace()
            .map(|kv| {
                if kv.starts_with("password=") {
                    "password=***"
                } else {
                    kv
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

/// A secret that is not a URL (an API key): the string itself or `{ file = "…" }`, like
/// [`SecretUrl`]; shown as `***` in `Debug` and `check-config`.
#[derive(Clone)]
pub struct Secret(pub String);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        SecretUrl::deserialize(d).map(|s| Secret(s.0))
    }
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// librdkafka properties; the values of secret ones (`sasl.password`, `ssl.key.password`,
/// `sasl.jaas.config`, …: any key naming a password, secret, key or JAAS config) are
/// `***` in `Debug` and `check-config`. A value may also be `{ file = "…" }`.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct KafkaProperties(pub BTreeMap<String, Secret>);

impl KafkaProperties {
    pub fn is_secret(key: &str) -> bool {
        let k = key.to_ascii_lowercase();
        ["password", "secret", "jaas", ".key.pem", "ssl.key", "keystore", "token"]
            .iter()
            .any(|w| k.contains(w))
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }

    /// The plain values, for librdkafka.
    pub fn exposed(&self) -> BTreeMap<String, String> {
        self.0.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect()
    }
}

impl fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| {
                let shown = if Self::is_secret(k) { "***" } else { v.0.as_str() };
                (k, shown)
            }))
            .finish()
    }
}
