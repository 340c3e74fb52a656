//! The harness of the end-to-end tests: builds the workspace once, starts
//! the real `agent` binary on free ports with a temp data dir, runs the
//! real `ctl`, and speaks plain HTTP/1.1 to the agent over real sockets.
//! Nothing here is a mock; tests only see what a user would see.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use nine9s_proto::control_client::ControlClient;
use nine9s_proto::{stage_chunk, StageChunk, StageHeader};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where cargo put the binaries and plugin libraries of this build
/// profile, after making sure they are built (once per test binary).
pub fn bin_dir() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> -> target/<profile>
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .to_owned();
        let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cargo
            .current_dir(root())
            // --all-targets resolves features as `cargo test` does (with
            // the dev-dependencies): a plain build after a test build
            // rebuilt the workspace's crates and some dependencies, and
            // the next test build rebuilt them back.
            .args(["build", "--workspace", "--all-targets", "--quiet"]);
        // What cargo set for this test (its package's name, version and
        // manifest dir, ...) is watched by a build script (ring's):
        // inherited, the outer `cargo test` and this build would each
        // rebuild half the dependencies after the other.
        let set_for_the_test = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
        ];
        for (name, _) in std::env::vars_os() {
            if let Some(name) = name.to_str() {
                if set_for_the_test.iter().any(|p| name.starts_with(p)) {
                    cargo.env_remove(name);
                }
            }
        }
        if dir.file_name().is_some_and(|n| n == "release") {
            cargo.arg("--release");
        }
        let status = cargo.status().expect("run cargo build");
        assert!(status.success(), "cargo build --workspace failed");
        dir
    })
}

/// A plugin library built by the workspace, e.g. `library("nine9s_0_2_0")`.
pub fn library(name: &str) -> PathBuf {
    bin_dir().join(format!("lib{name}.so"))
}

/// A sample release directory under `plugins/`, e.g. `release_dir("nine9s-0.2.0")`.
pub fn release_dir(name: &str) -> PathBuf {
    root().join("plugins").join(name)
}

/// A test fixture release directory under `tests/plugins/`.
pub fn fixture_dir(name: &str) -> PathBuf {
    root().join("tests/plugins").join(name)
}

/// What a `ctl` run printed, and how it exited.
#[derive(Debug)]
pub struct Ctl {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Ctl {
    /// Panics with the output unless the command succeeded.
    pub fn ok(self) -> Ctl {
        assert_eq!(self.code, 0, "ctl failed: {self:#?}");
        self
    }
}

/// A running agent process.
pub struct Agent {
    child: Child,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// The ready line the agent printed (`... http=ADDR grpc=ADDR ...`).
    pub ready: String,
}

impl Agent {
    /// Starts the agent on free ports over `data_dir`, with extra flags,
    /// and waits for its ready line.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Agent {
        Agent::start_with_env(data_dir, extra, &[])
    }

    /// [`Agent::start`] with extra environment variables.
    pub fn start_with_env(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Agent {
        Agent::spawn(Command::new(bin_dir().join("agent")), data_dir, extra, env)
    }

    /// [`Agent::start`] from the agent binary at `binary` (a copy, say).
    pub fn start_binary(binary: &Path, data_dir: &Path, extra: &[&str]) -> Agent {
        Agent::spawn(Command::new(binary), data_dir, extra, &[])
    }

    /// [`Agent::start`] after `sh` ran `setup` (`ulimit -n 512`, `umask
    /// 000`, ...) in the process that then becomes the agent.
    pub fn start_after(setup: &str, data_dir: &Path, extra: &[&str]) -> Agent {
        let mut sh = Command::new("sh");
        sh.arg("-c")
            .arg(format!("{setup}; exec \"$0\" \"$@\""))
            .arg(bin_dir().join("agent"));
        Agent::spawn(sh, data_dir, extra, &[])
    }

    fn spawn(mut command: Command, data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Agent {
        let log = data_dir.with_extension(format!("{}.log", unique()));
        command
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("agent log file"));
        // A binary the test just wrote can be "busy" for a moment: another
        // test's fork may still hold the writer's descriptor until it execs.
        let mut tries = 0;
        let mut child = loop {
            match command.spawn() {
                Err(e) if e.raw_os_error() == Some(26 /* ETXTBSY */) && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                spawned => break spawned.expect("start the agent"),
            }
        };
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.starts_with("nine9s agent ready") => line,
            other => {
                let _ = child.kill();
                panic!(
                    "agent did not become ready ({other:?}); its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        let addr = |key: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in ready line {line:?}"))
        };
        Agent {
            http: addr("http="),
            grpc: addr("grpc="),
            child,
            data_dir: data_dir.to_owned(),
            log,
            ready: line.trim_end().to_owned(),
        }
    }

    /// An address of the ready line (`health=`, `metrics=`), if there.
    pub fn ready_address(&self, key: &str) -> Option<SocketAddr> {
        self.ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
            .and_then(|a| a.parse().ok())
    }

    /// Waits for a worker other than `old` to serve, and returns it.
    pub fn new_worker(&self, old: u32) -> u32 {
        let mut new = old;
        assert!(
            eventually(Duration::from_secs(30), || {
                new = self.worker_pid();
                new != old
            }),
            "no new worker after {old}; log:\n{}",
            self.log()
        );
        new
    }

    /// Has the supervisor re-execute itself (SIGUSR2) and waits until it
    /// says it did.
    pub fn reexec_supervisor(&self) {
        kill("USR2", self.pid());
        assert!(
            eventually(Duration::from_secs(10), || self
                .log()
                .contains("supervisor re-executed")),
            "{}",
            self.log()
        );
    }

    /// The supervisor's pid: the process the test started.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The serving worker's pid, as `ctl status` reports it.
    pub fn worker_pid(&self) -> u32 {
        let status = self.status();
        let pid = status["agent"]["worker_pid"]
            .as_u64()
            .unwrap_or_else(|| panic!("no agent.worker_pid in {status}"));
        u32::try_from(pid).expect("a pid")
    }

    /// Runs `ctl --agent unix:DATA/control.sock ARGS`: the agent's own
    /// user on its local socket, an admin with no token.
    pub fn ctl(&self, args: &[&str]) -> Ctl {
        self.ctl_env(args, &[])
    }

    /// [`Agent::ctl`] with extra environment variables.
    pub fn ctl_env(&self, args: &[&str], env: &[(&str, &str)]) -> Ctl {
        ctl_env(&self.local(), args, env)
    }

    /// `ctl --output json watch --after 0` on this agent, its stdout piped:
    /// every event it kept, then each new one, a JSON object a line.
    pub fn watch_json(&self) -> Child {
        Command::new(bin_dir().join("ctl"))
            .args(["--agent", &self.local(), "--output", "json"])
            .args(["watch", "--after", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ctl watch")
    }

    /// The control plane's URL on TCP (plaintext: ctl sends no token
    /// there; the gRPC API does, see [`Agent::api_with`]).
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The agent's local control socket, as ctl's `--agent` takes it.
    pub fn local(&self) -> String {
        format!("unix:{}", self.data_dir.join("control.sock").display())
    }

    /// The admin token the agent created in its data dir.
    pub fn token_file(&self) -> PathBuf {
        self.data_dir.join("admin.token")
    }

    /// A gRPC client sending the agent's admin token.
    pub async fn api(&self) -> Api {
        let token = std::fs::read_to_string(self.token_file()).expect("the admin token");
        self.api_with(Some(token.trim())).await
    }

    /// A gRPC client sending `token` (or nothing).
    pub async fn api_with(&self, token: Option<&str>) -> Api {
        let channel = Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .expect("connect to the control plane");
        let header = token.map(|t| format!("Bearer {t}").parse().expect("a header value"));
        ControlClient::with_interceptor(channel, Bearer(header))
    }

    /// Runs `ctl --output json ARGS`, which must succeed, and parses its
    /// one JSON document.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let out = self.ctl(&all).ok();
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("ctl {args:?} printed no JSON ({e}): {out:?}"))
    }

    /// `ctl status` as JSON.
    pub fn status(&self) -> serde_json::Value {
        self.json(&["status"])
    }

    /// The active library's line of `status`.
    pub fn active_library(&self) -> serde_json::Value {
        self.status()["libraries"]
            .as_array()
            .expect("an array of libraries")
            .iter()
            .find(|l| l["active"] == true)
            .cloned()
            .expect("an active library")
    }

    /// A release's lifecycle state (`ctl releases`), or "absent".
    pub fn release_state(&self, version: &str) -> String {
        self.release(version).map_or_else(
            || "absent".to_owned(),
            |r| r["state"].as_str().unwrap_or("?").to_owned(),
        )
    }

    /// A release as `ctl releases --output json` shows it.
    pub fn release(&self, version: &str) -> Option<serde_json::Value> {
        self.json(&["releases"])
            .as_array()
            .expect("an array of releases")
            .iter()
            .find(|r| r["version"] == version)
            .cloned()
    }

    /// The history as JSON, oldest first.
    pub fn history(&self) -> Vec<serde_json::Value> {
        self.json(&["history"])["transitions"]
            .as_array()
            .expect("an array of transitions")
            .clone()
    }

    /// `GET path` on a fresh connection.
    pub fn get(&self, path: &str) -> Reply {
        get(self.http, path)
    }

    /// Waits until a checkpoint newer than now is taken.
    pub fn checkpointed(&self) {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        assert!(
            eventually(Duration::from_secs(10), || epoch_ms(
                &self.status()["last_checkpoint"]
            ) > since),
            "no checkpoint; log:\n{}",
            self.log()
        );
    }

    /// Waits until a request is served again (a new worker after a
    /// crash), and returns the release that answered.
    pub fn serving_release(&self) -> String {
        let mut serving = String::new();
        assert!(
            eventually(Duration::from_secs(30), || {
                serving = Client::connect(self.http)
                    .and_then(|mut c| c.get("/"))
                    .map(|r| r.release)
                    .unwrap_or_default();
                !serving.is_empty()
            }),
            "nothing serves; log:\n{}",
            self.log()
        );
        serving
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the log says `text` within 10 s: the worker's lines reach
    /// the file through its supervisor, a moment after what they tell of
    /// (a response sent first, say) on a busy machine.
    pub fn logged(&self, text: &str) -> bool {
        eventually(Duration::from_secs(10), || self.log().contains(text))
    }

    /// Sends SIGTERM and waits for the exit code.
    pub fn terminate(mut self) -> i32 {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the agent") {
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "agent did not stop on SIGTERM; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the serving worker to die on its own (a crash point: the
    /// supervisor says it was killed) and returns whether it did within
    /// `within`. The supervisor then starts another.
    pub fn wait_for_crash(&self, within: Duration) -> bool {
        eventually(within, || self.log().contains("the worker was killed by"))
    }

    /// SIGKILL, like a crash: no chance to save anything.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The paths of this agent's artifacts that its serving worker has mapped.
    pub fn mapped_artifacts(&self) -> Vec<String> {
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", self.worker_pid()))
            .unwrap_or_default();
        let mut paths: Vec<String> = maps
            .lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .filter(|p| p.contains("/artifacts/"))
            .map(str::to_owned)
            .collect();
        paths.sort();
        paths.dedup();
        paths
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// A gRPC client of the control plane with its credentials.
pub type Api = ControlClient<InterceptedService<Channel, Bearer>>;

/// Adds `authorization: Bearer TOKEN` to every call, if there is a token.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(header) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        Ok(request)
    }
}

/// Sends `signal` (`TERM`, `KILL`, `HUP`...) to `pid`.
pub fn kill(signal: &str, pid: u32) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// A self-signed certificate for `localhost` and 127.0.0.1 and its key,
/// made by the openssl command line in `dir`: (`cert.pem`, `key.pem`).
pub fn self_signed_localhost(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        // A server's certificate, which a client may trust as itself
        // (webpki refuses a CA's as a server's).
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (Debian: openssl)");
    assert!(made.status.success(), "{made:?}");
    (cert, key)
}

/// Runs `command`, an agent meant to refuse to start (or any process that
/// must end by itself), to its exit, its stderr into the file `log`:
/// its exit code and stderr. Fails if it still runs after 30 s.
pub fn refusal(mut command: Command, log: &Path) -> (Option<i32>, String) {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start the agent");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the agent started (or hung) instead of ending; its log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code(), std::fs::read_to_string(log).unwrap())
}

/// Runs the real `ctl` against `agent`, with no credentials but what it
/// finds itself.
pub fn ctl(agent: &str, args: &[&str]) -> Ctl {
    ctl_env(agent, args, &[])
}

/// Runs the real `ctl` against `agent` with extra environment variables
/// (and none of the caller's `NINE9S_*` ones).
pub fn ctl_env(agent: &str, args: &[&str], env: &[(&str, &str)]) -> Ctl {
    let mut all = vec!["--agent", agent];
    all.extend_from_slice(args);
    ctl_in(&root(), &all, env)
}

/// Runs the real `ctl ARGS` in `cwd` with extra environment variables
/// (and none of the caller's `NINE9S_*` ones).
pub fn ctl_in(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Ctl {
    let mut command = Command::new(bin_dir().join("ctl"));
    for (name, _) in std::env::vars() {
        if name.starts_with("NINE9S_") {
            command.env_remove(name);
        }
    }
    let output = command
        .envs(env.iter().copied())
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run ctl");
    Ctl {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// An HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    /// The `x-nine9s-release` header: which release answered.
    pub release: String,
    /// The server said `Connection: close`: this connection is done.
    pub close: bool,
}

/// `GET path` on a fresh connection; panics on a transport error.
pub fn get(addr: SocketAddr, path: &str) -> Reply {
    let mut client = Client::connect(addr).expect("connect to the agent");
    client.get(path).expect("HTTP exchange")
}

/// A keep-alive HTTP/1.1 client, enough for plain-text replies.
pub struct Client {
    reader: BufReader<TcpStream>,
    addr: SocketAddr,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> std::io::Result<Client> {
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_nodelay(true)?;
        Ok(Client {
            reader: BufReader::new(stream),
            addr,
        })
    }

    pub fn get(&mut self, path: &str) -> std::io::Result<Reply> {
        self.get_with(path, &[])
    }

    /// `GET path` with extra headers.
    pub fn get_with(&mut self, path: &str, headers: &[(&str, &str)]) -> std::io::Result<Reply> {
        let mut request = format!("GET {path} HTTP/1.1\r\nhost: {}\r\n", self.addr);
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        self.reader.get_mut().write_all(request.as_bytes())?;
        let mut status_line = String::new();
        if self.reader.read_line(&mut status_line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before a response",
            ));
        }
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
        let (mut length, mut release, mut close) = (0usize, String::new(), false);
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                match name.to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse().unwrap_or(0),
                    "x-nine9s-release" => release = value.trim().to_owned(),
                    "connection" => close = value.trim().eq_ignore_ascii_case("close"),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body)?;
        Ok(Reply {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
            release,
            close,
        })
    }
}

/// The messages of a Stage call: the header (with the library's size),
/// then the library in 64 KiB pieces.
pub fn stage_chunks(manifest: &str, sha256: &str, bytes: &[u8]) -> Vec<StageChunk> {
    stage_chunks_with(
        StageHeader {
            manifest_toml: manifest.to_owned(),
            sha256: sha256.to_owned(),
            size: bytes.len() as u64,
            ..Default::default()
        },
        bytes,
    )
}

/// [`stage_chunks`] with a header of the caller's own.
pub fn stage_chunks_with(header: StageHeader, bytes: &[u8]) -> Vec<StageChunk> {
    let mut chunks = vec![StageChunk {
        part: Some(stage_chunk::Part::Header(header)),
    }];
    chunks.extend(bytes.chunks(64 * 1024).map(|c| StageChunk {
        part: Some(stage_chunk::Part::Data(c.to_vec())),
    }));
    chunks
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// The stable reason code of an error status (its ErrorInfo, whose domain
/// must be the agent's).
pub fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .map(|info| {
            assert_eq!(info.domain, "nine9s.dev");
            info.reason
        })
        .unwrap_or_default()
}

/// A small filesystem of the test's own (tmpfs), unmounted when dropped.
/// Mounting needs root, which CI has; elsewhere the test is skipped.
pub struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    pub fn mount(megabytes: u32) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then(|| SmallDisk(dir))
    }

    pub fn path(&self) -> &std::path::Path {
        self.0.path()
    }

    /// Fills the filesystem to the last byte.
    pub fn fill(&self) {
        use std::io::Write;
        let mut filler = std::fs::File::create(self.path().join("filler")).unwrap();
        let chunk = vec![0u8; 1 << 16];
        while filler.write_all(&chunk).is_ok() {}
        while filler.write_all(&[0]).is_ok() {}
    }

    pub fn free(&self) {
        std::fs::remove_file(self.path().join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazily: an agent the test stopped may still be exiting, and an
        // unmount refused as busy would leave the mount behind.
        let _ = std::process::Command::new("umount")
            .arg("--lazy")
            .arg(self.0.path())
            .status();
    }
}

/// What keep-alive load saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LoadReport {
    /// 200 answers.
    pub ok: u64,
    /// Other answers, and requests sent on an open connection that got no
    /// answer.
    pub failed: u64,
    /// Connection attempts refused.
    pub refused: u64,
}

/// Keep-alive `GET path` on `connections` connections, each a thread,
/// until stopped; a connection the server closes (after `Connection:
/// close`, or between requests) is replaced by a new one.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<LoadReport>>,
}

impl Load {
    pub fn start(addr: SocketAddr, path: &str, connections: usize) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..connections)
            .map(|_| {
                let (stop, path) = (std::sync::Arc::clone(&stop), path.to_owned());
                std::thread::spawn(move || {
                    let mut report = LoadReport::default();
                    let mut client: Option<Client> = None;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let mut open = match client.take() {
                            Some(open) => open,
                            None => match Client::connect(addr) {
                                Ok(open) => open,
                                Err(e) => {
                                    if e.kind() == std::io::ErrorKind::ConnectionRefused {
                                        report.refused += 1;
                                    }
                                    std::thread::sleep(Duration::from_millis(5));
                                    continue;
                                }
                            },
                        };
                        match open.get(&path) {
                            Ok(reply) => {
                                if reply.status == 200 {
                                    report.ok += 1;
                                } else {
                                    report.failed += 1;
                                }
                                if !reply.close {
                                    client = Some(open);
                                }
                            }
                            Err(_) => report.failed += 1,
                        }
                    }
                    report
                })
            })
            .collect();
        Load { stop, threads }
    }

    /// Stops the load and adds up what every connection saw.
    pub fn stop(self) -> LoadReport {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|t| t.join().expect("a load thread"))
            .fold(LoadReport::default(), |a, b| LoadReport {
                ok: a.ok + b.ok,
                failed: a.failed + b.failed,
                refused: a.refused + b.refused,
            })
    }
}

/// A time of ctl's `--output json` (RFC 3339, `null` for none) as
/// milliseconds since the epoch (0 for none).
pub fn epoch_ms(time: &serde_json::Value) -> i64 {
    let Some(text) = time.as_str() else {
        assert!(time.is_null(), "not a time: {time}");
        return 0;
    };
    let at = humantime::parse_rfc3339(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    at.duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Polls `check` every 50 ms until it holds or `within` passes.
pub fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stages the sample release `nine9s-<version>` built by this workspace.
pub fn stage_sample(agent: &Agent, version: &str) -> Ctl {
    let lib = library(&format!("nine9s_{}", version.replace('.', "_")));
    stage_dir(agent, &release_dir(&format!("nine9s-{version}")), &lib)
}

/// Stages the release directory `dir` with the library `lib`, which must
/// succeed.
pub fn stage_dir(agent: &Agent, dir: &Path, lib: &Path) -> Ctl {
    agent
        .ctl(&[
            "stage",
            dir.to_str().unwrap(),
            "--library",
            lib.to_str().unwrap(),
        ])
        .ok()
}

/// Stages the sample service `myservice` `version` (`plugins/myservice-*`).
pub fn stage_myservice(agent: &Agent, version: &str) -> Ctl {
    stage_dir(
        agent,
        &release_dir(&format!("myservice-{version}")),
        &library(&format!("myservice_{}", version.replace('.', "_"))),
    )
}

/// Stages a fixture release from `tests/plugins/<name>`.
pub fn stage_fixture(agent: &Agent, name: &str) -> Ctl {
    let lib = library(&format!("fixture_{}", name.replace('-', "_")));
    let dir = fixture_dir(name);
    agent.ctl(&[
        "stage",
        dir.to_str().unwrap(),
        "--library",
        lib.to_str().unwrap(),
    ])
}

/// `GET /` `times` times, each answered 200.
pub fn hello(agent: &Agent, times: usize) {
    for _ in 0..times {
        assert_eq!(agent.get("/").status, 200);
    }
}

/// An agent over `data` (with `extra` flags) on nine9s 0.2.0, permanent,
/// with `hellos` requests counted.
pub fn on_0_2_0(data: &Path, extra: &[&str], hellos: usize) -> Agent {
    let agent = Agent::start(data, extra);
    stage_sample(&agent, "0.2.0");
    agent.ctl(&["upgrade", "--to", "0.2.0", "--permanent"]).ok();
    hello(&agent, hellos);
    agent
}
