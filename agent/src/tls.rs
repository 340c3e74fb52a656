//! The control plane's TLS: the server's certificate and key, and the CA
//! whose client certificates it accepts (mTLS). A client certificate's
//! subject common name is its identity, looked up in the tokens file.

use std::path::PathBuf;

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::error::{Error, Reason, Result};

/// How long a client gets to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// PEM files given on the command line.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Clients must present a certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// Reads the files into tonic's server configuration.
    pub fn server_config(&self) -> Result<ServerTlsConfig> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(Error::io(format!("cannot read {}", path.display())))
        };
        let ca = self.client_ca.as_ref().map(read).transpose()?;
        server_config(&read(&self.cert)?, &read(&self.key)?, ca.as_deref())
    }
}

/// tonic's server configuration from the PEM files' contents (read here,
/// or handed by the supervisor under `--worker-user`).
pub fn server_config(cert: &[u8], key: &[u8], client_ca: Option<&[u8]>) -> Result<ServerTlsConfig> {
    // A client that never finishes its handshake is dropped.
    let mut config = ServerTlsConfig::new()
        .timeout(HANDSHAKE_TIMEOUT)
        .identity(Identity::from_pem(cert, key));
    if let Some(ca) = client_ca {
        config = config.client_ca_root(Certificate::from_pem(ca));
    }
    // The PEM files are only parsed when a server takes the
    // configuration: do it now, so that unusable files stop the agent
    // at start instead of leaving it serving HTTP with no control plane.
    tonic::transport::Server::builder()
        .tls_config(config.clone())
        .map_err(|e| {
            Error::refused(
                Reason::InvalidArgument,
                format!(
                    "--tls-cert, --tls-key, --client-ca: {}",
                    crate::error::chain(&e)
                ),
            )
        })?;
    Ok(config)
}

/// The subject common name of the client's verified certificate, if the
/// call (whose request `extensions` these are) came over mTLS.
pub fn client_name(extensions: &tonic::codegen::http::Extensions) -> Option<String> {
    let certs = extensions
        .get::<TlsConnectInfo<TcpConnectInfo>>()?
        .peer_certs()?;
    let (_, cert) = x509_parser::parse_x509_certificate(certs.first()?.as_ref()).ok()?;
    let name = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(name.to_owned())
}
