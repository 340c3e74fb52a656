//! One function per command: build the request, call the agent, print the
//! reply through `render`.

use anyhow::{anyhow, Context};
use nine9s_manifest::Manifest;
use nine9s_proto as pb;
use pb::control_client::ControlClient;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;
use tonic::Code;

use crate::{json, render, Command, Failure, Output, StateFrom, Switch};

/// Bytes per Stage message.
const CHUNK: usize = 1024 * 1024;

pub async fn run(agent: &str, output: Output, command: Command) -> Result<(), Failure> {
    let json = output == Output::Json;
    let mut client = connect(agent).await?;
    let call = |what: String| move |status: tonic::Status| refused(agent, what, status);
    match command {
        Command::Stage { dir, library } => {
            let manifest = Manifest::read_dir(&dir)?;
            let library = match library {
                Some(path) => path,
                None => nine9s_manifest::locate_library(&dir, &manifest).map_err(|e| anyhow!(e))?,
            };
            let manifest_toml = std::fs::read_to_string(dir.join("release.toml"))?;
            let bytes = std::fs::read(&library)
                .with_context(|| format!("cannot read {}", library.display()))?;
            let sha256: String = Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let mut chunks = vec![pb::StageChunk {
                part: Some(pb::stage_chunk::Part::Header(pb::StageHeader {
                    manifest_toml,
                    sha256,
                    size: bytes.len() as u64,
                })),
            }];
            chunks.extend(bytes.chunks(CHUNK).map(|c| pb::StageChunk {
                part: Some(pb::stage_chunk::Part::Data(c.to_vec())),
            }));
            let reply = client
                .stage(tokio_stream::iter(chunks))
                .await
                .map_err(call(format!(
                    "staging {} {}",
                    manifest.name, manifest.version
                )))?
                .into_inner();
            if json {
                json::print(&json::staged(&reply));
            } else {
                render::staged(&reply, &library);
            }
        }
        Command::Releases => {
            let reply = client
                .list_releases(pb::ListReleasesRequest {})
                .await
                .map_err(call("listing releases".into()))?;
            let releases = reply.into_inner().releases;
            if json {
                json::print(&json::releases(&releases));
            } else {
                render::releases(&releases);
            }
        }
        Command::Upgrade(switch) => {
            let what = format!("upgrade to {}", switch.to);
            let reply = client
                .upgrade(transition(&switch))
                .await
                .map_err(call(what))?;
            switched(json, "upgrade", &switch, &reply.into_inner());
        }
        Command::Downgrade(switch) => {
            let what = format!("downgrade to {}", switch.to);
            let reply = client
                .downgrade(transition(&switch))
                .await
                .map_err(call(what))?;
            switched(json, "downgrade", &switch, &reply.into_inner());
        }
        Command::Rollback { state, dry_run } => {
            let state = match state {
                StateFrom::Migrate => pb::StateSource::Migrate,
                StateFrom::Snapshot => pb::StateSource::Snapshot,
            };
            let reply = client
                .rollback(pb::RollbackRequest {
                    state: state.into(),
                    dry_run,
                })
                .await
                .map_err(call("rollback".into()))?;
            if json {
                json::print(&json::switched(&reply.into_inner()));
            } else {
                render::rolled_back(dry_run, &reply.into_inner());
            }
        }
        Command::MakePermanent { version } => {
            let reply = client
                .make_permanent(pb::MakePermanentRequest {
                    version: version.clone(),
                })
                .await
                .map_err(call(format!("making {version} permanent")))?;
            if json {
                json::print(&json::switched(&reply.into_inner()));
            } else {
                println!("{version} is now permanent");
            }
        }
        Command::Remove { version } => {
            let reply = client
                .remove(pb::RemoveRequest {
                    version: version.clone(),
                })
                .await
                .map_err(call(format!("removing {version}")))?
                .into_inner();
            if json {
                json::print(&json::removed(&reply));
            } else {
                println!("removed {version}");
                for sha in reply.collected {
                    println!("deleted unreferenced artifact {sha}");
                }
            }
        }
        Command::Status => {
            let reply = client
                .status(pb::StatusRequest {})
                .await
                .map_err(call("status".into()))?;
            if json {
                json::print(&json::status(&reply.into_inner()));
            } else {
                render::status(&reply.into_inner());
            }
        }
        Command::History { limit } => {
            let reply = client
                .history(pb::HistoryRequest { limit })
                .await
                .map_err(call("history".into()))?;
            let transitions = reply.into_inner().transitions;
            if json {
                json::print(&json::history(&transitions));
            } else {
                render::history(&transitions);
            }
        }
    }
    Ok(())
}

fn switched(json: bool, word: &str, switch: &Switch, reply: &pb::TransitionReply) {
    if json {
        json::print(&json::switched(reply));
    } else {
        render::switched(word, switch, reply);
    }
}

async fn connect(agent: &str) -> Result<ControlClient<Channel>, Failure> {
    let endpoint = Channel::from_shared(agent.to_owned())
        .map_err(|e| Failure::Failed(anyhow!("--agent {agent:?} is not a URL: {e}")))?
        .connect_timeout(std::time::Duration::from_secs(5));
    let channel = endpoint.connect().await.map_err(|e| {
        Failure::Unreachable(anyhow!(e).context(format!("cannot reach the agent at {agent}")))
    })?;
    Ok(ControlClient::new(channel).max_decoding_message_size(64 * 1024 * 1024))
}

/// An error status from the agent, as one line.
fn refused(agent: &str, what: String, status: tonic::Status) -> Failure {
    match status.code() {
        Code::Unavailable => Failure::Unreachable(anyhow!(
            "{what}: the agent at {agent} is unavailable: {}",
            status.message()
        )),
        _ => Failure::Failed(anyhow!("{what}: {}", status.message())),
    }
}

fn transition(switch: &Switch) -> pb::TransitionRequest {
    let permanence = if switch.permanent {
        pb::Permanence::Immediate
    } else if switch.no_permanent {
        pb::Permanence::Never
    } else {
        pb::Permanence::Soak
    };
    pb::TransitionRequest {
        version: switch.to.clone(),
        permanence: permanence.into(),
        soak_ms: switch.soak.map_or(0, |d| d.as_millis() as u64),
        dry_run: switch.dry_run,
    }
}
