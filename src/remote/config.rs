//! Which remote a run uses, and how to reach it.
//!
//! A remote is declared in the pipeline file (`remote:`, shared with the project) or in the
//! user's config file (`~/.config/cusa-pipe/config.yaml`, or `$CUSA_PIPE_CONFIG`), which names
//! remotes and may set a default:
//!
//! ```yaml
//! remotes:
//!   team:
//!     url: s3://ml-cache/cusa        # s3:// gs:// az:// http(s):// file://
//!     write: true                    # read: true by default, write: true by default
//!     options: {region: eu-west-1}   # object_store's keys for that store
//!     grace: 24h                     # `cache gc --remote` never deletes younger objects
//! default: team
//! ```
//!
//! In the pipeline, `remote:` is a URL, a name from the user's file, or a mapping like the one
//! above. Precedence: `--no-remote`, then `--remote NAME|URL`, then the pipeline's `remote:`,
//! then the user's `default`. Credentials never live in these files: they come from
//! `object_store`'s standard chain (environment variables such as `AWS_ACCESS_KEY_ID`,
//! `GOOGLE_APPLICATION_CREDENTIALS`, `AZURE_STORAGE_ACCOUNT_KEY`, instance metadata, web identity).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;
use serde::Deserialize;
use serde_json::Value;

use super::RemoteError;

/// A remote as written (pipeline file or user config), before names are resolved.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRemote {
    pub url: String,
    #[serde(default = "yes")]
    pub read: bool,
    #[serde(default = "yes")]
    pub write: bool,
    #[serde(default)]
    pub options: BTreeMap<String, Value>,
    #[serde(default)]
    pub grace: Option<String>,
}

fn yes() -> bool {
    true
}

/// The pipeline's `remote:`.
#[derive(Debug, Clone)]
pub enum RemoteDecl {
    /// A name from the user's config file.
    Named(String),
    Inline(RawRemote),
}

/// Where the remote in use was declared (for messages).
#[derive(Debug, Clone)]
pub enum RemoteSource {
    Pipeline,
    UserConfig(PathBuf),
    CommandLine,
}

/// A resolved remote.
#[derive(Debug, Clone)]
pub struct RemoteSettings {
    pub name: String,
    pub url: String,
    pub read: bool,
    pub write: bool,
    pub options: BTreeMap<String, String>,
    pub grace: Duration,
    pub source: RemoteSource,
}

/// The user's config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    #[serde(default)]
    pub remotes: BTreeMap<String, RawRemote>,
    #[serde(default)]
    pub default: Option<String>,
}

/// `$CUSA_PIPE_CONFIG`, else `$XDG_CONFIG_HOME/cusa-pipe/config.yaml`, else
/// `~/.config/cusa-pipe/config.yaml`.
pub fn user_config_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CUSA_PIPE_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("cusa-pipe").join("config.yaml"))
}

/// Reads the user's config file (absent: empty).
pub fn read_user_config(path: &Path) -> Result<UserConfig, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(UserConfig::default()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    serde_yaml_ng::from_str(&text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!(":{}:{}", l.line(), l.column()))
            .unwrap_or_default();
        format!("{}{at}: {e}", path.display())
    })
}

/// A wrong setting of a remote, with the key it is about (so a caller can locate it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SettingError {
    pub key: SettingKey,
    pub message: String,
}

/// Which setting of a remote a [`SettingError`] is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettingKey {
    Url,
    Grace,
    /// `options.NAME`.
    Option(String),
}

impl SettingError {
    fn new(key: SettingKey, message: String) -> Self {
        SettingError { key, message }
    }
}

/// Checks a remote URL's form; the message says what is accepted.
pub fn check_url(url: &str) -> Result<(), SettingError> {
    let bad = |m: String| SettingError::new(SettingKey::Url, m);
    let parsed = url::Url::parse(url).map_err(|e| bad(format!("`{url}` is not a URL: {e}")))?;
    match parsed.scheme() {
        "s3" | "s3a" | "gs" | "az" | "adl" | "azure" | "abfs" | "abfss" | "http" | "https"
        | "file" => Ok(()),
        other => Err(bad(format!(
            "`{other}://` is not a remote this build can reach; use s3://, gs://, az://, \
             http(s):// or file://"
        ))),
    }
}

/// Checks the option names against the store the URL selects (no network, no credentials).
pub fn check_options(url: &str, options: &BTreeMap<String, Value>) -> Result<(), SettingError> {
    use object_store::ObjectStoreScheme as S;
    let Ok(parsed) = url::Url::parse(url) else {
        return Ok(());
    };
    let Ok((scheme, _)) = S::parse(&parsed) else {
        return Ok(());
    };
    for k in options.keys() {
        let k = k.to_ascii_lowercase();
        let known = match scheme {
            S::AmazonS3 => k.parse::<object_store::aws::AmazonS3ConfigKey>().is_ok(),
            S::GoogleCloudStorage => k.parse::<object_store::gcp::GoogleConfigKey>().is_ok(),
            S::MicrosoftAzure => k.parse::<object_store::azure::AzureConfigKey>().is_ok(),
            S::Http => k.parse::<object_store::ClientConfigKey>().is_ok(),
            _ => false,
        };
        if !known {
            return Err(SettingError::new(
                SettingKey::Option(k.clone()),
                format!(
                    "option `{k}`: not an option of {} stores (see object_store's config keys, \
                     e.g. `endpoint`, `region`, `allow_http`)",
                    url.split("://").next().unwrap_or(url)
                ),
            ));
        }
    }
    Ok(())
}

/// Resolves a raw remote into settings.
pub fn settings(
    name: &str,
    raw: &RawRemote,
    source: RemoteSource,
) -> Result<RemoteSettings, SettingError> {
    check_url(&raw.url)?;
    check_options(&raw.url, &raw.options)?;
    let grace = match &raw.grace {
        None => Duration::from_secs(24 * 3600),
        Some(g) => humantime::parse_duration(g).map_err(|e| {
            SettingError::new(
                SettingKey::Grace,
                format!("grace `{g}`: {e} (write e.g. `24h` or `30m`)"),
            )
        })?,
    };
    let mut options = BTreeMap::new();
    for (k, v) in &raw.options {
        let text = match v {
            Value::String(s) => s.clone(),
            Value::Bool(_) | Value::Number(_) => v.to_string(),
            _ => {
                return Err(SettingError::new(
                    SettingKey::Option(k.clone()),
                    format!("option `{k}`: give a string, number or boolean"),
                ));
            }
        };
        options.insert(k.clone(), text);
    }
    Ok(RemoteSettings {
        name: name.to_string(),
        url: raw.url.clone(),
        read: raw.read,
        write: raw.write,
        options,
        grace,
        source,
    })
}

/// Timeouts of a best-effort cache: fail fast when the server is away, never cut a long
/// transfer short.
const CLIENT_DEFAULTS: [(&str, &str); 3] = [
    ("connect_timeout", "5s"),
    ("read_timeout", "60s"),
    ("timeout", "24h"),
];

fn retry() -> object_store::RetryConfig {
    object_store::RetryConfig {
        max_retries: 3,
        retry_timeout: Duration::from_secs(20),
        ..Default::default()
    }
}

/// Applies `key = value` pairs through a builder's own key parser; an unknown key is an error
/// naming it.
fn apply<B, K: std::str::FromStr>(
    mut builder: B,
    settings: &RemoteSettings,
    with: impl Fn(B, K, String) -> B,
) -> Result<B, RemoteError> {
    for (k, v) in CLIENT_DEFAULTS {
        if let Ok(key) = k.parse::<K>() {
            builder = with(builder, key, v.to_string());
        }
    }
    for (k, v) in &settings.options {
        let key = k.to_ascii_lowercase().parse::<K>().map_err(|_| {
            RemoteError::Config(format!(
                "remote `{}`: unknown option `{k}` for {}",
                settings.name, settings.url
            ))
        })?;
        builder = with(builder, key, v.clone());
    }
    Ok(builder)
}

/// Builds the object store of a remote and the key prefix inside it.
pub fn object_store_for(
    settings: &RemoteSettings,
) -> Result<(Arc<dyn ObjectStore>, String), RemoteError> {
    let bad = |e: String| RemoteError::Config(format!("remote `{}`: {e}", settings.name));
    let url = url::Url::parse(&settings.url).map_err(|e| bad(e.to_string()))?;
    if url.scheme() == "file" {
        let dir = url
            .to_file_path()
            .map_err(|_| bad(format!("`{}` is not a local folder", settings.url)))?;
        // A folder that cannot be made or opened is a remote that is not there right now
        // (an unmounted share, no permission), not a mistake in the settings.
        let unavailable =
            |e: String| RemoteError::Unavailable(format!("remote `{}`: {e}", settings.name));
        std::fs::create_dir_all(&dir)
            .map_err(|e| unavailable(format!("creating {}: {e}", dir.display())))?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)
            .map_err(|e| unavailable(e.to_string()))?
            .with_automatic_cleanup(true);
        return Ok((Arc::new(store), String::new()));
    }
    let (scheme, path) =
        object_store::ObjectStoreScheme::parse(&url).map_err(|e| bad(e.to_string()))?;
    let prefix = path.as_ref().trim_matches('/').to_string();
    use object_store::ObjectStoreScheme as S;
    let store: Arc<dyn ObjectStore> = match scheme {
        S::AmazonS3 => {
            use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
            let b = AmazonS3Builder::from_env()
                .with_url(settings.url.clone())
                .with_retry(retry());
            let b = apply(
                b,
                settings,
                |b: AmazonS3Builder, k: AmazonS3ConfigKey, v| b.with_config(k, v),
            )?;
            Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
        }
        S::GoogleCloudStorage => {
            use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
            let b = GoogleCloudStorageBuilder::from_env()
                .with_url(settings.url.clone())
                .with_retry(retry());
            let b = apply(
                b,
                settings,
                |b: GoogleCloudStorageBuilder, k: GoogleConfigKey, v| b.with_config(k, v),
            )?;
            Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
        }
        S::MicrosoftAzure => {
            use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
            let b = MicrosoftAzureBuilder::from_env()
                .with_url(settings.url.clone())
                .with_retry(retry());
            let b = apply(
                b,
                settings,
                |b: MicrosoftAzureBuilder, k: AzureConfigKey, v| b.with_config(k, v),
            )?;
            Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
        }
        S::Http => {
            use object_store::ClientConfigKey;
            use object_store::http::HttpBuilder;
            let base = &url[..url::Position::BeforePath];
            let b = HttpBuilder::new().with_url(base).with_retry(retry());
            let b = apply(b, settings, |b: HttpBuilder, k: ClientConfigKey, v| {
                b.with_config(k, v)
            })?;
            Arc::new(b.build().map_err(|e| bad(e.to_string()))?)
        }
        other => return Err(bad(format!("{other:?} stores are not supported"))),
    };
    Ok((store, prefix))
}

/// Resolves which remote a command uses (see the module doc for the precedence).
pub fn resolve(
    pipeline: Option<&RemoteDecl>,
    flag: Option<&str>,
    no_remote: bool,
) -> Result<Option<RemoteSettings>, String> {
    if no_remote {
        return Ok(None);
    }
    let user_path = user_config_path();
    let user = || -> Result<(UserConfig, PathBuf), String> {
        match &user_path {
            Some(p) => Ok((read_user_config(p)?, p.clone())),
            None => Ok((
                UserConfig::default(),
                PathBuf::from("~/.config/cusa-pipe/config.yaml"),
            )),
        }
    };
    let named = |name: &str, source: RemoteSource| -> Result<RemoteSettings, String> {
        let (cfg, path) = user()?;
        match cfg.remotes.get(name) {
            Some(raw) => settings(name, raw, RemoteSource::UserConfig(path.clone()))
                .map_err(|e| format!("{}: remote `{name}`: {e}", path.display())),
            None => {
                let known: Vec<&str> = cfg.remotes.keys().map(String::as_str).collect();
                let from = match source {
                    RemoteSource::CommandLine => "`--remote`".to_string(),
                    _ => "the pipeline's `remote:`".to_string(),
                };
                Err(format!(
                    "{from} names remote `{name}`, which {} does not declare ({})",
                    path.display(),
                    if known.is_empty() {
                        "it declares none: add it under `remotes:`, or give a URL".to_string()
                    } else {
                        format!("it declares: {}", known.join(", "))
                    }
                ))
            }
        }
    };
    if let Some(f) = flag {
        if f.contains("://") {
            let raw = RawRemote {
                url: f.to_string(),
                read: true,
                write: true,
                options: BTreeMap::new(),
                grace: None,
            };
            return settings(f, &raw, RemoteSource::CommandLine)
                .map(Some)
                .map_err(|e| format!("`--remote {f}`: {e}"));
        }
        return named(f, RemoteSource::CommandLine).map(Some);
    }
    match pipeline {
        Some(RemoteDecl::Inline(raw)) => settings(&raw.url, raw, RemoteSource::Pipeline)
            .map(Some)
            .map_err(|e| format!("`remote:`: {e}")),
        Some(RemoteDecl::Named(n)) => named(n, RemoteSource::Pipeline).map(Some),
        None => {
            let (cfg, path) = user()?;
            match cfg.default {
                Some(d) => match cfg.remotes.get(&d) {
                    Some(raw) => settings(&d, raw, RemoteSource::UserConfig(path.clone()))
                        .map(Some)
                        .map_err(|e| format!("{}: remote `{d}`: {e}", path.display())),
                    None => Err(format!(
                        "{}: `default: {d}` is not under `remotes:`",
                        path.display()
                    )),
                },
                None => Ok(None),
            }
        }
    }
}
