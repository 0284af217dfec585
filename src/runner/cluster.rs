//! One stage as a cluster job: submit `cusa-pipe job` for exactly the stage and key the
//! coordinator decided on, wait for the job through the run's [`Watcher`], and take the
//! committed record — in the shared cache, or restored from the team remote — as the only
//! proof of success (see [`crate::executor`]). A job the cluster ended (preempted, node
//! failure, cancelled from outside) is submitted again, up to `max_resubmits`; a job whose
//! program failed is reported like a failed local stage: its id, state, exit code and the last
//! lines of its log.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::report::StageReport;
use super::{Assessment, Committed, Shared, Upstream};
use crate::executor::slurm::Slurm;
use crate::executor::watch::Waited;
use crate::executor::{
    CacheMode, Cluster, DEFAULT_JOB_CACHE, JobSpec, JobState, JobStatus, Placement, SlurmSettings,
};
use crate::fingerprint::Fingerprint;

/// Lines of a failed job's log shown with its error.
const LOG_TAIL: usize = 20;

/// Runs stage `idx` as Slurm jobs until one commits, the stage fails, or the run stops.
pub(super) fn run_as_job(
    shared: &Shared,
    idx: usize,
    a: &Assessment,
    fp: &Fingerprint,
    settings: &SlurmSettings,
    ups: &HashMap<String, Upstream>,
    report: &mut StageReport,
) -> Result<Committed, ()> {
    let forced = shared.settings.force.contains(&idx);
    let engine = &shared.engine;
    let stage = &engine.pipeline.stages[idx];
    let Some(watcher) = &shared.watcher else {
        report.error = Some("internal error: no cluster watcher for a cluster stage".into());
        return Err(());
    };
    if settings.cache_mode() == CacheMode::Remote {
        upstream_on_remote(shared, ups, report)?;
    }
    let cache = std::path::absolute(engine.store.root())
        .unwrap_or_else(|_| engine.store.root().to_path_buf());
    let log_dir = settings
        .log_dir
        .clone()
        .map(|d| engine.pipeline.dir.join(d))
        .unwrap_or_else(|| cache.join("logs-v1").join("slurm"));
    if let Err(e) = std::fs::create_dir_all(&log_dir) {
        report.error = Some(format!(
            "cannot create the job log folder {}: {e}",
            log_dir.display()
        ));
        return Err(());
    }
    let name = crate::executor::job_name(&shared.run_id, &stage.name);
    let spec = JobSpec {
        log: log_dir.join(format!("{name}-%j.log")),
        name,
        workdir: engine.pipeline.dir.clone(),
        command: job_command(shared, idx, fp, settings, &cache, forced),
        cpus: stage.cpus,
        memory: stage.memory.clone(),
        gpus: stage.gpus,
    };
    let _progress = shared.reporter.started(&stage.name, &a.reasons);
    let max = settings.max_resubmits();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let id = match watcher.cluster().submit(&spec, settings) {
            Ok(id) => id,
            Err(e) => {
                report.error = Some(format!("could not submit the job: {e}"));
                report.hint = Some(
                    "check the stage's `executor:` settings (partition, account, qos, time) \
                     against `sinfo` and `sacctmgr show assoc user=$USER`"
                        .into(),
                );
                return Err(());
            }
        };
        watcher.track(&id);
        let log = PathBuf::from(spec.log.display().to_string().replace("%j", &id));
        report.log = Some(log.clone());
        let again = if attempt > 1 {
            format!(" (attempt {attempt} of {})", max + 1)
        } else {
            String::new()
        };
        shared.reporter.line(&shared.reporter.stage_line(
            "submitted",
            &stage.name,
            &format!("{} job {id}{again}", watcher.cluster().name()),
        ));
        let end = match watcher.wait(&id) {
            Waited::Ended(end) => end,
            Waited::Interrupted => {
                report.error = Some(format!(
                    "interrupted: {} job {id} cancelled; nothing committed",
                    watcher.cluster().name()
                ));
                return Err(());
            }
        };
        if let Some(c) = committed(shared, idx, fp, settings) {
            let placement = c.ran_on.clone().unwrap_or(Placement {
                executor: watcher.cluster().name().into(),
                job: id.clone(),
                node: end.node.clone(),
            });
            report.notes.push(format!("ran on {placement}"));
            report.ran_on = Some(placement);
            return Ok(c);
        }
        let lost = describe(watcher.cluster().name(), &end);
        if end.state.is_cluster_loss() && attempt <= max {
            let note = format!(
                "{lost}; submitted again ({} of {max} resubmissions)",
                attempt
            );
            shared
                .reporter
                .line(&shared.reporter.stage_line("lost", &stage.name, &note));
            report.notes.push(note);
            continue;
        }
        report.error = Some(lost);
        report.log_tail = tail(&log, LOG_TAIL);
        report.hint = Some(hint(&end, settings, &cache, max));
        return Err(());
    }
}

/// With `cache: remote` a job finds its inputs only on the team remote: every upstream result
/// must be there before the job is submitted (a background push may still be on its way).
fn upstream_on_remote(
    shared: &Shared,
    ups: &HashMap<String, Upstream>,
    report: &mut StageReport,
) -> Result<(), ()> {
    let engine = &shared.engine;
    let Some(remote) = &engine.remote else {
        report.error = Some("`cache: remote` needs a team remote (`remote:`)".into());
        return Err(());
    };
    for (name, up) in ups {
        let Upstream::Done(c) = up else { continue };
        if remote.has_record(&c.fingerprint).unwrap_or(false) {
            continue;
        }
        let pushed = engine
            .store
            .read_record(&c.fingerprint)
            .ok_or_else(|| "its record is not in the local cache".to_string())
            .and_then(|record| {
                remote
                    .push_now(&engine.store, record)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = pushed {
            report.error = Some(format!(
                "the input `{name}` could not be put on {} for the job: {e}",
                remote.describe()
            ));
            report.hint = Some("check the remote's credentials and space, then run again".into());
            return Err(());
        }
    }
    Ok(())
}

/// The committed result of `fp` once its job ended: in the shared cache, or restored from the
/// team remote (`cache: remote`).
fn committed(
    shared: &Shared,
    idx: usize,
    fp: &Fingerprint,
    settings: &SlurmSettings,
) -> Option<Committed> {
    let engine = &shared.engine;
    if settings.cache_mode() == CacheMode::Remote {
        let remote = engine.remote.as_ref()?;
        remote.restore(&engine.store, fp, &engine.pipeline.stages[idx].name)?;
    }
    engine.committed_result(fp)
}

/// "slurm job 12 FAILED on n3 with exit code 1".
fn describe(cluster: &str, end: &JobStatus) -> String {
    let mut s = format!("{cluster} job {} {}", end.id, end.word);
    if let Some(n) = &end.node {
        s.push_str(&format!(" on {n}"));
    }
    match (end.exit_code, end.signal) {
        (_, Some(sig)) => s.push_str(&format!(" by signal {sig}")),
        (Some(code), None) if end.state != JobState::Vanished => {
            s.push_str(&format!(" with exit code {code}"))
        }
        _ => {}
    }
    if let Some(r) = end.reason.as_deref().filter(|r| *r != "NonZeroExitCode") {
        s.push_str(&format!(" ({r})"));
    }
    if end.state == JobState::Completed {
        s.push_str(", but committed nothing");
    }
    s
}

fn hint(end: &JobStatus, settings: &SlurmSettings, cache: &Path, max: u32) -> String {
    match &end.state {
        JobState::Timeout => "the job hit its time limit: raise the executor's `time:` (a \
                              training resumes from its last epoch)"
            .into(),
        JobState::OutOfMemory => "raise the stage's `resources: {memory: …}`".into(),
        JobState::Completed | JobState::Vanished => match settings.cache_mode() {
            CacheMode::Shared => format!(
                "the job's result is not in {}: is that folder shared with the nodes at the same \
                 path? If not, use `executor: {{cache: remote}}` with a team remote",
                cache.display()
            ),
            CacheMode::Remote => {
                "the job's result is not on the team remote: see the job's log for its push".into()
            }
        },
        s if s.is_cluster_loss() => format!(
            "the cluster ended the job {} time(s); raise the executor's `max_resubmits` or rerun",
            max + 1
        ),
        _ => "see the job's log; `cusa-pipe run` again resubmits it".into(),
    }
}

/// The shell command of the job: this binary's `job` subcommand for exactly this key.
fn job_command(
    shared: &Shared,
    idx: usize,
    fp: &Fingerprint,
    settings: &SlurmSettings,
    cache: &Path,
    forced: bool,
) -> String {
    let engine = &shared.engine;
    let binary = settings
        .binary
        .clone()
        .or_else(|| std::env::current_exe().ok())
        .unwrap_or_else(|| PathBuf::from("cusa-pipe"));
    let pipeline =
        std::path::absolute(&engine.pipeline.file).unwrap_or_else(|_| engine.pipeline.file.clone());
    let q = |s: &str| {
        shlex::try_quote(s)
            .map(|c| c.into_owned())
            .unwrap_or_else(|_| s.replace('\0', ""))
    };
    let cache_arg = match settings.cache_mode() {
        CacheMode::Shared => q(&cache.display().to_string()),
        // Expanded by the job's shell on the node (`$TMPDIR`), never split.
        CacheMode::Remote => {
            let raw = settings.job_cache.as_deref().unwrap_or(DEFAULT_JOB_CACHE);
            format!(
                "\"{}\"",
                raw.replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('`', "\\`")
            )
        }
    };
    let mut words = vec![
        "exec".to_string(),
        q(&binary.display().to_string()),
        "--cache-dir".into(),
        cache_arg,
        "job".into(),
        q(&pipeline.display().to_string()),
        "--stage".into(),
        q(&engine.pipeline.stages[idx].name),
        "--fingerprint".into(),
        fp.to_string(),
    ];
    if forced {
        words.push("--force".into());
    }
    words.extend(shared.settings.forward.iter().map(|w| q(w)));
    words.join(" ")
}

/// The last `n` lines of a job's log, when this machine can read it.
fn tail(log: &Path, n: usize) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(log) else {
        return vec![format!(
            "(the job's log {} is not readable here)",
            log.display()
        )];
    };
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// The run's Slurm watcher, when any selected stage runs on Slurm.
pub(super) fn slurm_watcher(
    shared_settings: impl Iterator<Item = SlurmSettings>,
    cancel: &cusa_stages::api::Cancel,
    reporter: std::sync::Arc<super::report::Reporter>,
) -> Option<crate::executor::watch::Watcher<Slurm>> {
    let mut bounds: Option<(std::time::Duration, std::time::Duration)> = None;
    for s in shared_settings {
        let (lo, hi) = s.poll();
        bounds = Some(match bounds {
            None => (lo, hi),
            Some((a, b)) => (a.min(lo), b.max(hi)),
        });
    }
    let bounds = bounds?;
    Some(crate::executor::watch::Watcher::new(
        Slurm,
        cancel.clone(),
        bounds,
        Box::new(move |m| reporter.line(m)),
    ))
}
