//! The command line: flags → validated settings once, one function per subcommand, exit codes
//! by error class (0 success, 1 a stage failed, 2 invalid pipeline or usage, 130 interrupted).

mod cache;
mod dag;
mod job;
mod metrics;
mod path;
mod remote;
mod run;
mod status;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use crate::graph::Dag;
use crate::runner::Engine;
use crate::spec::{self, Diagnostic, Override, Pipeline};
use crate::store::Store;

/// Exit codes.
pub const EXIT_STAGE_FAILED: i32 = 1;
pub const EXIT_INVALID: i32 = 2;
pub const EXIT_INTERRUPTED: i32 = 130;

#[derive(Parser)]
#[command(
    name = "cusa-pipe",
    version,
    about = "Content-hashed, explained, crash-safe pipelines for image-text retrieval training"
)]
struct Cli {
    /// Cache directory [default: `cache/` beside the pipeline file]
    #[arg(long, global = true, env = "CUSA_PIPE_CACHE", value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipeline (or the named stages and what they need)
    Run(run::RunArgs),
    /// Show every stage as fresh or stale, with the reasons (old → new)
    Status(status::StatusArgs),
    /// Print the stage graph
    Dag(dag::DagArgs),
    /// One table of what the pipeline's stages measured (eval results), with deltas
    Metrics(metrics::MetricsArgs),
    /// Print where a stage's committed output (or a path inside it) is
    Path(path::PathArgs),
    /// Upload the stages' committed results to the team cache (all, or the named ones)
    Push(remote::TransferArgs),
    /// Restore the stages' results from the team cache without running anything
    Pull(remote::TransferArgs),
    /// Inspect and maintain the cache
    #[command(subcommand)]
    Cache(cache::CacheCommand),
    /// Measure the engine against peers (sha256sum, DVC) on generated data
    Bench(crate::bench::BenchArgs),
    /// Execute one stage for one key: what a cluster job runs (`executor: slurm`)
    #[command(hide = true)]
    Job(job::JobArgs),
}

/// Errors at the CLI edge, by class.
#[derive(Debug)]
pub enum CliError {
    /// The pipeline file or the command line is wrong (exit 2).
    Invalid(Box<Diagnostic>),
    Usage(String),
    /// Something else went wrong (exit 1).
    Other(anyhow::Error),
}

impl From<anyhow::Error> for CliError {
    fn from(e: anyhow::Error) -> Self {
        CliError::Other(e)
    }
}

impl From<Diagnostic> for CliError {
    fn from(d: Diagnostic) -> Self {
        CliError::Invalid(Box::new(d))
    }
}

impl From<crate::store::StoreError> for CliError {
    fn from(e: crate::store::StoreError) -> Self {
        CliError::Other(e.into())
    }
}

/// Exit code of a command whose output was closed by its reader (`| head`): 128 + SIGPIPE,
/// what a shell reports for a Unix tool stopped the same way.
pub const EXIT_OUTPUT_CLOSED: i32 = 141;

/// A closed standard output or error (`cusa-pipe status | head -1`) ends the process quietly.
///
/// SIGPIPE stays ignored (Rust's default): the network clients of the team cache write to
/// sockets with `writev`, which would raise it when a server hangs up. Instead the failed write
/// of `println!`/`eprintln!` (a panic "failed printing to stdout: Broken pipe") exits with
/// [`EXIT_OUTPUT_CLOSED`] and no message; every other panic keeps the default report. Exiting
/// there is as safe as any interruption: nothing is committed half-way (see `store`).
fn quiet_on_closed_output() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        // std's message: "failed printing to stdout: Broken pipe (os error 32)".
        if message.starts_with("failed printing to std")
            && message.contains(&format!("(os error {})", libc::EPIPE))
        {
            std::process::exit(EXIT_OUTPUT_CLOSED);
        }
        default(info);
    }));
}

/// Entry point; returns the process exit code.
pub fn main() -> i32 {
    quiet_on_closed_output();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { EXIT_INVALID } else { 0 };
        }
    };
    let result = match cli.command {
        Command::Run(a) => run::run(a, cli.cache_dir),
        Command::Status(a) => status::status(a, cli.cache_dir),
        Command::Dag(a) => dag::dag(a),
        Command::Path(a) => path::path(a, cli.cache_dir),
        Command::Metrics(a) => metrics::metrics(a, cli.cache_dir),
        Command::Push(a) => remote::push(a, cli.cache_dir),
        Command::Pull(a) => remote::pull(a, cli.cache_dir),
        Command::Cache(c) => cache::cache(c, cli.cache_dir),
        Command::Bench(a) => crate::bench::bench(a).map_err(CliError::Other),
        Command::Job(a) => job::job(a, cli.cache_dir),
    };
    match result {
        Ok(code) => code,
        Err(CliError::Invalid(d)) => {
            eprint!("error: {d}");
            EXIT_INVALID
        }
        Err(CliError::Usage(m)) => {
            eprintln!("error: {m}");
            EXIT_INVALID
        }
        Err(CliError::Other(e)) => {
            eprintln!("error: {e:#}");
            EXIT_STAGE_FAILED
        }
    }
}

/// Splits `[PIPELINE] [STAGE…]`: the first word is the pipeline file if it looks like one.
pub(crate) fn split_pipeline_and_stages(words: &[String]) -> (PathBuf, Vec<String>) {
    match words.split_first() {
        Some((first, rest))
            if first.ends_with(".yaml")
                || first.ends_with(".yml")
                || Path::new(first).is_file() =>
        {
            (PathBuf::from(first), rest.to_vec())
        }
        _ => (PathBuf::from("pipeline.yaml"), words.to_vec()),
    }
}

/// Loads and validates the pipeline and its graph.
pub(crate) fn load(file: &Path, overrides: &[Override]) -> Result<(Pipeline, Dag), CliError> {
    let kinds = cusa_stages::registry();
    let pipeline = spec::load(file, overrides, &kinds)?;
    let dag = Dag::build(&pipeline)?;
    Ok((pipeline, dag))
}

/// The cache directory: `--cache-dir`/`CUSA_PIPE_CACHE`, else `cache/` beside the pipeline.
pub(crate) fn cache_root(flag: Option<PathBuf>, pipeline_dir: &Path) -> PathBuf {
    flag.unwrap_or_else(|| pipeline_dir.join("cache"))
}

/// Loads the pipeline and opens its store, for a command that writes to it.
pub(crate) fn engine(
    file: &Path,
    overrides: &[Override],
    cache_dir: Option<PathBuf>,
) -> Result<Engine, CliError> {
    engine_opened(file, overrides, cache_dir, Store::open)
}

/// Loads the pipeline and opens its store read-only (`status`, `path`, `metrics`): a cache on
/// a read-only disk, or one the user may not write, is read as it is.
pub(crate) fn engine_read_only(
    file: &Path,
    overrides: &[Override],
    cache_dir: Option<PathBuf>,
) -> Result<Engine, CliError> {
    engine_opened(file, overrides, cache_dir, Store::open_read_only)
}

fn engine_opened(
    file: &Path,
    overrides: &[Override],
    cache_dir: Option<PathBuf>,
    open: fn(&Path) -> Result<Store, crate::store::StoreError>,
) -> Result<Engine, CliError> {
    let (pipeline, dag) = load(file, overrides)?;
    let store = open(&cache_root(cache_dir, &pipeline.dir))?;
    Ok(Engine::new(pipeline, dag, store))
}

/// `--remote NAME|URL` / `--no-remote`, shared by the commands that use the team cache.
#[derive(clap::Args, Debug, Clone, Default)]
pub(crate) struct RemoteArgs {
    /// The team cache to use: a name from ~/.config/cusa-pipe/config.yaml or a URL
    /// [default: the pipeline's `remote:`, else the config file's `default`]
    #[arg(long, value_name = "NAME|URL", env = "CUSA_PIPE_REMOTE")]
    pub remote: Option<String>,
    /// Use no remote, whatever the pipeline or the config file says
    #[arg(long, conflicts_with = "remote")]
    pub no_remote: bool,
}

/// Connects to the remote a command should use, if any; warnings go through `warn`.
/// `best_effort` (`run`): a remote that cannot be reached is one warning and no remote, as
/// every other remote failure of a run; `push`, `pull` and `cache gc --remote` fail instead.
/// Wrong settings are a usage error either way.
pub(crate) fn connect_remote(
    pipeline: &Pipeline,
    args: &RemoteArgs,
    warn: Box<dyn Fn(&str) + Send + Sync>,
    best_effort: bool,
) -> Result<Option<std::sync::Arc<crate::remote::Remote>>, CliError> {
    let settings = crate::remote::config::resolve(
        pipeline.remote.as_ref(),
        args.remote.as_deref(),
        args.no_remote,
    )
    .map_err(CliError::Usage)?;
    let Some(settings) = settings else {
        return Ok(None);
    };
    let warn: std::sync::Arc<dyn Fn(&str) + Send + Sync> = std::sync::Arc::from(warn);
    let remote_warn = warn.clone();
    match crate::remote::Remote::connect(settings, Box::new(move |m| remote_warn(m))) {
        Ok(remote) => Ok(Some(std::sync::Arc::new(remote))),
        Err(crate::remote::RemoteError::Unavailable(e)) if best_effort => {
            warn(&format!(
                "warning: {e}; going on without it (stages run locally)"
            ));
            Ok(None)
        }
        Err(e @ crate::remote::RemoteError::Unavailable(_)) => {
            Err(CliError::Other(anyhow::anyhow!("{e}")))
        }
        Err(e) => Err(CliError::Usage(e.to_string())),
    }
}

/// The reporter of a command that runs stages, and the team cache it uses (its warnings go
/// through the reporter); see [`connect_remote`] for `best_effort`.
pub(crate) fn reporter_and_remote(
    engine: &mut Engine,
    args: &RemoteArgs,
    best_effort: bool,
) -> Result<std::sync::Arc<crate::runner::report::Reporter>, CliError> {
    let reporter = std::sync::Arc::new(crate::runner::report::Reporter::new(name_width(
        &engine.pipeline,
    )));
    let warn = reporter.clone();
    engine.remote = connect_remote(
        &engine.pipeline,
        args,
        Box::new(move |w| warn.line(w)),
        best_effort,
    )?;
    Ok(reporter)
}

/// Every project file or folder the `selected` stages declare must exist before anything
/// runs: a missing one is a mistake in the pipeline file (exit 2), located at its key.
pub(crate) fn check_project_inputs(p: &Pipeline, selected: &[usize]) -> Result<(), CliError> {
    for &i in selected {
        let stage = &p.stages[i];
        for (name, input) in &stage.inputs {
            let spec::Input::Project { path, key } = input else {
                continue;
            };
            let abs = p.dir.join(path);
            if std::fs::metadata(&abs).is_ok() {
                continue;
            }
            let dangling = std::fs::symlink_metadata(&abs).is_ok();
            let mut d = p.source.diagnostic_at_value(
                key,
                if dangling {
                    format!("input `{name}`: {path} is a symbolic link whose target does not exist")
                } else {
                    format!("input `{name}`: {path} does not exist")
                },
            );
            d.stage = Some(stage.name.clone());
            d.help = Some(format!(
                "create it, or fix the path (relative to {})",
                p.file.display()
            ));
            return Err(d.into());
        }
    }
    Ok(())
}

/// The longest stage name, to align per-stage lines.
pub(crate) fn name_width(p: &Pipeline) -> usize {
    p.stages.iter().map(|s| s.name.len()).max().unwrap_or(0)
}

/// Stage names and patterns (`train@*`, `train@variant=cusa`, comma-separated lists) →
/// indices without repeats, in the order named, or a usage error with a suggestion.
pub(crate) fn stage_indices(p: &Pipeline, names: &[String]) -> Result<Vec<usize>, CliError> {
    let mut out = Vec::new();
    for name in names.iter().flat_map(|n| crate::spec::split_stage_list(n)) {
        for i in p.select(&name).map_err(CliError::Usage)? {
            if !out.contains(&i) {
                out.push(i);
            }
        }
    }
    Ok(out)
}

/// The one stage a name or pattern names, or a usage error listing what it matched.
pub(crate) fn stage_index(p: &Pipeline, name: &str) -> Result<usize, CliError> {
    let found = p.select(name).map_err(CliError::Usage)?;
    match found.as_slice() {
        [i] => Ok(*i),
        many => {
            let names: Vec<&str> = many.iter().map(|&i| p.stages[i].name.as_str()).collect();
            Err(CliError::Usage(format!(
                "`{name}` names {} stages; pick one: {}",
                many.len(),
                names.join(", ")
            )))
        }
    }
}

pub(crate) use crate::graph::Format as DagFormat;
