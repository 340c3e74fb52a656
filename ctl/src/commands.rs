//! One function per command: build the request, call the agent (through
//! `rpc`, which retries transport failures with the same request id), print
//! the reply through `render` or `json`; and the two commands that need no
//! agent, `keygen` and `sign`.

use std::io::{ErrorKind, IsTerminal, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, Context};
use indicatif::{ProgressBar, ProgressStyle};
use nine9s_manifest::signature::{self, SecretKey, SIGNATURE_FILE};
use nine9s_manifest::Manifest;
use nine9s_proto as pb;
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;

use crate::rpc::{new_request_id, Agent};
use crate::{
    follow, json, render, AgentCommand, Checked, Command, Failure, Output, Request, Restart,
    StateFrom, Switch,
};

/// Bytes per Stage message.
const CHUNK: usize = 1024 * 1024;

/// The key files `keygen` writes.
const SECRET_KEY_FILE: &str = "nine9s.key";
const PUBLIC_KEY_FILE: &str = "nine9s.pub";

/// A release directory as `stage`, `sign` and `rollout` see it.
pub struct Release {
    pub manifest: Manifest,
    /// release.toml verbatim: what the agent records and a signature covers.
    pub manifest_toml: String,
    pub library: PathBuf,
    pub bytes: Vec<u8>,
    pub sha256: String,
}

/// Reads `DIR/release.toml` and its library: `library` if given, else the
/// one `locate_library` finds beside it or in a cargo target directory.
pub fn read_release(dir: &Path, library: Option<PathBuf>) -> Result<Release, Failure> {
    let path = dir.join("release.toml");
    // Read once: the text parsed is the text sent and signed.
    let manifest_toml = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let manifest = Manifest::parse(&manifest_toml)?;
    let library = match library {
        Some(path) => path,
        None => nine9s_manifest::locate_library(dir, &manifest).map_err(|e| anyhow!(e))?,
    };
    let bytes =
        std::fs::read(&library).with_context(|| format!("cannot read {}", library.display()))?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    Ok(Release {
        manifest,
        manifest_toml,
        library,
        bytes,
        sha256,
    })
}

/// Reads at most `signature::MAX_TEXT` bytes and one more: a key or a
/// signature is one short line, and a longer file is refused as malformed
/// without being read whole.
fn read_short(path: &Path) -> std::io::Result<String> {
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(signature::MAX_TEXT as u64 + 1)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// `DIR/release.sig` and the id of the key it names, if the release is
/// signed; a malformed one is refused here rather than by the agent.
pub fn read_signature(dir: &Path) -> Result<Option<(String, String)>, Failure> {
    let path = dir.join(SIGNATURE_FILE);
    let text = match read_short(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(anyhow!(e)
                .context(format!("cannot read {}", path.display()))
                .into())
        }
    };
    let signer = signature::signer(&text)
        .with_context(|| format!("{} (run ctl sign again)", path.display()))?;
    Ok(Some((text, signer)))
}

/// `ctl keygen --out DIR`.
pub fn keygen(out: &Path, output: Output) -> Result<(), Failure> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let (secret_path, public_path) = (out.join(SECRET_KEY_FILE), out.join(PUBLIC_KEY_FILE));
    let key = SecretKey::generate()?;
    // Owner-only from the start (whatever the umask), and never over a key
    // that exists: a lost key can sign nothing more for the agents that
    // trust it.
    let mut file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&secret_path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            return Err(anyhow!(
                "{} exists; refusing to overwrite a key (move it away to make a new one)",
                secret_path.display()
            )
            .into())
        }
        Err(e) => {
            return Err(anyhow!(e)
                .context(format!("cannot create {}", secret_path.display()))
                .into())
        }
    };
    let written = file
        .write_all(key.to_text().as_bytes())
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::write(&public_path, key.public().to_text()));
    if let Err(e) = written {
        // A half-written key would block the next keygen for nothing.
        let _ = std::fs::remove_file(&secret_path);
        return Err(anyhow!(e)
            .context(format!("cannot write the keys in {}", out.display()))
            .into());
    }
    let id = key.public().id();
    if output == Output::Json {
        json::print(&json::keygen(&id, &secret_path, &public_path));
    } else {
        outln!("created signing key {id}");
        outln!(
            "  secret: {} (owner-only; keep it private)",
            secret_path.display()
        );
        outln!(
            "  public: {} (put it in the agent's --trusted-keys directory)",
            public_path.display()
        );
    }
    Ok(())
}

/// `ctl sign DIR --key KEYFILE [--library PATH]`.
pub fn sign(
    dir: &Path,
    key: &Path,
    library: Option<PathBuf>,
    output: Output,
) -> Result<(), Failure> {
    let key_text = read_short(key).with_context(|| format!("cannot read {}", key.display()))?;
    let key = SecretKey::parse(&key_text).with_context(|| key.display().to_string())?;
    let release = read_release(dir, library)?;
    let text = signature::sign(&key, &release.manifest_toml, &release.sha256);
    let path = dir.join(SIGNATURE_FILE);
    std::fs::write(&path, &text).with_context(|| format!("cannot write {}", path.display()))?;
    let (m, id) = (&release.manifest, key.public().id());
    if output == Output::Json {
        json::print(&json::signed(
            m,
            &release.library,
            &release.sha256,
            &id,
            &path,
        ));
    } else {
        outln!(
            "signed {} {} (library {}, sha256 {}) with key {id}: {}",
            m.name,
            m.version,
            release.library.display(),
            release.sha256,
            path.display()
        );
    }
    Ok(())
}

pub async fn run(agent: &Agent, output: Output, command: Command) -> Result<(), Failure> {
    let json = output == Output::Json;
    match command {
        Command::Stage {
            dir,
            library,
            request,
        } => {
            let release = read_release(&dir, library)?;
            let (signature, signer) = read_signature(&dir)?.unzip();
            let chunks = stage_chunks(
                &release,
                signature,
                id(&request),
                request.reason.unwrap_or_default(),
            );
            // A bar only for people: a script reads the reply.
            let bar = (!json && std::io::stderr().is_terminal()).then(|| upload_bar(&release));
            let reply = stage(agent, &release, chunks, bar.as_ref()).await;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            let reply = reply?;
            if json {
                json::print(&reply);
            } else {
                render::staged(&reply, &release.library, signer.as_deref());
            }
        }
        Command::Releases => {
            let reply = agent
                .call(
                    "listing releases",
                    pb::ListReleasesRequest {},
                    |mut c, r| async move { c.list_releases(r).await },
                )
                .await?;
            if json {
                json::print(&reply.releases);
            } else {
                render::releases(&reply.releases);
            }
        }
        Command::Upgrade(switch) => switch_to(agent, output, "upgrade", switch).await?,
        Command::Promote {
            wait,
            force,
            request,
        } => promote(agent, output, wait, force, request).await?,
        Command::Downgrade(switch) => switch_to(agent, output, "downgrade", switch).await?,
        Command::Rollback {
            state,
            dry_run,
            request,
            // The target of a rollback is permanent at once: nothing to wait for.
            wait: _,
            expect_canary,
        } => {
            let request = pb::RollbackRequest {
                expected_canary: expect_canary.map(|v| v.to_string()).unwrap_or_default(),
                state: pb::StateSource::from(state).into(),
                dry_run,
                request_id: id(&request.request),
                expected_active: expected(&request),
                reason: request.request.reason.unwrap_or_default(),
                force: request.force,
                lease: String::new(),
            };
            let reply = agent
                .call("rollback", request, |mut c, r| async move {
                    c.rollback(r).await
                })
                .await?;
            if json {
                json::print(&reply);
            } else {
                render::rolled_back(dry_run, &reply);
            }
        }
        Command::MakePermanent { version, request } => {
            let version = version.to_string();
            let request = pb::MakePermanentRequest {
                version: version.clone(),
                request_id: id(&request.request),
                expected_active: expected(&request),
                reason: request.request.reason.unwrap_or_default(),
                force: request.force,
                lease: String::new(),
            };
            let what = format!("making {version} permanent");
            let reply = agent
                .call(&what, request, |mut c, r| async move {
                    c.make_permanent(r).await
                })
                .await?;
            if json {
                json::print(&reply);
            } else {
                render::made_permanent(&version, &reply);
            }
        }
        Command::Remove { version, request } => {
            let version = version.to_string();
            let request = pb::RemoveRequest {
                version: version.clone(),
                request_id: id(&request.request),
                expected_active: expected(&request),
                reason: request.request.reason.unwrap_or_default(),
                force: request.force,
                lease: String::new(),
            };
            let what = format!("removing {version}");
            let reply = agent
                .call(&what, request, |mut c, r| async move { c.remove(r).await })
                .await?;
            if json {
                json::print(&reply);
            } else {
                outln!("removed {version}");
                for sha in reply.collected {
                    outln!("deleted unreferenced artifact {sha}");
                }
            }
        }
        Command::Status => {
            let reply = status(agent).await?;
            if json {
                json::print(&reply);
            } else {
                render::status(&reply);
            }
        }
        Command::History { limit, after } => {
            let request = pb::HistoryRequest {
                limit,
                after_id: after,
            };
            let reply = agent
                .call(
                    "history",
                    request,
                    |mut c, r| async move { c.history(r).await },
                )
                .await?;
            if json {
                json::print(&reply);
            } else {
                render::history(&reply);
            }
        }
        Command::Watch { after } => {
            let after = match after {
                Some(after) => after,
                None => status(agent).await?.last_event_id,
            };
            follow::watch(agent, after, output).await?;
        }
        Command::Info => {
            let reply = agent
                .call(
                    "agent info",
                    pb::AgentInfoRequest {},
                    |mut c, r| async move { c.agent_info(r).await },
                )
                .await?;
            if json {
                json::print(&reply);
            } else {
                render::info(&reply);
            }
        }
        Command::Agent {
            command: AgentCommand::Restart(restart),
        } => restart_agent(agent, output, restart).await?,
    }
    Ok(())
}

/// The Stage request for `release`: its header, then the library in
/// chunks.
pub fn stage_chunks(
    release: &Release,
    signature: Option<String>,
    request_id: String,
    reason: String,
) -> Vec<pb::StageChunk> {
    let mut chunks = vec![pb::StageChunk {
        part: Some(pb::stage_chunk::Part::Header(pb::StageHeader {
            manifest_toml: release.manifest_toml.clone(),
            sha256: release.sha256.clone(),
            size: release.bytes.len() as u64,
            request_id,
            reason,
            signature: signature.unwrap_or_default(),
        })),
    }];
    chunks.extend(release.bytes.chunks(CHUNK).map(|c| pb::StageChunk {
        part: Some(pb::stage_chunk::Part::Data(c.to_vec())),
    }));
    chunks
}

/// Uploads `chunks` (retried whole after a transport failure, with the
/// same request id); `bar` follows the library's bytes as the call takes
/// them.
pub async fn stage(
    agent: &Agent,
    release: &Release,
    chunks: Vec<pb::StageChunk>,
    bar: Option<&ProgressBar>,
) -> Result<pb::StageReply, Failure> {
    let what = format!(
        "staging {} {}",
        release.manifest.name, release.manifest.version
    );
    agent
        .call(&what, chunks, |mut c, chunks| {
            let bar = bar.cloned();
            async move {
                if let Some(bar) = &bar {
                    bar.reset();
                }
                let counted = tokio_stream::iter(chunks).map(move |chunk| {
                    if let (Some(bar), Some(pb::stage_chunk::Part::Data(data))) =
                        (&bar, &chunk.part)
                    {
                        bar.inc(data.len() as u64);
                        if bar.position() == bar.length().unwrap_or(0) {
                            bar.set_message("uploaded; the agent checks it");
                        }
                    }
                    chunk
                });
                c.stage(counted).await
            }
        })
        .await
}

fn upload_bar(release: &Release) -> ProgressBar {
    let bar = ProgressBar::new(release.bytes.len() as u64);
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(format!(
        "staging {} {}",
        release.manifest.name, release.manifest.version
    ));
    bar
}

/// `ctl agent restart`, then with `--wait` ask the agent until a new
/// worker serves.
async fn restart_agent(agent: &Agent, output: Output, restart: Restart) -> Result<(), Failure> {
    let json = output == Output::Json;
    let request = pb::RestartAgentRequest {
        reason: restart.reason.unwrap_or_default(),
    };
    // A failure reported after this one is this restart's.
    let failed_before = if restart.wait {
        agent
            .call(
                "agent info",
                pb::AgentInfoRequest {},
                |mut c, r| async move { c.agent_info(r).await },
            )
            .await?
            .process
            .and_then(|p| p.last_failed_restart)
    } else {
        None
    };
    let asked = Instant::now();
    // No request id: a call cut short is not sent again, for the agent may
    // have acted on it.
    let reply = agent
        .call_unsent_retried("restarting the agent", request, |mut c, r| async move {
            c.restart_agent(r).await
        })
        .await?;
    if !json {
        render::agent_restarting(&reply);
    }
    if !restart.wait {
        if json {
            json::print(&json::AgentRestart {
                reply: &reply,
                new_worker: None,
                waited_ms: None,
            });
        }
        return Ok(());
    }
    let (new, serving_since) =
        follow::until_new_worker(agent, reply.worker_pid, failed_before, restart.timeout).await?;
    // Until the new worker served, not until it had hashed its binary.
    let waited = serving_since.saturating_duration_since(asked);
    let ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX);
    if json {
        json::print(&json::AgentRestart {
            reply: &reply,
            new_worker: Some(&new),
            waited_ms: Some(ms),
        });
    } else {
        outln!("{}", render::agent_restarted(reply.worker_pid, &new, ms));
    }
    Ok(())
}

/// Upgrade or Downgrade (`word`), then with `--wait` follow the release
/// through its soak.
async fn switch_to(
    agent: &Agent,
    output: Output,
    word: &str,
    switch: Switch,
) -> Result<(), Failure> {
    let target = switch.to.to_string();
    // Read before the command, so that no event of its own is missed.
    let before = if switch.wait && !switch.permanent {
        Some(status(agent).await?)
    } else {
        None
    };
    let what = format!("{word} to {target}");
    let request = transition(&switch);
    let reply = if word == "upgrade" {
        agent
            .call(&what, request, |mut c, r| async move { c.upgrade(r).await })
            .await?
    } else {
        agent
            .call(
                &what,
                request,
                |mut c, r| async move { c.downgrade(r).await },
            )
            .await?
    };
    if output == Output::Json {
        json::print(&reply);
    } else {
        render::switched(word, &switch, &reply);
    }
    let Some(before) = before else { return Ok(()) };
    if reply.unchanged {
        let soak = before.soak.unwrap_or_default();
        if before.permanent_version == target {
            return Ok(());
        }
        if soak.mode() == pb::SoakMode::Held && soak.version == target {
            return Err(anyhow!(
                "--wait: {target} is held current; `ctl make-permanent {target}` makes it permanent"
            )
            .into());
        }
    }
    let countdown = follow::Countdown::new(&target);
    let line = follow::until_permanent(
        agent,
        &target,
        before.last_event_id,
        switch.timeout,
        &|left| countdown.tick(left),
    )
    .await;
    drop(countdown);
    let line = line?;
    if output == Output::Table {
        outln!("{line}");
    }
    Ok(())
}

/// `ctl promote`: the switch to the canary's release, conditional on the
/// release active now.
async fn promote(
    agent: &Agent,
    output: Output,
    wait: bool,
    force: bool,
    request: Request,
) -> Result<(), Failure> {
    let now = status(agent).await?;
    let Some(canary) = now.canary else {
        return Err(
            anyhow!("there is no canary to promote (`ctl status` shows it when there is)").into(),
        );
    };
    let to: semver::Version = canary
        .version
        .parse()
        .with_context(|| format!("the agent's canary version {:?}", canary.version))?;
    let active: semver::Version = now
        .active_version
        .parse()
        .with_context(|| format!("the agent's active version {:?}", now.active_version))?;
    let word = if to > active { "upgrade" } else { "downgrade" };
    let switch = Switch {
        expected_canary: Some(to.clone()),
        to,
        soak: None,
        permanent: false,
        no_permanent: false,
        dry_run: false,
        wait,
        timeout: None,
        canary: None,
        canary_header: None,
        state: None,
        request: Checked {
            request,
            expect_active: Some(active),
            force,
        },
    };
    switch_to(agent, output, word, switch).await
}

pub async fn status(agent: &Agent) -> Result<pb::StatusReply, Failure> {
    agent
        .call("status", pb::StatusRequest {}, |mut c, r| async move {
            c.status(r).await
        })
        .await
}

/// The request id: the user's, or a fresh one that every retry reuses.
fn id(request: &Request) -> String {
    request.request_id.clone().unwrap_or_else(new_request_id)
}

fn expected(request: &Checked) -> String {
    request
        .expect_active
        .as_ref()
        .map_or_else(String::new, ToString::to_string)
}

fn transition(switch: &Switch) -> pb::TransitionRequest {
    let canary = switch.canary.is_some() || switch.canary_header.is_some();
    // A canary does not switch: it has no permanence to ask for.
    let permanence = if canary {
        pb::Permanence::Unspecified
    } else if switch.permanent {
        pb::Permanence::Immediate
    } else if switch.no_permanent {
        pb::Permanence::Never
    } else {
        pb::Permanence::Soak
    };
    pb::TransitionRequest {
        version: switch.to.to_string(),
        permanence: permanence.into(),
        soak_ms: switch.soak.map_or(0, |d| d.as_millis() as u64),
        dry_run: switch.dry_run,
        request_id: id(&switch.request.request),
        expected_active: expected(&switch.request),
        reason: switch.request.request.reason.clone().unwrap_or_default(),
        expected_canary: switch
            .expected_canary
            .as_ref()
            .map_or_else(String::new, ToString::to_string),
        state: switch
            .state
            .map_or(pb::StateSource::Unspecified, pb::StateSource::from)
            .into(),
        canary: match (&switch.canary, &switch.canary_header) {
            (Some(permille), _) => Some(pb::CanarySplit {
                permille: u32::from(*permille),
                ..Default::default()
            }),
            (None, Some((header, value))) => Some(pb::CanarySplit {
                header: header.clone(),
                header_value: value.clone(),
                ..Default::default()
            }),
            (None, None) => None,
        },
        force: switch.request.force,
        lease: String::new(),
    }
}

impl From<StateFrom> for pb::StateSource {
    fn from(state: StateFrom) -> pb::StateSource {
        match state {
            StateFrom::Migrate => pb::StateSource::Migrate,
            StateFrom::Snapshot => pb::StateSource::Snapshot,
        }
    }
}
