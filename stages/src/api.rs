//! The one contract between the engine and every stage kind.
//!
//! The engine knows nothing about ML; a stage kind knows nothing about scheduling, caching or
//! printing. They meet here:
//!
//! * [`StageKind`] is implemented once per kind (`command`, `download`, `dataset`, `teacher`,
//!   `softlabel`, `train`, `eval`, `export`; see [`crate::registry`]). It has a name, an
//!   implementation [`StageKind::version`] that enters every fingerprint (bump it whenever the
//!   same config would now produce different bytes), a load-time [`StageKind::check`] of its
//!   typed config, [`StageKind::run`], and the keys of its config that hold shell command lines
//!   ([`StageKind::shell_keys`]: values substituted there are quoted).
//! * [`StageContext`] is everything a running stage may touch: its declared inputs (read-only
//!   paths), its output directory `out_dir` (the only place it may write), a private scratch
//!   directory that survives interruptions (for resumable downloads), its log, its progress
//!   handle, the GPUs it was granted and the cancellation flag.
//!
//! Invariants a kind must keep:
//! * write only under `ctx.out_dir` (and `ctx.scratch_dir`); never print — log or report;
//! * be deterministic for a given config and inputs, or say in its docs why not;
//! * poll [`Cancel::is_cancelled`] in long loops and register child process groups with
//!   [`Cancel::track_process_group`] so Ctrl-C stops them;
//! * turn every bad user input into a [`ConfigError`] (at load time) or a [`StageError`] with a
//!   hint (at run time), never a panic.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// A stage kind with a typed config. Each kind implements this once; the engine reaches every
/// kind through [`StageKind`], which one generic impl derives from it (parse, validate,
/// normalise and the error mapping live there, not in eight copies).
pub trait Kind: Send + Sync + 'static {
    /// The typed `with:` block. `Serialize` gives the normalised form the engine hashes; it
    /// must parse back to the same value (checked on every load).
    type Config: Serialize + DeserializeOwned;

    /// The `kind:` name in the pipeline file.
    const NAME: &'static str;

    /// Implementation version; part of every fingerprint of this kind. Bump it when the same
    /// normalised config would now produce different bytes. Defaults and presets need no bump:
    /// they are part of the normalised config.
    const VERSION: u32;

    /// Keys of `with:` that hold a POSIX shell command line (`command`'s `run`): the engine
    /// substitutes every `${…}` value there as one literal, quoted piece of shell text, so a
    /// parameter can never inject a command.
    const SHELL_KEYS: &'static [&'static str] = &[];

    /// Parses `with:` (parameters substituted; `${inputs.X}` and `${out}` still symbolic).
    /// The default is serde with located errors; a kind whose presets supply keys overrides it.
    fn parse(with: &Value) -> Result<Self::Config, ConfigError> {
        parse_config(with)
    }

    /// Validates a parsed config and normalises it in place: every default a preset or the
    /// kind supplies is written into the config, so the engine hashes the values a stage runs
    /// with, and two spellings of one computation share a key. Runs once, at load time.
    /// Returns what the kind learnt (project paths it reads on its own).
    fn validate(
        config: &mut Self::Config,
        declared_inputs: &[String],
    ) -> Result<Checked, ConfigError>;

    /// Executes the stage. The config is the normalised one with every `${…}` reference
    /// resolved to a real path.
    fn run(&self, config: Self::Config, ctx: &StageContext<'_>)
    -> Result<StageSummary, StageError>;
}

/// The engine's view of a stage kind, with the config as JSON. Implemented for every [`Kind`].
pub trait StageKind: Send + Sync + 'static {
    /// The `kind:` name in the pipeline file.
    fn name(&self) -> &'static str;

    /// Implementation version; part of every fingerprint of this kind.
    fn version(&self) -> u32;

    /// Keys of `with:` that hold a shell command line ([`Kind::SHELL_KEYS`]).
    fn shell_keys(&self) -> &'static [&'static str];

    /// Load-time parse, validation and normalisation of `with:` (parameters substituted;
    /// `${inputs.X}` and `${out}` still symbolic).
    fn check(&self, with: &Value, declared_inputs: &[String]) -> Result<Checked, ConfigError>;

    /// Executes the stage with the normalised config of [`Checked::config`], every `${…}`
    /// reference resolved to a real path.
    fn run(&self, config: &Value, ctx: &StageContext<'_>) -> Result<StageSummary, StageError>;
}

impl<K: Kind> StageKind for K {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn version(&self) -> u32 {
        K::VERSION
    }

    fn shell_keys(&self) -> &'static [&'static str] {
        K::SHELL_KEYS
    }

    fn check(&self, with: &Value, declared_inputs: &[String]) -> Result<Checked, ConfigError> {
        let mut config = K::parse(with)?;
        let mut checked = K::validate(&mut config, declared_inputs)?;
        checked.config = normalised::<K>(&config)?;
        Ok(checked)
    }

    fn run(&self, config: &Value, ctx: &StageContext<'_>) -> Result<StageSummary, StageError> {
        // The config was parsed and normalised at load time; failing now is a defect of the
        // kind's round trip, which `check` rules out.
        let config = K::parse(config).map_err(|e| {
            StageError::failed(format!(
                "the normalised `{}` config no longer parses at {}: {}",
                K::NAME,
                if e.path.is_empty() { "with" } else { &e.path },
                e.message
            ))
        })?;
        Kind::run(self, config, ctx)
    }
}

/// The normalised config as JSON, checked to parse back to itself (what is hashed is exactly
/// what runs).
fn normalised<K: Kind>(config: &K::Config) -> Result<Value, ConfigError> {
    let bug = |what: String| {
        ConfigError::new(
            "",
            format!("`{}` cannot normalise this config: {what}", K::NAME),
        )
        .with_help("this is a defect of cusa-pipe; please report it with the stage's `with:`")
    };
    let value = serde_json::to_value(config).map_err(|e| bug(e.to_string()))?;
    let again = K::parse(&value).map_err(|e| bug(format!("{} ({})", e.message, e.path)))?;
    let again = serde_json::to_value(&again).map_err(|e| bug(e.to_string()))?;
    if again != value {
        return Err(bug("it does not parse back to itself".into()));
    }
    Ok(value)
}

/// What [`StageKind::check`] learnt about a config.
#[derive(Debug, Default, Clone)]
pub struct Checked {
    /// The normalised config (defaults and presets applied), as the engine hashes it and the
    /// kind runs it; set by the generic [`StageKind`] impl.
    pub config: Value,
    /// Extra project paths the stage reads, by the config key that names them (`with.file`).
    pub implicit_inputs: Vec<ImplicitInput>,
}

/// A project path named inside `with:` rather than under `inputs:`.
#[derive(Debug, Clone)]
pub struct ImplicitInput {
    /// The name under which the engine passes the resolved path back in
    /// [`StageContext::inputs`]; also used in miss reasons.
    pub name: String,
    /// The config key path inside `with` that names it, for error locations (`file`).
    pub key: String,
    /// The path as written, relative to the pipeline file's folder or absolute.
    pub path: String,
}

/// A config problem, located by its key path inside `with:` (`sources[0].url`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Key path relative to `with`, in `a.b[0].c` form; empty for the whole block.
    pub path: String,
    /// Whether the diagnostic points at the key (unknown or missing keys) or at its value.
    pub points_at: PointsAt,
    pub message: String,
    pub help: Option<String>,
}

/// Where in a `key: value` line a [`ConfigError`] points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PointsAt {
    /// The key itself is wrong (unknown) or absent (missing, pointed at its parent).
    Key,
    /// The value under the key is wrong.
    #[default]
    Value,
}

impl ConfigError {
    /// A wrong value under `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            points_at: PointsAt::Value,
            message: message.into(),
            help: None,
        }
    }

    /// A wrong or missing key at `path`.
    pub fn at_key(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            points_at: PointsAt::Key,
            ..Self::new(path, message)
        }
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Deserialises a kind's typed config, reporting the key path of any error.
///
/// Kinds put `#[serde(deny_unknown_fields)]` on their config structs; an unknown key then
/// becomes an error whose help suggests the closest known key.
pub fn parse_config<T: DeserializeOwned>(with: &Value) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize::<_, T>(with).map_err(|err| {
        let path = err.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let inner = err.into_inner().to_string();
        config_error_from_serde(path, &inner)
    })
}

/// Turns serde's message into ours: unknown keys get a did-you-mean help.
fn config_error_from_serde(path: String, message: &str) -> ConfigError {
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some((field, expected)) = rest.split_once('`')
    {
        let candidates: Vec<&str> = expected
            .split('`')
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
            .map(|(_, s)| s)
            .collect();
        let mut err = ConfigError::at_key(path, format!("unknown key `{field}`"));
        err.help = Some(match closest(field, &candidates) {
            Some(best) => format!(
                "did you mean `{best}`? known keys: {}",
                candidates.join(", ")
            ),
            None => format!("known keys: {}", candidates.join(", ")),
        });
        return err;
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        let field = rest.split('`').next().unwrap_or(rest);
        return ConfigError::at_key(path, format!("missing required key `{field}`"));
    }
    ConfigError::new(path, message.to_string())
}

/// The candidate closest to `word`, if one is plausibly meant: an edit distance (with
/// transpositions) of at most a third of the word's length, at least 1, as cargo does.
pub fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .iter()
        .map(|c| (strsim::osa_distance(word, c), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, c)| (*d, *c))
        .map(|(_, c)| c)
}

/// What a finished stage tells the user beyond "ran" (e.g. a digest to pin).
#[derive(Debug, Default, Clone)]
pub struct StageSummary {
    /// One line each, shown after the stage's outcome and kept in its run record.
    pub notes: Vec<String>,
    /// Small numbers worth keeping in the run record (bytes downloaded, rows, timings).
    pub metrics: BTreeMap<String, Value>,
    /// What the stage measured of a model, as numbers, in display order: the columns of
    /// `cusa-pipe metrics` (e.g. `i2t R@1`, `rsum`). Empty for stages that measure nothing.
    pub results: serde_json::Map<String, Value>,
}

/// Why a stage failed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The stage's own logic failed; `hint` tells the user what to do.
    #[error("{message}")]
    Failed {
        message: String,
        hint: Option<String>,
    },
    /// A child program exited non-zero.
    #[error("`{program}` exited with code {code}")]
    ExitCode { program: String, code: i32 },
    /// A child program was killed by a signal.
    #[error("`{program}` was killed by signal {signal}")]
    Signal { program: String, signal: i32 },
    /// Ctrl-C / SIGTERM: nothing of this stage is committed.
    #[error("interrupted")]
    Cancelled,
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl StageError {
    pub fn failed(message: impl Into<String>) -> Self {
        StageError::Failed {
            message: message.into(),
            hint: None,
        }
    }

    pub fn failed_with_hint(message: impl Into<String>, hint: impl Into<String>) -> Self {
        StageError::Failed {
            message: message.into(),
            hint: Some(hint.into()),
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StageError::Io {
            context: context.into(),
            source,
        }
    }

    pub fn hint(&self) -> Option<&str> {
        match self {
            StageError::Failed { hint, .. } => hint.as_deref(),
            _ => None,
        }
    }
}

/// Everything a running stage may touch.
pub struct StageContext<'a> {
    /// The stage's name in the pipeline.
    pub stage: &'a str,
    /// The pipeline file's folder: the working directory of user programs.
    pub project_dir: &'a Path,
    /// The output tree being built; committed to the store only if `run` returns `Ok`.
    pub out_dir: &'a Path,
    /// A directory private to this stage kind that survives interruptions (resume state).
    pub scratch_dir: &'a Path,
    /// The stage's fingerprint (hex): resume state kept in `scratch_dir` is keyed by it, so a
    /// rerun resumes only the very same computation.
    pub fingerprint: &'a str,
    /// Declared and implicit inputs by name, as absolute read-only paths.
    pub inputs: &'a BTreeMap<String, PathBuf>,
    /// GPU indices granted to this stage (`resources: {gpu: N}`); empty on CPU.
    pub gpus: &'a [usize],
    /// Threads the stage may use for its own parallel work.
    pub threads: usize,
    pub log: &'a StageLog,
    pub progress: &'a dyn Progress,
    pub cancel: &'a Cancel,
}

impl StageContext<'_> {
    /// A path from the config: absolute as given, or relative to the pipeline file's folder
    /// (`${inputs.X}` references are already absolute).
    pub fn resolve(&self, path: &str) -> PathBuf {
        let p = Path::new(path);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.project_dir.join(p)
        }
    }
}

/// The stage's log file. Everything a stage or its child programs say goes here.
pub struct StageLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl StageLog {
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let file = File::create(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line.
    pub fn line(&self, text: impl AsRef<str>) {
        if let Ok(mut f) = self.file.lock() {
            let _ = writeln!(f, "{}", text.as_ref());
        }
    }

    /// A second handle on the file, for a child process's stdout/stderr.
    pub fn try_clone_file(&self) -> std::io::Result<File> {
        let f = self
            .file
            .lock()
            .map_err(|_| std::io::Error::other("log lock poisoned"))?;
        f.try_clone()
    }

    /// The last `n` lines of the log (shown when the stage fails).
    pub fn tail(&self, n: usize) -> Vec<String> {
        let text = std::fs::read(&self.path).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }
}

/// Progress of a long step (bytes downloaded, items processed). The engine shows it as a
/// progress bar when stderr is a terminal and ignores it otherwise.
pub trait Progress: Send + Sync {
    /// Total bytes (shown with bytes/s and ETA).
    fn set_length(&self, len: Option<u64>);
    /// Total items (shown with items/s and ETA); positions then count items.
    fn set_items(&self, total: Option<u64>) {
        self.set_length(total);
    }
    fn set_position(&self, pos: u64);
    fn set_message(&self, msg: &str);
}

/// A progress sink that shows nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn set_length(&self, _: Option<u64>) {}
    fn set_position(&self, _: u64) {}
    fn set_message(&self, _: &str) {}
}

/// Cooperative cancellation shared by the engine's signal handler and every running stage.
///
/// Child programs run in their own process group; the stage registers that group here so that
/// an interrupt can stop the whole tree of processes, not only the direct child.
#[derive(Clone, Default)]
pub struct Cancel {
    inner: Arc<CancelInner>,
}

#[derive(Default)]
struct CancelInner {
    cancelled: AtomicBool,
    groups: Mutex<Vec<i32>>,
}

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_cancelled(&self) -> bool {
        self.inner.cancelled.load(Ordering::SeqCst)
    }

    /// Marks everything cancelled and sends `signal` to every tracked process group.
    pub fn cancel(&self, signal: i32) {
        self.inner.cancelled.store(true, Ordering::SeqCst);
        self.signal_groups(signal);
    }

    /// Sends `signal` to every tracked process group.
    pub fn signal_groups(&self, signal: i32) {
        if let Ok(groups) = self.inner.groups.lock() {
            for &pgid in groups.iter() {
                // SAFETY: killpg has no memory-safety preconditions; a stale group id only
                // yields ESRCH.
                unsafe {
                    libc::killpg(pgid, signal);
                }
            }
        }
    }

    /// Registers a child's process group; returns a guard that unregisters it.
    pub fn track_process_group(&self, pgid: i32) -> GroupGuard {
        if let Ok(mut groups) = self.inner.groups.lock() {
            groups.push(pgid);
        }
        GroupGuard {
            cancel: self.clone(),
            pgid,
        }
    }
}

/// Unregisters a process group when dropped.
pub struct GroupGuard {
    cancel: Cancel,
    pgid: i32,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Ok(mut groups) = self.cancel.inner.groups.lock() {
            groups.retain(|&g| g != self.pgid);
        }
    }
}

/// A value as the pretty JSON text (with a final newline) of a file a later stage or a user
/// reads. Serialising can fail (a map keyed by non-strings): that is an error of the stage,
/// never an empty file.
pub fn json_text(value: &impl serde::Serialize, what: &str) -> Result<String, StageError> {
    serde_json::to_string_pretty(value)
        .map(|t| t + "\n")
        .map_err(|e| StageError::failed(format!("cannot serialise {what}: {e}")))
}

/// The name a config value is written as in `with:` (its serde form: `infonce`, `cls`), for
/// files that record it. Never a `Debug` string: that is not a format.
pub fn config_name(value: &impl serde::Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(e) => format!("<{e}>"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Demo {
        run: String,
        #[serde(default)]
        env: BTreeMap<String, String>,
    }

    #[test]
    fn unknown_key_suggests_the_closest_known_one() {
        let err = parse_config::<Demo>(&serde_json::json!({"rn": "x"})).unwrap_err();
        assert_eq!(err.message, "unknown key `rn`");
        assert_eq!(
            err.help.as_deref(),
            Some("did you mean `run`? known keys: run, env")
        );
    }

    #[test]
    fn type_errors_name_the_key_path() {
        let err =
            parse_config::<Demo>(&serde_json::json!({"run": "x", "env": {"A": [1]}})).unwrap_err();
        assert_eq!(err.path, "env.A");
        assert!(err.message.contains("expected a string"), "{}", err.message);
    }

    #[test]
    fn suggestions_need_a_plausible_typo() {
        assert_eq!(
            closest("inptus", &["inputs", "kind", "with"]),
            Some("inputs")
        );
        assert_eq!(closest("comand", &["command", "download"]), Some("command"));
        assert_eq!(closest("trian", &["train", "eval"]), Some("train"));
        assert_eq!(closest("banana", &["inputs", "kind", "with"]), None);
    }

    #[test]
    fn missing_key_is_named() {
        let err = parse_config::<Demo>(&serde_json::json!({})).unwrap_err();
        assert_eq!(err.message, "missing required key `run`");
    }
}
