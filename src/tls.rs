//! TLS with rustls (ring provider) on both legs.
//!
//! Toward clients, wsgate presents a certificate chain from PEM files and offers ALPN
//! `h2` and `http/1.1`. The files are re-read periodically and on SIGHUP: a Kubernetes
//! Secret update swaps them in place, and new handshakes get the new certificate while
//! open connections carry on. A new pair that does not load is logged and the previous
//! one kept.
//!
//! Toward the backend (`https://` URLs), the server certificate is verified against the
//! system roots or a configured CA bundle, optionally with a client certificate (mTLS)
//! and a configured server name.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::{BackendTlsConfig, TlsConfig};
use crate::error::TlsError;

/// Makes ring the process-wide crypto provider (it builds in half the time of
/// aws-lc-rs and halves the binary). Idempotent; call before any TLS setup.
pub fn install_provider() {
    // An error means a provider is installed already: keep it.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    install_provider();
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            what: format!("bad certificate PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            what: "no certificate found".into(),
        });
    }
    Ok(certs)
}

fn key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        what: format!("no usable private key: {e}"),
    })
}

/// The certificate wsgate presents to clients, swappable while serving.
pub struct ServerCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// The file contents `current` was built from, to notice changes.
    loaded: Mutex<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerCert")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

/// A certificate and key as loaded, with the file contents they came from.
struct Loaded {
    certified: Arc<CertifiedKey>,
    files: (Vec<u8>, Vec<u8>),
}

impl ServerCert {
    fn load(cert_path: &Path, key_path: &Path) -> Result<Loaded, TlsError> {
        let cert_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        let chain = certs(cert_path, &cert_pem)?;
        let key = key(key_path, &key_pem)?;
        let certified = CertifiedKey::from_der(chain, key, &provider())?;
        Ok(Loaded {
            certified: Arc::new(certified),
            files: (cert_pem, key_pem),
        })
    }

    pub fn new(config: &TlsConfig) -> Result<ServerCert, TlsError> {
        let loaded = Self::load(&config.cert, &config.key)?;
        Ok(ServerCert {
            cert_path: config.cert.clone(),
            key_path: config.key.clone(),
            current: RwLock::new(loaded.certified),
            loaded: Mutex::new(loaded.files),
        })
    }

    /// Re-reads the files; swaps the certificate if they changed and load. Returns
    /// whether it changed. On error the previous certificate stays in use.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let files = (read(&self.cert_path)?, read(&self.key_path)?);
        if *self.loaded.lock().unwrap_or_else(|p| p.into_inner()) == files {
            return Ok(false);
        }
        let loaded = Self::load(&self.cert_path, &self.key_path)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = loaded.certified;
        *self.loaded.lock().unwrap_or_else(|p| p.into_inner()) = loaded.files;
        Ok(true)
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

/// The client-facing TLS setup.
pub struct ServerTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub cert: Arc<ServerCert>,
    /// A client must finish its handshake within this (`tls.handshake_timeout`).
    pub handshake_timeout: std::time::Duration,
}

impl ServerTls {
    pub fn new(config: &TlsConfig) -> Result<ServerTls, TlsError> {
        let cert = Arc::new(ServerCert::new(config)?);
        install_provider();
        let mut server = ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(cert.clone());
        server.alpn_protocols = if config.http2 {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        Ok(ServerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            cert,
            handshake_timeout: config.handshake_timeout,
        })
    }
}

/// The backend-facing TLS setup: the client configuration and the name to verify.
#[derive(Clone)]
pub struct BackendTls {
    pub connector: tokio_rustls::TlsConnector,
    pub server_name: ServerName<'static>,
}

impl BackendTls {
    /// `host` is the backend URL's host, the default server name.
    pub fn new(config: &BackendTlsConfig, host: &str) -> Result<BackendTls, TlsError> {
        let mut roots = RootCertStore::empty();
        match &config.ca_file {
            Some(path) => {
                let pem = read(path)?;
                for cert in certs(path, &pem)? {
                    roots.add(cert)?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for e in &found.errors {
                    tracing::warn!(error = %e, "cannot load some system root certificates");
                }
                let (added, ignored) = roots.add_parsable_certificates(found.certs);
                tracing::debug!(added, ignored, "system root certificates loaded");
            }
        }
        install_provider();
        let builder = ClientConfig::builder().with_root_certificates(roots);
        let mut client = match (&config.client_cert, &config.client_key) {
            (Some(cert_path), Some(key_path)) => {
                let chain = certs(cert_path, &read(cert_path)?)?;
                let key = key(key_path, &read(key_path)?)?;
                builder.with_client_auth_cert(chain, key)?
            }
            _ => builder.with_no_client_auth(),
        };
        // Backend connections carry HTTP/1.1 (a WebSocket upgrade needs it).
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = config.server_name.as_deref().unwrap_or(host).to_string();
        let server_name =
            ServerName::try_from(name.clone()).map_err(|_| TlsError::ServerName(name))?;
        Ok(BackendTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
            server_name,
        })
    }
}
