//! Release signatures (ed25519): the key files `ctl keygen` writes, the
//! `release.sig` that `ctl sign` puts beside `release.toml`, and the check
//! the agent makes against the keys it trusts before it stages a release.
//!
//! Every file is one line of text:
//!
//! ```text
//! nine9s-ed25519-secret <64 hex>                       # KEY.key: the 32-byte seed
//! nine9s-ed25519-public <64 hex>                       # KEY.pub
//! nine9s-ed25519-signature <key id> <128 hex>          # release.sig
//! ```
//!
//! A key id is the first 16 hex characters of the sha256 of the public key
//! bytes. What is signed is `"nine9s release signature v1\n"`, the library's
//! lower-case hex sha256, `"\n"`, then the release.toml text verbatim: the
//! signature covers the code and everything the manifest says about it, and
//! the fixed prefix keeps it from being valid for any other use of the key.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// The signature's file name, beside `release.toml`.
pub const SIGNATURE_FILE: &str = "release.sig";

/// The longest key or signature text accepted: each is one short line, so
/// anything longer is malformed, and a hostile file is never read whole.
pub const MAX_TEXT: usize = 1024;

const SECRET_TAG: &str = "nine9s-ed25519-secret";
const PUBLIC_TAG: &str = "nine9s-ed25519-public";
const SIGNATURE_TAG: &str = "nine9s-ed25519-signature";
const CONTEXT: &str = "nine9s release signature v1\n";
const KEY_ID_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error("malformed {what}: {why}")]
    Malformed { what: String, why: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("no trusted keys: {0} holds no *.pub file")]
    NoKeys(String),
    #[error("the release is signed by key {0}, which is not trusted here")]
    Untrusted(String),
    #[error("the signature by key {0} does not match this release: it was changed after signing, or signed for other bytes")]
    Mismatch(String),
    #[error("cannot draw random bytes for a key: {0}")]
    Random(std::io::Error),
}

fn malformed(what: &str, why: impl Into<String>) -> SignatureError {
    SignatureError::Malformed {
        what: what.to_owned(),
        why: why.into(),
    }
}

/// A signing key. Its bytes are wiped when it is dropped and never printed.
pub struct SecretKey(SigningKey);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public {})", self.public().id())
    }
}

impl SecretKey {
    /// A new key from the kernel's random source.
    pub fn generate() -> Result<SecretKey, SignatureError> {
        let mut seed = [0u8; 32];
        let mut filled = 0;
        // getrandom may return fewer bytes than asked, or be interrupted.
        while filled < seed.len() {
            match rustix::rand::getrandom(
                &mut seed[filled..],
                rustix::rand::GetRandomFlags::empty(),
            ) {
                Ok(n) => filled += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(SignatureError::Random(e.into())),
            }
        }
        let key = SecretKey(SigningKey::from_bytes(&seed));
        zero(&mut seed);
        Ok(key)
    }

    /// Parses a secret key file's text (`nine9s-ed25519-secret <64 hex>`).
    pub fn parse(text: &str) -> Result<SecretKey, SignatureError> {
        let mut seed = parse_line::<0, 32>("secret key", SECRET_TAG, text)?.1;
        let key = SecretKey(SigningKey::from_bytes(&seed));
        zero(&mut seed);
        Ok(key)
    }

    /// The key file's text: one line, ending in a newline.
    pub fn to_text(&self) -> String {
        format!("{SECRET_TAG} {}\n", hex::encode(self.0.as_bytes()))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }
}

/// A verifying key.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.id())
    }
}

impl PublicKey {
    /// Parses a public key file's text (`nine9s-ed25519-public <64 hex>`).
    pub fn parse(text: &str) -> Result<PublicKey, SignatureError> {
        let bytes = parse_line::<0, 32>("public key", PUBLIC_TAG, text)?.1;
        VerifyingKey::from_bytes(&bytes)
            .map(PublicKey)
            .map_err(|_| malformed("public key", "not a point on the curve"))
    }

    /// The key file's text: one line, ending in a newline.
    pub fn to_text(&self) -> String {
        format!("{PUBLIC_TAG} {}\n", hex::encode(self.0.as_bytes()))
    }

    /// The first 16 hex characters of the sha256 of the key's bytes.
    pub fn id(&self) -> String {
        let mut id = hex::encode(Sha256::digest(self.0.as_bytes()));
        id.truncate(KEY_ID_LEN);
        id
    }
}

/// The text of a `release.sig` for a release: `manifest_toml` verbatim and
/// `sha256`, the hex sha256 of its library (lower-cased: that is what is
/// signed). One line, ending in a newline.
pub fn sign(key: &SecretKey, manifest_toml: &str, sha256: &str) -> String {
    let signature = key.0.sign(&message(manifest_toml, sha256));
    format!(
        "{SIGNATURE_TAG} {} {}\n",
        key.public().id(),
        hex::encode(signature.to_bytes())
    )
}

/// The key id a `release.sig` text names, without verifying anything: to
/// say who signed, or to look for the key.
pub fn signer(sig_text: &str) -> Result<String, SignatureError> {
    parse_signature(sig_text).map(|(id, _)| id)
}

/// The keys whose signatures are trusted.
#[derive(Debug, Clone)]
pub struct TrustedKeys {
    keys: Vec<PublicKey>,
}

impl TrustedKeys {
    /// Trusts exactly `keys` (the same key twice is kept once).
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> TrustedKeys {
        let mut trusted = TrustedKeys { keys: Vec::new() };
        for key in keys {
            if !trusted.keys.contains(&key) {
                trusted.keys.push(key);
            }
        }
        trusted
    }

    /// Every `*.pub` file in `dir`. A malformed or unreadable one is an
    /// error naming it (a key silently skipped would surprise whoever put
    /// it there), and so is a directory without any.
    pub fn read_dir(dir: &Path) -> Result<TrustedKeys, SignatureError> {
        let read_error = |path: &Path| {
            let path = path.display().to_string();
            move |source| SignatureError::Read { path, source }
        };
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(read_error(dir))?
            .map(|entry| entry.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(read_error(dir))?;
        paths.retain(|p| p.extension().is_some_and(|e| e == "pub"));
        // Sorted, so that which file an error names does not depend on the
        // order the directory lists them in.
        paths.sort();
        let mut keys = Vec::with_capacity(paths.len());
        for path in &paths {
            let text = read_small(path)?;
            let key = PublicKey::parse(&text).map_err(|e| match e {
                SignatureError::Malformed { why, .. } => {
                    malformed(&format!("public key file {}", path.display()), why)
                }
                other => other,
            })?;
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(SignatureError::NoKeys(dir.display().to_string()));
        }
        Ok(TrustedKeys::new(keys))
    }

    /// The ids of the trusted keys.
    pub fn ids(&self) -> Vec<String> {
        self.keys.iter().map(PublicKey::id).collect()
    }

    /// Checks that `sig_text` (a release.sig) is a signature by a trusted
    /// key of this release; returns the key's id.
    pub fn verify(
        &self,
        sig_text: &str,
        manifest_toml: &str,
        sha256: &str,
    ) -> Result<String, SignatureError> {
        let (id, signature) = parse_signature(sig_text)?;
        let message = message(manifest_toml, sha256);
        let mut named = self.keys.iter().filter(|k| k.id() == id).peekable();
        if named.peek().is_none() {
            return Err(SignatureError::Untrusted(id));
        }
        // Two trusted keys may share an id (64 bits); either may have signed.
        if named.any(|k| k.0.verify_strict(&message, &signature).is_ok()) {
            Ok(id)
        } else {
            Err(SignatureError::Mismatch(id))
        }
    }
}

/// The bytes a signature covers.
fn message(manifest_toml: &str, sha256: &str) -> Vec<u8> {
    let sha256 = sha256.to_ascii_lowercase();
    let mut message = Vec::with_capacity(CONTEXT.len() + sha256.len() + 1 + manifest_toml.len());
    message.extend_from_slice(CONTEXT.as_bytes());
    message.extend_from_slice(sha256.as_bytes());
    message.push(b'\n');
    message.extend_from_slice(manifest_toml.as_bytes());
    message
}

fn parse_signature(text: &str) -> Result<(String, Signature), SignatureError> {
    let (words, bytes) = parse_line::<1, 64>(SIGNATURE_FILE, SIGNATURE_TAG, text)?;
    let id = words[0].to_ascii_lowercase();
    if id.len() != KEY_ID_LEN || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(malformed(
            SIGNATURE_FILE,
            format!("the key id must be {KEY_ID_LEN} hex characters"),
        ));
    }
    Ok((id, Signature::from_bytes(&bytes)))
}

/// Splits `TAG WORD.. HEX`: `W` words, then `N` bytes in hex. Returns the
/// words and the bytes.
fn parse_line<'t, const W: usize, const N: usize>(
    what: &str,
    tag: &str,
    text: &'t str,
) -> Result<([&'t str; W], [u8; N]), SignatureError> {
    if text.len() > MAX_TEXT {
        return Err(malformed(
            what,
            format!("{} bytes; at most {MAX_TEXT}", text.len()),
        ));
    }
    let mut words = text.split_ascii_whitespace();
    if words.next() != Some(tag) {
        return Err(malformed(what, format!("it must start with {tag:?}")));
    }
    let rest: Vec<&str> = words.collect();
    let expected = W + 1;
    if rest.len() != expected {
        return Err(malformed(
            what,
            format!("{} fields after {tag:?}; expected {expected}", rest.len()),
        ));
    }
    let bytes = unhex::<N>(rest[W]).ok_or_else(|| {
        malformed(
            what,
            format!("the key material must be {} hex characters", 2 * N),
        )
    })?;
    let mut words = [""; W];
    words.copy_from_slice(&rest[..W]);
    Ok((words, bytes))
}

/// Reads a key file, refusing one too long to be a key.
fn read_small(path: &Path) -> Result<String, SignatureError> {
    let read_error = |source| SignatureError::Read {
        path: path.display().to_string(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_TEXT as u64 + 1).read_to_end(&mut bytes))
        .map_err(read_error)?;
    let what = || format!("public key file {}", path.display());
    if bytes.len() > MAX_TEXT {
        return Err(malformed(&what(), format!("longer than {MAX_TEXT} bytes")));
    }
    String::from_utf8(bytes).map_err(|_| malformed(&what(), "not UTF-8 text"))
}

/// `N` bytes from exactly `2N` hex digits (either case).
fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let mut bytes = [0u8; N];
    hex::decode_to_slice(text, &mut bytes).ok()?;
    Some(bytes)
}

/// Overwrites a stack copy of a seed once `SigningKey` (which wipes its
/// own on drop) holds it. Best effort: volatile writes would need unsafe,
/// so `black_box` is what keeps the stores from being dropped as dead.
fn zero(bytes: &mut [u8]) {
    bytes.fill(0);
    std::hint::black_box(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    const TOML: &str = "name = \"nine9s\"\nversion = \"0.2.0\"\nlibrary = \"lib.so\"\n";

    fn key() -> SecretKey {
        SecretKey::generate().unwrap()
    }

    #[test]
    fn round_trip() {
        let secret = key();
        let public = secret.public();
        assert_eq!(
            SecretKey::parse(&secret.to_text()).unwrap().public(),
            public
        );
        assert_eq!(PublicKey::parse(&public.to_text()).unwrap(), public);
        assert_eq!(public.id().len(), 16);
        let sig = sign(&secret, TOML, SHA);
        assert!(sig.ends_with('\n') && sig.len() <= MAX_TEXT);
        assert_eq!(signer(&sig).unwrap(), public.id());
        let trusted = TrustedKeys::new([public.clone()]);
        assert_eq!(trusted.verify(&sig, TOML, SHA).unwrap(), public.id());
        // The hex is case-insensitive, and so is the sha given.
        assert!(trusted
            .verify(
                &sig.to_uppercase()
                    .replace("NINE9S-ED25519-SIGNATURE", SIGNATURE_TAG),
                TOML,
                SHA
            )
            .is_ok());
        assert!(trusted.verify(&sig, TOML, &SHA.to_uppercase()).is_ok());
    }

    #[test]
    fn secret_keys_are_not_printed() {
        let secret = key();
        let hex_seed = secret.to_text();
        let hex_seed = hex_seed.split_whitespace().nth(1).unwrap();
        assert!(!format!("{secret:?}").contains(hex_seed));
    }

    #[test]
    fn any_change_fails() {
        let secret = key();
        let trusted = TrustedKeys::new([secret.public()]);
        let sig = sign(&secret, TOML, SHA);
        let mut sha = SHA.as_bytes().to_vec();
        sha[10] = if sha[10] == b'0' { b'1' } else { b'0' };
        let sha = String::from_utf8(sha).unwrap();
        let err = trusted.verify(&sig, TOML, &sha).unwrap_err();
        assert!(matches!(err, SignatureError::Mismatch(_)), "{err}");
        assert!(err.to_string().contains("changed after signing"), "{err}");
        let toml = TOML.replace("0.2.0", "0.2.1");
        assert!(matches!(
            trusted.verify(&sig, &toml, SHA),
            Err(SignatureError::Mismatch(_))
        ));
        assert!(matches!(
            trusted.verify(&sig, &format!("{TOML}\n"), SHA),
            Err(SignatureError::Mismatch(_))
        ));
        // A flipped bit of the signature itself.
        let last = sig.trim_end().chars().last().unwrap();
        let flipped = format!(
            "{}{}\n",
            &sig.trim_end()[..sig.trim_end().len() - 1],
            if last == '0' { '1' } else { '0' }
        );
        assert!(matches!(
            trusted.verify(&flipped, TOML, SHA),
            Err(SignatureError::Mismatch(_))
        ));
    }

    #[test]
    fn unknown_key() {
        let (signer_key, other) = (key(), key());
        let trusted = TrustedKeys::new([other.public()]);
        let err = trusted
            .verify(&sign(&signer_key, TOML, SHA), TOML, SHA)
            .unwrap_err();
        assert!(matches!(&err, SignatureError::Untrusted(id) if *id == signer_key.public().id()));
        assert!(err.to_string().contains(&signer_key.public().id()), "{err}");
        assert!(err.to_string().contains("not trusted"), "{err}");
    }

    #[test]
    fn a_key_id_that_lies_does_not_verify() {
        let (real, named) = (key(), key());
        let sig = sign(&real, TOML, SHA).replace(&real.public().id(), &named.public().id());
        let trusted = TrustedKeys::new([named.public(), real.public()]);
        assert!(matches!(
            trusted.verify(&sig, TOML, SHA),
            Err(SignatureError::Mismatch(_))
        ));
    }

    #[test]
    fn malformed_texts() {
        let secret = key();
        let sig = sign(&secret, TOML, SHA);
        let trusted = TrustedKeys::new([secret.public()]);
        let words: Vec<&str> = sig.split_whitespace().collect();
        for bad in [
            String::new(),
            "nine9s-ed25519-signature".into(),
            format!("{} {}", words[0], words[1]),
            format!("{} {} {} extra", words[0], words[1], words[2]),
            format!("other-tag {} {}", words[1], words[2]),
            format!("{} {} {}", words[0], &words[1][..15], words[2]),
            format!("{} zzzzzzzzzzzzzzzz {}", words[0], words[2]),
            format!("{} {} {}", words[0], words[1], &words[2][..126]),
            format!("{} {} {}x", words[0], words[1], &words[2][..127]),
            format!("{} {} {}é", words[0], words[1], &words[2][..126]),
            format!("{sig}{}", " ".repeat(MAX_TEXT)),
        ] {
            let err = trusted.verify(&bad, TOML, SHA).unwrap_err();
            assert!(
                matches!(err, SignatureError::Malformed { .. }),
                "{bad:?}: {err}"
            );
            assert!(err.to_string().contains("release.sig"), "{err}");
        }
        assert!(PublicKey::parse("nine9s-ed25519-public 00").is_err());
        assert!(SecretKey::parse(&secret.public().to_text()).is_err());
        assert!(PublicKey::parse(&secret.to_text()).is_err());
        // Trailing whitespace and CRLF, as editors leave them, are fine.
        let crlf = secret.public().to_text().replace('\n', "\r\n");
        assert!(PublicKey::parse(&crlf).is_ok());
    }

    #[test]
    fn trusted_keys_from_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let err = TrustedKeys::read_dir(dir.path()).unwrap_err();
        assert!(matches!(err, SignatureError::NoKeys(_)), "{err}");
        let (a, b) = (key(), key());
        std::fs::write(dir.path().join("a.pub"), a.public().to_text()).unwrap();
        std::fs::write(dir.path().join("b.pub"), b.public().to_text()).unwrap();
        std::fs::write(dir.path().join("a.key"), a.to_text()).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a key").unwrap();
        let trusted = TrustedKeys::read_dir(dir.path()).unwrap();
        let mut ids = trusted.ids();
        ids.sort();
        let mut expected = vec![a.public().id(), b.public().id()];
        expected.sort();
        assert_eq!(ids, expected);
        assert!(trusted.verify(&sign(&b, TOML, SHA), TOML, SHA).is_ok());

        std::fs::write(dir.path().join("c.pub"), "nine9s-ed25519-public xyz").unwrap();
        let err = TrustedKeys::read_dir(dir.path()).unwrap_err();
        assert!(err.to_string().contains("c.pub"), "{err}");
        std::fs::write(dir.path().join("c.pub"), "x".repeat(5000)).unwrap();
        let err = TrustedKeys::read_dir(dir.path()).unwrap_err();
        assert!(err.to_string().contains("c.pub"), "{err}");
        assert!(TrustedKeys::read_dir(&dir.path().join("missing")).is_err());
    }

    proptest! {
        #[test]
        fn parsing_never_panics(text in ".{0,300}") {
            let _ = PublicKey::parse(&text);
            let _ = SecretKey::parse(&text);
            let _ = signer(&text);
            let trusted = TrustedKeys::new([]);
            prop_assert!(trusted.verify(&text, "", &text).is_err());
        }

        #[test]
        fn near_signatures_never_panic(
            id in "[0-9a-fA-F]{0,20}",
            sig in "[0-9a-fA-Fx ]{0,140}",
            toml in ".{0,100}",
        ) {
            let secret = SecretKey::parse(&format!("{SECRET_TAG} {}", "11".repeat(32))).unwrap();
            let trusted = TrustedKeys::new([secret.public()]);
            let text = format!("{SIGNATURE_TAG} {id} {sig}");
            prop_assert!(trusted.verify(&text, &toml, SHA).is_err());
        }

        #[test]
        fn signatures_verify_for_any_manifest(toml in ".{0,500}", sha in "[0-9a-f]{64}") {
            let secret = SecretKey::parse(&format!("{SECRET_TAG} {}", "22".repeat(32))).unwrap();
            let trusted = TrustedKeys::new([secret.public()]);
            let sig = sign(&secret, &toml, &sha);
            prop_assert!(trusted.verify(&sig, &toml, &sha).is_ok());
        }
    }
}
