//! One `run` from start to end: everything around executing the graph that must happen exactly
//! once per invocation, whoever invokes it.
//!
//! Invariants:
//! * stages execute only under the shared cache lock, so `cache gc` never removes what a run
//!   is about to read or commit (a run waits for a running `gc`, and says so);
//! * staging folders left by a killed run are removed before anything new is staged (by the
//!   coordinator of a run, not by its cluster jobs);
//! * the first SIGINT/SIGTERM cancels: running programs' process groups get SIGTERM, and
//!   SIGKILL after [`KILL_GRACE`] or at a second signal; nothing partial is committed;
//! * pushes to the team cache are awaited before the run returns (never decide success);
//! * a real run leaves a history entry (locally, and on the remote when a stage ran); a dry run
//!   leaves none.

use std::sync::Arc;
use std::time::Duration;

use cusa_stages::api::Cancel;
use signal_hook::consts::{SIGINT, SIGTERM};

use super::report::{Outcome, Reporter, human};
use super::{Engine, RunResult, RunSettings};
use crate::remote::Remote;
use crate::store::{HistoryEntry, HistoryStage, StoreError};

/// How long running programs have between SIGTERM and SIGKILL after an interrupt.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot watch for Ctrl-C: {0}")]
    Signals(std::io::Error),
}

/// Runs the selected stages of `engine` as one invocation (see the module doc).
pub fn execute(
    engine: Engine,
    settings: &RunSettings,
    reporter: Arc<Reporter>,
) -> Result<RunResult, SessionError> {
    let _lock = engine.store.lock(false, || {
        reporter.waiting("the cache is locked by `cusa-pipe cache gc`")
    })?;
    // A cluster job leaves sweeping to its coordinator: on a shared filesystem, other nodes'
    // staging folders are only as alive as that filesystem's locks say.
    let swept = if settings.job.is_none() {
        engine.store.sweep_staging()
    } else {
        0
    };
    if swept > 0 {
        reporter.line(&format!(
            "  cleaned  {swept} staging folder(s) left by an interrupted run"
        ));
    }

    let cancel = Cancel::new();
    let interrupts = Interrupts::watch(cancel.clone(), reporter.clone())?;
    let engine = Arc::new(engine);
    let result = engine.run(settings, reporter.clone(), cancel);
    drop(interrupts);

    if let Some(remote) = &engine.remote {
        wait_for_pushes(remote, &reporter);
    }
    // A cluster job's run is part of its coordinator's, which writes the history entry.
    if !settings.dry_run && settings.job.is_none() {
        let history = history(&engine, &result);
        if let Err(e) = engine.store.write_history(&history) {
            reporter.line(&format!("warning: {e}"));
        }
        if let Some(remote) = &engine.remote
            && result.reports.iter().any(|r| r.outcome == Outcome::Ran)
        {
            remote.push_history(&history);
        }
    }
    Ok(result)
}

/// The history entry of a finished run.
fn history(engine: &Engine, result: &RunResult) -> HistoryEntry {
    HistoryEntry {
        pipeline: engine.pipeline.file.display().to_string(),
        dry_run: false,
        stages: result
            .reports
            .iter()
            .map(|r| HistoryStage {
                name: r.name.clone(),
                outcome: r.outcome.key().to_string(),
                fingerprint: r.fingerprint.clone(),
                reasons: r.reasons.iter().map(ToString::to_string).collect(),
                seconds: r.seconds,
            })
            .collect(),
    }
}

/// The SIGINT/SIGTERM watcher of one run; stops watching when dropped.
struct Interrupts {
    handle: signal_hook::iterator::Handle,
    watcher: Option<std::thread::JoinHandle<()>>,
}

impl Interrupts {
    fn watch(cancel: Cancel, reporter: Arc<Reporter>) -> Result<Self, SessionError> {
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
            .map_err(SessionError::Signals)?;
        let handle = signals.handle();
        let watcher = std::thread::spawn(move || {
            for (n, _) in signals.forever().enumerate() {
                if n == 0 {
                    reporter.line(
                        "interrupted: stopping running stages (press Ctrl-C again to kill them)",
                    );
                    cancel.cancel(libc::SIGTERM);
                    let cancel = cancel.clone();
                    std::thread::spawn(move || {
                        std::thread::sleep(KILL_GRACE);
                        cancel.signal_groups(libc::SIGKILL);
                    });
                } else {
                    cancel.signal_groups(libc::SIGKILL);
                }
            }
        });
        Ok(Interrupts {
            handle,
            watcher: Some(watcher),
        })
    }
}

impl Drop for Interrupts {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
    }
}

/// Waits for the background pushes of this run, with a bar on a terminal, and reports them.
pub fn wait_for_pushes(remote: &Remote, reporter: &Reporter) {
    let pending = remote.pending();
    let bar = (pending > 0 && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template("  pushing  {wide_bar} {pos}/{len}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let results = remote.finish(|done, total| {
        if let Some(b) = &bar {
            b.set_length(total as u64);
            b.set_position(done as u64);
        }
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let (mut pushed, mut bytes) = (0, 0);
    for (stage, r) in &results {
        match r {
            Ok(s) if !s.already => {
                pushed += 1;
                bytes += s.bytes;
                if s.repaired > 0 || s.record_replaced {
                    reporter.line(&format!(
                        " repaired  `{stage}` on {}: {} damaged or missing object(s) uploaded again{}",
                        remote.describe(),
                        s.repaired,
                        if s.record_replaced { ", record replaced" } else { "" }
                    ));
                }
            }
            Ok(_) => {}
            Err(e) => remote.failed(&format!("pushing `{stage}`"), e),
        }
    }
    if pushed > 0 {
        reporter.line(&format!(
            "   pushed  {pushed} result(s), {} to {}",
            human(bytes),
            remote.describe()
        ));
    }
}
