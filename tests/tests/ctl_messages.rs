//! What ctl tells a user, checked against the real agent (issue 18, items
//! 5 and 6): every error says what to do, a reply says what really
//! happened to the state, and the same thing is said the same way in the
//! table, the JSON and the README.

use nine9s_tests::{hello, on_0_2_0, stage_fixture, Agent};

/// A self-signed certificate for localhost and 127.0.0.1, made with the
/// openssl command line: (certificate, key).
fn self_signed(dir: &std::path::Path) -> (String, String) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (Debian: openssl)");
    assert!(made.status.success(), "{made:?}");
    (
        cert.to_str().unwrap().to_owned(),
        key.to_str().unwrap().to_owned(),
    )
}

#[test]
fn plaintext_to_a_tls_control_port_says_to_use_https_and_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let agent = Agent::start(
        &dir.path().join("data"),
        &["--tls-cert", &cert, "--tls-key", &key],
    );
    // Was "Internal: h2 protocol error".
    let plain = nine9s_tests::ctl(&agent.url(), &["status"]);
    assert_eq!(plain.code, 3, "{plain:?}");
    let https = format!("https://{}", agent.grpc);
    assert!(
        plain.stderr.contains("speaks TLS")
            && plain.stderr.contains(&format!("--agent {https}"))
            && plain.stderr.contains("--ca"),
        "{plain:?}"
    );
    assert!(!plain.stderr.contains("h2 protocol error"), "{plain:?}");
    // The message for a missing --ca is a whole sentence.
    let no_ca = nine9s_tests::ctl(&https, &["status"]);
    assert_eq!(no_ca.code, 2, "{no_ca:?}");
    assert!(
        no_ca
            .stderr
            .contains("the PEM certificate of the CA that signed the agent's TLS certificate"),
        "{no_ca:?}"
    );
}
