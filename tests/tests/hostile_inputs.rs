//! The hostile-input matrix (issue 8): whatever a stranger or a broken
//! client sends, the agent answers with a clear error — gRPC code, message
//! and ErrorInfo reason — keeps serving the release it served with its
//! state, leaves nothing behind in its data dir, and comes back from a
//! restart on the same release and state.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nine9s_proto::{StageHeader, StageReply, StatusRequest, TransitionRequest};
use nine9s_tests::{
    eventually, fixture_dir, library, on_0_2_0, reason, release_dir, sha256_hex, stage_chunks,
    stage_chunks_with, Agent,
};
use object::{Object, ObjectSection};
use tonic::{Code, Status};

/// `/` requests counted by 0.2.0 before each case.
const HELLOS: usize = 3;

/// An agent on 0.2.0 (permanent, count [`HELLOS`]) and what its data dir
/// held before the case.
struct Target {
    _dir: tempfile::TempDir,
    data: PathBuf,
    extra: Vec<String>,
    agent: Agent,
    artifacts: Vec<String>,
}

fn target(extra: &[&str]) -> Target {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let agent = on_0_2_0(&data, extra, HELLOS);
    let artifacts = listing(&data.join("artifacts"));
    Target {
        _dir: dir,
        data,
        extra: extra.iter().map(|s| s.to_string()).collect(),
        agent,
        artifacts,
    }
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

fn manifest(version: &str, library: &str) -> String {
    format!(
        "name = \"nine9s\"\nversion = \"{version}\"\nlibrary = \"{library}\"\nroutes = [\"/\"]\n"
    )
}

impl Target {
    /// Stages `bytes` under `manifest` over gRPC, with the admin token.
    fn stage(&self, manifest: &str, bytes: &[u8]) -> Result<StageReply, Status> {
        self.stage_with(
            StageHeader {
                manifest_toml: manifest.to_owned(),
                sha256: sha256_hex(bytes),
                size: bytes.len() as u64,
                ..Default::default()
            },
            bytes,
        )
    }

    fn stage_with(&self, header: StageHeader, bytes: &[u8]) -> Result<StageReply, Status> {
        block_on(async {
            let mut api = self.agent.api().await;
            api.stage(tokio_stream::iter(stage_chunks_with(header, bytes)))
                .await
                .map(tonic::Response::into_inner)
        })
    }

    /// The release it served, with its state; no upload left behind; and
    /// the same after a restart.
    fn unharmed(self) {
        let Target {
            _dir,
            data,
            extra,
            agent,
            artifacts,
        } = self;
        let check = |agent: &Agent, when: &str| {
            let reply = agent.get("/count");
            assert_eq!(
                (reply.status, reply.body.trim(), reply.release.as_str()),
                (200, HELLOS.to_string().as_str(), "0.2.0"),
                "{when}"
            );
            assert_eq!(agent.status()["permanent_version"], "0.2.0", "{when}");
        };
        check(&agent, "after the case");
        assert!(
            eventually(Duration::from_secs(10), || listing(&data.join("artifacts"))
                == artifacts),
            "left behind in the artifacts: {:?} (before: {artifacts:?})",
            listing(&data.join("artifacts"))
        );
        assert_eq!(agent.terminate(), 0);
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let again = Agent::start(&data, &extra);
        check(&again, "after a restart");
    }
}

/// Asserts an error status: its code, its reason code, and words of its message.
#[track_caller]
fn refused(result: Result<StageReply, Status>, code: Code, reason_code: &str, says: &str) {
    let status = result.expect_err("the stage must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(reason(&status), reason_code, "{status:?}");
    assert!(
        status.message().contains(says),
        "the message {:?} does not say {says:?}",
        status.message()
    );
}

fn sample_library(version: &str) -> Vec<u8> {
    std::fs::read(library(&format!("nine9s_{}", version.replace('.', "_")))).unwrap()
}

fn fixture_library(name: &str) -> Vec<u8> {
    std::fs::read(library(&format!("fixture_{}", name.replace('-', "_")))).unwrap()
}

fn fixture_manifest(name: &str) -> String {
    std::fs::read_to_string(fixture_dir(name).join("release.toml")).unwrap()
}

#[test]
fn random_bytes_are_no_library() {
    let t = target(&[]);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let bytes: Vec<u8> = (0..200_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    refused(
        t.stage(&manifest("0.9.9", "libx.so"), &bytes),
        Code::InvalidArgument,
        "INVALID_ARTIFACT",
        "not an ELF shared library",
    );
    t.unharmed();
}

#[test]
fn a_library_truncated_inside_its_code_is_refused_before_it_is_mapped() {
    let t = target(&[]);
    let whole = sample_library("0.3.0");
    let text = object::File::parse(&*whole)
        .unwrap()
        .section_by_name(".text")
        .expect("a .text section")
        .file_range()
        .expect("in the file");
    let cut = &whole[..(text.0 + text.1 / 2) as usize];
    refused(
        t.stage(&manifest("0.3.0", "libnine9s_0_3_0.so"), cut),
        Code::InvalidArgument,
        "INVALID_ARTIFACT",
        "truncated",
    );
    t.unharmed();
}

#[test]
fn a_library_for_another_architecture_is_refused() {
    let t = target(&[]);
    let mut bytes = sample_library("0.3.0");
    // e_machine, little-endian: EM_AARCH64 (or EM_X86_64 on an arm host).
    let other: u16 = if cfg!(target_arch = "x86_64") {
        183
    } else {
        62
    };
    bytes[18..20].copy_from_slice(&other.to_le_bytes());
    refused(
        t.stage(&manifest("0.3.0", "libnine9s_0_3_0.so"), &bytes),
        Code::InvalidArgument,
        "INVALID_ARTIFACT",
        "built for",
    );
    t.unharmed();
}

#[test]
fn a_shared_library_that_is_no_plugin_is_refused_libz() {
    let t = target(&[]);
    let libz = [
        "/lib/x86_64-linux-gnu/libz.so.1",
        "/usr/lib/x86_64-linux-gnu/libz.so.1",
        "/lib/aarch64-linux-gnu/libz.so.1",
        "/usr/lib/aarch64-linux-gnu/libz.so.1",
        "/usr/lib64/libz.so.1",
        "/lib64/libz.so.1",
    ]
    .iter()
    .find_map(|p| std::fs::read(p).ok())
    .expect("libz.so.1 on this machine (Debian: zlib1g)");
    refused(
        t.stage(&manifest("0.9.9", "libz.so"), &libz),
        Code::InvalidArgument,
        "INVALID_ARTIFACT",
        "not a nine9s plugin",
    );
    t.unharmed();
}

#[test]
fn a_plugin_of_another_abi_version_is_refused() {
    let t = target(&[]);
    refused(
        t.stage(
            &fixture_manifest("wrong-abi"),
            &fixture_library("wrong-abi"),
        ),
        Code::InvalidArgument,
        "INVALID_ARTIFACT",
        "ABI",
    );
    t.unharmed();
}

#[test]
fn a_library_whose_constructor_crashes_only_crashes_the_probe() {
    let t = target(&[]);
    refused(
        t.stage(
            &fixture_manifest("ctor-crash"),
            &fixture_library("ctor-crash"),
        ),
        Code::InvalidArgument,
        "INVALID_ARTIFACT",
        "crashed the probe process with SIGSEGV",
    );
    t.unharmed();
}

#[test]
fn a_constructor_runs_in_the_probe_never_in_the_serving_agent() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("opened-by");
    let data = dir.path().join("data");
    let agent = Agent::start_with_env(
        &data,
        &[],
        &[("NINE9S_FIXTURE_MARKER", marker.to_str().unwrap())],
    );
    let staged = nine9s_tests::stage_fixture(&agent, "ctor-writes").ok();
    assert!(staged.stdout.contains("0.2.7"), "{staged:?}");
    // The probe's constructor could not write the marker (its mounts are
    // read-only) or wrote another pid: never the agent's.
    let openers = std::fs::read_to_string(&marker).unwrap_or_default();
    let pids: Vec<u32> = openers.lines().map(|l| l.parse().unwrap()).collect();
    let (supervisor, worker) = (agent.pid(), agent.worker_pid());
    assert!(
        !pids.contains(&worker) && !pids.contains(&supervisor),
        "opened by {pids:?}; the agent is {supervisor} (worker {worker})"
    );
    let sha = agent.release("0.2.7").unwrap()["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        !agent.mapped_artifacts().iter().any(|p| p.contains(&sha)),
        "the agent mapped the staged library: {:?}",
        agent.mapped_artifacts()
    );
    // Once accepted, it is the agent's to load when told to.
    agent.ctl(&["upgrade", "--to", "0.2.7"]).ok();
    assert_eq!(agent.get("/").body, "Hello marked !");
}

#[test]
fn an_upload_whose_bytes_do_not_match_its_digest_is_refused() {
    let t = target(&[]);
    let bytes = sample_library("0.3.0");
    let mut header = StageHeader {
        manifest_toml: manifest("0.3.0", "libnine9s_0_3_0.so"),
        sha256: sha256_hex(&bytes),
        size: bytes.len() as u64,
        ..Default::default()
    };
    let mut corrupt = bytes.clone();
    corrupt[4096] ^= 0x55;
    refused(
        t.stage_with(header.clone(), &corrupt),
        Code::DataLoss,
        "CHECKSUM_MISMATCH",
        "corrupt",
    );
    header.sha256 = "not hex".into();
    refused(
        t.stage_with(header, &bytes),
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
        "64 hex digits",
    );
    t.unharmed();
}

/// A tokens file must be owner-only (the agent refuses it otherwise).
fn owner_only(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A key pair made by `ctl keygen` in `dir/name`.
fn keygen(dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    let made = nine9s_tests::ctl(
        "http://127.0.0.1:1",
        &["keygen", "--out", out.to_str().unwrap()],
    );
    assert_eq!(made.code, 0, "{made:?}");
    out
}

/// A copy of nine9s 0.3.0's release dir signed with `key`, and its release.sig.
fn signed_copy(dir: &Path, key: &Path) -> String {
    let release = dir.join(format!(
        "release-{}",
        sha256_hex(key.to_str().unwrap().as_bytes())
    ));
    std::fs::create_dir_all(&release).unwrap();
    std::fs::copy(
        release_dir("nine9s-0.3.0").join("release.toml"),
        release.join("release.toml"),
    )
    .unwrap();
    let signed = nine9s_tests::ctl(
        "http://127.0.0.1:1",
        &[
            "sign",
            release.to_str().unwrap(),
            "--key",
            key.join("nine9s.key").to_str().unwrap(),
            "--library",
            library("nine9s_0_3_0").to_str().unwrap(),
        ],
    );
    assert_eq!(signed.code, 0, "{signed:?}");
    std::fs::read_to_string(release.join("release.sig")).unwrap()
}

#[test]
fn signatures_that_do_not_verify_are_always_refused() {
    let keys = tempfile::tempdir().unwrap();
    let trusted = keygen(keys.path(), "trusted");
    let stranger = keygen(keys.path(), "stranger");
    let trusted_dir = keys.path().join("trust");
    std::fs::create_dir_all(&trusted_dir).unwrap();
    std::fs::copy(
        trusted.join("nine9s.pub"),
        trusted_dir.join("release-team.pub"),
    )
    .unwrap();
    let t = target(&["--trusted-keys", trusted_dir.to_str().unwrap()]);
    let text = std::fs::read_to_string(release_dir("nine9s-0.3.0").join("release.toml")).unwrap();
    let bytes = sample_library("0.3.0");
    let header = |signature: String, manifest: &str| StageHeader {
        manifest_toml: manifest.to_owned(),
        sha256: sha256_hex(&bytes),
        size: bytes.len() as u64,
        signature,
        ..Default::default()
    };
    // Signed by a key this agent does not trust.
    refused(
        t.stage_with(header(signed_copy(keys.path(), &stranger), &text), &bytes),
        Code::FailedPrecondition,
        "BAD_SIGNATURE",
        "not trusted",
    );
    // Signed by a trusted key, then the manifest was changed.
    let good = signed_copy(keys.path(), &trusted);
    let changed = text.replace("routes = [", "routes = [\"/admin\", ");
    assert_ne!(changed, text);
    refused(
        t.stage_with(header(good.clone(), &changed), &bytes),
        Code::FailedPrecondition,
        "BAD_SIGNATURE",
        "does not match",
    );
    // Garbage where the signature goes.
    refused(
        t.stage_with(header("nine9s-ed25519-signature zz".into(), &text), &bytes),
        Code::FailedPrecondition,
        "BAD_SIGNATURE",
        "malformed",
    );
    t.unharmed();
    // And the good one is taken.
    let t = target(&["--trusted-keys", trusted_dir.to_str().unwrap()]);
    let reply = t.stage_with(header(good, &text), &bytes).unwrap();
    assert_eq!(reply.release.unwrap().version, "0.3.0");
}

/// An agent that trusts no keys cannot check a signature and requires
/// none: a signed release is staged as unsigned, and ctl says so (issue
/// 18, item 2: it was refused, so signing a release dir broke every agent
/// without keys).
#[test]
fn a_signed_release_on_an_agent_that_trusts_no_keys_is_staged_unsigned_and_said_so() {
    let keys = tempfile::tempdir().unwrap();
    let key = keygen(keys.path(), "release-team");
    signed_copy(keys.path(), &key);
    let dir = keys.path().join(format!(
        "release-{}",
        sha256_hex(key.to_str().unwrap().as_bytes())
    ));
    let agent = Agent::start(&keys.path().join("data"), &[]);
    let lib = library("nine9s_0_3_0");
    let args = [
        "stage",
        dir.to_str().unwrap(),
        "--library",
        lib.to_str().unwrap(),
    ];
    let staged = agent.ctl(&args).ok();
    assert!(
        staged
            .stdout
            .contains("note: the release is signed, but this agent trusts no keys"),
        "{staged:?}"
    );
    assert!(!staged.stdout.contains("signed by"), "{staged:?}");
    let again = agent.json(&args);
    assert!(
        again["signature_note"]
            .as_str()
            .is_some_and(|n| n.contains("not checked")),
        "{again}"
    );
    let release = agent.release("0.3.0").expect("0.3.0 staged");
    assert!(
        release["signed_by"].as_str().is_none_or(str::is_empty),
        "{release}"
    );
}

#[test]
fn an_unsigned_release_is_refused_when_signatures_are_required() {
    let keys = tempfile::tempdir().unwrap();
    let trusted = keygen(keys.path(), "trusted");
    let agent = Agent::start(
        &keys.path().join("data"),
        &[
            "--trusted-keys",
            trusted.to_str().unwrap(),
            "--require-signed",
        ],
    );
    let lib = library("nine9s_0_3_0");
    let unsigned = agent.ctl(&[
        "stage",
        release_dir("nine9s-0.3.0").to_str().unwrap(),
        "--library",
        lib.to_str().unwrap(),
    ]);
    assert_eq!(unsigned.code, 1, "{unsigned:?}");
    assert!(
        unsigned.stderr.contains("SIGNATURE_REQUIRED"),
        "{unsigned:?}"
    );
    assert_eq!(agent.release_state("0.3.0"), "absent");
    assert_eq!(agent.get("/").body, "Hello world!");
    // `ctl sign` writes release.sig beside release.toml; `ctl stage` sends it.
    let signed = keys.path().join("signed");
    std::fs::create_dir_all(&signed).unwrap();
    std::fs::copy(
        release_dir("nine9s-0.3.0").join("release.toml"),
        signed.join("release.toml"),
    )
    .unwrap();
    let key = trusted.join("nine9s.key");
    let sign = [
        "sign",
        signed.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--library",
        lib.to_str().unwrap(),
    ];
    assert_eq!(nine9s_tests::ctl("http://127.0.0.1:1", &sign).code, 0);
    nine9s_tests::stage_dir(&agent, &signed, &lib);
    assert_eq!(agent.release_state("0.3.0"), "staged");
}

#[test]
fn a_manifest_that_names_another_version_than_its_library_is_refused() {
    let t = target(&[]);
    refused(
        t.stage(
            &manifest("0.2.9", "libnine9s_0_2_0.so"),
            &sample_library("0.2.0"),
        ),
        Code::InvalidArgument,
        "INVALID_ARTIFACT",
        "release.toml says nine9s 0.2.9, but the library is nine9s 0.2.0",
    );
    t.unharmed();
}

#[test]
fn versions_that_are_not_semver_or_too_long_are_refused_and_leave_the_history_alone() {
    let t = target(&[]);
    let bytes = sample_library("0.3.0");
    let history_before = t.agent.history();
    refused(
        t.stage(&manifest("three", "l.so"), &bytes),
        Code::InvalidArgument,
        "INVALID_MANIFEST",
        "three",
    );
    let long = format!("0.3.0-{}", "a".repeat(1000));
    refused(
        t.stage(&manifest(&long, "l.so"), &bytes),
        Code::InvalidArgument,
        "INVALID_MANIFEST",
        "at most 64",
    );
    let huge = format!("0.3.0-{}", "a".repeat(70_000));
    refused(
        t.stage(&manifest(&huge, "l.so"), &bytes),
        Code::ResourceExhausted,
        "TOO_LARGE",
        "release.toml",
    );
    // Refusals are not transitions: the history is as it was, and readable.
    assert_eq!(t.agent.history(), history_before);
    t.unharmed();
}

#[test]
fn path_traversal_in_name_and_library_is_refused() {
    let t = target(&[]);
    let bytes = sample_library("0.3.0");
    refused(
        t.stage(
            "name = \"../../etc\"\nversion = \"0.3.0\"\nlibrary = \"l.so\"\n",
            &bytes,
        ),
        Code::InvalidArgument,
        "INVALID_MANIFEST",
        "name",
    );
    for library in ["../../../etc/passwd.so", "/etc/x.so", "sub/dir.so", ".."] {
        refused(
            t.stage(&manifest("0.3.0", library), &bytes),
            Code::InvalidArgument,
            "INVALID_MANIFEST",
            "file name",
        );
    }
    t.unharmed();
}

#[test]
fn an_oversized_manifest_is_refused_before_the_upload() {
    let t = target(&[]);
    let text = format!(
        "{}# {}\n",
        manifest("0.3.0", "libnine9s_0_3_0.so"),
        "x".repeat(100 * 1024)
    );
    refused(
        t.stage(&text, &sample_library("0.3.0")),
        Code::ResourceExhausted,
        "TOO_LARGE",
        "release.toml",
    );
    t.unharmed();
}

/// Sends a Stage header and `sent` of the library, then keeps the call
/// open without sending more; returns the call's task and the sender
/// that keeps it open.
fn open_upload(
    runtime: &tokio::runtime::Runtime,
    agent: &Agent,
    bytes: &[u8],
    sent: usize,
) -> (
    tokio::task::JoinHandle<Result<StageReply, Status>>,
    tokio::sync::mpsc::Sender<nine9s_proto::StageChunk>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let chunks = stage_chunks(
        &std::fs::read_to_string(release_dir("nine9s-0.3.0").join("release.toml")).unwrap(),
        &sha256_hex(bytes),
        &bytes[..sent],
    );
    let header = chunks[0].clone();
    // The header announces the whole library.
    let header = match header.part {
        Some(nine9s_proto::stage_chunk::Part::Header(mut h)) => {
            h.size = bytes.len() as u64;
            nine9s_proto::StageChunk {
                part: Some(nine9s_proto::stage_chunk::Part::Header(h)),
            }
        }
        _ => unreachable!(),
    };
    let mut api = runtime.block_on(agent.api());
    let call = runtime.spawn(async move {
        api.stage(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map(tonic::Response::into_inner)
    });
    runtime.block_on(async {
        tx.send(header).await.unwrap();
        for chunk in chunks.into_iter().skip(1) {
            tx.send(chunk).await.unwrap();
        }
    });
    (call, tx)
}

fn partials(data: &Path) -> usize {
    listing(&data.join("artifacts"))
        .iter()
        .filter(|n| n.ends_with(".partial"))
        .count()
}

#[test]
fn an_interrupted_upload_leaves_nothing_behind() {
    let t = target(&[]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let bytes = sample_library("0.3.0");
    let (call, tx) = open_upload(&runtime, &t.agent, &bytes, bytes.len() / 2);
    assert!(
        eventually(Duration::from_secs(10), || partials(&t.data) == 1),
        "the upload never reached the disk"
    );
    // The client goes away mid-upload.
    call.abort();
    drop(tx);
    drop(runtime);
    assert!(
        eventually(Duration::from_secs(10), || partials(&t.data) == 0),
        "a partial upload was left behind"
    );
    // An upload that ends early is refused, and leaves nothing either.
    let mut short = stage_chunks(
        &manifest("0.3.0", "libnine9s_0_3_0.so"),
        &sha256_hex(&bytes),
        &bytes,
    );
    short.pop();
    let status =
        block_on(async { t.agent.api().await.stage(tokio_stream::iter(short)).await }).unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::InvalidArgument, "INVALID_ARGUMENT")
    );
    assert!(status.message().contains("ended after"), "{status:?}");
    t.unharmed();
}

#[test]
fn stalled_uploads_are_bounded_in_number_and_time() {
    let t = target(&["--max-uploads", "2", "--upload-idle-timeout", "1s"]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let bytes = sample_library("0.3.0");
    let stalled: Vec<_> = (0..2)
        .map(|_| open_upload(&runtime, &t.agent, &bytes, 64 * 1024))
        .collect();
    assert!(eventually(Duration::from_secs(10), || partials(&t.data) == 2));
    // A third at the same time is refused at once.
    refused(
        t.stage(&manifest("0.3.0", "libnine9s_0_3_0.so"), &bytes),
        Code::ResourceExhausted,
        "TOO_MANY_UPLOADS",
        "--max-uploads",
    );
    // The stalled ones are dropped after their idle timeout.
    for (call, tx) in stalled {
        let status = runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(30), call).await })
            .expect("a stalled upload is dropped")
            .unwrap()
            .unwrap_err();
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        assert_eq!(reason(&status), "UPLOAD_STALLED");
        drop(tx);
    }
    assert_eq!(partials(&t.data), 0);
    // And uploads are taken again.
    let reply = t
        .stage(
            &std::fs::read_to_string(release_dir("nine9s-0.3.0").join("release.toml")).unwrap(),
            &bytes,
        )
        .unwrap();
    assert_eq!(reply.release.unwrap().version, "0.3.0");
}

#[test]
fn the_same_version_with_other_bytes_is_a_conflict() {
    let t = target(&[]);
    let text = std::fs::read_to_string(release_dir("nine9s-0.2.0").join("release.toml")).unwrap();
    let mut other = sample_library("0.2.0");
    other.extend_from_slice(&[0; 64]);
    refused(
        t.stage(&text, &other),
        Code::FailedPrecondition,
        "VERSION_CONFLICT",
        "already staged with other contents",
    );
    t.unharmed();
}

#[test]
fn concurrent_transitions_with_the_same_expectation_run_one_at_a_time() {
    let t = target(&[]);
    nine9s_tests::stage_sample(&t.agent, "0.3.0");
    let agent = &t.agent;
    let (up, down) = std::thread::scope(|s| {
        let up = s.spawn(|| agent.ctl(&["upgrade", "--to", "0.3.0", "--expect-active", "0.2.0"]));
        let down =
            s.spawn(|| agent.ctl(&["downgrade", "--to", "0.1.0", "--expect-active", "0.2.0"]));
        (up.join().unwrap(), down.join().unwrap())
    });
    let winners = [&up, &down].iter().filter(|c| c.code == 0).count();
    assert_eq!(winners, 1, "exactly one wins: {up:?} {down:?}");
    let loser = if up.code == 0 { &down } else { &up };
    assert_eq!(loser.code, 1, "{loser:?}");
    assert!(
        loser.stderr.contains("EXPECTED_ACTIVE_MISMATCH"),
        "{loser:?}"
    );
    let active = agent.status()["active_version"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(active, if up.code == 0 { "0.3.0" } else { "0.1.0" });
}

#[test]
fn strangers_are_unauthenticated() {
    let t = target(&[]);
    block_on(async {
        let mut nobody = t.agent.api_with(None).await;
        let status = nobody.status(StatusRequest {}).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert_eq!(reason(&status), "UNAUTHENTICATED");
        let mut guesser = t
            .agent
            .api_with(Some("0123456789abcdef0123456789abcdef"))
            .await;
        let status = guesser
            .upgrade(TransitionRequest {
                version: "0.1.0".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    });
    // ctl over TCP sends no token (plaintext): the agent turns it away
    // and the hint points to the local socket.
    let out = nine9s_tests::ctl(&t.agent.url(), &["status"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("UNAUTHENTICATED"), "{out:?}");
    assert!(out.stderr.contains("unix:"), "{out:?}");
    // The admin token is the agent user's alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(t.agent.token_file())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "admin.token mode {mode:o}");
    t.unharmed();
}

#[test]
fn roles_limit_what_a_token_may_do_and_identities_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        "# name role token\nwatcher read read-token-0123456789\nci deploy deploy-token-0123456789\nops admin admin-token-0123456789\n",
    )
    .unwrap();
    owner_only(&tokens);
    // Tokens go only over TLS.
    let pki = Pki::new();
    let agent = Agent::start(
        &dir.path().join("data"),
        &[
            "--tokens",
            tokens.to_str().unwrap(),
            "--tls-cert",
            &pki.path("server.pem"),
            "--tls-key",
            &pki.path("server.key"),
        ],
    );
    // With --tokens, no admin token is made in the data dir.
    assert!(!agent.token_file().exists());
    let url = format!("https://localhost:{}", agent.grpc.port());
    let ca = pki.path("ca.pem");
    let as_ = |token: &str, args: &[&str]| {
        let mut all = vec!["--ca", ca.as_str()];
        all.extend_from_slice(args);
        nine9s_tests::ctl_env(&url, &all, &[("NINE9S_TOKEN", token)])
    };
    let lib = library("nine9s_0_2_0");
    let release = release_dir("nine9s-0.2.0");
    let stage = [
        "stage",
        release.to_str().unwrap(),
        "--library",
        lib.to_str().unwrap(),
    ];
    let denied = as_("read-token-0123456789", &stage);
    assert_eq!(denied.code, 1, "{denied:?}");
    assert!(denied.stderr.contains("PERMISSION_DENIED"), "{denied:?}");
    as_("read-token-0123456789", &["status"]).ok();
    as_("deploy-token-0123456789", &stage).ok();
    // A read token calling Upgrade.
    let denied = as_("read-token-0123456789", &["upgrade", "--to", "0.2.0"]);
    assert_eq!(denied.code, 1, "{denied:?}");
    assert!(denied.stderr.contains("[PERMISSION_DENIED]"), "{denied:?}");
    assert!(
        denied.stderr.contains("watcher has the read role"),
        "{denied:?}"
    );
    let upgrade = [
        "upgrade",
        "--to",
        "0.2.0",
        "--permanent",
        "--reason",
        "ticket 7",
        "--request-id",
        "deploy-7",
    ];
    as_("deploy-token-0123456789", &upgrade).ok();
    // A request id is its caller's: another identity cannot replay it.
    let replayed = as_("admin-token-0123456789", &upgrade);
    assert_eq!(replayed.code, 1, "{replayed:?}");
    assert!(
        replayed.stderr.contains("REQUEST_ID_REUSED"),
        "{replayed:?}"
    );
    // ... nor learn what that command was, or whose.
    for private in ["by ci", "Permanent", "None"] {
        assert!(
            !replayed.stderr.contains(private),
            "{private}: {replayed:?}"
        );
    }
    let denied = as_("deploy-token-0123456789", &["remove", "0.1.0"]);
    assert_eq!(denied.code, 1, "{denied:?}");
    assert!(denied.stderr.contains("PERMISSION_DENIED"), "{denied:?}");
    as_("admin-token-0123456789", &["remove", "0.1.0"]).ok();
    let history = as_("watcher-is-not-a-token", &["--output", "json", "history"]);
    assert_eq!(history.code, 1, "{history:?}");
    let history = as_("read-token-0123456789", &["--output", "json", "history"]).ok();
    let history: serde_json::Value = serde_json::from_str(&history.stdout).unwrap();
    let who: Vec<(String, String, String)> = history["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let text = |k: &str| t[k].as_str().unwrap_or_default().to_owned();
            (text("kind"), text("identity"), text("reason"))
        })
        .collect();
    let expect = |kind: &str, identity: &str, reason: &str| {
        assert!(
            who.contains(&(kind.into(), identity.into(), reason.into())),
            "no {kind} by {identity:?} for {reason:?} in {who:?}"
        )
    };
    expect("stage", "ci", "");
    expect("upgrade", "ci", "ticket 7");
    expect("remove", "ops", "");
    assert_eq!(agent.get("/").release, "0.2.0");
}

/// A CA, a server certificate for 127.0.0.1 and client certificates,
/// made with the openssl command line.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki { dir };
        pki.ca("ca");
        pki.ca("other-ca");
        pki.issue(
            "server",
            "ca",
            "/CN=localhost",
            Some("subjectAltName=DNS:localhost,IP:127.0.0.1"),
        );
        pki.issue("edge-1", "ca", "/CN=edge-1", None);
        pki.issue("impostor", "other-ca", "/CN=edge-1", None);
        pki.issue("stranger", "ca", "/CN=stranger", None);
        pki.issue("ops", "ca", "/CN=ops", None);
        pki
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_owned()
    }

    fn openssl(&self, args: &[&str]) {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("openssl (Debian: openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn ca(&self, name: &str) {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
        ]);
    }

    fn issue(&self, name: &str, ca: &str, subject: &str, ext: Option<&str>) {
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            subject,
        ]);
        let ext_file = format!("{name}.ext");
        std::fs::write(
            self.dir.path().join(&ext_file),
            ext.unwrap_or("basicConstraints=CA:FALSE"),
        )
        .unwrap();
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &ext_file,
        ]);
    }
}

#[test]
fn client_certificates_are_identities_and_a_wrong_one_is_turned_away() {
    let pki = Pki::new();
    let tokens = pki.dir.path().join("tokens");
    std::fs::write(
        &tokens,
        "edge-1 deploy -\nops admin admin-token-0123456789\n",
    )
    .unwrap();
    owner_only(&tokens);
    let data = pki.dir.path().join("data");
    let agent = Agent::start(
        &data,
        &[
            "--tokens",
            tokens.to_str().unwrap(),
            "--tls-cert",
            &pki.path("server.pem"),
            "--tls-key",
            &pki.path("server.key"),
            "--client-ca",
            &pki.path("ca.pem"),
        ],
    );
    let url = format!("https://localhost:{}", agent.grpc.port());
    let with = |client: &str, args: &[&str]| {
        let mut all = vec![
            "--ca".to_owned(),
            pki.path("ca.pem"),
            "--cert".into(),
            pki.path(&format!("{client}.pem")),
            "--key".into(),
            pki.path(&format!("{client}.key")),
        ];
        all.extend(args.iter().map(|s| s.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        nine9s_tests::ctl(&url, &all)
    };
    let ok = with("edge-1", &["--output", "json", "status"]);
    assert_eq!(ok.code, 0, "{ok:?}");
    let (release, lib) = (release_dir("nine9s-0.2.0"), library("nine9s_0_2_0"));
    let staged = with(
        "edge-1",
        &[
            "stage",
            release.to_str().unwrap(),
            "--library",
            lib.to_str().unwrap(),
        ],
    );
    assert_eq!(staged.code, 0, "{staged:?}");
    assert_eq!(with("edge-1", &["upgrade", "--to", "0.2.0"]).code, 0);
    let history = with("edge-1", &["--output", "json", "history"]);
    let history: serde_json::Value = serde_json::from_str(&history.stdout).unwrap();
    assert_eq!(
        history["transitions"].as_array().unwrap().last().unwrap()["identity"],
        "edge-1"
    );
    // Same subject, another CA: the agent refuses the certificate in the
    // handshake, nothing is done, and ctl says so (issue 17: it said
    // "cannot reach the agent", exit 3).
    let impostor = with("impostor", &["upgrade", "--to", "0.1.0"]);
    assert_eq!(impostor.code, 1, "{impostor:?}");
    assert!(
        impostor
            .stderr
            .contains("the agent refused this client certificate (TLS alert: ")
            && impostor.stderr.contains("impostor.pem")
            && impostor.stderr.contains("[UNAUTHENTICATED]"),
        "{impostor:?}"
    );
    let json = with("impostor", &["--output", "json", "status"]);
    let error: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(error["error"]["reason"], "UNAUTHENTICATED", "{json:?}");
    assert_eq!(error["error"]["exit_code"], 1, "{json:?}");
    // Signed by the CA, but not listed: unauthenticated.
    let stranger = with("stranger", &["status"]);
    assert_eq!(stranger.code, 1, "{stranger:?}");
    assert!(stranger.stderr.contains("UNAUTHENTICATED"), "{stranger:?}");
    // A token identity's name on a certificate is not that identity.
    let ops = with("ops", &["remove", "0.1.0"]);
    assert!(ops.stderr.contains("UNAUTHENTICATED"), "{ops:?}");
    // No certificate at all, even with a valid token: no handshake either.
    let bare = nine9s_tests::ctl(
        &url,
        &[
            "--ca",
            &pki.path("ca.pem"),
            "--token",
            "admin-token-0123456789",
            "status",
        ],
    );
    assert_eq!(bare.code, 1, "{bare:?}");
    assert!(
        bare.stderr
            .contains("the agent requires a client certificate and none was given (TLS alert: ")
            && bare.stderr.contains("--cert"),
        "{bare:?}"
    );
    assert_eq!(agent.get("/").release, "0.2.0");
}

#[test]
fn a_control_plane_beyond_loopback_without_tls_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(nine9s_tests::bin_dir().join("agent"))
        .args(["--data-dir", dir.path().join("data").to_str().unwrap()])
        .args(["--http", "127.0.0.1:0", "--grpc", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--tls-cert"), "{stderr}");
    assert!(!dir.path().join("data").exists(), "nothing was created");
}

/// Closed by the agent: end of file or a reset, not our read timeout.
fn closed_by_the_agent(stream: &mut TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            // A response (the 408 of a slow body): read on to the close.
            Ok(_) => continue,
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

/// Sends `bytes` one at a time, 300 ms apart, until the agent closes the
/// connection or they run out; returns whether it closed it.
fn trickle(stream: &mut TcpStream, bytes: &[u8]) -> bool {
    let mut probe = stream.try_clone().unwrap();
    probe.set_nonblocking(true).unwrap();
    for byte in bytes {
        if stream.write_all(&[*byte]).is_err() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(300));
        let mut buf = [0u8; 1];
        if matches!(probe.read(&mut buf), Ok(0)) {
            return true;
        }
    }
    false
}

#[test]
fn slowloris_headers_are_cut_off_while_others_are_served() {
    // An idle limit far away: only the header timeout can close it.
    let t = target(&["--http-header-timeout", "1s", "--http-idle-timeout", "1h"]);
    let mut slow = TcpStream::connect(t.agent.http).unwrap();
    let agent = &t.agent;
    let cut = std::thread::scope(|s| {
        let served = s.spawn(|| agent.get("/count").status);
        let cut = trickle(&mut slow, &[b'G'; 100]);
        assert_eq!(served.join().unwrap(), 200);
        cut
    });
    assert!(cut, "a request whose headers never end was kept for 30 s");
    t.unharmed();
}

#[test]
fn a_slow_body_is_cut_off() {
    let t = target(&["--http-body-timeout", "1s", "--http-idle-timeout", "1h"]);
    let mut slow = TcpStream::connect(t.agent.http).unwrap();
    slow.write_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n")
        .unwrap();
    // Everything the agent sends until it closes, read as it comes; the
    // body trickles in (a byte every 300 ms, which never completes it)
    // until the agent has answered.
    let answered = Arc::new(AtomicBool::new(false));
    let mut reader = slow.try_clone().unwrap();
    reader
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let reply = {
        let answered = Arc::clone(&answered);
        std::thread::spawn(move || {
            let mut all = Vec::new();
            let mut buf = [0u8; 1024];
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                answered.store(true, Ordering::SeqCst);
                all.extend_from_slice(&buf[..n]);
            }
            String::from_utf8_lossy(&all).into_owned()
        })
    };
    for _ in 0..100 {
        if answered.load(Ordering::SeqCst) || slow.write_all(b"x").is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let reply = reply.join().unwrap();
    assert!(reply.starts_with("HTTP/1.1 408 "), "{reply:?}");
    assert!(
        reply.contains("the request body did not arrive within 1000 ms"),
        "{reply:?}"
    );
    t.unharmed();
}

#[test]
fn idle_keep_alive_connections_are_closed() {
    let t = target(&["--http-idle-timeout", "1s", "--http-header-timeout", "1h"]);
    let mut idle = TcpStream::connect(t.agent.http).unwrap();
    assert!(
        closed_by_the_agent(&mut idle),
        "an idle connection was kept"
    );
    // And one idle after a response: answered, then closed.
    let mut used = TcpStream::connect(t.agent.http).unwrap();
    used.write_all(b"GET /count HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    assert!(
        closed_by_the_agent(&mut used),
        "a keep-alive connection idle for 30 s was kept"
    );
    t.unharmed();
}

#[test]
fn connections_beyond_the_cap_wait_and_never_take_the_control_plane_down() {
    let t = target(&["--max-connections", "16", "--http-idle-timeout", "1h"]);
    // Each in the middle of its request's headers: none idle, so none
    // gives way to a newcomer.
    let mut held: Vec<TcpStream> = (0..16)
        .map(|_| {
            let mut held = TcpStream::connect(t.agent.http).unwrap();
            held.write_all(b"GET /count HTTP/1.1\r\n").unwrap();
            held
        })
        .collect();
    // The 17th waits: connected (the backlog), not served.
    let mut waiting = TcpStream::connect(t.agent.http).unwrap();
    waiting
        .write_all(b"GET /count HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    waiting
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut buf = [0u8; 512];
    let early = waiting.read(&mut buf);
    assert!(
        matches!(&early, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "served beyond the cap: {early:?}"
    );
    // The control plane answers while the data plane is full.
    assert_eq!(t.agent.status()["active_version"], "0.2.0");
    // A slot frees: the waiting one is served.
    held.pop();
    waiting
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let n = waiting.read(&mut buf).unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    drop(held);
    t.unharmed();
}

/// What proptest sends as a Stage call: header and data messages in any
/// order, with sizes and digests that may or may not add up.
fn stage_message() -> impl proptest::strategy::Strategy<Value = nine9s_proto::StageChunk> {
    use nine9s_proto::stage_chunk::Part;
    use nine9s_proto::StageChunk;
    use proptest::prelude::*;
    let bytes = proptest::collection::vec(any::<u8>(), 0..2048);
    prop_oneof![
        3 => bytes.clone().prop_map(|b| StageChunk { part: Some(Part::Data(b)) }),
        1 => (0u64..5000, "[0-9a-f]{0,64}", any::<bool>(), bytes).prop_map(|(size, sha, real, b)| {
            let manifest = if real {
                "name = \"nine9s\"\nversion = \"0.9.0\"\nlibrary = \"l.so\"\n".to_owned()
            } else {
                String::from_utf8_lossy(&b).into_owned()
            };
            StageChunk {
                part: Some(Part::Header(StageHeader {
                    manifest_toml: manifest,
                    sha256: sha,
                    size,
                    ..Default::default()
                })),
            }
        }),
        1 => Just(StageChunk { part: None }),
    ]
}

/// A proptest over one real agent, which lives (and is stopped) with the test.
#[test]
fn any_stage_call_gets_a_clear_answer_and_the_agent_keeps_serving() {
    use proptest::test_runner::{Config, TestCaseError, TestRunner};
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &["--upload-idle-timeout", "2s"]);
    let mut runner = TestRunner::new(Config {
        cases: 48,
        ..Config::default()
    });
    let messages = proptest::collection::vec(stage_message(), 0..6);
    runner
        .run(&messages, |messages| {
            let result =
                block_on(async { agent.api().await.stage(tokio_stream::iter(messages)).await });
            if let Err(status) = result {
                if reason(&status).is_empty() || status.message().is_empty() {
                    return Err(TestCaseError::fail(format!(
                        "no reason or message: {status:?}"
                    )));
                }
            }
            if agent.get("/").status != 200 {
                return Err(TestCaseError::fail("the agent stopped serving"));
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn an_artifact_changed_on_disk_is_never_loaded() {
    let t = target(&[]);
    nine9s_tests::stage_sample(&t.agent, "0.3.0");
    let sha = t.agent.release("0.3.0").unwrap()["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = t.data.join("artifacts").join(format!("{sha}.so"));
    let mut bytes = std::fs::read(&path).unwrap();
    let text = object::File::parse(&*bytes)
        .unwrap()
        .section_by_name(".text")
        .unwrap()
        .file_range()
        .unwrap();
    // Someone with access to the data dir patches the code.
    bytes[(text.0 + text.1 / 2) as usize] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let out = t.agent.ctl(&["upgrade", "--to", "0.3.0"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("CHECKSUM_MISMATCH") && out.stderr.contains("changed on disk"),
        "{out:?}"
    );
    assert!(
        !t.agent.mapped_artifacts().iter().any(|p| p.contains(&sha)),
        "the changed library was mapped"
    );
    assert_eq!(t.agent.release_state("0.3.0"), "failed");
    assert_eq!(t.agent.get("/count").release, "0.2.0");
}

#[test]
fn a_permanent_artifact_changed_on_disk_is_not_loaded_at_boot() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let agent = on_0_2_0(&data, &[], HELLOS);
    let sha = agent.release("0.2.0").unwrap()["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(agent.terminate(), 0);
    let path = data.join("artifacts").join(format!("{sha}.so"));
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let agent = Agent::start(&data, &[]);
    // It falls back on the release before, and says why.
    assert_eq!(agent.get("/").release, "0.1.0");
    let status = agent.status();
    assert_eq!(status["permanent_version"], "0.1.0", "{status}");
    assert!(agent.logged("changed on disk"), "{}", agent.log());
    assert!(!agent.mapped_artifacts().iter().any(|p| p.contains(&sha)));
}

#[test]
fn the_data_dir_is_owner_only_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // A permissive umask: what the agent creates is owner-only anyway. (A
    // data dir others can write to is refused: local_admin.rs.)
    let agent = Agent::start_after("umask 000", &data, &[]);
    nine9s_tests::stage_sample(&agent, "0.2.0");
    agent.ctl(&["upgrade", "--to", "0.2.0", "--permanent"]).ok();
    let mut open = Vec::new();
    let mut stack = vec![data.clone()];
    while let Some(path) = stack.pop() {
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        if mode & 0o077 != 0 {
            open.push(format!("{} {:o}", path.display(), mode & 0o777));
        }
        if path.is_dir() {
            stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
    }
    assert!(open.is_empty(), "readable by others: {open:#?}");
}

#[test]
fn a_flood_of_connections_never_takes_the_control_plane_down() {
    // Few file descriptors, and more connections than they could hold.
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start_after("ulimit -n 300", &dir.path().join("data"), &[]);
    // Those beyond the agent's cap and the listen backlog wait for the
    // kernel to take their SYN: not for this test.
    let flood: Vec<TcpStream> = (0..400)
        .filter_map(|_| TcpStream::connect_timeout(&agent.http, Duration::from_millis(20)).ok())
        .collect();
    let status = agent.ctl(&["--output", "json", "status"]);
    assert_eq!(
        status.code, 0,
        "the control plane is unreachable: {status:?}"
    );
    drop(flood);
    assert!(eventually(Duration::from_secs(10), || {
        nine9s_tests::Client::connect(agent.http)
            .and_then(|mut c| c.get("/"))
            .is_ok_and(|r| r.status == 200)
    }));
}

#[test]
fn disk_full_while_staging_is_refused_and_leaves_nothing() {
    let Some(disk) = nine9s_tests::SmallDisk::mount(64) else {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    };
    let data = disk.path().join("data");
    let agent = on_0_2_0(&data, &["--checkpoint-every", "1d"], HELLOS);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let big = vec![0x5a_u8; 20 * 1024 * 1024];
    // One upload under way holds its room on the disk...
    let (first, tx) = open_upload(&runtime, &agent, &big, 1024 * 1024);
    assert!(eventually(Duration::from_secs(10), || partials(&data) == 1));
    // ...so a second that would fit alone, but not beside it, is refused at once.
    let status = block_on(async {
        agent
            .api()
            .await
            .stage(tokio_stream::iter(stage_chunks(
                &manifest("0.3.0", "libnine9s_0_3_0.so"),
                &sha256_hex(&big),
                &big,
            )))
            .await
            .unwrap_err()
    });
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::ResourceExhausted, "DISK_FULL"),
        "{status:?}"
    );
    // The disk fills up under the first: its writes fail, it is refused.
    disk.fill();
    runtime.block_on(async {
        for chunk in big[1024 * 1024..].chunks(64 * 1024) {
            let message = nine9s_proto::StageChunk {
                part: Some(nine9s_proto::stage_chunk::Part::Data(chunk.to_vec())),
            };
            if tx.send(message).await.is_err() {
                break;
            }
        }
    });
    drop(tx);
    let status = runtime
        .block_on(first)
        .unwrap()
        .expect_err("an upload onto a full disk");
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::ResourceExhausted, "DISK_FULL"),
        "{status:?}"
    );
    assert_eq!(partials(&data), 0, "a partial upload was left behind");
    assert_eq!(agent.get("/count").body.trim(), HELLOS.to_string());
    disk.free();
    assert_eq!(agent.terminate(), 0);
    let agent = Agent::start(&data, &[]);
    assert_eq!(agent.get("/count").body.trim(), HELLOS.to_string());
    assert_eq!(agent.release_state("0.3.0"), "absent");
}

/// Processes running `sleep 3599`, the child the hanging fixture starts.
fn fixture_sleepers() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == b"sleep\x003599\x00")
        })
        .collect()
}

#[test]
fn a_release_that_crashes_on_init_is_rehearsed_away_from_the_serving_worker() {
    let dir = tempfile::tempdir().unwrap();
    let crash = dir.path().join("crash-now");
    let agent = Agent::start_with_env(
        &dir.path().join("data"),
        &[],
        &[("NINE9S_FIXTURE_CRASH_FILE", crash.to_str().unwrap())],
    );
    nine9s_tests::stage_sample(&agent, "0.2.0");
    agent.ctl(&["upgrade", "--to", "0.2.0", "--permanent"]).ok();
    nine9s_tests::hello(&agent, HELLOS);
    nine9s_tests::stage_fixture(&agent, "segfault").ok();
    // From now on 0.2.8's `init` writes through a null pointer.
    std::fs::write(&crash, "").unwrap();
    let worker = agent.worker_pid();
    let intact = |when: &str| {
        assert_eq!(agent.worker_pid(), worker, "{when}: the worker changed");
        let count = agent.get("/count");
        assert_eq!(
            (count.body.trim(), count.release.as_str()),
            (HELLOS.to_string().as_str(), "0.2.0"),
            "{when}"
        );
    };
    let dry = agent.ctl(&["upgrade", "--to", "0.2.8", "--dry-run"]);
    assert_eq!(dry.code, 1, "{dry:?}");
    assert!(
        dry.stderr.contains("SIGSEGV") && dry.stderr.contains("never loaded it"),
        "{dry:?}"
    );
    intact("after the dry run");
    let real = agent.ctl(&["upgrade", "--to", "0.2.8"]);
    assert_eq!(real.code, 1, "{real:?}");
    assert!(real.stderr.contains("SIGSEGV"), "{real:?}");
    intact("after the upgrade");
    assert_eq!(agent.release_state("0.2.8"), "failed");
}

/// Processes whose name (`comm`) is `name`.
fn named(name: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .collect()
}

#[test]
fn a_constructor_that_leaves_a_daemon_holds_nothing_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    std::fs::create_dir(&files).unwrap();
    // Writable by anyone: whoever the probe runs as, only its walls stop it.
    std::fs::set_permissions(&files, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let name = format!("n9d{}", std::process::id());
    let agent = Agent::start_with_env(
        &dir.path().join("data"),
        &[],
        &[
            ("NINE9S_FIXTURE_DAEMON", name.as_str()),
            ("NINE9S_FIXTURE_FILES", files.to_str().unwrap()),
        ],
    );
    // The daemon holds the probe's stdout for 30 s: the stage must not wait.
    let started = Instant::now();
    let staged = nine9s_tests::stage_fixture(&agent, "ctor-daemon");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(12),
        "the stage took {took:?}: {staged:?}"
    );
    assert!(staged.stdout.contains("0.2.3"), "{staged:?}");
    assert!(
        eventually(Duration::from_secs(5), || named(&name).is_empty()),
        "the constructor's daemon outlived the probe: {:?}",
        named(&name)
    );
    let written: u64 = std::fs::read_dir(&files)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(
        written <= 1024 * 1024,
        "the probe's constructor wrote {written} bytes"
    );
    // Nothing of it was held: staging goes on.
    nine9s_tests::stage_sample(&agent, "0.2.0");
}

#[test]
fn a_library_whose_constructor_hangs_is_refused_and_leaves_no_process() {
    let t = target(&[]);
    refused(
        t.stage(
            &fixture_manifest("ctor-hangs"),
            &fixture_library("ctor-hangs"),
        ),
        Code::InvalidArgument,
        "INVALID_ARTIFACT",
        "did not finish within 10 s",
    );
    assert!(
        eventually(Duration::from_secs(5), || fixture_sleepers().is_empty()),
        "the constructor's child outlived the probe: {:?}",
        fixture_sleepers()
    );
    t.unharmed();
}

#[test]
fn require_signed_applies_to_releases_staged_before_it_and_releases_show_who_signed() {
    let keys = tempfile::tempdir().unwrap();
    let trusted = keygen(keys.path(), "trusted");
    let data = keys.path().join("data");
    let agent = Agent::start(&data, &[]);
    let lib = library("nine9s_0_3_0");
    let stage = |agent: &Agent, dir: &Path| {
        nine9s_tests::stage_dir(agent, dir, &lib);
    };
    // Staged unsigned while no signature is required.
    stage(&agent, &release_dir("nine9s-0.3.0"));
    let signed_by = |agent: &Agent, version: &str| {
        agent.release(version).expect("listed")["signed_by"]
            .as_str()
            .expect("signed_by is a string")
            .to_owned()
    };
    // The embedded sample release is part of the agent binary: trusted as it.
    assert_eq!(signed_by(&agent, "0.1.0"), "built-in");
    assert_eq!(signed_by(&agent, "0.3.0"), "");
    let table = agent.ctl(&["releases"]).ok().stdout;
    assert!(
        table.contains("SIGNED-BY") && table.contains("built-in"),
        "{table}"
    );
    assert_eq!(agent.terminate(), 0);

    // Restarted with signatures required: the unsigned release already in
    // the store is neither switched to nor made permanent.
    let flags = [
        "--trusted-keys",
        trusted.to_str().unwrap(),
        "--require-signed",
    ];
    let agent = Agent::start(&data, &flags);
    block_on(async {
        let mut api = agent.api().await;
        for permanence in [0, 2] {
            let status = api
                .upgrade(TransitionRequest {
                    version: "0.3.0".into(),
                    permanence,
                    ..Default::default()
                })
                .await
                .expect_err("an unsigned release is refused");
            assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
            assert_eq!(reason(&status), "SIGNATURE_REQUIRED");
            assert!(status.message().contains("staged unsigned"), "{status:?}");
        }
    });
    let upgrade = agent.ctl(&["upgrade", "--to", "0.3.0", "--permanent"]);
    assert_eq!(upgrade.code, 1, "{upgrade:?}");
    assert!(upgrade.stderr.contains("SIGNATURE_REQUIRED"), "{upgrade:?}");
    let permanent = agent.ctl(&["make-permanent", "0.3.0"]);
    assert_ne!(permanent.code, 0, "{permanent:?}");
    // It keeps serving what it served; the release stays staged.
    let reply = agent.get("/");
    assert_eq!((reply.status, reply.release.as_str()), (200, "0.1.0"));
    assert_eq!(agent.status()["permanent_version"], "0.1.0");
    assert_eq!(agent.release_state("0.3.0"), "staged");

    // Removed and staged again signed, it is taken, and shows its key.
    agent.ctl(&["remove", "0.3.0"]).ok();
    let signed = keys.path().join("signed");
    std::fs::create_dir_all(&signed).unwrap();
    std::fs::copy(
        release_dir("nine9s-0.3.0").join("release.toml"),
        signed.join("release.toml"),
    )
    .unwrap();
    let key = trusted.join("nine9s.key");
    let sign = nine9s_tests::ctl(
        "http://127.0.0.1:1",
        &[
            "sign",
            signed.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--library",
            lib.to_str().unwrap(),
        ],
    );
    assert_eq!(sign.code, 0, "{sign:?}");
    stage(&agent, &signed);
    let by = signed_by(&agent, "0.3.0");
    assert!(
        by.len() == 16 && by.bytes().all(|b| b.is_ascii_hexdigit()),
        "{by:?}"
    );
    assert!(
        sign.stdout.contains(&by),
        "the key ctl sign named: {sign:?}"
    );
    agent.ctl(&["upgrade", "--to", "0.3.0", "--permanent"]).ok();
    assert_eq!(agent.get("/").release, "0.3.0");
}

#[test]
fn history_after_the_last_possible_id_is_empty_and_ends() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    block_on(async {
        let mut api = agent.api().await;
        for after_id in [u64::MAX, u64::MAX - 1] {
            let page = api
                .history(nine9s_proto::HistoryRequest {
                    after_id: Some(after_id),
                    limit: 10,
                })
                .await
                .expect("a page")
                .into_inner();
            assert!(page.transitions.is_empty(), "{page:?}");
            assert!(!page.more, "{page:?}");
        }
    });
    assert_eq!(agent.get("/").status, 200);
}

/// The status line of `GET path` on a new connection.
fn status_line(agent: &Agent, path: &str) -> String {
    let mut stream = TcpStream::connect(agent.http).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    answer.lines().next().unwrap_or_default().to_owned()
}

#[test]
fn a_release_answering_no_final_status_gets_its_client_a_502() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("data"), &[]);
    nine9s_tests::stage_fixture(&agent, "headers").ok();
    agent.ctl(&["upgrade", "--to", "0.4.2", "--permanent"]).ok();
    assert!(status_line(&agent, "/status?code=204").starts_with("HTTP/1.1 204"));
    // 101 would tell the client the connection now speaks another
    // protocol; 100 that the answer is yet to come; 999 is no status.
    for code in [101, 100, 999, 600] {
        let line = status_line(&agent, &format!("/status?code={code}"));
        assert!(line.starts_with("HTTP/1.1 502"), "{code}: {line:?}");
    }
    assert!(agent.logged("no final HTTP status"));
    assert_eq!(agent.get("/count").status, 200);
}
