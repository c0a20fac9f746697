//! TLS helpers shared by the connectors: one crypto provider (rustls with ring, as
//! pgwire-replication and reqwest use) and CA files.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;
use std::path::Path;

/// The crypto provider of every rustls config made here.
pub fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Makes ring the process's default rustls provider, for libraries that build their
/// configs with `ClientConfig::builder()` (the redis crate): with more than one provider
/// compiled in, rustls cannot pick one by itself. Idempotent.
pub fn install_default_provider() {
    let _ = provider().install_default();
}

/// A TLS file or URL part that cannot be used, with what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsSetupError(pub String);

/// The CA certificates of a PEM file.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsSetupError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsSetupError(format!("cannot read the CA file {}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsSetupError(format!("cannot parse the CA file {}: {e}", path.display())))?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(TlsSetupError(format!("no CA certificate in {}", path.display())));
    }
    Ok(roots)
}

/// `%XX`-decoding of URL parts (user names, passwords, query values).
pub fn percent_decode(s: &str) -> Result<String, TlsSetupError> {
    let bad = || TlsSetupError(format!("bad percent-encoding in '{s}'"));
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or_else(bad)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| TlsSetupError(format!("'{s}' is not UTF-8 once decoded")))
}
