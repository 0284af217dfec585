//! Slurm through its command-line clients, as a user on a login node has them: `sbatch
//! --parsable` submits, one `squeue --jobs=…` per interval reads every job of a run (with
//! `--states=all`, so a job that just ended still shows its state and exit code), one
//! `scancel` cancels them all, and `sacct` — when the cluster keeps accounting — answers for a
//! job `squeue` has forgotten. Without accounting, `sacct` fails and a forgotten job is
//! [`JobState::Vanished`]: the committed record still decides whether it succeeded.

use std::process::Command;

use super::{
    Cluster, ClusterError, GpuRequest, JobId, JobSpec, JobState, JobStatus, SlurmSettings,
};

/// The Slurm clients found on `PATH`.
pub struct Slurm;

/// `squeue -O` fields, each followed by a `|`.
const FORMAT: &str = "JobID:|,State:|,NodeList:|,exit_code:|,Reason:";

impl Slurm {
    /// The `sbatch` arguments of one job (without the program name).
    pub fn sbatch_args(job: &JobSpec, s: &SlurmSettings) -> Vec<String> {
        let mut a = vec![
            "--parsable".to_string(),
            format!("--job-name={}", job.name),
            format!("--output={}", job.log.display()),
            format!("--chdir={}", job.workdir.display()),
        ];
        for (flag, v) in [
            ("partition", &s.partition),
            ("account", &s.account),
            ("qos", &s.qos),
            ("time", &s.time),
        ] {
            if let Some(v) = v {
                a.push(format!("--{flag}={v}"));
            }
        }
        if let Some(c) = job.cpus {
            a.push(format!("--cpus-per-task={c}"));
        }
        if let Some(m) = &job.memory {
            a.push(format!("--mem={m}"));
        }
        if job.gpus > 0 {
            a.push(match s.gpu_request.unwrap_or(GpuRequest::Gres) {
                GpuRequest::Gres => format!("--gres=gpu:{}", job.gpus),
                GpuRequest::Gpus => format!("--gpus={}", job.gpus),
            });
        }
        // Resubmission is ours (counted, and visible in the run's output): Slurm must not
        // requeue the job under the same id behind our back, unless the user asks for it.
        if !s.sbatch_args.iter().any(|x| x == "--requeue") {
            a.push("--no-requeue".into());
        }
        a.extend(s.sbatch_args.iter().cloned());
        a.push(format!("--wrap={}", job.command));
        a
    }
}

fn run(program: &str, args: &[String]) -> Result<String, ClusterError> {
    let out = Command::new(program).args(args).output().map_err(|e| {
        ClusterError(format!(
            "cannot run `{program}` ({e}); is this a Slurm login node (`{program}` on PATH)?"
        ))
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(ClusterError(format!(
            "`{program}` failed ({}): {}",
            out.status,
            err.trim()
        )))
    }
}

impl Cluster for Slurm {
    type Settings = SlurmSettings;

    fn name(&self) -> &'static str {
        "slurm"
    }

    fn submit(&self, job: &JobSpec, settings: &SlurmSettings) -> Result<JobId, ClusterError> {
        let out = run("sbatch", &Self::sbatch_args(job, settings))?;
        // `--parsable`: "jobid" or "jobid;cluster".
        let id = out
            .trim()
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit() || c == '_') {
            return Err(ClusterError(format!(
                "sbatch printed `{}` instead of a job id",
                out.trim()
            )));
        }
        Ok(id)
    }

    fn poll(&self, jobs: &[JobId]) -> Result<Vec<JobStatus>, ClusterError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let args = vec![
            format!("--jobs={}", jobs.join(",")),
            "--states=all".into(),
            "--noheader".into(),
            "-O".into(),
            FORMAT.into(),
        ];
        match run("squeue", &args) {
            Ok(out) => Ok(parse_squeue(&out)),
            // Every id unknown (all purged): nothing to report, not an error.
            Err(e) if e.0.contains("Invalid job id") => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    fn history(&self, jobs: &[JobId]) -> Option<Vec<JobStatus>> {
        let args = vec![
            format!("--jobs={}", jobs.join(",")),
            "--allocations".into(),
            "--noheader".into(),
            "--parsable2".into(),
            "--format=JobID,State,NodeList,ExitCode,Reason".into(),
        ];
        run("sacct", &args).ok().map(|out| parse_sacct(&out))
    }

    fn cancel(&self, jobs: &[JobId]) -> Result<(), ClusterError> {
        if jobs.is_empty() {
            return Ok(());
        }
        run("scancel", jobs).map(|_| ())
    }
}

/// A Slurm state name → [`JobState`] (`CANCELLED by 0` → cancelled).
pub fn state(word: &str) -> JobState {
    let w = word.split_whitespace().next().unwrap_or("");
    match w.trim_end_matches('+') {
        // REQUEUED: the same job id goes back to the queue (`--requeue`).
        "PENDING" | "CONFIGURING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED"
        | "RESV_DEL_HOLD" => JobState::Pending,
        "RUNNING" | "COMPLETING" | "SUSPENDED" | "STAGE_OUT" | "SIGNALING" | "RESIZING" => {
            JobState::Running
        }
        "COMPLETED" => JobState::Completed,
        "FAILED" | "SPECIAL_EXIT" => JobState::Failed,
        "CANCELLED" | "REVOKED" => JobState::Cancelled,
        "PREEMPTED" => JobState::Preempted,
        "NODE_FAIL" | "BOOT_FAIL" | "LAUNCH_FAILED" => JobState::NodeFail,
        "TIMEOUT" | "DEADLINE" => JobState::Timeout,
        "OUT_OF_MEMORY" => JobState::OutOfMemory,
        other => JobState::Other(other.to_string()),
    }
}

/// `squeue -O`'s exit_code is the raw wait status: exit code in the high byte, signal low.
fn wait_status(raw: &str) -> (Option<i32>, Option<i32>) {
    match raw.trim().parse::<i32>() {
        Ok(s) => {
            let signal = s & 0x7f;
            if signal != 0 {
                (None, Some(signal))
            } else {
                (Some((s >> 8) & 0xff), None)
            }
        }
        Err(_) => (None, None),
    }
}

fn node(raw: &str) -> Option<String> {
    let n = raw.trim();
    (!n.is_empty() && n != "(null)" && n != "None assigned").then(|| n.to_string())
}

/// Lines of `squeue -O JobID:|,State:|,NodeList:|,exit_code:|,Reason:`.
pub fn parse_squeue(out: &str) -> Vec<JobStatus> {
    out.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split('|').map(str::trim).collect();
            if f.len() < 4 || f[0].is_empty() {
                return None;
            }
            let (exit_code, signal) = wait_status(f[3]);
            Some(JobStatus {
                id: f[0].to_string(),
                state: state(f[1]),
                word: f[1].to_string(),
                node: node(f[2]),
                exit_code,
                signal,
                reason: f
                    .get(4)
                    .and_then(|r| (!r.is_empty() && *r != "None").then(|| r.to_string())),
            })
        })
        .collect()
}

/// Lines of `sacct --parsable2 --format=JobID,State,NodeList,ExitCode,Reason` (ExitCode is
/// `code:signal`).
pub fn parse_sacct(out: &str) -> Vec<JobStatus> {
    out.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split('|').map(str::trim).collect();
            if f.len() < 4 || f[0].is_empty() || f[0].contains('.') {
                return None;
            }
            let (code, signal) = f[3].split_once(':').unwrap_or((f[3], "0"));
            let signal = signal.parse::<i32>().ok().filter(|&s| s != 0);
            Some(JobStatus {
                id: f[0].to_string(),
                state: state(f[1]),
                word: f[1].split_whitespace().next().unwrap_or("").to_string(),
                node: node(f[2]),
                exit_code: if signal.is_some() {
                    None
                } else {
                    code.parse().ok()
                },
                signal,
                reason: f
                    .get(4)
                    .and_then(|r| (!r.is_empty() && *r != "None").then(|| r.to_string())),
            })
        })
        .collect()
}

/// Slurm's time-limit forms: `M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`, `UNLIMITED`.
pub fn valid_time(t: &str) -> bool {
    let nums = |s: &str, max_parts: usize| {
        let parts: Vec<&str> = s.split(':').collect();
        parts.len() <= max_parts
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
    };
    if t.eq_ignore_ascii_case("unlimited") || t.eq_ignore_ascii_case("infinite") {
        return true;
    }
    match t.split_once('-') {
        Some((d, rest)) => !d.is_empty() && d.chars().all(|c| c.is_ascii_digit()) && nums(rest, 3),
        None => nums(t, 3),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squeue_lines_give_state_node_and_exit_code() {
        let out = "1|FAILED|vm|768|NonZeroExitCode\n2|CANCELLED|vm|36608|None\n\
                   3|PENDING||0|Resources\n4|COMPLETED|n07|0|None\n5|NODE_FAIL|n1|9|None\n";
        let s = parse_squeue(out);
        assert_eq!(s.len(), 5);
        assert_eq!(
            (s[0].state.clone(), s[0].exit_code, s[0].node.as_deref()),
            (JobState::Failed, Some(3), Some("vm"))
        );
        assert_eq!(
            (s[1].state.clone(), s[1].exit_code),
            (JobState::Cancelled, Some(143))
        );
        assert_eq!(
            (
                s[2].state.clone(),
                s[2].node.clone(),
                s[2].reason.as_deref()
            ),
            (JobState::Pending, None, Some("Resources"))
        );
        assert_eq!(s[3].state, JobState::Completed);
        assert_eq!((s[4].signal, s[4].exit_code), (Some(9), None));
        assert!(s[4].state.is_cluster_loss() && s[1].state.is_cluster_loss());
        assert!(!s[0].state.is_cluster_loss() && !s[2].state.is_finished());
    }

    #[test]
    fn sacct_lines_skip_steps_and_read_code_and_signal() {
        let out = "12|PREEMPTED|n3|0:15|None\n12.batch|CANCELLED|n3|0:15|\n\
                   13|CANCELLED by 1000|n3|0:0|None\n14|FAILED|n4|2:0|NonZeroExitCode\n";
        let s = parse_sacct(out);
        assert_eq!(s.len(), 3);
        assert_eq!(
            (s[0].state.clone(), s[0].signal),
            (JobState::Preempted, Some(15))
        );
        assert_eq!(
            (s[1].state.clone(), s[1].word.as_str()),
            (JobState::Cancelled, "CANCELLED")
        );
        assert_eq!(
            (s[2].state.clone(), s[2].exit_code),
            (JobState::Failed, Some(2))
        );
    }

    #[test]
    fn time_limits_in_slurms_forms() {
        for ok in [
            "30",
            "1:30",
            "1:30:00",
            "2-00",
            "2-00:00",
            "2-00:00:00",
            "UNLIMITED",
        ] {
            assert!(valid_time(ok), "{ok}");
        }
        for bad in ["", "soon", "1h", "1:2:3:4", "-1", "2-", "1::2"] {
            assert!(!valid_time(bad), "{bad}");
        }
    }

    #[test]
    fn resources_and_settings_become_sbatch_flags() {
        let job = JobSpec {
            name: "cusa-1-train".into(),
            workdir: "/p".into(),
            log: "/c/logs/train-%j.log".into(),
            command: "exec /bin/cusa-pipe job".into(),
            cpus: Some(8),
            memory: Some("32G".into()),
            gpus: 1,
        };
        let s = SlurmSettings {
            partition: Some("gpu".into()),
            time: Some("4:00:00".into()),
            sbatch_args: vec!["--constraint=a100".into()],
            ..Default::default()
        };
        assert_eq!(
            Slurm::sbatch_args(&job, &s),
            [
                "--parsable",
                "--job-name=cusa-1-train",
                "--output=/c/logs/train-%j.log",
                "--chdir=/p",
                "--partition=gpu",
                "--time=4:00:00",
                "--cpus-per-task=8",
                "--mem=32G",
                "--gres=gpu:1",
                "--no-requeue",
                "--constraint=a100",
                "--wrap=exec /bin/cusa-pipe job"
            ]
        );
        let s = SlurmSettings {
            gpu_request: Some(GpuRequest::Gpus),
            ..Default::default()
        };
        assert!(Slurm::sbatch_args(&job, &s).contains(&"--gpus=1".to_string()));
    }
}
