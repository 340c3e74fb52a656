//! Who `ctl` is to the agent and how it reaches it: the bearer token (from
//! `--token`, `--token-file`, or the default data dir's `admin.token`) and,
//! for an `https://` agent URL, the TLS settings. All of it is settled
//! before the first call, and every mistake in it is a usage error (exit 2):
//! a deploy should not find out halfway that its credentials were wrong.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

/// Where the agent keeps its admin token when it runs with its default
/// data dir (`./nine9s-data`), relative to the directory `ctl` runs in.
pub const DEFAULT_TOKEN_FILE: &str = "nine9s-data/admin.token";

/// A token or PEM file larger than this is not one: it is refused rather
/// than read whole.
const MAX_FILE: u64 = 1024 * 1024;

/// The flags that say who `ctl` is and how to reach the agent.
#[derive(clap::Args, Clone)]
pub struct AccessFlags {
    /// The bearer token to send [default: the content of
    /// ./nine9s-data/admin.token, if it exists].
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

/// Where the token came from, to say what to do when the agent refuses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    Flag,
    File(PathBuf),
    /// `./nine9s-data/admin.token`.
    DataDir,
    /// `./nine9s-data/admin.token` exists but could not be used (why).
    DataDirUnusable(String),
    /// The agent is not on this machine: the local admin token is not sent.
    NotForRemote,
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

/// Everything needed to talk to the agent.
pub struct Connection {
    pub url: String,
    pub endpoint: Endpoint,
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
    /// the command line already checked is an http:// or https:// URL).
    /// `Err` is a usage error.
    pub fn connect(&self, url: &str) -> Result<Connection, String> {
        let (bearer, token_source) = self.bearer(url)?;
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| format!("--agent {url:?} is not a URL: {e}"))?
            .connect_timeout(Duration::from_secs(5));
        if let Some(tls) = self.tls(url)? {
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| format!("--ca, --cert, --key: {}", causes(&e)))?;
        }
        Ok(Connection {
            url: url.to_owned(),
            endpoint,
            bearer,
            token_source,
        })
    }

    fn bearer(&self, url: &str) -> Result<(Bearer, TokenSource), String> {
        let (token, source) = if let Some(token) = &self.token {
            (token.clone(), TokenSource::Flag)
        } else if let Some(path) = &self.token_file {
            let text =
                read_small(path).map_err(|e| format!("--token-file: {}", cannot_read(path, &e)))?;
            (text, TokenSource::File(path.clone()))
        } else if !is_loopback(url) {
            // The local agent's admin token is for the local agent: never
            // sent to another machine unless asked for.
            return Ok((Bearer(None), TokenSource::NotForRemote));
        } else {
            let path = Path::new(DEFAULT_TOKEN_FILE);
            match read_small(path) {
                Ok(text) => (text, TokenSource::DataDir),
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    return Ok((Bearer(None), TokenSource::None))
                }
                // Not a usage error: nothing was typed. The agent will
                // refuse the call, and its error says what to do.
                Err(e) => {
                    let why = cannot_read(path, &e);
                    return Ok((Bearer(None), TokenSource::DataDirUnusable(why)));
                }
            }
        };
        match header(token.trim()) {
            Ok(value) => Ok((Bearer(Some(value)), source)),
            Err(why) => match source {
                TokenSource::Flag => Err(format!("--token {why}")),
                TokenSource::File(path) => Err(format!("--token-file {}: {why}", path.display())),
                _ => Ok((
                    Bearer(None),
                    TokenSource::DataDirUnusable(format!("{DEFAULT_TOKEN_FILE}: {why}")),
                )),
            },
        }
    }

    fn tls(&self, url: &str) -> Result<Option<ClientTlsConfig>, String> {
        if self.cert.is_some() != self.key.is_some() {
            return Err(
                "--cert and --key (NINE9S_CERT, NINE9S_KEY) go together: give both or neither"
                    .into(),
            );
        }
        let https = url
            .parse::<tonic::transport::Uri>()
            .is_ok_and(|u| u.scheme_str() == Some("https"));
        if !https {
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
                "--agent {url} needs --ca FILE (or NINE9S_CA): the CA certificate that signed the agent's"
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
        // The server name checked is the URL's host: tonic takes it from
        // the endpoint's URL (an IPv6 address without its brackets).
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            tls = tls.identity(Identity::from_pem(read("cert", cert)?, read("key", key)?));
        }
        Ok(Some(tls))
    }
}

/// What to tell someone the agent did not recognise.
pub fn unauthenticated_hint(source: &TokenSource) -> String {
    const GIVE: &str =
        "give --token/--token-file, or run where ./nine9s-data/admin.token is readable";
    match source {
        TokenSource::None => format!("no token was sent: {GIVE}"),
        TokenSource::NotForRemote => format!(
            "no token was sent: ./{DEFAULT_TOKEN_FILE} is only used for an agent on this machine; give --token/--token-file"
        ),
        TokenSource::DataDirUnusable(why) => format!("no token was sent ({why}): {GIVE}"),
        TokenSource::DataDir => format!(
            "the token in ./{DEFAULT_TOKEN_FILE} is not this agent's (it may use another data dir): give --token/--token-file"
        ),
        TokenSource::Flag => "check --token (or NINE9S_TOKEN)".to_owned(),
        TokenSource::File(path) => format!("check the token in {}", path.display()),
    }
}

/// Whether `url`'s host is this machine (loopback or `localhost`).
fn is_loopback(url: &str) -> bool {
    let Ok(uri) = url.parse::<tonic::transport::Uri>() else {
        return false;
    };
    match uri.host() {
        Some("localhost") => true,
        Some(host) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
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
            ErrorKind::InvalidData,
            format!("{size} bytes; at most {MAX_FILE}"),
        ));
    }
    std::fs::read_to_string(path)
}

fn cannot_read(path: &Path, e: &std::io::Error) -> String {
    format!("cannot read {}: {e}", path.display())
}

/// An error and its causes on one line (tonic's TLS errors say what is
/// wrong only in their source).
fn causes(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        line.push_str(&format!(": {e}"));
        cause = e.source();
    }
    line
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
    fn the_local_admin_token_is_only_for_a_local_agent() {
        for url in [
            "http://127.0.0.1:50051",
            "http://localhost:1",
            "https://[::1]:2",
        ] {
            assert!(is_loopback(url), "{url}");
        }
        for url in [
            "http://10.0.0.7:50051",
            "https://agent.example:443",
            "http://[2001:db8::1]:1",
        ] {
            assert!(!is_loopback(url), "{url}");
            let (bearer, source) = flags(&[]).bearer(url).unwrap();
            assert!(
                bearer.0.is_none() && matches!(source, TokenSource::NotForRemote),
                "{url}"
            );
        }
    }

    #[test]
    fn tokens() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t");
        std::fs::write(&file, "  s3cret-token\n").unwrap();
        let file = file.to_str().unwrap();
        let (bearer, source) = flags(&["--token-file", file])
            .bearer("http://127.0.0.1:50051")
            .unwrap();
        assert_eq!(bearer.0.unwrap().to_str().unwrap(), "Bearer s3cret-token");
        assert_eq!(source, TokenSource::File(file.into()));
        let (bearer, source) = flags(&["--token", "abc"])
            .bearer("http://127.0.0.1:50051")
            .unwrap();
        assert_eq!(bearer.0.unwrap().to_str().unwrap(), "Bearer abc");
        assert_eq!(source, TokenSource::Flag);
        for bad in ["", " ", "two words", "é"] {
            let err = flags(&["--token", bad])
                .bearer("http://127.0.0.1:50051")
                .err()
                .unwrap();
            assert!(err.starts_with("--token "), "{err}");
        }
        let missing = dir.path().join("missing");
        let err = flags(&["--token-file", missing.to_str().unwrap()])
            .bearer("http://127.0.0.1:50051")
            .err()
            .unwrap();
        assert!(err.contains("missing"), "{err}");
        std::fs::write(dir.path().join("empty"), "\n").unwrap();
        let empty = dir.path().join("empty");
        let err = flags(&["--token-file", empty.to_str().unwrap()])
            .bearer("http://127.0.0.1:50051")
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
        let err = flags(&["--ca", "ca.pem"]).tls(http).unwrap_err();
        assert!(err.contains("https://"), "{err}");
        let err = flags(&["--cert", "c", "--key", "k"]).tls(http).unwrap_err();
        assert!(err.contains("https://"), "{err}");
        for half in [["--cert", "c"], ["--key", "k"]] {
            let err = flags(&half).tls(https).unwrap_err();
            assert!(err.contains("give both or neither"), "{err}");
        }
        let err = flags(&[]).tls(https).unwrap_err();
        assert!(err.contains("--ca"), "{err}");
        let err = flags(&["--ca", "/no/such/ca.pem"]).tls(https).unwrap_err();
        assert!(err.contains("/no/such/ca.pem"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate").unwrap();
        let err = flags(&["--ca", ca.to_str().unwrap()])
            .tls(https)
            .unwrap_err();
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
        assert!(err.starts_with("--ca, --cert, --key"), "{err}");
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
            .bearer("http://127.0.0.1:50051")
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
        assert!(unauthenticated_hint(&TokenSource::None).contains("--token/--token-file"));
        assert!(
            unauthenticated_hint(&TokenSource::DataDirUnusable("denied".into())).contains("denied")
        );
    }
}
