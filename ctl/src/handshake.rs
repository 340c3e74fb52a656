//! TLS to an `https://` agent, made by ctl itself with rustls: the one way
//! a connection to it is made, for every call's channel and for the
//! diagnosis of a connection that broke. The diagnosis exists because of
//! TLS 1.3: the client finishes its handshake before the server has
//! checked the client's certificate, so an agent that refuses it (or
//! requires one that was not given) answers with an alert that tonic's
//! channel only sees as a broken pipe — "cannot reach the agent". One
//! handshake of ctl's own, made the same way, reads that alert. And an
//! `http://` URL whose server answers a TLS handshake is an agent that
//! speaks TLS, not one that is down.

use std::future::Future;
use std::io::{Error, ErrorKind};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{AlertDescription, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tonic::transport::Uri;

/// The protocol gRPC runs on, which the agent must agree to (ALPN).
const ALPN_H2: &[u8] = b"h2";

/// How long the diagnosis waits for the agent's first bytes after its
/// handshake: an agent that accepted the certificate sends its HTTP/2
/// settings at once, one that refused it its alert.
const DIAGNOSIS_READ: Duration = Duration::from_secs(5);

/// The client preface of HTTP/2 and an empty SETTINGS frame: what a gRPC
/// client sends first, so that the agent answers as it would to a call.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Where the agent is and how ctl proves who it is to it: the CA that
/// signed the agent's certificate and, optionally, a client certificate.
pub struct Tls {
    config: Arc<ClientConfig>,
    /// The name checked on the agent's certificate: the URL's host.
    server_name: ServerName<'static>,
    host: String,
    port: u16,
    /// `--cert`, to name it when the agent refuses it.
    certificate: Option<PathBuf>,
}

/// A client certificate of ctl's (the PEM texts of `--cert` and `--key`).
pub struct Identity {
    pub cert_path: PathBuf,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Tls {
    /// The TLS settings for `url` (an https:// URL). `Err` says which flag
    /// is wrong.
    pub fn new(url: &Uri, ca_pem: &str, identity: Option<Identity>) -> Result<Tls, String> {
        let mut roots = RootCertStore::empty();
        let certificates = CertificateDer::pem_slice_iter(ca_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("--ca: not PEM certificates: {e}"))?;
        let (usable, _) = roots.add_parsable_certificates(certificates);
        if usable == 0 {
            return Err("--ca: holds no certificate ctl can use".into());
        }
        let (host, port) = host_port(url)?;
        let server_name = ServerName::try_from(host.clone())
            .map_err(|e| format!("--agent {url}: {host:?} is not a server name: {e}"))?;
        let builder = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots);
        let (mut config, certificate) = match identity {
            None => (builder.with_no_client_auth(), None),
            Some(identity) => {
                let chain = CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("--cert: not PEM certificates: {e}"))?;
                if chain.is_empty() {
                    return Err(format!(
                        "--cert: {} holds no PEM certificate",
                        identity.cert_path.display()
                    ));
                }
                let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())
                    .map_err(|e| format!("--key: no PEM private key: {e}"))?;
                let config = builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("--cert, --key: {e}"))?;
                (config, Some(identity.cert_path))
            }
        };
        config.alpn_protocols.push(ALPN_H2.to_vec());
        Ok(Tls {
            config: Arc::new(config),
            server_name,
            host,
            port,
            certificate,
        })
    }

    /// A TLS connection to the agent that agreed to HTTP/2.
    async fn connect(&self) -> Result<TlsStream<TcpStream>, Error> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
        tcp.set_nodelay(true)?;
        let stream = TlsConnector::from(Arc::clone(&self.config))
            .connect(self.server_name.clone(), tcp)
            .await?;
        if stream.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
            return Err(Error::new(
                ErrorKind::InvalidData,
                "the server did not agree to HTTP/2 (ALPN h2): not a nine9s agent",
            ));
        }
        Ok(stream)
    }

    /// Why the agent turned this connection away, if it was for the client
    /// certificate: one handshake of ctl's own, then what the agent
    /// answers to the start of a call. `None` when it answers as it should
    /// (or fails for another reason, which the caller reports as it was).
    pub async fn refusal(&self) -> Option<String> {
        let alert = match self.connect().await {
            Err(e) => alert(&e)?,
            Ok(mut stream) => {
                let mut first = [0u8; 1];
                let answer = async {
                    stream.write_all(H2_PREFACE).await?;
                    stream.flush().await?;
                    stream.read(&mut first).await
                };
                match tokio::time::timeout(DIAGNOSIS_READ, answer).await {
                    Ok(Err(e)) => alert(&e)?,
                    // It answered, closed or kept silent: not a refusal.
                    Ok(Ok(_)) | Err(_) => return None,
                }
            }
        };
        let name = alert_name(alert);
        Some(match &self.certificate {
            Some(cert) if is_certificate_alert(alert) => format!(
                "the agent refused this client certificate (TLS alert: {name}): --cert {} is not signed by a CA the agent takes client certificates from (its --client-ca), or is not valid now",
                cert.display()
            ),
            None if is_certificate_alert(alert) => format!(
                "the agent requires a client certificate and none was given (TLS alert: {name}): give --cert FILE and --key FILE (NINE9S_CERT, NINE9S_KEY), signed by the CA of its --client-ca"
            ),
            _ => return None,
        })
    }
}

/// Whether whatever listens at `host:port` answers a TLS handshake: an
/// agent with TLS reached through an `http://` URL. The handshake trusts
/// no CA, so it fails either way; how it fails tells.
pub async fn speaks_tls(host: &str, port: u16) -> bool {
    let Ok(server_name) = ServerName::try_from(host.to_owned()) else {
        return false;
    };
    let Ok(builder) = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
    else {
        return false;
    };
    let config = builder
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    let handshake = async {
        let tcp = TcpStream::connect((host, port)).await?;
        TlsConnector::from(Arc::new(config))
            .connect(server_name, tcp)
            .await
    };
    match tokio::time::timeout(DIAGNOSIS_READ, handshake).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => rustls_error(&e).is_some_and(|e| {
            matches!(
                e,
                tokio_rustls::rustls::Error::InvalidCertificate(_)
                    | tokio_rustls::rustls::Error::AlertReceived(_)
            )
        }),
        Err(_) => false,
    }
}

/// The rustls error under an I/O error, if there is one.
fn rustls_error(e: &Error) -> Option<&tokio_rustls::rustls::Error> {
    e.get_ref()?.downcast_ref::<tokio_rustls::rustls::Error>()
}

/// The alert the agent sent, if that is what `e` is.
fn alert(e: &Error) -> Option<AlertDescription> {
    match rustls_error(e)? {
        tokio_rustls::rustls::Error::AlertReceived(alert) => Some(*alert),
        _ => None,
    }
}

/// The alerts a server sends about the client's certificate (TLS 1.2
/// sends `handshake_failure` for a missing one).
fn is_certificate_alert(alert: AlertDescription) -> bool {
    matches!(
        alert,
        AlertDescription::CertificateRequired
            | AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::AccessDenied
            | AlertDescription::DecryptError
            | AlertDescription::HandshakeFailure
    )
}

/// An alert as the TLS specification spells it: `unknown_ca`.
fn alert_name(alert: AlertDescription) -> String {
    let debug = format!("{alert:?}");
    let mut name = String::new();
    let mut lower_before = false;
    for c in debug.chars() {
        if c.is_ascii_uppercase() && lower_before {
            name.push('_');
        }
        lower_before = c.is_ascii_lowercase();
        name.push(c.to_ascii_lowercase());
    }
    name
}

/// The host (an IPv6 address without its brackets) and port of `url`.
pub fn host_port(url: &Uri) -> Result<(String, u16), String> {
    let host = url
        .host()
        .ok_or_else(|| format!("--agent {url} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = url.port_u16().unwrap_or(match url.scheme_str() {
        Some("https") => 443,
        _ => 80,
    });
    Ok((host, port))
}

/// Connects tonic's channel through [`Tls::connect`].
#[derive(Clone)]
pub struct Connector {
    tls: Arc<Tls>,
}

impl Connector {
    pub fn new(tls: Arc<Tls>) -> Connector {
        Connector { tls }
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let tls = Arc::clone(&self.tls);
        Box::pin(async move { tls.connect().await.map(TokioIo::new) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts_are_named_as_the_specification_does() {
        assert_eq!(alert_name(AlertDescription::UnknownCA), "unknown_ca");
        assert_eq!(
            alert_name(AlertDescription::CertificateRequired),
            "certificate_required"
        );
        assert_eq!(
            alert_name(AlertDescription::BadCertificate),
            "bad_certificate"
        );
        assert!(is_certificate_alert(AlertDescription::CertificateRequired));
        assert!(!is_certificate_alert(AlertDescription::InternalError));
    }

    #[test]
    fn hosts_and_ports() {
        let at = |url: &str| host_port(&url.parse().unwrap()).unwrap();
        assert_eq!(at("https://localhost:50051"), ("localhost".into(), 50051));
        assert_eq!(at("https://[::1]:7"), ("::1".into(), 7));
        assert_eq!(at("https://agent.example"), ("agent.example".into(), 443));
        assert_eq!(at("http://10.0.0.7"), ("10.0.0.7".into(), 80));
    }
}
