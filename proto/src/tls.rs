//! TLS for the coordinator's gRPC, with rustls (through tonic): the coordinator presents a
//! certificate, workers check it against a CA (or the public web roots), and with a client
//! CA the coordinator also demands a certificate from every worker (mTLS). PEM files
//! throughout; every file is read and checked when the program starts, so a bad one is an
//! error naming its flag and path, not a server that silently never starts.

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Why the TLS set-up failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{flag} {path}: {source}")]
    Read {
        /// The flag that named it.
        flag: &'static str,
        /// The file.
        path: String,
        /// The failure.
        source: std::io::Error,
    },
    /// A file holds no PEM block of the kind expected.
    #[error("{flag} {path}: no {what} in PEM format")]
    NotPem {
        /// The flag that named it.
        flag: &'static str,
        /// The file.
        path: String,
        /// What was expected.
        what: &'static str,
    },
    /// A certificate and key that must come together came alone.
    #[error("{0}")]
    Incomplete(&'static str),
}

/// Picks rustls's ring provider for the process. rustls panics at the first TLS use when
/// more than one provider is compiled in (object_store brings aws-lc-rs), so every entry
/// point below calls this first; later calls are no-ops.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A PEM file holding a certificate, as named in messages and found by its block marker.
const CERTIFICATE: (&str, &[u8]) = ("certificate", b"-----BEGIN CERTIFICATE-----");
/// A PEM file holding a private key (PKCS#8, RSA or EC: all end their marker so).
const PRIVATE_KEY: (&str, &[u8]) = ("private key", b"PRIVATE KEY-----");

fn read_pem(
    flag: &'static str,
    path: &Path,
    (what, marker): (&'static str, &[u8]),
) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.display().to_string(),
        source,
    })?;
    if !bytes.windows(marker.len()).any(|w| w == marker) {
        return Err(TlsError::NotPem { flag, path: path.display().to_string(), what });
    }
    Ok(bytes)
}

/// The coordinator's side: `cert` and `key` (PEM), and a CA whose certificates workers
/// must present when `client_ca` is given.
pub fn server_config(
    cert: Option<&Path>,
    key: Option<&Path>,
    client_ca: Option<&Path>,
) -> Result<Option<ServerTlsConfig>, TlsError> {
    install_crypto_provider();
    let (cert, key) = match (cert, key) {
        (Some(c), Some(k)) => (c, k),
        (None, None) if client_ca.is_none() => return Ok(None),
        (None, None) => {
            return Err(TlsError::Incomplete("--tls-client-ca needs --tls-cert and --tls-key"));
        }
        _ => return Err(TlsError::Incomplete("--tls-cert and --tls-key go together")),
    };
    let identity = Identity::from_pem(
        read_pem("--tls-cert", cert, CERTIFICATE)?,
        read_pem("--tls-key", key, PRIVATE_KEY)?,
    );
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = client_ca {
        config = config.client_ca_root(Certificate::from_pem(read_pem(
            "--tls-client-ca",
            ca,
            CERTIFICATE,
        )?));
    }
    Ok(Some(config))
}

/// A worker's (or `coordinator status`'s) side, for an `https://` coordinator URL: trust
/// `ca` (else the public web roots) and present `cert`/`key` when given (mTLS).
pub fn client_config(
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<ClientTlsConfig, TlsError> {
    install_crypto_provider();
    let mut config = ClientTlsConfig::new();
    config = match ca {
        Some(ca) => {
            config.ca_certificate(Certificate::from_pem(read_pem("--tls-ca", ca, CERTIFICATE)?))
        }
        None => config.with_webpki_roots(),
    };
    match (cert, key) {
        (Some(c), Some(k)) => Ok(config.identity(Identity::from_pem(
            read_pem("--tls-cert", c, CERTIFICATE)?,
            read_pem("--tls-key", k, PRIVATE_KEY)?,
        ))),
        (None, None) => Ok(config),
        _ => Err(TlsError::Incomplete("--tls-cert and --tls-key go together")),
    }
}

/// `client_config`, or none when no file is given (then the URL's scheme decides).
pub fn client_config_if(
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<Option<ClientTlsConfig>, TlsError> {
    if ca.is_none() && cert.is_none() && key.is_none() {
        return Ok(None);
    }
    client_config(ca, cert, key).map(Some)
}

/// A channel to the coordinator at `url`: TLS when it is `https://`, with `tls` (or the
/// defaults of `client_config(None, None, None)`).
pub fn endpoint(
    url: &str,
    tls: Option<ClientTlsConfig>,
) -> Result<tonic::transport::Endpoint, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("--coordinator {url}: {e}"))?;
    if !url.starts_with("https://") {
        if tls.is_some() {
            return Err(format!("--coordinator {url}: TLS flags need an https:// URL"));
        }
        return Ok(endpoint);
    }
    install_crypto_provider();
    let tls = tls.unwrap_or_else(|| ClientTlsConfig::new().with_webpki_roots());
    endpoint.tls_config(tls).map_err(|e| format!("--coordinator {url}: TLS: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_name_their_flag() {
        let dir = std::env::temp_dir().join(format!("ct-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate").expect("write");
        let e = client_config(Some(&junk), None, None).expect_err("junk CA");
        assert!(e.to_string().starts_with("--tls-ca ") && e.to_string().contains("no certificate"));
        let missing = dir.join("missing.pem");
        let e = server_config(Some(&missing), Some(&junk), None).expect_err("missing cert");
        assert!(e.to_string().starts_with("--tls-cert "), "{e}");
        let e = server_config(Some(&junk), None, None).expect_err("cert without key");
        assert_eq!(e.to_string(), "--tls-cert and --tls-key go together");
        assert!(server_config(None, None, None).expect("no TLS").is_none());
        assert!(endpoint("http://127.0.0.1:1", Some(ClientTlsConfig::new())).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
