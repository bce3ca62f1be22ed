//! Live configuration: on SIGHUP, and when the config file or a keys file
//! it names changes (also when a Kubernetes ConfigMap or Secret update
//! swaps the symlink it is read through),
//! the file is read and validated again and handed to the gateway, which
//! applies it without dropping a request (see [`crate::serve`]). A config
//! that does not load is logged with the key at fault and the old one stays
//! in force.

use std::path::PathBuf;
use std::time::Duration;

use tokio::signal::unix::Signal;
use tokio::sync::{mpsc, oneshot};

use crate::config::Config;

/// A reload's error once the gateway is gone.
const STOPPED: &str = "the gateway has stopped";

/// How often the config file is read to see whether it changed.
pub const WATCH_PERIOD: Duration = Duration::from_secs(1);

/// A reload for the gateway: the new config, or why it did not load.
pub(crate) struct Request {
    pub config: Result<Config, String>,
    pub done: oneshot::Sender<Result<(), String>>,
}

/// Hands new configs to a running gateway.
#[derive(Clone)]
pub struct Reloader {
    pub(crate) tx: mpsc::Sender<Request>,
}

impl Reloader {
    /// Applies `config` (or counts and logs a config that did not load);
    /// the error says why the old config stays in force.
    pub async fn reload(&self, config: Result<Config, String>) -> Result<(), String> {
        let (done, answer) = oneshot::channel();
        self.tx.send(Request { config, done }).await.map_err(|_| STOPPED.to_string())?;
        answer.await.map_err(|_| STOPPED.to_string())?
    }
}

/// SIGHUP, taken from now on (its default action would kill the process).
pub fn hangup_signal() -> anyhow::Result<Signal> {
    use anyhow::Context;
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("cannot install the SIGHUP handler")
}

/// Reloads `path` on SIGHUP and whenever its contents change (read every
/// [`WATCH_PERIOD`], through any symlink). Without a file, SIGHUP is only
/// logged. Runs until the gateway stops.
pub async fn watch(path: Option<PathBuf>, mut hangup: Signal, reloader: Reloader) {
    let Some(path) = path else {
        while hangup.recv().await.is_some() {
            tracing::warn!("SIGHUP received, but sdgate runs the built-in config: there is no file to reload");
        }
        return;
    };
    let mut seen = std::fs::read(&path).ok();
    // The services' keys files (`auth.keys_file`, a Secret's file on
    // Kubernetes) are read at a reload: a change of one is a reload too.
    let mut keys_files = keys_files_of(&path);
    let mut keys_seen = read_all(&keys_files);
    let mut period = tokio::time::interval(WATCH_PERIOD);
    period.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let why = tokio::select! {
            _ = hangup.recv() => "SIGHUP",
            _ = period.tick() => {
                let now = std::fs::read(&path).ok();
                let keys_now = read_all(&keys_files);
                // A file missing for a moment (an editor's rename) is not a change.
                let config_changed = now.is_some() && now != seen;
                let keys_changed = keys_now.iter().all(Option::is_some) && keys_now != keys_seen;
                if !config_changed && !keys_changed {
                    continue;
                }
                if config_changed {
                    seen = now;
                }
                if config_changed { "the config file changed" } else { "a keys file changed" }
            }
        };
        keys_files = keys_files_of(&path);
        keys_seen = read_all(&keys_files);
        tracing::info!(file = %path.display(), why, "reloading the config");
        let config = Config::load(&path).map_err(|error| format!("{error:#}"));
        // The gateway logs a refusal, with the key at fault.
        if reloader.reload(config).await.as_ref().is_err_and(|error| error == STOPPED) {
            return;
        }
    }
}

/// The keys files the config at `path` names (none if it does not load).
fn keys_files_of(path: &std::path::Path) -> Vec<PathBuf> {
    let Ok(config) = Config::load(path) else { return Vec::new() };
    config.services.iter().filter_map(|service| service.auth.as_ref()?.keys_path()).collect()
}

fn read_all(paths: &[PathBuf]) -> Vec<Option<Vec<u8>>> {
    paths.iter().map(|path| std::fs::read(path).ok()).collect()
}
