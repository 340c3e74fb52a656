//! The home thread of an instance of a service release (ABI v3): a thread
//! of the host's that runs that instance's calls — `create`, `attach`,
//! `snapshot`, `health`, `hook`, `stop`, `destroy` — one after the other,
//! and nothing else, and ends with the instance.
//!
//! Why: glibc keeps a library mapped while a thread lives on which the
//! library's code registered a thread-local destructor, and a service's
//! code does (its own std when it starts a thread, its tokio when it
//! builds a runtime). On a thread of the agent's that lives on, that pins
//! the library for good; on the home thread, it ends when the home
//! thread is joined, before the library is closed.

use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::CallError;

/// One call, as the home thread runs it.
type Job = Box<dyn FnOnce() + Send>;

pub(crate) struct Home {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Home {
    /// Starts the thread, named after the release.
    pub(crate) fn start(version: &str) -> std::io::Result<Home> {
        let (jobs, inbox) = mpsc::channel::<Job>();
        // Thread names are cut to 15 bytes by the kernel.
        let name: String = format!("n9s-{version}").chars().take(15).collect();
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            while let Ok(job) = inbox.recv() {
                job();
            }
        })?;
        Ok(Home {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Runs `f` on the home thread and waits for it.
    pub(crate) fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, CallError> {
        let (done, result) = mpsc::sync_channel(1);
        let sent = self.jobs.as_ref().map(|jobs| {
            jobs.send(Box::new(move || {
                let _ = done.send(f());
            }))
        });
        let gone = || CallError::Failed("the instance's home thread is gone".into());
        if !matches!(sent, Some(Ok(()))) {
            return Err(gone());
        }
        result.recv().map_err(|_| gone())
    }

    /// Ends the thread once its calls are done, and waits for it: whatever
    /// the release's code left on it goes with it.
    pub(crate) fn end(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("an instance's home thread panicked");
            }
        }
    }
}
