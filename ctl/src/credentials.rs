//! Who `ctl` is to the agent and how it reaches it: the agent's local
//! control socket (`unix:PATH`, where the agent knows the caller by its
//! uid and no token is sent), or a URL with the bearer token (from
//! `--token` or `--token-file`) and, for `https://`, the TLS settings.
//! A credential is never sent to a server that has not proven it is the
//! agent: not over plaintext `http://` (a token there is a usage error),
//! and not to a socket served by another user (`local.rs`). All of it is
//! settled before the first call, and every mistake in it is a usage error
//! (exit 2): a deploy should not find out halfway that its credentials
//! were wrong.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Status};

use crate::handshake::{self, Tls};
use crate::local;

/// A token or PEM file larger than this is not one: it is refused rather
/// than read whole.
const MAX_FILE: u64 = 1024 * 1024;

/// The flags that say who `ctl` is and how to reach the agent.
#[derive(clap::Args, Clone)]
pub struct AccessFlags {
    /// The bearer token to send to an https:// agent (never sent over
    /// http://, nor needed on the agent's local socket).
    #[arg(
        long,
        global = true,
        env = "NINE9S_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN",
        conflicts_with = "token_file"
    )]
    token: Option<String>,
    /// A file holding the bearer token (surrounding whitespace is ignored).
    #[arg(long, global = true, env = "NINE9S_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// PEM file of the CA that signed the agent's certificate (required
    /// with an https:// --agent).
    #[arg(long, global = true, env = "NINE9S_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
    /// PEM client certificate, for an agent that takes client certificates
    /// (with --key).
    #[arg(long, global = true, env = "NINE9S_CERT", value_name = "FILE")]
    cert: Option<PathBuf>,
    /// PEM private key of --cert (for `ctl sign`, --key is the signing key).
    // Both or neither is checked in `tls`, not by clap: `sign` has a
    // `--key` of its own (same id, so clap does not add this one to it),
    // and a stray NINE9S_KEY must not stop it.
    #[arg(long, global = true, env = "NINE9S_KEY", value_name = "FILE")]
    key: Option<PathBuf>,
}

/// Who `ctl` is to the agent, to say what to do when the agent refuses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    Flag,
    File(PathBuf),
    /// The local control socket: the caller's uid, no token.
    LocalSocket,
    None,
}

/// The `authorization` metadata of every call (none without a token).
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// How connections to the agent are made.
#[derive(Clone)]
pub enum Line {
    /// `http://`.
    Plain(Endpoint),
    /// `https://`: connections made by ctl's own TLS (`handshake.rs`).
    Tls { endpoint: Endpoint, tls: Arc<Tls> },
    /// The agent's local control socket at `path`.
    Local { endpoint: Endpoint, path: PathBuf },
}

impl Line {
    /// A channel that connects at its first call.
    pub fn channel(&self) -> Channel {
        match self {
            Line::Plain(endpoint) => endpoint.connect_lazy(),
            Line::Tls { endpoint, tls } => {
                endpoint.connect_with_connector_lazy(handshake::Connector::new(Arc::clone(tls)))
            }
            Line::Local { endpoint, path } => {
                endpoint.connect_with_connector_lazy(local::Connector::new(path.clone()))
            }
        }
    }
}

/// Everything needed to talk to the agent.
pub struct Connection {
    pub url: String,
    pub line: Line,
    pub bearer: Bearer,
    pub token_source: TokenSource,
}

impl AccessFlags {
    /// These flags with a fleet file's files in their place, where it names
    /// them (its token file replaces `--token` too).
    pub fn with_files(&self, files: &crate::rollout::fleet::Files) -> AccessFlags {
        let mut flags = self.clone();
        if let Some(token_file) = &files.token_file {
            flags.token = None;
            flags.token_file = Some(token_file.clone());
        }
        for (flag, file) in [
            (&mut flags.ca, &files.ca),
            (&mut flags.cert, &files.cert),
            (&mut flags.key, &files.key),
        ] {
            if file.is_some() {
                flag.clone_from(file);
            }
        }
        flags
    }

    /// Reads the token and TLS files and checks they go with `url` (which
    /// the command line already checked is a `unix:` path or an http:// or
    /// https:// URL). `Err` is a usage error.
    pub fn connect(&self, url: &str) -> Result<Connection, String> {
        if let Some(path) = local::socket_path(url) {
            // No token is read or sent: the agent knows the caller by its uid.
            self.tls(url)?;
            let endpoint = Endpoint::from_static("http://local.control.socket")
                .connect_timeout(Duration::from_secs(5));
            return Ok(Connection {
                url: url.to_owned(),
                line: Line::Local { endpoint, path },
                bearer: Bearer(None),
                token_source: TokenSource::LocalSocket,
            });
        }
        let (bearer, token_source) = self.bearer(url)?;
        let endpoint = |url: &str| {
            Endpoint::from_shared(url.to_owned())
                .map(|e| e.connect_timeout(Duration::from_secs(5)))
                .map_err(|e| format!("--agent {url:?} is not a URL: {e}"))
        };
        let line = match self.tls(url)? {
            None => Line::Plain(endpoint(url)?),
            Some(tls) => {
                // The channel's own URL is plain, or tonic would want to
                // make the TLS itself; the requests carry the https://
                // origin.
                let uri: Uri = url
                    .parse()
                    .map_err(|e| format!("--agent {url:?} is not a URL: {e}"))?;
                let authority = uri
                    .authority()
                    .ok_or_else(|| format!("--agent {url} has no host"))?;
                Line::Tls {
                    endpoint: endpoint(&format!("http://{authority}"))?.origin(uri),
                    tls: Arc::new(tls),
                }
            }
        };
        Ok(Connection {
            url: url.to_owned(),
            line,
            bearer,
            token_source,
        })
    }

    /// The token for `url`: only over https://, where the agent proves who
    /// it is before anything is sent.
    fn bearer(&self, url: &str) -> Result<(Bearer, TokenSource), String> {
        let (token, source) = if let Some(token) = &self.token {
            (token.clone(), TokenSource::Flag)
        } else if let Some(path) = &self.token_file {
            let text =
                read_small(path).map_err(|e| format!("--token-file: {}", cannot_read(path, &e)))?;
            (text, TokenSource::File(path.clone()))
        } else {
            return Ok((Bearer(None), TokenSource::None));
        };
        if !is_https(url) {
            let given = match &source {
                TokenSource::File(path) => format!("--token-file {}", path.display()),
                _ => "--token".to_owned(),
            };
            return Err(format!(
                "refusing to send the token of {given} (or NINE9S_TOKEN, NINE9S_TOKEN_FILE) over plaintext {url}: whatever listens on that port would get it, agent or not. On the agent's machine use its local socket, which needs no token (--agent unix:DATA/control.sock; the default is unix:{}); from elsewhere give --agent https://HOST:PORT with --ca",
                local::DEFAULT_SOCKET
            ));
        }
        match header(token.trim()) {
            Ok(value) => Ok((Bearer(Some(value)), source)),
            Err(why) => match source {
                TokenSource::File(path) => Err(format!("--token-file {}: {why}", path.display())),
                _ => Err(format!("--token {why}")),
            },
        }
    }

    fn tls(&self, url: &str) -> Result<Option<Tls>, String> {
        if self.cert.is_some() != self.key.is_some() {
            return Err(
                "--cert and --key (NINE9S_CERT, NINE9S_KEY) go together: give both or neither"
                    .into(),
            );
        }
        if !is_https(url) {
            if self.ca.is_some() || self.cert.is_some() || self.key.is_some() {
                return Err(format!(
                    "--ca, --cert and --key are for an https:// --agent; {url} is not one"
                ));
            }
            return Ok(None);
        }
        // tonic is built without the system's root certificates, so it can
        // only verify the agent against a CA it is given.
        let Some(ca) = &self.ca else {
            return Err(format!(
                "--agent {url} needs --ca FILE (or NINE9S_CA): the PEM certificate of the CA that signed the agent's TLS certificate (ctl trusts no system roots)"
            ));
        };
        let read = |flag: &str, path: &Path| {
            read_small(path).map_err(|e| format!("--{flag}: {}", cannot_read(path, &e)))
        };
        let ca_pem = read("ca", ca)?;
        // rustls skips what it cannot parse, so a wrong file would only
        // show as a failed handshake with every call.
        if !ca_pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(format!("--ca: {} holds no PEM certificate", ca.display()));
        }
        let identity = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some(handshake::Identity {
                cert_path: cert.clone(),
                cert_pem: read("cert", cert)?,
                key_pem: read("key", key)?,
            }),
            _ => None,
        };
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("--agent {url:?} is not a URL: {e}"))?;
        // The server name checked is the URL's host (an IPv6 address
        // without its brackets).
        Tls::new(&uri, &ca_pem, identity).map(Some)
    }
}

/// What to tell someone the agent did not recognise.
pub fn unauthenticated_hint(source: &TokenSource) -> String {
    match source {
        TokenSource::None => format!(
            "no token was sent: on the agent's machine use its local socket (--agent unix:DATA/control.sock; the default is unix:{}), or give --token/--token-file with an https:// --agent and --ca",
            local::DEFAULT_SOCKET
        ),
        TokenSource::LocalSocket => {
            "the local socket admits only the agent's own user and root: run ctl as one of them"
                .to_owned()
        }
        TokenSource::Flag => "check --token (or NINE9S_TOKEN)".to_owned(),
        TokenSource::File(path) => format!("check the token in {}", path.display()),
    }
}

/// Whether `url` is an https:// URL: the only kind a token is sent to.
fn is_https(url: &str) -> bool {
    url.parse::<tonic::transport::Uri>()
        .is_ok_and(|u| u.scheme_str() == Some("https"))
}

/// A token as the value of `authorization: Bearer TOKEN`.
fn header(token: &str) -> Result<MetadataValue<Ascii>, &'static str> {
    if token.is_empty() {
        return Err("is empty");
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be printable ASCII without spaces");
    }
    let mut value: MetadataValue<Ascii> = format!("Bearer {token}")
        .parse()
        .map_err(|_| "must be printable ASCII without spaces")?;
    // Kept out of any debug output of the request.
    value.set_sensitive(true);
    Ok(value)
}

/// A small file's text: a token or a PEM file, never megabytes.
fn read_small(path: &Path) -> std::io::Result<String> {
    let size = std::fs::metadata(path)?.len();
    if size > MAX_FILE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{size} bytes; at most {MAX_FILE}"),
        ));
    }
    std::fs::read_to_string(path)
}

fn cannot_read(path: &Path, e: &std::io::Error) -> String {
    format!("cannot read {}: {e}", path.display())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        access: AccessFlags,
    }

    fn flags(args: &[&str]) -> AccessFlags {
        let mut all = vec!["ctl"];
        all.extend_from_slice(args);
        Flags::try_parse_from(all).unwrap().access
    }

    #[test]
    fn a_token_is_never_sent_over_plaintext_nor_read_for_the_local_socket() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t");
        std::fs::write(&file, "s3cret-token\n").unwrap();
        let file = file.to_str().unwrap();
        for url in [
            "http://127.0.0.1:50051",
            "http://localhost:1",
            "http://10.0.0.7:50051",
        ] {
            for given in [&["--token", "abc"][..], &["--token-file", file][..]] {
                let err = flags(given).connect(url).err().unwrap();
                assert!(err.contains("refusing to send the token"), "{url}: {err}");
                assert!(err.contains("unix:") && err.contains("https://"), "{err}");
            }
            let plain = flags(&[]).connect(url).ok().unwrap();
            assert!(plain.bearer.0.is_none() && plain.token_source == TokenSource::None);
        }
        // The local socket: nothing read, nothing sent, even when given.
        let missing = dir.path().join("missing");
        let local = flags(&["--token-file", missing.to_str().unwrap()])
            .connect("unix:nine9s-data/control.sock")
            .ok()
            .unwrap();
        assert!(local.bearer.0.is_none());
        assert_eq!(local.token_source, TokenSource::LocalSocket);
        let err = flags(&["--ca", "ca.pem"])
            .connect("unix:nine9s-data/control.sock")
            .err()
            .unwrap();
        assert!(err.contains("https://"), "{err}");
    }

    #[test]
    fn tokens() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t");
        std::fs::write(&file, "  s3cret-token\n").unwrap();
        let file = file.to_str().unwrap();
        let (bearer, source) = flags(&["--token-file", file])
            .bearer("https://127.0.0.1:50051")
            .unwrap();
        assert_eq!(bearer.0.unwrap().to_str().unwrap(), "Bearer s3cret-token");
        assert_eq!(source, TokenSource::File(file.into()));
        let (bearer, source) = flags(&["--token", "abc"])
            .bearer("https://127.0.0.1:50051")
            .unwrap();
        assert_eq!(bearer.0.unwrap().to_str().unwrap(), "Bearer abc");
        assert_eq!(source, TokenSource::Flag);
        for bad in ["", " ", "two words", "é"] {
            let err = flags(&["--token", bad])
                .bearer("https://127.0.0.1:50051")
                .err()
                .unwrap();
            assert!(err.starts_with("--token "), "{err}");
        }
        let missing = dir.path().join("missing");
        let err = flags(&["--token-file", missing.to_str().unwrap()])
            .bearer("https://127.0.0.1:50051")
            .err()
            .unwrap();
        assert!(err.contains("missing"), "{err}");
        std::fs::write(dir.path().join("empty"), "\n").unwrap();
        let empty = dir.path().join("empty");
        let err = flags(&["--token-file", empty.to_str().unwrap()])
            .bearer("https://127.0.0.1:50051")
            .err()
            .unwrap();
        assert!(err.contains("is empty"), "{err}");
    }

    #[test]
    fn token_flags_conflict() {
        let parse = |args: &[&str]| Flags::try_parse_from(args).map(|_| ());
        assert!(parse(&["ctl", "--token", "a", "--token-file", "f"]).is_err());
        assert!(parse(&["ctl", "--cert", "c", "--key", "k"]).is_ok());
    }

    #[test]
    fn tls_goes_with_https_only() {
        let http = "http://127.0.0.1:50051";
        let https = "https://agent.example:50051";
        assert!(flags(&[]).tls(http).unwrap().is_none());
        let err = flags(&["--ca", "ca.pem"]).tls(http).err().unwrap();
        assert!(err.contains("https://"), "{err}");
        let err = flags(&["--cert", "c", "--key", "k"])
            .tls(http)
            .err()
            .unwrap();
        assert!(err.contains("https://"), "{err}");
        for half in [["--cert", "c"], ["--key", "k"]] {
            let err = flags(&half).tls(https).err().unwrap();
            assert!(err.contains("give both or neither"), "{err}");
        }
        let err = flags(&[]).tls(https).err().unwrap();
        assert!(err.contains("--ca"), "{err}");
        let err = flags(&["--ca", "/no/such/ca.pem"])
            .tls(https)
            .err()
            .unwrap();
        assert!(err.contains("/no/such/ca.pem"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate").unwrap();
        let err = flags(&["--ca", ca.to_str().unwrap()])
            .tls(https)
            .err()
            .unwrap();
        assert!(err.contains("no PEM certificate"), "{err}");
        let pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        std::fs::write(&ca, pem).unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(&key, "not a key").unwrap();
        let (ca, key) = (ca.to_str().unwrap(), key.to_str().unwrap());
        let err = flags(&["--ca", ca, "--cert", ca, "--key", key])
            .connect(https)
            .err()
            .unwrap();
        // Not a certificate rustls can use, although PEM.
        assert!(err.starts_with("--ca: "), "{err}");
    }

    proptest::proptest! {
        #[test]
        fn any_token_is_sent_as_typed_or_refused(token in "\\PC{0,40}|[!-~]{1,40}") {
            if let Ok(value) = header(&token) {
                proptest::prop_assert_eq!(value.to_str().unwrap(), format!("Bearer {token}"));
            }
        }
    }

    #[test]
    fn every_call_carries_the_token() {
        let (mut bearer, _) = flags(&["--token", "abc"])
            .bearer("https://127.0.0.1:50051")
            .unwrap();
        let request = bearer.call(Request::new(())).unwrap();
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer abc"
        );
        let request = Bearer(None).call(Request::new(())).unwrap();
        assert!(request.metadata().get("authorization").is_none());
    }

    #[test]
    fn hints_say_what_to_do() {
        let none = unauthenticated_hint(&TokenSource::None);
        assert!(
            none.contains("unix:") && none.contains("--token/--token-file"),
            "{none}"
        );
        assert!(unauthenticated_hint(&TokenSource::LocalSocket).contains("root"));
    }
}
