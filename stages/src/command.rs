//! `kind: command` — a user's own program as a cached stage.
//!
//! ```yaml
//! total:
//!   kind: command
//!   inputs: {numbers: ${numbers}}
//!   with:
//!     run: python3 sum.py ${inputs.numbers}/numbers.txt ${out}/total.txt
//!     env: {PYTHONHASHSEED: "0"}   # optional, added to the inherited environment
//!     shell: true                  # default; false splits `run` like a POSIX shell, no shell
//! ```
//!
//! Every `${…}` in `run` becomes one literal piece of shell text, quoted for where it stands
//! (bare, in `'…'`, in `"…"`): `echo ${params.msg}` with `msg: "x; touch y"` prints `x; touch
//! y`, with `shell: true` or `false`. `${params.KEY:raw}` pastes a value unquoted, for values
//! that are meant as shell syntax (several flags).
//!
//! Invariants:
//! * the program runs with the pipeline file's folder as working directory, `${out}` is its
//!   staging directory, and `CUSA_PIPE_OUT` holds the same path;
//! * stdout and stderr go to the stage's log file (the engine shows its last lines on failure);
//! * a non-zero exit or a death by signal fails the stage; nothing is committed;
//! * the program runs in its own process group so an interrupt stops its children too, and it
//!   is killed if cusa-pipe itself dies (`PR_SET_PDEATHSIG`);
//! * the host environment is inherited but is *not* part of the fingerprint: put variables that
//!   change results under `env:`, where they are. Declared inputs are the only files a command
//!   may rely on; the engine cannot see what else it reads.

use std::collections::BTreeMap;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::api::{Checked, ConfigError, Kind, StageContext, StageError, StageSummary};

/// The typed `with:` block of a command stage.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CommandConfig {
    /// The command line; `${inputs.NAME}`, `${out}` and `${params.KEY}` are substituted.
    pub run: String,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Run through `sh -c` (default) or exec the split words directly.
    #[serde(default = "default_true")]
    pub shell: bool,
}

fn default_true() -> bool {
    true
}

pub struct CommandKind;

impl Kind for CommandKind {
    type Config = CommandConfig;
    const NAME: &'static str = "command";
    const VERSION: u32 = 1;
    const SHELL_KEYS: &'static [&'static str] = &["run"];

    fn validate(config: &mut CommandConfig, _declared: &[String]) -> Result<Checked, ConfigError> {
        if config.run.trim().is_empty() {
            return Err(ConfigError::new("run", "`run` is empty").with_help(
                "give the command line to execute, e.g. `python3 make.py ${out}/data.txt`",
            ));
        }
        if !config.shell && shlex::split(&config.run).is_none() {
            return Err(ConfigError::new("run", "`run` has an unbalanced quote")
                .with_help("with `shell: false` the command is split like a POSIX shell would"));
        }
        for key in config.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(ConfigError::new(
                    format!("env.{key}"),
                    format!("invalid environment variable name `{key}`"),
                ));
            }
        }
        Ok(Checked::default())
    }

    fn run(
        &self,
        config: CommandConfig,
        ctx: &StageContext<'_>,
    ) -> Result<StageSummary, StageError> {
        let (program, mut command) = if config.shell {
            let mut c = Command::new("sh");
            c.arg("-c").arg(&config.run);
            ("sh".to_string(), c)
        } else {
            let words = shlex::split(&config.run)
                .ok_or_else(|| StageError::failed("`run` has an unbalanced quote"))?;
            let (first, rest) = words
                .split_first()
                .ok_or_else(|| StageError::failed("`run` is empty"))?;
            let mut c = Command::new(first);
            c.args(rest);
            (first.clone(), c)
        };
        let label = if config.shell {
            short_command(&config.run)
        } else {
            program.clone()
        };

        let stdout = ctx
            .log
            .try_clone_file()
            .map_err(|e| StageError::io("opening the stage log", e))?;
        let stderr = ctx
            .log
            .try_clone_file()
            .map_err(|e| StageError::io("opening the stage log", e))?;
        command
            .current_dir(ctx.project_dir)
            .envs(&config.env)
            .env("CUSA_PIPE_OUT", ctx.out_dir)
            .env("CUSA_PIPE_STAGE", ctx.stage)
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            .process_group(0);
        if !ctx.gpus.is_empty() {
            let list: Vec<String> = ctx.gpus.iter().map(|g| g.to_string()).collect();
            command.env("CUDA_VISIBLE_DEVICES", list.join(","));
        }
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }

        ctx.log.line(format!("$ {}", config.run));
        if ctx.cancel.is_cancelled() {
            return Err(StageError::Cancelled);
        }
        let mut child = command.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                StageError::failed_with_hint(
                    format!("cannot start `{program}`: not found"),
                    "check that the program is installed and on PATH",
                )
            } else {
                StageError::io(format!("starting `{program}`"), e)
            }
        })?;
        let pgid = child.id() as i32;
        let _guard = ctx.cancel.track_process_group(pgid);
        // An interrupt that arrived between spawn and registration must still stop the child.
        if ctx.cancel.is_cancelled() {
            ctx.cancel.signal_groups(libc::SIGTERM);
        }
        let status = child
            .wait()
            .map_err(|e| StageError::io(format!("waiting for `{program}`"), e))?;
        if ctx.cancel.is_cancelled() {
            return Err(StageError::Cancelled);
        }
        match (status.code(), status.signal()) {
            (Some(0), _) => Ok(StageSummary::default()),
            (Some(code), _) => Err(StageError::ExitCode {
                program: label,
                code,
            }),
            (None, Some(signal)) => Err(StageError::Signal {
                program: label,
                signal,
            }),
            (None, None) => Err(StageError::failed(format!("`{label}` ended abnormally"))),
        }
    }
}

/// The first line of a command, at most 60 characters, for messages.
fn short_command(run: &str) -> String {
    let trimmed = run.trim();
    let first = trimmed.lines().next().unwrap_or("");
    let mut short: String = first.chars().take(60).collect();
    if short.len() < trimmed.len() {
        short.push_str(" …");
    }
    short
}

#[cfg(test)]
mod tests {
    #[test]
    fn long_commands_are_shortened_for_messages() {
        assert_eq!(super::short_command("python3 x.py"), "python3 x.py");
        assert_eq!(super::short_command("echo a\nexit 3\n"), "echo a …");
        assert_eq!(super::short_command(&"y".repeat(80)).chars().count(), 62);
    }
}
