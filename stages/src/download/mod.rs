//! `kind: download` — bring one external artefact into the store, verified.
//!
//! Exactly one source per stage:
//!
//! ```yaml
//! tokenizer:
//!   kind: download
//!   with:
//!     url: https://example.org/files/tokenizer.json
//!     sha256: be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037
//! onnxruntime:
//!   kind: download
//!   with:
//!     pip: onnxruntime==1.32.0
//!     member: onnxruntime/capi/libonnxruntime.so.1.32.0
//!     platform: manylinux_2_28_x86_64
//!     python_version: "3.11"
//!     sha256: 6c1585d1bbf45b0712ea4a21b705c5fcb4ba04ff2e30f1fbf81a49faf658638f
//! annotations:
//!   kind: download
//!   with:
//!     file: data/captions.csv
//! ```
//!
//! Invariants:
//! * the output tree holds the fetched file(s) under their base name (or `filename:`);
//! * with `sha256:` a mismatch fails the stage and nothing is committed; without it the digest
//!   of the first fetch is reported (and kept in the run record) so it can be pinned — the
//!   stage's fingerprint then keeps it from being fetched again;
//! * an interrupted `url` transfer is kept in the stage kind's scratch directory and resumed
//!   with an HTTP `Range` request (validated with `If-Range` when the server gave an ETag);
//! * 5xx answers, time-outs and dropped connections are retried with exponential back-off;
//!   4xx answers, TLS errors and checksum mismatches are not, and say what to do.

mod extract;
mod http;
mod pip;

pub use extract::Extract;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::api::{
    Checked, ConfigError, ImplicitInput, Kind, StageContext, StageError, StageSummary,
};

/// One value or a list of values.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match Value::deserialize(d)? {
            Value::String(s) => Ok(OneOrMany::One(s)),
            Value::Array(items) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    other => Err(D::Error::custom(format!(
                        "expected a string, found `{other}`"
                    ))),
                })
                .collect::<Result<_, _>>()
                .map(OneOrMany::Many),
            other => Err(D::Error::custom(format!(
                "expected a string or a list of strings, found `{other}`"
            ))),
        }
    }
}

/// Expected digests: one for a single file, or one per wheel member.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Sha256Spec {
    One(String),
    PerMember(BTreeMap<String, String>),
}

impl<'de> Deserialize<'de> for Sha256Spec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let digest = |v: Value| match v {
            Value::String(s) => Ok(s),
            Value::Number(_) => Err(D::Error::custom(
                "this digest was read as a number: put it in quotes",
            )),
            other => Err(D::Error::custom(format!(
                "expected a sha256 digest, found `{other}`"
            ))),
        };
        match Value::deserialize(d)? {
            Value::Object(map) => map
                .into_iter()
                .map(|(k, v)| digest(v).map(|h| (k, h)))
                .collect::<Result<_, _>>()
                .map(Sha256Spec::PerMember),
            v => digest(v).map(Sha256Spec::One),
        }
    }
}

/// The typed `with:` block of a download stage.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DownloadConfig {
    /// An http(s) URL.
    pub url: Option<OneOrMany>,
    /// Unpack the fetched archive into the output tree (the archive itself is not kept).
    pub extract: Option<Extract>,
    /// A `package==version` requirement fetched with `pip download --no-deps`.
    pub pip: Option<String>,
    /// A local file, relative to the pipeline file's folder (or absolute).
    pub file: Option<String>,
    /// Expected sha256 (hex) of the file, or per wheel member.
    pub sha256: Option<Sha256Spec>,
    /// Name of the file in the output tree (url/file sources); default: the source's base name.
    pub filename: Option<String>,
    /// Wheel member path(s) to extract (pip); default: keep the wheel file itself.
    pub member: Option<OneOrMany>,
    /// pip `--platform` tag(s), e.g. `manylinux_2_28_x86_64`.
    pub platform: Option<OneOrMany>,
    /// pip `--python-version`, e.g. "3.11".
    pub python_version: Option<String>,
    /// pip `--implementation`, e.g. `cp`.
    pub implementation: Option<String>,
    /// pip `--abi`, e.g. `cp311`.
    pub abi: Option<String>,
    /// pip `--index-url`.
    pub index_url: Option<String>,
    /// The Python interpreter that runs pip.
    #[serde(default = "default_python")]
    pub python: String,
    /// How many times a failed transfer is retried (url sources).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// First back-off between retries in milliseconds; doubles each time.
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
    /// Seconds without progress before a transfer is abandoned (and retried).
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
}

fn default_python() -> String {
    "python3".into()
}
fn default_retries() -> u32 {
    4
}
fn default_backoff_ms() -> u64 {
    500
}
fn default_timeout_s() -> u64 {
    60
}

/// Which source a config names (after validation exactly one).
enum Source<'a> {
    Urls(Vec<String>),
    Pip(&'a str),
    File(&'a str),
}

impl DownloadConfig {
    fn source(&self) -> Result<Source<'_>, ConfigError> {
        let given: Vec<&str> = [
            ("url", self.url.is_some()),
            ("pip", self.pip.is_some()),
            ("file", self.file.is_some()),
        ]
        .iter()
        .filter(|(_, on)| *on)
        .map(|(k, _)| *k)
        .collect();
        match (given.as_slice(), &self.url, &self.pip, &self.file) {
            (["url"], Some(u), _, _) => Ok(Source::Urls(u.to_vec())),
            (["pip"], _, Some(p), _) => Ok(Source::Pip(p)),
            (["file"], _, _, Some(f)) => Ok(Source::File(f)),
            ([], ..) => Err(ConfigError::new("", "a download stage needs a source")
                .with_help("add one of `url:`, `pip:` or `file:`")),
            (many, ..) => Err(ConfigError::new(
                many[1],
                format!("give one source, not {}", many.join(" and ")),
            )
            .with_help("split them into one download stage each")),
        }
    }

    fn expected_single(&self) -> Result<Option<String>, ConfigError> {
        match &self.sha256 {
            None => Ok(None),
            Some(Sha256Spec::One(hex)) => Ok(Some(check_hex("sha256", hex)?)),
            Some(Sha256Spec::PerMember(_)) => Err(ConfigError::new(
                "sha256",
                "expected one sha256 digest",
            )
            .with_help("a map of digests is only for a pip source with several `member:` paths")),
        }
    }
}

fn check_hex(key: &str, hex: &str) -> Result<String, ConfigError> {
    let lower = hex.trim().to_ascii_lowercase();
    if lower.len() == 64 && lower.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(lower)
    } else {
        Err(
            ConfigError::new(key, format!("`{hex}` is not a sha256 digest")).with_help(
                "a sha256 digest is 64 hexadecimal characters, as printed by `sha256sum`",
            ),
        )
    }
}

pub struct DownloadKind;

impl Kind for DownloadKind {
    type Config = DownloadConfig;
    const NAME: &'static str = "download";
    const VERSION: u32 = 1;

    fn validate(config: &mut DownloadConfig, _declared: &[String]) -> Result<Checked, ConfigError> {
        let source = config.source()?;
        let mut checked = Checked::default();
        if let Some(name) = &config.filename {
            checked_file_name(name).map_err(|e| {
                ConfigError::new("filename", e.to_string())
                    .with_help("set `filename:` to a plain name such as `model.onnx`")
            })?;
        }
        match source {
            Source::Urls(urls) => {
                for url in &urls {
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return Err(ConfigError::new(
                            "url",
                            format!("`{url}` is not an http(s) URL"),
                        )
                        .with_help(
                            "use `file:` for a local path and `pip:` for a Python package",
                        ));
                    }
                }
                if urls.len() > 1 {
                    if config.filename.is_some() {
                        return Err(ConfigError::new(
                            "filename",
                            "`filename` names one file; several URLs keep their own names",
                        ));
                    }
                    let names: Vec<String> = urls
                        .iter()
                        .map(|u| {
                            http::file_name_from_url(u)
                                .map_err(|e| ConfigError::new("url", e.to_string()))
                        })
                        .collect::<Result<_, _>>()?;
                    match &config.sha256 {
                        Some(Sha256Spec::One(_)) => {
                            return Err(ConfigError::new(
                                "sha256",
                                "several URLs need one digest each",
                            )
                            .with_help("write `sha256: {file name: digest, …}`"));
                        }
                        Some(Sha256Spec::PerMember(map)) => {
                            for (name, hex) in map {
                                check_hex(&format!("sha256.{name}"), hex)?;
                                if !names.contains(name) {
                                    return Err(ConfigError::new(
                                        format!("sha256.{name}"),
                                        format!("no URL downloads a file named `{name}`"),
                                    ));
                                }
                            }
                        }
                        None => {}
                    }
                } else {
                    config.expected_single()?;
                    if config.filename.is_none() {
                        let name = http::file_name_from_url(&urls[0])
                            .map_err(|e| ConfigError::new("url", e.to_string()))?;
                        checked_file_name(&name).map_err(|e| {
                            ConfigError::new("url", e.to_string()).with_help(
                                "add `filename: NAME` to the download stage (a plain name)",
                            )
                        })?;
                    }
                }
                pip_only_keys(config)?;
            }
            Source::File(path) => {
                config.expected_single()?;
                pip_only_keys(config)?;
                if !path.contains("${") {
                    checked.implicit_inputs.push(ImplicitInput {
                        name: "file".into(),
                        key: "file".into(),
                        path: path.to_string(),
                    });
                }
            }
            Source::Pip(req) => {
                pip::check_requirement(req)?;
                if config.extract.is_some() {
                    return Err(ConfigError::new(
                        "extract",
                        "`extract` is for url and file sources",
                    )
                    .with_help("a wheel's members are taken with `member:`"));
                }
                if config.filename.is_some() {
                    return Err(ConfigError::new(
                        "filename",
                        "`filename` is for url and file sources",
                    )
                    .with_help("pip members keep their base names"));
                }
                let members = config
                    .member
                    .as_ref()
                    .map(OneOrMany::to_vec)
                    .unwrap_or_default();
                match &config.sha256 {
                    Some(Sha256Spec::PerMember(map)) => {
                        for (member, hex) in map {
                            check_hex(&format!("sha256.{member}"), hex)?;
                            if !members.contains(member) {
                                return Err(ConfigError::new(
                                    format!("sha256.{member}"),
                                    format!("`{member}` is not one of the `member:` paths"),
                                ));
                            }
                        }
                    }
                    Some(Sha256Spec::One(hex)) => {
                        check_hex("sha256", hex)?;
                        if members.len() > 1 {
                            return Err(ConfigError::new(
                                "sha256",
                                "several members need one digest each",
                            )
                            .with_help("write `sha256: {member/path: digest, …}`"));
                        }
                    }
                    None => {}
                }
            }
        }
        Ok(checked)
    }

    fn run(
        &self,
        config: DownloadConfig,
        ctx: &StageContext<'_>,
    ) -> Result<StageSummary, StageError> {
        let source = config.source().map_err(|e| StageError::failed(e.message))?;
        let mut summary = StageSummary::default();
        match source {
            Source::Urls(urls) => {
                let archives = ctx.out_dir.join(".archives");
                for url in &urls {
                    let name = match &config.filename {
                        Some(n) => n.clone(),
                        None => http::file_name_from_url(url)?,
                    };
                    let folder = if config.extract.is_some() {
                        &archives
                    } else {
                        ctx.out_dir
                    };
                    std::fs::create_dir_all(folder)
                        .map_err(|e| StageError::io("creating the download folder", e))?;
                    let dest = folder.join(checked_file_name(&name)?);
                    let expected = match &config.sha256 {
                        Some(Sha256Spec::One(hex)) => Some(hex.to_ascii_lowercase()),
                        Some(Sha256Spec::PerMember(map)) => {
                            map.get(&name).map(|h| h.to_ascii_lowercase())
                        }
                        None => None,
                    };
                    let fetched = http::fetch(url, &config, ctx, &dest, expected.is_some())?;
                    *summary
                        .metrics
                        .entry("bytes".into())
                        .or_insert(Value::from(0u64)) = Value::from(
                        summary
                            .metrics
                            .get("bytes")
                            .and_then(Value::as_u64)
                            .unwrap_or(0)
                            + fetched.bytes,
                    );
                    if fetched.resumed_from > 0 {
                        summary
                            .notes
                            .push(format!("{name}: resumed at byte {}", fetched.resumed_from));
                    }
                    verify_or_record(&dest, &name, expected.as_deref(), &mut summary)?;
                    if let Some(kind) = config.extract {
                        let n = extract::unpack(kind, &dest, ctx.out_dir, ctx)?;
                        summary.notes.push(format!("{name}: extracted {n} files"));
                    }
                }
                if archives.exists() {
                    std::fs::remove_dir_all(&archives)
                        .map_err(|e| StageError::io("removing downloaded archives", e))?;
                }
            }
            Source::File(_) => {
                let src = ctx
                    .inputs
                    .get("file")
                    .ok_or_else(|| StageError::failed("the `file:` input was not resolved"))?;
                let name = match &config.filename {
                    Some(n) => n.clone(),
                    None => src
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .ok_or_else(|| {
                            StageError::failed(format!("{} has no file name", src.display()))
                        })?,
                };
                if !src.is_file() {
                    return Err(StageError::failed_with_hint(
                        format!("{} is not a file", src.display()),
                        "`file:` copies one file; use a stage input to pass a directory",
                    ));
                }
                let dest = ctx.out_dir.join(checked_file_name(&name)?);
                std::fs::copy(src, &dest)
                    .map_err(|e| StageError::io(format!("copying {}", src.display()), e))?;
                let expected = config
                    .expected_single()
                    .map_err(|e| StageError::failed(e.message))?;
                verify_or_record(&dest, &name, expected.as_deref(), &mut summary)?;
                if let Some(kind) = config.extract {
                    let n = extract::unpack(kind, &dest, ctx.out_dir, ctx)?;
                    std::fs::remove_file(&dest)
                        .map_err(|e| StageError::io("removing the unpacked archive", e))?;
                    summary.notes.push(format!("{name}: extracted {n} files"));
                }
            }
            Source::Pip(req) => {
                let files = pip::fetch(req, &config, ctx)?;
                for (member, dest) in files {
                    let expected = match &config.sha256 {
                        Some(Sha256Spec::One(hex)) => Some(hex.to_ascii_lowercase()),
                        Some(Sha256Spec::PerMember(map)) => {
                            map.get(&member).map(|h| h.to_ascii_lowercase())
                        }
                        None => None,
                    };
                    verify_or_record(&dest, &member, expected.as_deref(), &mut summary)?;
                }
            }
        }
        Ok(summary)
    }
}

fn pip_only_keys(config: &DownloadConfig) -> Result<(), ConfigError> {
    let pip_keys = [
        ("member", config.member.is_some()),
        ("platform", config.platform.is_some()),
        ("python_version", config.python_version.is_some()),
        ("implementation", config.implementation.is_some()),
        ("abi", config.abi.is_some()),
        ("index_url", config.index_url.is_some()),
    ];
    match pip_keys.iter().find(|(_, on)| *on) {
        Some((key, _)) => Err(ConfigError::new(
            *key,
            format!("`{key}` only applies to a `pip:` source"),
        )),
        None => Ok(()),
    }
}

/// A plain file name: no separators, not `.`/`..`.
fn checked_file_name(name: &str) -> Result<&str, StageError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        Err(StageError::failed_with_hint(
            format!("`{name}` is not a usable file name"),
            "set `filename:` to a plain name such as `model.onnx`",
        ))
    } else {
        Ok(name)
    }
}

/// Checks the digest against the expected one, or records it for the user to pin.
fn verify_or_record(
    path: &Path,
    label: &str,
    expected: Option<&str>,
    summary: &mut StageSummary,
) -> Result<(), StageError> {
    let actual = sha256_file(path)?;
    match expected {
        Some(want) if want != actual => {
            let _ = std::fs::remove_file(path);
            Err(StageError::failed_with_hint(
                format!("checksum mismatch for {label}: expected sha256 {want}, got {actual}"),
                "the source changed or the digest in the pipeline is wrong; nothing was kept. \
                 Fix `sha256:` only if you trust the new file",
            ))
        }
        Some(_) => {
            summary
                .metrics
                .insert(format!("sha256:{label}"), Value::from(actual));
            Ok(())
        }
        None => {
            summary.notes.push(format!(
                "{label}: sha256 {actual} (not pinned: add `sha256: {actual}`)"
            ));
            summary
                .metrics
                .insert(format!("sha256:{label}"), Value::from(actual));
            Ok(())
        }
    }
}

pub(crate) fn sha256_file(path: &Path) -> Result<String, StageError> {
    let mut file =
        File::open(path).map_err(|e| StageError::io(format!("opening {}", path.display()), e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| StageError::io(format!("reading {}", path.display()), e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}
