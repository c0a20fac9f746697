//! Connecting to Postgres with the TLS the connection string asks for, libpq's way.
//!
//! `sslmode` (`disable`, `prefer` (the default), `require`, `verify-ca`, `verify-full`)
//! and `sslrootcert` (a PEM file of CA certificates) are read from the URL or key=value
//! string and removed before tokio-postgres parses the rest (it knows neither
//! `verify-*` nor `sslrootcert`). As in libpq:
//!
//! * `prefer` encrypts when the server offers TLS and does not check its certificate;
//! * `require` insists on TLS, and checks the chain only when `sslrootcert` is given;
//! * `verify-ca` checks the chain; `verify-full` the chain and that the certificate names
//!   the host of the URL (with `hostaddr=`, the address connected to and the name checked
//!   differ, as in libpq). Known gap: the replication stream's own TLS
//!   (`pgwire-replication` 0.5) only knows rustls's older name-mismatch error, so under
//!   `verify-ca` it still refuses a certificate that does not name the host (stricter,
//!   never weaker; the error says so).
//!
//! Without `sslrootcert` the `verify-*` modes trust the Mozilla roots (webpki-roots).
//! One [`PgConnector`] serves both protocols: the SQL connections (tokio-postgres with
//! rustls) and the replication stream (`pgwire-replication`, whose rustls setup gets the
//! same mode and CA file via [`PgConnector::replication_tls`]).

use crate::tls::{load_roots, percent_decode};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres::Client;
use viewkeeper_core::ErrorKind;

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<Self, BadUrl> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            "allow" => {
                return Err(BadUrl(
                    "sslmode=allow is not supported; use disable, prefer, require, verify-ca or verify-full".into(),
                ))
            }
            _ => {
                return Err(BadUrl(format!(
                    "unknown sslmode '{s}'; use disable, prefer, require, verify-ca or verify-full"
                )))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// A connection string (or its CA file) that cannot be used, with what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadUrl(pub String);

impl From<crate::tls::TlsSetupError> for BadUrl {
    fn from(e: crate::tls::TlsSetupError) -> Self {
        BadUrl(e.0)
    }
}

/// A failed connection, classified: TLS itself failing (the certificate is not trusted or
/// does not name the host, the server refuses TLS that the URL requires) is a setup
/// problem that retrying does not fix; a refused login is one too.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct PgConnectError {
    pub message: String,
    pub kind: ErrorKind,
}

impl From<BadUrl> for PgConnectError {
    fn from(e: BadUrl) -> Self {
        PgConnectError {
            message: format!("bad connection string: {e}"),
            kind: ErrorKind::Unfit,
        }
    }
}

/// How to reach one Postgres database: the parsed connection string and its TLS setup.
#[derive(Clone)]
pub struct PgConnector {
    config: tokio_postgres::Config,
    mode: SslMode,
    root_cert: Option<PathBuf>,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

impl std::fmt::Debug for PgConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // tokio-postgres's Config Debug redacts the password.
        f.debug_struct("PgConnector")
            .field("config", &self.config)
            .field("sslmode", &self.mode)
            .field("sslrootcert", &self.root_cert)
            .finish()
    }
}

impl std::str::FromStr for PgConnector {
    type Err = BadUrl;
    fn from_str(s: &str) -> Result<Self, BadUrl> {
        PgConnector::parse(s)
    }
}

/// Splits `sslmode` and `sslrootcert` off a connection string (URL or key=value form).
fn split_tls_params(url: &str) -> Result<(String, Option<String>, Option<String>), BadUrl> {
    let mut mode = None;
    let mut root = None;
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_string(), None, None));
        };
        let mut kept = Vec::new();
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            match kv.split_once('=') {
                Some(("sslmode", v)) => mode = Some(percent_decode(v)?),
                Some(("sslrootcert", v)) => root = Some(percent_decode(v)?),
                _ => kept.push(kv),
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        Ok((rest, mode, root))
    } else {
        let mut kept = Vec::new();
        for kv in url.split_whitespace() {
            if let Some(v) = kv.strip_prefix("sslmode=") {
                mode = Some(v.trim_matches('\'').to_string());
            } else if let Some(v) = kv.strip_prefix("sslrootcert=") {
                root = Some(v.trim_matches('\'').to_string());
            } else {
                kept.push(kv);
            }
        }
        Ok((kept.join(" "), mode, root))
    }
}

/// An error with its causes (tokio-postgres's own text is only "error performing TLS
/// handshake" or "db error"; the reason is in the cause).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(crate::tls::provider())
}

impl PgConnector {
    /// Parses a connection string; reads the CA file when one is named.
    pub fn parse(url: &str) -> Result<Self, BadUrl> {
        let (rest, mode, root) = split_tls_params(url)?;
        let mode = mode.as_deref().map(SslMode::parse).transpose()?.unwrap_or_default();
        let mut config: tokio_postgres::Config =
            rest.parse().map_err(|e: tokio_postgres::Error| BadUrl(e.to_string()))?;
        let root_cert = root.map(PathBuf::from);
        // libpq: `require` with a root certificate verifies the chain, like verify-ca.
        let mode = match (mode, &root_cert) {
            (SslMode::Require, Some(_)) => SslMode::VerifyCa,
            (m, _) => m,
        };
        config.ssl_mode(match mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            _ => PgSslMode::Require,
        });
        let tls = match mode {
            SslMode::Disable => None,
            _ => Some(tokio_postgres_rustls::MakeRustlsConnect::new(client_config(
                mode,
                root_cert.as_deref(),
            )?)),
        };
        Ok(PgConnector {
            config,
            mode,
            root_cert,
            tls,
        })
    }

    /// The parsed connection settings (`sslmode` as tokio-postgres knows it).
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    pub fn ssl_mode(&self) -> SslMode {
        self.mode
    }

    /// `host:port` of the first host, for messages.
    pub fn endpoint(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        format!("{host}:{port}")
    }

    /// Connects; the connection is driven by a spawned task (ends when the client drops).
    pub async fn connect(&self) -> Result<(Client, tokio::task::JoinHandle<()>), PgConnectError> {
        let r = match &self.tls {
            None => self.config.connect(tokio_postgres::NoTls).await.map(|(c, conn)| {
                (
                    c,
                    tokio::spawn(async move {
                        let _ = conn.await;
                    }),
                )
            }),
            Some(tls) => self.config.connect(tls.clone()).await.map(|(c, conn)| {
                (
                    c,
                    tokio::spawn(async move {
                        let _ = conn.await;
                    }),
                )
            }),
        };
        r.map_err(|e| {
            let kind = super::errors::kind_of_sql(&e);
            let mut err = self.error(&error_chain(&e));
            if err.kind != ErrorKind::Tls {
                err.kind = kind;
            }
            err
        })
    }

    /// A connection failure as a [`PgConnectError`] that says what to check.
    pub fn error(&self, e: &str) -> PgConnectError {
        let cert = e.contains("invalid peer certificate") || e.contains("certificate");
        let refused = e.contains("server does not support TLS") || e.contains("SSLRequest rejected");
        let hint = if cert && (e.contains("NotValidForName") || e.contains("not valid for name")) {
            let fix = if self.mode == SslMode::VerifyCa {
                "the replication stream (pgwire-replication 0.5) checks the name even under verify-ca: connect by a name the certificate has"
            } else {
                "connect by a name the certificate has, or use verify-ca"
            };
            format!(
                "; the server's certificate does not name host {} (sslmode={}: {fix})",
                self.endpoint(),
                self.mode.as_str()
            )
        } else if cert {
            format!(
                "; the server's certificate is not trusted (sslmode={}, sslrootcert={}: it must be the CA that signed the server's certificate)",
                self.mode.as_str(),
                self.root_cert
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "none: Mozilla roots".into())
            )
        } else if refused {
            format!(
                "; sslmode={} needs TLS but the server does not offer it (enable ssl on the server or change sslmode)",
                self.mode.as_str()
            )
        } else {
            String::new()
        };
        PgConnectError {
            message: format!("cannot connect to {}: {e}{hint}", self.endpoint()),
            kind: if cert || refused {
                ErrorKind::Tls
            } else {
                ErrorKind::Unavailable
            },
        }
    }

    /// The same TLS setup for `pgwire-replication` (its own rustls stack). `host`: the
    /// name the certificate must carry (the URL's host; the replication client connects
    /// to `hostaddr` when one is given).
    pub fn replication_tls(&self, host: &str) -> pgwire_replication::TlsConfig {
        use pgwire_replication::TlsConfig;
        let ca = self.root_cert.clone();
        let tls = match self.mode {
            SslMode::Disable => TlsConfig::disabled(),
            SslMode::Prefer => TlsConfig {
                mode: pgwire_replication::SslMode::Prefer,
                ..TlsConfig::disabled()
            },
            SslMode::Require => TlsConfig::require(),
            SslMode::VerifyCa => TlsConfig::verify_ca(ca),
            SslMode::VerifyFull => TlsConfig::verify_full(ca),
        };
        // pgwire-replication refuses verify-full towards an IP literal unless the name to
        // verify is given explicitly; rustls checks IP addresses in the certificate fine.
        if self.mode != SslMode::Disable {
            tls.with_sni_hostname(host)
        } else {
            tls
        }
    }
}

fn client_config(mode: SslMode, root_cert: Option<&Path>) -> Result<ClientConfig, BadUrl> {
    let roots = match root_cert {
        Some(p) => load_roots(p)?,
        None => RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| BadUrl(format!("TLS setup: {e}")))?;
    let roots = Arc::new(roots);
    let mut cfg = builder.with_root_certificates(roots.clone()).with_no_client_auth();
    match mode {
        SslMode::VerifyFull | SslMode::Disable => {}
        SslMode::VerifyCa => {
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
                .build()
                .map_err(|e| BadUrl(format!("TLS setup: {e}")))?;
            cfg.dangerous().set_certificate_verifier(Arc::new(ChainOnly(inner)));
        }
        SslMode::Prefer | SslMode::Require => {
            cfg.dangerous().set_certificate_verifier(Arc::new(NoCheck(provider())));
        }
    }
    Ok(cfg)
}

/// `verify-ca`: the chain must lead to a trusted CA; the names in it are not checked.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer`/`require` (libpq's meaning): encryption without checking who answers. The
/// handshake signatures are still verified.
#[derive(Debug)]
struct NoCheck(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoCheck {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_of_urls_and_key_value_strings() {
        let c =
            PgConnector::parse("postgres://u:pw@db.example:5433/cat?sslmode=verify-full&application_name=x").unwrap();
        assert_eq!(c.ssl_mode(), SslMode::VerifyFull);
        assert_eq!(c.config().get_ssl_mode(), PgSslMode::Require);
        assert_eq!(c.config().get_application_name(), Some("x"));
        assert_eq!(c.endpoint(), "db.example:5433");
        let c = PgConnector::parse("postgres://u@h/db").unwrap();
        assert_eq!(c.ssl_mode(), SslMode::Prefer);
        let c = PgConnector::parse("host=h dbname=d sslmode=disable").unwrap();
        assert_eq!(c.ssl_mode(), SslMode::Disable);
        assert_eq!(c.config().get_dbname(), Some("d"));
        let err = PgConnector::parse("postgres://u@h/db?sslmode=verify-full&sslrootcert=%2Fnone%2Fca.crt").unwrap_err();
        assert!(err.0.contains("cannot read the CA file /none/ca.crt"), "{err}");
        let err = PgConnector::parse("postgres://u@h/db?sslmode=strict").unwrap_err();
        assert!(err.0.contains("unknown sslmode 'strict'"), "{err}");
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let path = std::env::temp_dir().join(format!("vk-connect-empty-{}.pem", std::process::id()));
        std::fs::write(&path, "").unwrap();
        let err = PgConnector::parse(&format!(
            "postgres://u@h/db?sslmode=require&sslrootcert={}",
            path.display()
        ))
        .unwrap_err();
        assert!(err.0.contains("no CA certificate in"), "{err}");
        let _ = std::fs::remove_file(&path);
    }
}
