//! What a rollout says while it runs, on stderr: one live line per agent
//! (indicatif) when stderr is a terminal, else one plain line per step,
//! prefixed with the agent's name, for logs and CI. Stdout is kept for the
//! summary (or the JSON document) at the end.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// How often a plain line tells an agent's soak time left.
const PLAIN_SOAK_EVERY: Duration = Duration::from_secs(10);

pub struct Progress {
    names: Vec<String>,
    /// One bar per agent, when stderr is a terminal.
    bars: Option<(MultiProgress, Vec<ProgressBar>)>,
    /// When each agent's soak was last told on a plain line.
    soak_told: Mutex<Vec<Option<Instant>>>,
}

impl Progress {
    pub fn new(names: Vec<String>) -> Progress {
        let bars = std::io::stderr().is_terminal().then(|| {
            let width = names.iter().map(|n| n.chars().count()).max().unwrap_or(0);
            let style =
                ProgressStyle::with_template(&format!("{{spinner}} {{prefix:<{width}}}  {{msg}}"))
                    .unwrap_or_else(|_| ProgressStyle::default_spinner());
            let multi = MultiProgress::new();
            let bars = names
                .iter()
                .map(|name| {
                    let bar = multi.add(ProgressBar::new_spinner());
                    bar.set_style(style.clone());
                    bar.set_prefix(name.clone());
                    bar.set_message("waiting");
                    bar.enable_steady_tick(Duration::from_millis(120));
                    bar
                })
                .collect();
            (multi, bars)
        });
        let soak_told = Mutex::new(vec![None; names.len()]);
        Progress {
            names,
            bars,
            soak_told,
        }
    }

    /// Agent `i`'s soak goes on (about once a second): its live line
    /// counts down; a plain line says so every 10 s.
    pub fn soak(&self, i: usize, what: String) {
        if self.bars.is_none() {
            let mut told = self.soak_told.lock();
            if told[i].is_some_and(|t| t.elapsed() < PLAIN_SOAK_EVERY) {
                return;
            }
            told[i] = Some(Instant::now());
        }
        self.say(i, what);
    }

    /// Agent `i`'s line now says `what`.
    pub fn say(&self, i: usize, what: impl Into<String>) {
        let what = what.into();
        match &self.bars {
            Some((_, bars)) => bars[i].set_message(what),
            None => eprintln!("ctl: rollout: {}: {what}", self.names[i]),
        }
    }

    /// A line about the whole rollout.
    pub fn note(&self, what: &str) {
        match &self.bars {
            Some((multi, _)) => {
                let _ = multi.println(what);
            }
            None => eprintln!("ctl: {what}"),
        }
    }

    /// Agent `i` is done with this rollout: its line stops moving.
    pub fn done(&self, i: usize, what: impl Into<String>) {
        match &self.bars {
            Some((_, bars)) => bars[i].finish_with_message(what.into()),
            None => self.say(i, what),
        }
    }

    /// Stops every line still moving, before the summary is printed.
    pub fn finish(&self) {
        if let Some((_, bars)) = &self.bars {
            for bar in bars.iter().filter(|b| !b.is_finished()) {
                bar.finish();
            }
        }
    }
}
