//! The data plane's TLS (`--http-tls-cert`, `--http-tls-key`): rustls
//! with ALPN `h2` and `http/1.1`, and a certificate that can be replaced
//! while the agent serves. The files are looked at every
//! [`RELOAD_CHECK`]; once either changed, both are read again and, if they
//! make a valid pair, new handshakes get the new certificate. Connections
//! already open keep theirs: nothing is dropped. A pair that does not load
//! (a key that does not match, a file half written) is logged and the
//! certificate in use stays until the files change again.
//!
//! Under `--worker-user` the worker reads the files itself, so they must
//! be readable by that user (it holds the key in memory to serve anyway).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

/// How often the files are looked at for a change.
pub const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// Why a certificate and key were not taken.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate in it")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no PEM private key in it")]
    NoKey {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{cert} and {key} are no usable pair")]
    Unusable {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// The files, and what the data plane accepts TLS connections with.
pub struct HttpTls {
    cert: PathBuf,
    key: PathBuf,
    acceptor: TlsAcceptor,
    resolver: Arc<Current>,
    /// The files as they were when last read.
    seen: Mutex<Option<Stamp>>,
}

/// The certificate new handshakes get.
#[derive(Debug)]
struct Current(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// What tells that a file changed: its modification time, size and inode.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp(Vec<Option<(SystemTime, u64, u64)>>);

impl Stamp {
    fn of(paths: [&Path; 2]) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp(
            paths
                .iter()
                .map(|path| {
                    let meta = std::fs::metadata(path).ok()?;
                    Some((meta.modified().ok()?, meta.len(), meta.ino()))
                })
                .collect(),
        )
    }
}

impl HttpTls {
    /// Reads the pair; an error names the file and what is wrong with it.
    pub fn load(cert: PathBuf, key: PathBuf) -> Result<HttpTls, CertError> {
        let seen = Stamp::of([&cert, &key]);
        let resolver = Arc::new(Current(ArcSwap::from_pointee(read_pair(&cert, &key)?)));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&resolver) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(HttpTls {
            cert,
            key,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            resolver,
            seen: Mutex::new(Some(seen)),
        })
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Takes the files again if they changed since they were last read:
    /// `Some(outcome)` then, `None` if they did not.
    pub fn reload_if_changed(&self) -> Option<Result<(), CertError>> {
        let now = Stamp::of([&self.cert, &self.key]);
        {
            let mut seen = self.seen.lock();
            if seen.as_ref() == Some(&now) {
                return None;
            }
            // Noted even if the pair does not load: it is tried again
            // once a file changes again (the other half of the pair).
            *seen = Some(now);
        }
        Some(read_pair(&self.cert, &self.key).map(|pair| self.resolver.0.store(Arc::new(pair))))
    }

    /// Looks at the files every [`RELOAD_CHECK`] until `stopped` resolves.
    pub async fn watch(self: Arc<Self>, stopped: impl std::future::Future<Output = ()>) {
        tokio::pin!(stopped);
        let mut tick = tokio::time::interval(RELOAD_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut stopped => return,
                _ = tick.tick() => {}
            }
            // Off the runtime's threads: a file system that hangs holds
            // one blocking thread, not the data plane.
            let tls = Arc::clone(&self);
            match tokio::task::spawn_blocking(move || tls.reload_if_changed()).await {
                Ok(Some(Ok(()))) => tracing::info!(
                    cert = %self.cert.display(),
                    "the data plane's certificate changed: new connections get it, open ones keep theirs"
                ),
                Ok(Some(Err(e))) => tracing::error!(
                    error = crate::error::chain(&e),
                    "the data plane's certificate files changed but do not load: the certificate in use stays"
                ),
                Ok(None) | Err(_) => {}
            }
        }
    }
}

/// Whether `files` load, for the supervisor to refuse them at start (a
/// worker would only fail, and be restarted, on them): what is wrong,
/// with its causes.
pub fn check(files: &crate::config::HttpTlsFiles) -> Result<(), String> {
    read_pair(&files.cert, &files.key).map(drop).map_err(|e| {
        format!(
            "--http-tls-cert, --http-tls-key: {}",
            crate::error::chain(&e)
        )
    })
}

fn read_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, CertError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| CertError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(cert)?)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(CertError::NoCertificate {
            path: cert.to_owned(),
        });
    }
    let private =
        PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|source| CertError::NoKey {
            path: key.to_owned(),
            source,
        })?;
    CertifiedKey::from_der(chain, private, &rustls::crypto::ring::default_provider()).map_err(
        |source| CertError::Unusable {
            cert: cert.to_owned(),
            key: key.to_owned(),
            source,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_no_certificate_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, "not a certificate").unwrap();
        std::fs::write(&key, "not a key").unwrap();
        let Err(e) = HttpTls::load(cert.clone(), key) else {
            panic!("loaded")
        };
        assert!(
            matches!(e, CertError::NoCertificate { ref path } if *path == cert),
            "{e:#}"
        );
    }
}
