//! The pipeline file: YAML → validated, typed [`Pipeline`], or a located [`Diagnostic`].
//!
//! This is the only module that reads raw YAML. Everything downstream works on [`Pipeline`],
//! whose invariants are:
//! * every stage has a known kind whose `with:` config passed the kind's typed check;
//! * every `${STAGE}` input names an existing stage, every `${inputs.NAME}` a declared input,
//!   every `${params.KEY}` an existing parameter; no stage reference hides in `with:`;
//! * parameters are substituted (typed when a value is exactly `${params.KEY}`), while the
//!   symbolic `with:` is kept too, so a fingerprint can say "param `n` 1000 → 2000" rather than
//!   "config changed";
//! * `--set` overrides are applied before validation, so they are checked like the file.
//!
//! Cycles are found by [`crate::graph`], which names the stages on the cycle.

pub mod diagnostic;
pub mod interpolate;
pub mod location;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cusa_stages::api::{ConfigError, PointsAt, StageKind, closest, parse_config};
use serde::Deserialize;
use serde_json::Value;

use crate::remote::config::{RawRemote, RemoteDecl};
pub use diagnostic::Diagnostic;
use interpolate::{Piece, Ref, WalkError};
use location::LocationIndex;

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
    pub name: String,
    pub kind: Arc<dyn StageKind>,
    /// `with:` as written (after `--set`), parameters still symbolic: explains cache misses.
    pub written: Value,
    /// The kind's normalised config: parameters substituted, defaults and presets written in,
    /// `${inputs.X}` / `${out}` still symbolic. Hashed into the fingerprint; the runner binds
    /// the references to paths and hands it to the kind.
    pub config: Value,
    /// Parameters this stage reads, with their values.
    pub params_used: BTreeMap<String, Value>,
    /// Declared inputs plus the kind's implicit ones, by name.
    pub inputs: BTreeMap<String, Input>,
    /// GPUs the stage needs (`resources: {gpu: N}`).
    pub gpus: u32,
}

/// Where an input comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A file or folder of the project, relative to the pipeline file (or absolute).
    Project { path: String, key: String },
    /// Another stage's output tree, or a path inside it.
    Stage { stage: String, sub: Option<String> },
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    kind: String,
    #[serde(default)]
    inputs: serde_json::Map<String, Value>,
    #[serde(default)]
    with: Value,
    #[serde(default)]
    resources: RawResources,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawResources {
    #[serde(default)]
    gpu: u32,
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
    let names: Vec<&str> = raw.stages.keys().map(String::as_str).collect();
    let mut stages = Vec::new();
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
        stages.push(build_stage(
            name,
            raw_stage,
            &raw.params,
            &names,
            kinds,
            &source,
        )?);
    }
    Ok(Pipeline {
        file: file.to_path_buf(),
        dir,
        source,
        params: raw.params,
        stages,
        remote,
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
    name: &str,
    raw: RawStage,
    params: &serde_json::Map<String, Value>,
    names: &[&str],
    kinds: &Kinds,
    source: &Source,
) -> Result<Stage, Diagnostic> {
    let base = format!("stages.{name}");
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

    // Inputs: a stage reference, or a project path (parameters allowed).
    let mut inputs = BTreeMap::new();
    for (input, value) in &raw.inputs {
        let path = format!("{base}.inputs.{input}");
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
            [Piece::Ref(Ref::Stage { name: up, sub })] => {
                if !names.contains(&up.as_str()) {
                    let mut d = source.diagnostic_at_value(
                        &path,
                        format!("input `{input}` refers to unknown stage `{up}`"),
                    );
                    d.help = Some(match closest(up, names) {
                        Some(n) => format!("did you mean `${{{n}}}`?"),
                        None => format!("stages: {}", names.join(", ")),
                    });
                    return Err(d);
                }
                if up == name {
                    return Err(source.diagnostic_at_value(
                        &path,
                        format!("stage `{name}` cannot read its own output"),
                    ));
                }
                Input::Stage {
                    stage: up.clone(),
                    sub: sub.clone(),
                }
            }
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
    }

    // `with:`: substitute parameters, check references.
    let written = if raw.with.is_null() {
        Value::Object(Default::default())
    } else {
        raw.with
    };
    let declared: Vec<String> = inputs.keys().cloned().collect();
    let with_path = format!("{base}.with");
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
                                    "declare it under `inputs:` first, e.g. `{n}: path/or/${{stage}}`"
                                ),
                                None => format!("declared inputs: {}", names.join(", ")),
                            }),
                        ));
                    }
                    out.push_str(&format!("${{inputs.{n}}}"));
                }
                Piece::Ref(Ref::Out) => out.push_str("${out}"),
                Piece::Ref(Ref::Stage { name: up, sub }) => {
                    let written = match &sub {
                        Some(s) => format!("${{{up}/{s}}}"),
                        None => format!("${{{up}}}"),
                    };
                    return Err(err(
                        format!("stage reference `{written}` inside `with:`"),
                        Some(format!(
                            "declare it under `inputs:` (e.g. `{up}: {written}`) and write `${{inputs.{up}}}`"
                        )),
                    ));
                }
            }
        }
        Ok(Value::String(out))
    };
    let with = interpolate::map_strings(&written, "", &mut substitute).map_err(|e| {
        let path = if e.path.is_empty() {
            with_path.clone()
        } else {
            format!("{with_path}.{}", e.path)
        };
        let mut d = source.diagnostic_at_value(&path, e.message);
        d.help = e.help;
        d
    })?;

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
        inputs.insert(
            implicit.name,
            Input::Project {
                path: implicit.path,
                key: format!("{with_path}.{}", implicit.key),
            },
        );
    }

    Ok(Stage {
        name: name.to_string(),
        kind,
        written,
        config: checked.config,
        params_used,
        inputs,
        gpus: raw.resources.gpu,
    })
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
        "params" | "version" | "remote" => parts.iter().map(|s| s.to_string()).collect(),
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
