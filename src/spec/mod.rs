//! The pipeline file: YAML → validated, typed [`Pipeline`], or a located [`Diagnostic`].
//!
//! This is the only module that reads raw YAML. Everything downstream works on [`Pipeline`],
//! whose invariants are:
//! * every stage has a known kind whose `with:` config passed the kind's typed check;
//! * a stage with `matrix:` is expanded into its elements ([`matrix`]), each an ordinary stage
//!   named `stage@axis=label,…`, `${matrix.AXIS}` substituted;
//! * every stage reference (`${STAGE}`, `${STAGE/sub}`, `${STAGE@…}`), whether under `inputs:`
//!   or written in `with:`, names an existing stage (element) and is an input of the stage;
//!   every `${inputs.NAME}` names a declared input, every `${params.KEY}` an existing parameter;
//! * parameters are substituted (typed when a value is exactly `${params.KEY}`), while the
//!   symbolic `with:` is kept too, so a fingerprint can say "param `n` 1000 → 2000" rather than
//!   "config changed";
//! * stage inputs are named by position (`@0`, … in the order the config uses them), so the
//!   two ways of writing a reference are one cache key;
//! * `--set` overrides are applied before validation, so they are checked like the file.
//!
//! Cycles are found by [`crate::graph`], which names the stages on the cycle.

pub mod diagnostic;
pub mod interpolate;
pub mod location;
pub mod matrix;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cusa_stages::api::{ConfigError, PointsAt, StageKind, closest, parse_config};
use serde::Deserialize;
use serde_json::Value;

use crate::executor::ExecutorDecl;
use crate::remote::config::{RawRemote, RemoteDecl};
pub use diagnostic::Diagnostic;
use interpolate::{Piece, Ref, WalkError};
use location::LocationIndex;
pub use matrix::Element;
use matrix::{Matrix, Resolved, Universe};

/// The pipeline-file format version this build reads.
pub const FORMAT_VERSION: u64 = 1;

/// The stage kinds available to a load, by name.
pub type Kinds = BTreeMap<&'static str, Arc<dyn StageKind>>;

/// A validated pipeline.
pub struct Pipeline {
    /// The file as the user named it (for messages).
    pub file: PathBuf,
    /// Absolute folder of the file: project paths and commands are relative to it.
    pub dir: PathBuf,
    pub source: Arc<Source>,
    pub params: serde_json::Map<String, Value>,
    /// Stages in declaration order.
    pub stages: Vec<Stage>,
    /// The team cache declared by the file (`remote:`), if any.
    pub remote: Option<RemoteDecl>,
    /// The pipeline-wide `executor:` (local when absent).
    pub executor: ExecutorDecl,
}

impl Pipeline {
    /// The stages a command-line pattern names, in declaration order: a stage or element by
    /// name (`train@variant=cusa,seed=1`, labels in any order), every element of a matrix stage
    /// (`train`, `train@*`), or those with some labels (`train@variant=cusa`). The error says
    /// what exists.
    pub fn select(&self, pattern: &str) -> Result<Vec<usize>, String> {
        if let Some(i) = self.stages.iter().position(|s| s.name == pattern) {
            return Ok(vec![i]);
        }
        let (stage, selector) = match pattern.split_once('@') {
            Some((s, sel)) => (s, Some(sel)),
            None => (pattern, None),
        };
        let elements: Vec<(usize, &Element)> = self
            .stages
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((i, s.element.as_ref().filter(|e| e.stage == stage)?)))
            .collect();
        if elements.is_empty() {
            let mut written: Vec<&str> = Vec::new();
            for s in &self.stages {
                let n = s
                    .element
                    .as_ref()
                    .map_or(s.name.as_str(), |e| e.stage.as_str());
                if !written.contains(&n) {
                    written.push(n);
                }
            }
            return Err(format!(
                "no stage `{pattern}` in {}; {}",
                self.file.display(),
                match closest(stage, &written) {
                    Some(c) => format!("did you mean `{c}`?"),
                    None => format!("stages: {}", written.join(", ")),
                }
            ));
        }
        let picks: Vec<(&str, &str)> = match selector.map(str::trim) {
            None | Some("*") => Vec::new(),
            Some(sel) => sel
                .split(',')
                .map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.trim(), v.trim()))
                        .ok_or_else(|| {
                            format!("`{pattern}`: after `@` write `*` or `axis=label,…`")
                        })
                })
                .collect::<Result<_, _>>()?,
        };
        let axes = &elements[0].1.labels;
        for (k, v) in &picks {
            if !axes.iter().any(|(a, _)| a == k) {
                let names: Vec<&str> = axes.iter().map(|(a, _)| a.as_str()).collect();
                return Err(format!(
                    "`{pattern}`: `{stage}` has no axis `{k}` (its axes: {})",
                    names.join(", ")
                ));
            }
            if !elements.iter().any(|(_, e)| e.label(k) == Some(v)) {
                let mut labels: Vec<&str> = Vec::new();
                for (_, e) in &elements {
                    let l = e.label(k).unwrap_or_default();
                    if !labels.contains(&l) {
                        labels.push(l);
                    }
                }
                return Err(format!(
                    "`{pattern}`: `{stage}` has no element with {k}={v} ({k}: {})",
                    labels.join(", ")
                ));
            }
        }
        Ok(elements
            .into_iter()
            .filter(|(_, e)| picks.iter().all(|(k, v)| e.label(k) == Some(v)))
            .map(|(i, _)| i)
            .collect())
    }
}

/// Splits a command line's comma-separated stage list, keeping an element's labels together
/// (`a,train@variant=cusa,seed=1` is two names).
pub fn split_stage_list(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for part in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match out.last_mut() {
            Some(last) if last.contains('@') && part.contains('=') && !part.contains('@') => {
                last.push(',');
                last.push_str(part);
            }
            _ => out.push(part.to_string()),
        }
    }
    out
}

/// The file's text and location index, kept for errors found after loading.
pub struct Source {
    pub file: PathBuf,
    pub text: String,
    pub index: LocationIndex,
    /// Key paths set by `--set` (full, e.g. `stages.total.with.run`) and the flag as written:
    /// a problem at or under one of them is located at the flag, not in the file.
    pub overrides: Vec<(String, String)>,
}

impl Source {
    /// A diagnostic located at `path` (a key path of the document).
    pub fn diagnostic(&self, path: &str, message: impl Into<String>) -> Diagnostic {
        if let Some((_, flag)) = self.overrides.iter().rev().find(|(key, _)| {
            path == key
                || path
                    .strip_prefix(key.as_str())
                    .is_some_and(|rest| rest.starts_with(['.', '[']))
        }) {
            let mut d = Diagnostic::new(PathBuf::from(flag), message);
            d.key = Some(path.to_string());
            if let Some(rest) = path.strip_prefix("stages.") {
                d.stage = rest.split(['.', '[']).next().map(str::to_string);
            }
            return d;
        }
        let mut d = Diagnostic::new(self.file.clone(), message);
        d.key = (!path.is_empty()).then(|| path.to_string());
        if let Some(loc) = self.index.find(path) {
            d.position = Some(loc.key);
            d.source_line = self.text.lines().nth(loc.key.line - 1).map(str::to_string);
        }
        if let Some(rest) = path.strip_prefix("stages.") {
            d.stage = rest.split(['.', '[']).next().map(str::to_string);
        }
        d
    }

    /// Like [`Source::diagnostic`] but pointing at the value rather than the key.
    pub fn diagnostic_at_value(&self, path: &str, message: impl Into<String>) -> Diagnostic {
        let mut d = self.diagnostic(path, message);
        if d.position.is_none() {
            // Not in the file (a `--set`), or not located at all.
            return d;
        }
        if let Some(loc) = self.index.find(path) {
            d.position = Some(loc.value);
            d.source_line = self
                .text
                .lines()
                .nth(loc.value.line - 1)
                .map(str::to_string);
        }
        d
    }
}

/// One validated stage.
pub struct Stage {
    /// The stage's name; an element of a matrix stage is `train@variant=cusa,seed=1`.
    pub name: String,
    /// For an element of a matrix stage: the stage as written and its labels.
    pub element: Option<Element>,
    pub kind: Arc<dyn StageKind>,
    /// `with:` as written (after `--set`), parameters still symbolic: explains cache misses.
    pub written: Value,
    /// The kind's normalised config: parameters substituted, defaults and presets written in,
    /// `${inputs.X}` / `${out}` still symbolic. Hashed into the fingerprint; the runner binds
    /// the references to paths and hands it to the kind.
    pub config: Value,
    /// Parameters this stage reads, with their values.
    pub params_used: BTreeMap<String, Value>,
    /// Declared inputs, the stage references of `with:` and the kind's implicit inputs, by
    /// name (stage inputs by position, `@0`, …: see `canonical_inputs`).
    pub inputs: BTreeMap<String, Input>,
    /// Where each input is written in the file (its key path), to locate errors.
    pub written_at: BTreeMap<String, String>,
    /// GPUs the stage needs (`resources: {gpu: N}`).
    pub gpus: u32,
    /// CPUs a cluster job asks for (`resources: {cpus: N}`).
    pub cpus: Option<u32>,
    /// Memory a cluster job asks for (`resources: {memory: 32G}`, Slurm's units).
    pub memory: Option<String>,
    /// Where it runs: its own `executor:` over the pipeline's (not part of its key).
    pub executor: ExecutorDecl,
    /// Whether the stage wrote `executor:` itself (`run --executor slurm` keeps a stage that
    /// says `executor: local` local).
    pub executor_own: bool,
}

/// Where an input comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A file or folder of the project, relative to the pipeline file (or absolute).
    Project { path: String, key: String },
    /// Another stage's output tree, or a path inside it.
    Stage { stage: String, sub: Option<String> },
}

impl Input {
    /// How messages name an input: `input `script`` for a named one, the reference itself
    /// (`${scenes/report.json}`) for a stage input (named by position, `@0`).
    pub fn label(name: &str, input: &Input) -> String {
        match input {
            Input::Stage { stage, sub } if name.starts_with('@') => match sub {
                Some(s) => format!("`${{{stage}/{s}}}`"),
                None => format!("`${{{stage}}}`"),
            },
            _ => format!("input `{name}`"),
        }
    }
}

impl Stage {
    /// Names of upstream stages, sorted, without repeats.
    pub fn upstream(&self) -> BTreeSet<&str> {
        self.inputs
            .values()
            .filter_map(|i| match i {
                Input::Stage { stage, .. } => Some(stage.as_str()),
                Input::Project { .. } => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn yaml_messages_lose_their_inline_positions() {
        assert_eq!(
            super::strip_location(
                "did not find expected key at line 5 column 4, while parsing a block mapping at line 3 column 5"
            ),
            "did not find expected key, while parsing a block mapping"
        );
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    version: u64,
    #[serde(default)]
    params: serde_json::Map<String, Value>,
    stages: serde_json::Map<String, Value>,
    #[serde(default)]
    remote: Option<Value>,
    /// Where stages run by default ([`crate::executor`]).
    #[serde(default)]
    executor: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    kind: String,
    /// Axes to expand the stage over ([`matrix`]).
    #[serde(default)]
    matrix: Option<Value>,
    #[serde(default)]
    inputs: serde_json::Map<String, Value>,
    #[serde(default)]
    with: Value,
    #[serde(default)]
    resources: RawResources,
    /// Where this stage runs, over the pipeline's `executor:`.
    #[serde(default)]
    executor: Option<Value>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct RawResources {
    #[serde(default)]
    gpu: u32,
    #[serde(default)]
    cpus: Option<u32>,
    #[serde(default)]
    memory: Option<String>,
}

/// A `--set KEY=VALUE` override.
#[derive(Debug, Clone)]
pub struct Override {
    pub key: String,
    pub value: String,
}

impl std::str::FromStr for Override {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (key, value) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))?;
        if key.trim().is_empty() {
            return Err(format!("`{s}` has an empty key"));
        }
        Ok(Override {
            key: key.trim().to_string(),
            value: value.to_string(),
        })
    }
}

/// Reads, overrides and validates a pipeline file.
pub fn load(file: &Path, overrides: &[Override], kinds: &Kinds) -> Result<Pipeline, Diagnostic> {
    let bytes = std::fs::read(file).map_err(|e| {
        let mut d = Diagnostic::new(
            file.to_path_buf(),
            format!("cannot read the pipeline file: {e}"),
        );
        d.help = Some(match e.kind() {
            std::io::ErrorKind::NotFound => {
                "run from the folder holding pipeline.yaml, or pass its path".into()
            }
            std::io::ErrorKind::IsADirectory => "pass the pipeline file, not its folder".into(),
            _ => "check the file's permissions".into(),
        });
        d
    })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = good.iter().filter(|&&b| b == b'\n').count() + 1;
        let column = good.len() - good.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) + 1;
        let mut d = Diagnostic::new(
            file.to_path_buf(),
            format!(
                "the pipeline file is not UTF-8 text (byte {} is not valid UTF-8)",
                good.len()
            ),
        );
        d.position = Some(location::Position { line, column });
        d.help = Some("save it as UTF-8 (most editors offer the choice when saving)".into());
        d
    })?;
    let dir = std::path::absolute(file)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    let mut source = Source {
        file: file.to_path_buf(),
        index: LocationIndex::build(&text),
        text,
        overrides: Vec::new(),
    };
    if let Some((path, first, _second)) = source.index.duplicates.first() {
        let mut d = source.diagnostic(
            path,
            format!(
                "`{}` is defined twice",
                path.rsplit('.').next().unwrap_or(path)
            ),
        );
        // Point at the second definition, mention the first.
        let (_, _, second) = source.index.duplicates[0];
        d.position = Some(second);
        d.source_line = source.text.lines().nth(second.line - 1).map(str::to_string);
        d.help = Some(format!(
            "the first definition is at line {}; rename or remove one",
            first.line
        ));
        return Err(d);
    }

    let mut yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&source.text).map_err(|e| {
        let mut d = Diagnostic::new(
            file.to_path_buf(),
            format!("invalid YAML: {}", strip_location(&e.to_string())),
        );
        if let Some(loc) = e.location() {
            d.position = Some(location::Position {
                line: loc.line(),
                column: loc.column(),
            });
            d.source_line = source
                .text
                .lines()
                .nth(loc.line().saturating_sub(1))
                .map(str::to_string);
        }
        d
    })?;
    if yaml.is_null() {
        let mut d = Diagnostic::new(file.to_path_buf(), "the pipeline file is empty");
        d.help = Some(
            "a pipeline has `version: 1` and a `stages:` mapping; see examples/numbers/pipeline.yaml"
                .into(),
        );
        return Err(d);
    }
    if !yaml.is_mapping() {
        let mut d = source.diagnostic("", "the pipeline file is not a mapping of keys");
        d.position = Some(location::Position { line: 1, column: 1 });
        d.help = Some("a pipeline has `version: 1` and a `stages:` mapping".into());
        return Err(d);
    }
    for o in overrides {
        let key = apply_override(&mut yaml, o, &source)?;
        source
            .overrides
            .push((key, format!("--set {}={}", o.key, o.value)));
    }
    let source = Arc::new(source);
    let json = yaml_to_json(&yaml, "").map_err(|(path, msg)| source.diagnostic(&path, msg))?;
    let raw: RawPipeline = parse_config(&json).map_err(|e| config_diagnostic(&source, "", e))?;
    if raw.version != FORMAT_VERSION {
        let mut d = source.diagnostic_at_value(
            "version",
            format!("unsupported pipeline format version {}", raw.version),
        );
        d.help = Some(format!("this cusa-pipe reads `version: {FORMAT_VERSION}`"));
        return Err(d);
    }
    if raw.stages.is_empty() {
        let mut d = source.diagnostic("stages", "the pipeline has no stages");
        d.help = Some("declare at least one stage under `stages:`".into());
        return Err(d);
    }

    let remote = match &raw.remote {
        None | Some(Value::Null) => None,
        Some(v) => Some(remote_decl(v, &source)?),
    };
    let executor = match &raw.executor {
        None | Some(Value::Null) => ExecutorDecl::Local,
        Some(v) => {
            crate::executor::parse_decl(v).map_err(|e| config_diagnostic(&source, "executor", e))?
        }
    };
    let mut raws: Vec<(&str, RawStage)> = Vec::new();
    for (name, raw_stage) in &raw.stages {
        let base = format!("stages.{name}");
        if !interpolate::is_stage_name(name) {
            let mut d = source.diagnostic(&base, format!("`{name}` is not a valid stage name"));
            // The name itself is the problem: it cannot be split out of the key path.
            d.stage = None;
            d.help = Some("stage names use lowercase letters, digits and `_`".into());
            return Err(d);
        }
        let raw_stage: RawStage =
            parse_config(raw_stage).map_err(|e| config_diagnostic(&source, &base, e))?;
        raws.push((name, raw_stage));
    }
    let mut matrices = BTreeMap::new();
    for (name, raw_stage) in &raws {
        if let Some(m) = &raw_stage.matrix {
            let m = Matrix::parse(m, &|k| interpolate::lookup_param(&raw.params, k).cloned())
                .map_err(|e| {
                    let mut d =
                        source.diagnostic_at_value(&format!("stages.{name}.{}", e.path), e.message);
                    d.help = e.help;
                    d
                })?;
            matrices.insert(name.to_string(), m);
        }
    }
    let universe = Universe {
        written: raws.iter().map(|(n, _)| n.to_string()).collect(),
        matrices,
    };
    let mut stages = Vec::new();
    for (name, raw_stage) in raws {
        let Some(m) = universe.matrices.get(name) else {
            stages.push(build_stage(
                name,
                None,
                raw_stage,
                &raw.params,
                &universe,
                kinds,
                &source,
            )?);
            continue;
        };
        for element in m.elements(name) {
            let values = |axis: &str, label: bool| m.bound(&element, axis, label);
            let source = &source;
            let at = |part: String| {
                move |e: interpolate::WalkError| {
                    let path = match e.path.is_empty() {
                        true => format!("stages.{name}.{part}"),
                        false => format!("stages.{name}.{part}.{}", e.path),
                    };
                    let mut d = source.diagnostic_at_value(&path, e.message);
                    d.help = e.help;
                    d
                }
            };
            // Twice: a value may itself read another axis (`csa: {alpha: "${matrix.alpha}"}`).
            let twice = |v: &Value| {
                matrix::substitute(v, &values).and_then(|v| matrix::substitute(&v, &values))
            };
            let mut inputs = serde_json::Map::new();
            for (k, v) in &raw_stage.inputs {
                let v = twice(v).map_err(at(format!("inputs.{k}")))?;
                inputs.insert(k.clone(), v);
            }
            let with = twice(&raw_stage.with).map_err(at("with".into()))?;
            let element_raw = RawStage {
                kind: raw_stage.kind.clone(),
                inputs,
                with,
                resources: raw_stage.resources.clone(),
                executor: raw_stage.executor.clone(),
                matrix: None,
            };
            let element_name = element.name();
            stages.push(
                build_stage(
                    name,
                    Some(element),
                    element_raw,
                    &raw.params,
                    &universe,
                    kinds,
                    source,
                )
                .map_err(|mut d| {
                    d.stage = Some(element_name);
                    d
                })?,
            );
        }
    }
    for stage in &mut stages {
        let own = stage
            .executor_own
            .then(|| std::mem::take(&mut stage.executor));
        stage.executor = crate::executor::merge(&executor, own);
    }
    Ok(Pipeline {
        file: file.to_path_buf(),
        dir,
        source,
        params: raw.params,
        stages,
        remote,
        executor,
    })
}

/// `remote:` is a URL, a name from the user's config file, or a mapping (`url`, `read`,
/// `write`, `options`, `grace`).
fn remote_decl(v: &Value, source: &Source) -> Result<RemoteDecl, Diagnostic> {
    let raw = match v {
        Value::String(s) if !s.contains("://") => {
            if s.is_empty() {
                return Err(source.diagnostic_at_value("remote", "the remote's name is empty"));
            }
            return Ok(RemoteDecl::Named(s.clone()));
        }
        Value::String(s) => RawRemote {
            url: s.clone(),
            read: true,
            write: true,
            options: Default::default(),
            grace: None,
        },
        other => {
            parse_config::<RawRemote>(other).map_err(|e| config_diagnostic(source, "remote", e))?
        }
    };
    let at = if v.is_string() {
        "remote"
    } else {
        "remote.url"
    };
    if let Err(e) =
        crate::remote::config::settings("pipeline", &raw, crate::remote::RemoteSource::Pipeline)
    {
        use crate::remote::config::SettingKey;
        let key = match &e.key {
            SettingKey::Grace => "remote.grace".to_string(),
            SettingKey::Option(name) => format!("remote.options.{name}"),
            SettingKey::Url => at.to_string(),
        };
        let mut d = source.diagnostic_at_value(&key, e.message);
        d.help = Some(
            "e.g. `remote: s3://bucket/prefix`, or a name from ~/.config/cusa-pipe/config.yaml"
                .into(),
        );
        return Err(d);
    }
    Ok(RemoteDecl::Inline(raw))
}

fn build_stage(
    written_name: &str,
    element: Option<Element>,
    raw: RawStage,
    params: &serde_json::Map<String, Value>,
    universe: &Universe,
    kinds: &Kinds,
    source: &Source,
) -> Result<Stage, Diagnostic> {
    let base = format!("stages.{written_name}");
    let own_executor = match &raw.executor {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            crate::executor::parse_decl(v)
                .map_err(|e| config_diagnostic(source, &format!("{base}.executor"), e))?,
        ),
    };
    if let Some(m) = &raw.resources.memory
        && !valid_memory(m)
    {
        let mut d = source.diagnostic_at_value(
            &format!("{base}.resources.memory"),
            format!("`{m}` is not an amount of memory"),
        );
        d.help = Some("write a number with K, M, G or T (Slurm's units): `32G`".into());
        return Err(d);
    }
    if raw.resources.cpus == Some(0) {
        let mut d = source.diagnostic_at_value(
            &format!("{base}.resources.cpus"),
            "a stage needs at least one CPU",
        );
        d.help = Some("remove `cpus`, or ask for 1 or more".into());
        return Err(d);
    }
    let kind = kinds.get(raw.kind.as_str()).cloned().ok_or_else(|| {
        let known: Vec<&str> = kinds.keys().copied().collect();
        let mut d = source.diagnostic_at_value(
            &format!("{base}.kind"),
            format!("unknown stage kind `{}`", raw.kind),
        );
        d.help = Some(match closest(&raw.kind, &known) {
            Some(k) => format!("did you mean `{k}`? known kinds: {}", known.join(", ")),
            None => format!("known kinds: {}", known.join(", ")),
        });
        d
    })?;
    let mut params_used = BTreeMap::new();
    let no_axis = |axis: &str| {
        let message = match &element {
            Some(_) => format!("`${{matrix.{axis}}}`: the stage's matrix has no axis `{axis}`"),
            None => format!("`${{matrix.{axis}}}` in a stage without `matrix:`"),
        };
        let help = match &element {
            Some(e) => {
                let axes: Vec<&str> = e.labels.iter().map(|(a, _)| a.as_str()).collect();
                format!("its axes: {}", axes.join(", "))
            }
            None => "give the stage a `matrix:`, or use `${matrix.AXIS}` inside a list item that reads `${STAGE@*}`".into(),
        };
        (message, help)
    };

    // Inputs: a stage reference, or a project path (parameters allowed).
    let mut inputs = BTreeMap::new();
    let mut written_at: BTreeMap<String, String> = BTreeMap::new();
    for (input, value) in &raw.inputs {
        let path = format!("{base}.inputs.{input}");
        if input.starts_with('@') {
            return Err(source.diagnostic(
                &path,
                format!("input names cannot start with `@` (`{input}`)"),
            ));
        }
        let Value::String(text) = value else {
            let mut d =
                source.diagnostic_at_value(&path, format!("input `{input}` must be a string"));
            d.help = Some(
                "write a project path (`data/train.csv`) or a stage reference (`${numbers}`)"
                    .into(),
            );
            return Err(d);
        };
        let pieces = interpolate::parse(text).map_err(|m| source.diagnostic_at_value(&path, m))?;
        let parsed = match pieces.as_slice() {
            [
                Piece::Ref(Ref::Stage {
                    name: up,
                    select,
                    sub,
                }),
            ] => match universe.resolve(up, select.as_ref(), written_name, element.as_ref()) {
                Ok(Resolved::One(stage)) => Input::Stage {
                    stage,
                    sub: sub.clone(),
                },
                Ok(Resolved::Many(_)) => {
                    let mut d = source.diagnostic_at_value(
                        &path,
                        format!("input `{input}` is a list of stages (`{text}`)"),
                    );
                    d.help = Some(format!(
                        "an input is one stage; write the list in `with:` (e.g. `runs: \"{text}\"`)"
                    ));
                    return Err(d);
                }
                Err(e) => {
                    let mut d = source.diagnostic_at_value(&path, e.message);
                    d.help = e.help;
                    return Err(d);
                }
            },
            _ => {
                let mut resolved = String::new();
                for piece in &pieces {
                    match piece {
                        Piece::Text(t) => resolved.push_str(t),
                        Piece::Ref(Ref::Param(key) | Ref::RawParam(key)) => {
                            let v = param_value(params, key, &path, source)?;
                            params_used.insert(key.clone(), v.clone());
                            resolved.push_str(&interpolate::scalar_text(v).ok_or_else(|| {
                                source.diagnostic_at_value(
                                    &path,
                                    format!("parameter `{key}` is not a scalar"),
                                )
                            })?);
                        }
                        Piece::Ref(Ref::Stage { .. }) => {
                            let mut d = source.diagnostic_at_value(
                                &path,
                                "a stage reference must be the whole input",
                            );
                            d.help = Some("write `${stage}` or `${stage/sub/path}` alone".into());
                            return Err(d);
                        }
                        Piece::Ref(Ref::Matrix { axis, .. }) => {
                            let (message, help) = no_axis(axis);
                            let mut d = source.diagnostic_at_value(&path, message);
                            d.help = Some(help);
                            return Err(d);
                        }
                        Piece::Ref(Ref::Input(_) | Ref::Out) => {
                            return Err(source.diagnostic_at_value(
                                &path,
                                "`${inputs.…}` and `${out}` are for `with:`, not for inputs",
                            ));
                        }
                    }
                }
                if resolved.trim().is_empty() {
                    return Err(
                        source.diagnostic_at_value(&path, format!("input `{input}` is empty"))
                    );
                }
                Input::Project {
                    path: resolved,
                    key: path.clone(),
                }
            }
        };
        inputs.insert(input.clone(), parsed);
        written_at.insert(input.clone(), path);
    }

    // `with:`: lists of matrix elements spelt out, parameters substituted, stage references
    // turned into inputs.
    let written = if raw.with.is_null() {
        Value::Object(Default::default())
    } else {
        raw.with
    };
    let with_path = format!("{base}.with");
    let located = |e: WalkError| {
        let path = if e.path.is_empty() {
            with_path.clone()
        } else {
            format!("{with_path}.{}", e.path)
        };
        let mut d = source.diagnostic_at_value(&path, e.message);
        d.help = e.help;
        d
    };
    let listed =
        expand_lists(&written, "", universe, written_name, element.as_ref()).map_err(&located)?;
    let declared: Vec<String> = inputs.keys().cloned().collect();
    let mut inferred: BTreeMap<String, (Input, String)> = BTreeMap::new();
    let shell_keys = kind.shell_keys();
    let mut substitute = |key_path: &str, s: &str| -> Result<Value, WalkError> {
        let err = |message: String, help: Option<String>| WalkError {
            path: key_path.to_string(),
            message,
            help,
        };
        let pieces = interpolate::parse(s).map_err(|m| err(m, None))?;
        // In a command line, values are quoted for where they land.
        let mut shell = shell_keys
            .contains(&key_path)
            .then(interpolate::ShellQuoting::default);
        if shell.is_none()
            && let [Piece::Ref(Ref::Param(key) | Ref::RawParam(key))] = pieces.as_slice()
        {
            let v = interpolate::lookup_param(params, key)
                .ok_or_else(|| unknown_param(key, params, key_path))?;
            params_used.insert(key.clone(), v.clone());
            return Ok(v.clone());
        }
        let mut param_text = |key: &str| -> Result<String, WalkError> {
            let v = interpolate::lookup_param(params, key)
                .ok_or_else(|| unknown_param(key, params, key_path))?;
            params_used.insert(key.to_string(), v.clone());
            interpolate::scalar_text(v).ok_or_else(|| {
                err(
                    format!("parameter `{key}` is a list or map; it can only be a whole value"),
                    None,
                )
            })
        };
        let mut out = String::new();
        for piece in pieces {
            match piece {
                Piece::Text(t) => {
                    if let Some(q) = &mut shell {
                        q.feed(&t);
                    }
                    out.push_str(&interpolate::escape(&t))
                }
                Piece::Ref(Ref::Param(key)) => {
                    let text = param_text(&key)?;
                    match &shell {
                        Some(q) => out.push_str(&interpolate::escape(&q.quote(&text))),
                        None => out.push_str(&interpolate::escape(&text)),
                    }
                }
                Piece::Ref(Ref::RawParam(key)) => {
                    let text = param_text(&key)?;
                    // A raw value is shell syntax: it moves the quoting state.
                    if let Some(q) = &mut shell {
                        q.feed(&text);
                    }
                    out.push_str(&interpolate::escape(&text));
                }
                Piece::Ref(Ref::Input(n)) => {
                    if !declared.contains(&n) {
                        let names: Vec<&str> = declared.iter().map(String::as_str).collect();
                        return Err(err(
                            format!("`${{inputs.{n}}}` names no declared input"),
                            Some(match closest(&n, &names) {
                                Some(c) => format!("did you mean `${{inputs.{c}}}`?"),
                                None if names.is_empty() => format!(
                                    "write the stage reference itself (`${{STAGE}}`), or declare a file under `inputs:`, e.g. `{n}: path/to/{n}`"
                                ),
                                None => format!("declared inputs: {}", names.join(", ")),
                            }),
                        ));
                    }
                    out.push_str(&format!("${{inputs.{n}}}"));
                }
                Piece::Ref(Ref::Out) => out.push_str("${out}"),
                Piece::Ref(Ref::Matrix { axis, .. }) => {
                    let (message, help) = no_axis(&axis);
                    return Err(err(message, Some(help)));
                }
                Piece::Ref(Ref::Stage {
                    name: up,
                    select,
                    sub,
                }) => {
                    let r = Ref::Stage {
                        name: up.clone(),
                        select: select.clone(),
                        sub: sub.clone(),
                    };
                    let sub = &sub;
                    let up = &up;
                    let select = &select;
                    let mut input = |stage: String| {
                        let name = match sub {
                            Some(sub) => format!("@{stage}/{sub}"),
                            None => format!("@{stage}"),
                        };
                        inferred.entry(name.clone()).or_insert((
                            Input::Stage {
                                stage,
                                sub: sub.clone(),
                            },
                            format!("{with_path}.{key_path}"),
                        ));
                        format!("${{inputs.{name}}}")
                    };
                    match universe
                        .resolve(up, select.as_ref(), written_name, element.as_ref())
                        .map_err(|e| err(e.message, e.help))?
                    {
                        Resolved::One(stage) => out.push_str(&input(stage)),
                        // In a command line: one word per element (`cat ${eval@*/e.txt}`).
                        Resolved::Many(list) if shell.is_some() => {
                            let words: Vec<String> = list.iter().map(|e| input(e.name())).collect();
                            if let Some(q) = &mut shell {
                                q.feed(" ");
                            }
                            out.push_str(&words.join(" "));
                        }
                        Resolved::Many(_) => {
                            return Err(err(
                                format!("`{r}` is a list of stages; it can only be a whole value"),
                                Some("write it alone as the value (`models: \"${train@*}\"`), or as a list item".into()),
                            ));
                        }
                    }
                }
            }
        }
        Ok(Value::String(out))
    };
    let with = interpolate::map_strings(&listed, "", &mut substitute).map_err(&located)?;
    for (name, (input, at)) in inferred {
        inputs.insert(name.clone(), input);
        written_at.insert(name, at);
    }
    let declared: Vec<String> = inputs.keys().cloned().collect();

    let checked = kind
        .check(&with, &declared)
        .map_err(|e| config_diagnostic(source, &with_path, e))?;
    for implicit in checked.implicit_inputs {
        if inputs.contains_key(&implicit.name) {
            return Err(source.diagnostic(
                &format!("{base}.inputs.{}", implicit.name),
                format!(
                    "input `{}` clashes with the one `with.{}` declares",
                    implicit.name, implicit.key
                ),
            ));
        }
        let key = format!("{with_path}.{}", implicit.key);
        written_at.insert(implicit.name.clone(), key.clone());
        inputs.insert(
            implicit.name,
            Input::Project {
                path: implicit.path,
                key,
            },
        );
    }
    let (config, inputs, written_at) = canonical_inputs(&checked.config, inputs, written_at);

    Ok(Stage {
        name: element
            .as_ref()
            .map(Element::name)
            .unwrap_or_else(|| written_name.to_string()),
        element,
        kind,
        written,
        config,
        params_used,
        inputs,
        written_at,
        gpus: raw.resources.gpu,
        cpus: raw.resources.cpus,
        memory: raw.resources.memory.clone(),
        executor_own: own_executor.is_some(),
        // Merged with the pipeline's `executor:` once every stage is built (see `load`).
        executor: own_executor.unwrap_or_default(),
    })
}

/// Slurm's memory amounts: digits with an optional K, M, G or T.
fn valid_memory(m: &str) -> bool {
    let digits = m.trim_end_matches(['K', 'M', 'G', 'T', 'k', 'm', 'g', 't']);
    !digits.is_empty() && m.len() - digits.len() <= 1 && digits.chars().all(|c| c.is_ascii_digit())
}

/// Spells out lists of matrix elements in `with:`: a value that is exactly a list reference
/// (`"${train@*}"`) becomes the list of its elements' references (spliced into a list it is an
/// item of); a list item (a mapping or list) that reads list references is repeated once per
/// element, the references made one element each and `${matrix.AXIS}` (`:name`) the element's
/// value (label). Every list reference in one item must list the same elements' labels.
fn expand_lists(
    value: &Value,
    path: &str,
    universe: &Universe,
    stage: &str,
    from: Option<&Element>,
) -> Result<Value, WalkError> {
    let err = |path: &str, message: String, help: Option<String>| WalkError {
        path: path.to_string(),
        message,
        help,
    };
    let child = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    // A whole-string list reference: its elements, each as a reference.
    let whole = |s: &str| -> Result<Option<Vec<Value>>, WalkError> {
        let Ok(pieces) = interpolate::parse(s) else {
            return Ok(None);
        };
        let [Piece::Ref(Ref::Stage { name, select, sub })] = pieces.as_slice() else {
            return Ok(None);
        };
        match universe.resolve(name, select.as_ref(), stage, from) {
            Ok(Resolved::Many(elements)) => Ok(Some(
                elements
                    .iter()
                    .map(|e| Value::String(element_ref(e, sub.as_deref())))
                    .collect(),
            )),
            Ok(Resolved::One(_)) => Ok(None),
            Err(e) => Err(err(path, e.message, e.help)),
        }
    };
    Ok(match value {
        Value::String(s) => match whole(s)? {
            Some(items) => Value::Array(items),
            None => value.clone(),
        },
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map {
                out.insert(
                    k.clone(),
                    expand_lists(v, &child(k), universe, stage, from)?,
                );
            }
            Value::Object(out)
        }
        Value::Array(items) => {
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let at = format!("{path}[{i}]");
                if let Value::String(s) = item {
                    match whole(s).map_err(|e| WalkError {
                        path: at.clone(),
                        ..e
                    })? {
                        Some(refs) => out.extend(refs),
                        None => out.push(item.clone()),
                    }
                    continue;
                }
                // The item's list references, each with its elements.
                let mut lists: Vec<(String, Vec<Element>)> = Vec::new();
                let mut find = |_: &str, s: &str| -> Result<Value, WalkError> {
                    if let Ok(pieces) = interpolate::parse(s) {
                        for p in pieces {
                            if let Piece::Ref(r @ Ref::Stage { .. }) = &p
                                && let Ref::Stage { name, select, .. } = r
                                && let Ok(Resolved::Many(e)) =
                                    universe.resolve(name, select.as_ref(), stage, from)
                            {
                                lists.push((r.to_string(), e));
                            }
                        }
                    }
                    Ok(Value::Null)
                };
                interpolate::map_strings(item, "", &mut find)?;
                // The list with the most axes drives the repetition; another list pairs with
                // it when it lists the same elements, or a matrix over some of its axes (each
                // repetition then reads the element that agrees on those axes).
                let Some((first, elements)) = lists
                    .iter()
                    .max_by_key(|(_, e)| e.first().map_or(0, |x| x.labels.len()))
                    .cloned()
                else {
                    out.push(expand_lists(item, &at, universe, stage, from)?);
                    continue;
                };
                let labels = |e: &[Element]| -> Vec<Vec<(String, String)>> {
                    e.iter().map(|e| e.labels.clone()).collect()
                };
                let pairs = |other: &[Element]| {
                    labels(other) == labels(&elements)
                        || elements
                            .iter()
                            .all(|e| other.iter().filter(|x| agrees(x, e)).count() == 1)
                };
                if let Some((other, _)) = lists.iter().find(|(_, e)| !pairs(e)) {
                    return Err(err(
                        &at,
                        format!(
                            "mismatched axes: `{first}` and `{other}` list different elements, so one item cannot pair them"
                        ),
                        Some("give both stages the same matrix, or select the same labels".into()),
                    ));
                }
                let matrix = &universe.matrices[&elements[0].stage];
                for e in &elements {
                    let values = |axis: &str, label: bool| matrix.bound(e, axis, label);
                    let one = matrix::substitute(item, &values).map_err(|e| WalkError {
                        path: format!("{at}.{}", e.path),
                        ..e
                    })?;
                    let mut pin = |_: &str, s: &str| -> Result<Value, WalkError> {
                        let Ok(pieces) = interpolate::parse(s) else {
                            return Ok(Value::String(s.to_string()));
                        };
                        let mut changed = false;
                        let pieces: Vec<Piece> = pieces
                            .into_iter()
                            .map(|p| match &p {
                                Piece::Ref(Ref::Stage { name, select, sub }) => {
                                    match universe.resolve(name, select.as_ref(), stage, from) {
                                        Ok(Resolved::Many(list)) => {
                                            match list.iter().find(|x| agrees(x, e)) {
                                                Some(x) => {
                                                    changed = true;
                                                    Piece::Ref(Ref::Stage {
                                                        name: x.stage.clone(),
                                                        select: Some(interpolate::Select::Pick(
                                                            x.labels.clone(),
                                                        )),
                                                        sub: sub.clone(),
                                                    })
                                                }
                                                None => p,
                                            }
                                        }
                                        _ => p,
                                    }
                                }
                                _ => p,
                            })
                            .collect();
                        Ok(Value::String(if changed {
                            interpolate::unparse(&pieces)
                        } else {
                            s.to_string()
                        }))
                    };
                    out.push(interpolate::map_strings(&one, "", &mut pin)?);
                }
            }
            Value::Array(out)
        }
        other => other.clone(),
    })
}

/// Whether element `x` has, on each of its axes, the label `e` has there (`x`'s axes being
/// some of `e`'s): `softlabels@teacher=max` agrees with `train@teacher=max,seed=1`.
fn agrees(x: &Element, e: &Element) -> bool {
    x.labels
        .iter()
        .all(|(a, l)| e.labels.iter().any(|(b, m)| a == b && l == m))
}

/// `${train@variant=cusa,seed=1/sub}` for one element.
fn element_ref(e: &Element, sub: Option<&str>) -> String {
    Ref::Stage {
        name: e.stage.clone(),
        select: Some(interpolate::Select::Pick(e.labels.clone())),
        sub: sub.map(str::to_string),
    }
    .to_string()
}

/// Names the stage inputs by position, so that a key depends on what is read and where it is
/// used, never on how an input or its upstream stage is named: the distinct upstream outputs
/// (stage, sub-path) get `@0`, `@1`, … in the order `config` first uses them (keys sorted),
/// then any it does not use; `${inputs.NAME}` in `config` is renamed to match. An explicit
/// `inputs: {dataset: ${scenes}}` + `${inputs.dataset}` and `${scenes}` written in `with:`
/// are the same key. Project inputs keep their names.
fn canonical_inputs(
    config: &Value,
    mut inputs: BTreeMap<String, Input>,
    mut written_at: BTreeMap<String, String>,
) -> (Value, BTreeMap<String, Input>, BTreeMap<String, String>) {
    fn walk(v: &Value, f: &mut dyn FnMut(&str)) {
        match v {
            Value::String(s) => f(s),
            Value::Array(items) => items.iter().for_each(|x| walk(x, f)),
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                for k in keys {
                    walk(&map[k], f);
                }
            }
            _ => {}
        }
    }
    fn target(inputs: &BTreeMap<String, Input>, name: &str) -> Option<(String, Option<String>)> {
        match inputs.get(name) {
            Some(Input::Stage { stage, sub }) => Some((stage.clone(), sub.clone())),
            _ => None,
        }
    }
    let mut order: Vec<(String, Option<String>)> = Vec::new();
    walk(config, &mut |s| {
        for p in interpolate::parse(s).unwrap_or_default() {
            if let Piece::Ref(Ref::Input(n)) = p
                && let Some(t) = target(&inputs, &n)
                && !order.contains(&t)
            {
                order.push(t);
            }
        }
    });
    // A reference written in `with:` that the kind's normalised config no longer reads (a
    // setting that does not apply) is not an input; a declared one stays (it may order runs).
    let dropped: Vec<String> = inputs
        .keys()
        .filter(|n| n.starts_with('@') && target(&inputs, n).is_some_and(|t| !order.contains(&t)))
        .cloned()
        .collect();
    for n in &dropped {
        inputs.remove(n);
    }
    let target = |name: &str| target(&inputs, name);
    let mut unused: Vec<(String, Option<String>)> = inputs
        .keys()
        .filter_map(|n| target(n))
        .filter(|t| !order.contains(t))
        .collect();
    unused.sort();
    unused.dedup();
    order.extend(unused);
    let position = |n: &str| {
        target(n).and_then(|t| order.iter().position(|o| *o == t).map(|i| format!("@{i}")))
    };
    let renamed: BTreeMap<String, String> = inputs
        .keys()
        .filter_map(|n| Some((n.clone(), position(n)?)))
        .collect();
    let mut rename = |_: &str, s: &str| -> Result<Value, WalkError> {
        let Ok(pieces) = interpolate::parse(s) else {
            return Ok(Value::String(s.to_string()));
        };
        if !pieces
            .iter()
            .any(|p| matches!(p, Piece::Ref(Ref::Input(n)) if renamed.contains_key(n)))
        {
            return Ok(Value::String(s.to_string()));
        }
        let pieces: Vec<Piece> = pieces
            .into_iter()
            .map(|p| match p {
                Piece::Ref(Ref::Input(n)) if renamed.contains_key(&n) => {
                    Piece::Ref(Ref::Input(renamed[&n].clone()))
                }
                other => other,
            })
            .collect();
        Ok(Value::String(interpolate::unparse(&pieces)))
    };
    let config =
        interpolate::map_strings(config, "", &mut rename).unwrap_or_else(|_| config.clone());
    let mut out = BTreeMap::new();
    let mut at = BTreeMap::new();
    for (name, input) in inputs {
        let key = written_at.remove(&name);
        let name = renamed.get(&name).cloned().unwrap_or(name);
        if let Some(key) = key {
            at.entry(name.clone()).or_insert(key);
        }
        out.insert(name, input);
    }
    (config, out, at)
}

fn param_value<'a>(
    params: &'a serde_json::Map<String, Value>,
    key: &str,
    path: &str,
    source: &Source,
) -> Result<&'a Value, Diagnostic> {
    interpolate::lookup_param(params, key).ok_or_else(|| {
        let e = unknown_param(key, params, path);
        let mut d = source.diagnostic_at_value(path, e.message);
        d.help = e.help;
        d
    })
}

fn unknown_param(key: &str, params: &serde_json::Map<String, Value>, path: &str) -> WalkError {
    let known: Vec<&str> = params.keys().map(String::as_str).collect();
    WalkError {
        path: path.to_string(),
        message: format!("unknown parameter `{key}`"),
        help: Some(match closest(key, &known) {
            Some(k) => format!("did you mean `${{params.{k}}}`?"),
            None if known.is_empty() => "declare it under `params:` at the top of the file".into(),
            None => format!("parameters: {}", known.join(", ")),
        }),
    }
}

/// A kind's or the raw format's [`ConfigError`], located under `base`.
fn config_diagnostic(source: &Source, base: &str, e: ConfigError) -> Diagnostic {
    let path = match (base.is_empty(), e.path.is_empty()) {
        (true, _) => e.path.clone(),
        (false, true) => base.to_string(),
        (false, false) => format!("{base}.{}", e.path),
    };
    let mut d = match e.points_at {
        PointsAt::Key => source.diagnostic(&path, e.message),
        PointsAt::Value => source.diagnostic_at_value(&path, e.message),
    };
    d.help = e.help;
    d
}

/// serde_yaml_ng puts "at line L column C" into messages; the position is shown separately.
fn strip_location(msg: &str) -> String {
    let mut out = String::new();
    let mut rest = msg;
    while let Some(i) = rest.find(" at line ") {
        out.push_str(&rest[..i]);
        let after = &rest[i + " at line ".len()..];
        // Skip "L column C".
        let skip = after
            .char_indices()
            .find(|&(_, c)| !(c.is_ascii_digit() || c == ' ' || "column".contains(c)))
            .map(|(j, _)| j)
            .unwrap_or(after.len());
        rest = &after[skip..];
    }
    out.push_str(rest);
    out
}

fn yaml_to_json(v: &serde_yaml_ng::Value, path: &str) -> Result<Value, (String, String)> {
    use serde_yaml_ng::Value as Y;
    Ok(match v {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(*b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                serde_json::Number::from_f64(f)
                    .map(Value::Number)
                    .ok_or_else(|| (path.to_string(), format!("`{f}` is not a finite number")))?
            }
        }
        Y::String(s) => Value::String(s.clone()),
        Y::Sequence(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, x)| yaml_to_json(x, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Y::Mapping(map) => {
            let mut out = serde_json::Map::new();
            for (k, x) in map {
                let key = match k {
                    Y::String(s) => s.clone(),
                    Y::Number(n) => n.to_string(),
                    Y::Bool(b) => b.to_string(),
                    _ => return Err((path.to_string(), "mapping keys must be strings".into())),
                };
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                out.insert(key, yaml_to_json(x, &child)?);
            }
            Value::Object(out)
        }
        Y::Tagged(t) => yaml_to_json(&t.value, path)?,
    })
}

/// Applies `--set a.b.c=VALUE`: VALUE is read as YAML (`2000` is a number, `true` a bool).
/// Returns the full key path it set (`stages.total.with.run`).
fn apply_override(
    doc: &mut serde_yaml_ng::Value,
    o: &Override,
    source: &Source,
) -> Result<String, Diagnostic> {
    use serde_yaml_ng::Value as Y;
    let bad = |message: String, help: Option<String>| {
        let mut d = Diagnostic::new(
            PathBuf::from(format!("--set {}={}", o.key, o.value)),
            message,
        );
        d.help = help;
        d
    };
    let value: Y = serde_yaml_ng::from_str(&o.value).unwrap_or_else(|_| Y::String(o.value.clone()));
    let parts: Vec<&str> = o.key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(bad(
            format!("`{}` is not a key path", o.key),
            Some("write e.g. `params.n=2000` or `total.with.run=…`".into()),
        ));
    }
    // `params.X` and `version` live at the top; anything else starts with a stage name.
    let full: Vec<String> = match parts[0] {
        "params" | "version" | "remote" | "executor" => {
            parts.iter().map(|s| s.to_string()).collect()
        }
        stage => {
            let stages: Vec<String> = source.index.children("stages");
            if !stages.iter().any(|s| s == stage) {
                let names: Vec<&str> = stages.iter().map(String::as_str).collect();
                return Err(bad(
                    format!("`{stage}` is neither `params` nor a stage"),
                    Some(match closest(stage, &names) {
                        Some(n) => format!("did you mean `{n}`?"),
                        None => format!("stages: {}", names.join(", ")),
                    }),
                ));
            }
            std::iter::once("stages".to_string())
                .chain(parts.iter().map(|s| s.to_string()))
                .collect()
        }
    };
    if full[0] == "params" && full.len() >= 2 {
        let exists = doc
            .get("params")
            .and_then(|p| p.get(full[1].as_str()))
            .is_some();
        if !exists {
            let known: Vec<String> = source.index.children("params");
            let names: Vec<&str> = known.iter().map(String::as_str).collect();
            return Err(bad(
                format!("unknown parameter `{}`", full[1]),
                Some(match closest(&full[1], &names) {
                    Some(n) => format!("did you mean `params.{n}`?"),
                    None => {
                        "`--set` changes parameters that the file declares under `params:`".into()
                    }
                }),
            ));
        }
    }
    let mut cur = doc;
    for (i, part) in full.iter().enumerate() {
        let Y::Mapping(map) = cur else {
            return Err(bad(
                format!("`{}` is not a mapping", full[..i].join(".")),
                None,
            ));
        };
        let key = Y::String(part.clone());
        if i + 1 == full.len() {
            map.insert(key, value);
            return Ok(full.join("."));
        }
        if !map.contains_key(&key) {
            map.insert(key.clone(), Y::Mapping(Default::default()));
        }
        cur = map.get_mut(&key).expect("just inserted");
    }
    Ok(full.join("."))
}
