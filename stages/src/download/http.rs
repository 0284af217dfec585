//! Resumable, retried HTTP(S) transfers.
//!
//! The partial file lives in the kind's scratch directory under a name derived from the URL, so
//! a transfer cut by a dropped connection, a dying server, Ctrl-C or kill -9 continues from the
//! byte it reached. A `.meta` file beside it keeps the validator (a strong ETag, else
//! Last-Modified) and the announced length; a resume sends `Range` with `If-Range`, and a server
//! that answers 200 instead of 206 (the file changed, or no range support) restarts the transfer
//! from zero. A partial file is only ever continued when something can tell that the rest comes
//! from the same version: a validator the server gave (and gives again on the 206), or a pinned
//! `sha256:` that checks the whole file afterwards. Without either, the transfer restarts from
//! zero rather than risk splicing two versions of the file.
//!
//! The client is reqwest's blocking one, the HTTP stack the team cache (object_store) already
//! builds: one stack, one TLS setup (rustls with ring, the system's trust store).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::DownloadConfig;
use crate::api::{StageContext, StageError};

/// What a successful transfer did.
pub struct Fetched {
    pub bytes: u64,
    /// Non-zero when the transfer continued a partial file.
    pub resumed_from: u64,
}

#[derive(Serialize, Deserialize, Default)]
struct PartMeta {
    url: String,
    validator: Option<String>,
    total: Option<u64>,
}

/// One attempt's failure: retry it, or give up at once.
enum AttemptError {
    Retry(String),
    Fatal(StageError),
}

/// The last path segment of a URL, without query or fragment.
pub fn file_name_from_url(url: &str) -> Result<String, StageError> {
    let no_query = url.split(['?', '#']).next().unwrap_or(url);
    let after_scheme = no_query
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or(no_query);
    match after_scheme.split_once('/') {
        Some((_, path)) if !path.is_empty() && !path.ends_with('/') => {
            Ok(path.rsplit('/').next().unwrap_or(path).to_string())
        }
        _ => Err(StageError::failed_with_hint(
            format!("cannot tell a file name from `{url}`"),
            "add `filename: NAME` to the download stage",
        )),
    }
}

pub fn fetch(
    url: &str,
    config: &DownloadConfig,
    ctx: &StageContext<'_>,
    dest: &Path,
    pinned: bool,
) -> Result<Fetched, StageError> {
    std::fs::create_dir_all(ctx.scratch_dir)
        .map_err(|e| StageError::io("creating the download scratch directory", e))?;
    let key = hex::encode(&Sha256::digest(url.as_bytes())[..16]);
    let part = ctx.scratch_dir.join(format!("{key}.part"));
    let meta_path = ctx.scratch_dir.join(format!("{key}.meta"));
    // Two stages fetching the same URL at once must not write the same partial file.
    let lock = File::create(ctx.scratch_dir.join(format!("{key}.lock")))
        .map_err(|e| StageError::io("creating the download lock", e))?;
    if lock.try_lock().is_err() {
        ctx.log
            .line(format!("waiting for another process downloading {url}"));
        lock.lock()
            .map_err(|e| StageError::io("locking the partial download", e))?;
    }

    let mut meta = read_meta(&meta_path, url);
    if meta.url != url {
        let _ = std::fs::remove_file(&part);
        meta = PartMeta {
            url: url.to_string(),
            ..PartMeta::default()
        };
    }

    let agent = client(config)?;

    let mut resumed_from = 0u64;
    let mut failures: u32 = 0;
    loop {
        if ctx.cancel.is_cancelled() {
            return Err(StageError::Cancelled);
        }
        match attempt(
            &agent,
            url,
            &part,
            &meta_path,
            &mut meta,
            ctx,
            &mut resumed_from,
            pinned,
        ) {
            Ok(bytes) => {
                std::fs::rename(&part, dest)
                    .map_err(|e| StageError::io("moving the finished download", e))?;
                let _ = std::fs::remove_file(&meta_path);
                return Ok(Fetched {
                    bytes,
                    resumed_from,
                });
            }
            Err(AttemptError::Fatal(err)) => return Err(err),
            Err(AttemptError::Retry(why)) => {
                failures += 1;
                let kept = part.metadata().map(|m| m.len()).unwrap_or(0);
                if failures > config.retries {
                    let tries = failures;
                    return Err(StageError::failed_with_hint(
                        format!("could not download {url} after {tries} attempts: {why}"),
                        if kept > 0 {
                            format!("{kept} bytes are kept; run again to resume from there")
                        } else {
                            "check that the server is up and reachable, then run again".to_string()
                        },
                    ));
                }
                let wait = config
                    .backoff_ms
                    .saturating_mul(1 << (failures - 1).min(16));
                ctx.log.line(format!(
                    "{why}; {kept} bytes kept; retry {failures}/{} in {wait} ms",
                    config.retries
                ));
                sleep_unless_cancelled(Duration::from_millis(wait), ctx)?;
            }
        }
    }
}

/// The HTTP client of one transfer: `timeout_s` bounds connecting (at most 30 s), waiting for
/// the response, and each read of the body (not the whole transfer); redirects are followed;
/// bodies are never decoded (the bytes on disk are the bytes served).
fn client(config: &DownloadConfig) -> Result<reqwest::blocking::Client, StageError> {
    // reqwest is built without a default crypto provider; the first caller in the process
    // installs ring's (the engine's team cache does the same), later ones find it there.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::blocking::Client::builder()
        .connect_timeout(Duration::from_secs(config.timeout_s.min(30)))
        .timeout(Duration::from_secs(config.timeout_s))
        .user_agent(concat!("cusa-pipe/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| StageError::failed(format!("cannot set up the HTTP client: {e}")))
}

#[allow(clippy::too_many_arguments)]
fn attempt(
    agent: &reqwest::blocking::Client,
    url: &str,
    part: &PathBuf,
    meta_path: &Path,
    meta: &mut PartMeta,
    ctx: &StageContext<'_>,
    resumed_from: &mut u64,
    pinned: bool,
) -> Result<u64, AttemptError> {
    let mut have = part.metadata().map(|m| m.len()).unwrap_or(0);
    if have > 0 && meta.validator.is_none() && !pinned {
        ctx.log.line(format!(
            "{have} bytes kept from an earlier attempt, but the server gave no ETag or \
             Last-Modified and no sha256 is pinned: nothing can tell they belong to the same \
             version of the file; restarting from zero"
        ));
        let _ = std::fs::remove_file(part);
        have = 0;
    }
    let mut request = agent.get(url);
    if have > 0 {
        request = request.header("Range", format!("bytes={have}-"));
        if let Some(validator) = &meta.validator {
            request = request.header("If-Range", validator.as_str());
        }
    }
    ctx.log.line(format!(
        "GET {url}{}",
        if have > 0 {
            format!(" (from byte {have})")
        } else {
            String::new()
        }
    ));
    let response = request.send().map_err(classify)?;
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    // If-Range needs a strong validator (RFC 9110 §13.1.5): a weak ETag is not one.
    let validator = header("etag")
        .filter(|e| !e.starts_with("W/"))
        .or_else(|| header("last-modified"));
    let content_range = header("content-range");
    let length = response.content_length();

    let (mut file, start, total) = match status {
        200 => {
            let file = File::create(part)
                .map_err(|e| AttemptError::Fatal(StageError::io("creating the partial file", e)))?;
            (file, 0u64, length)
        }
        206 => {
            let (start, total) =
                parse_content_range(content_range.as_deref()).ok_or_else(|| {
                    AttemptError::Retry(format!("bad Content-Range {content_range:?}"))
                })?;
            if start != have {
                let _ = std::fs::remove_file(part);
                return Err(AttemptError::Retry(format!(
                    "server resumed at byte {start}, not {have}"
                )));
            }
            // A server that ignores If-Range answers 206 for a changed file: its validator
            // tells.
            if let (Some(was), Some(now)) = (&meta.validator, &validator)
                && was != now
            {
                let _ = std::fs::remove_file(part);
                return Err(AttemptError::Retry(format!(
                    "the file changed on the server ({was} → {now}); restarting from zero"
                )));
            }
            let file = OpenOptions::new()
                .append(true)
                .open(part)
                .map_err(|e| AttemptError::Fatal(StageError::io("opening the partial file", e)))?;
            *resumed_from = (*resumed_from).max(have);
            ctx.log.line(format!("HTTP 206: resuming at byte {have}"));
            (file, have, total.or(length.map(|l| l + have)))
        }
        416 if have > 0 && meta.total == Some(have) => return Ok(have),
        416 => {
            let _ = std::fs::remove_file(part);
            return Err(AttemptError::Retry(
                "server refused the resume range; restarting".into(),
            ));
        }
        404 | 410 => {
            return Err(AttemptError::Fatal(StageError::failed_with_hint(
                format!("{url} was not found (HTTP {status})"),
                "check the URL in the pipeline file",
            )));
        }
        401 | 403 => {
            return Err(AttemptError::Fatal(StageError::failed_with_hint(
                format!("access to {url} was denied (HTTP {status})"),
                "the file may need credentials or may no longer be public",
            )));
        }
        408 | 429 | 500..=599 => {
            return Err(AttemptError::Retry(format!(
                "HTTP {status} from the server"
            )));
        }
        _ => {
            return Err(AttemptError::Fatal(StageError::failed(format!(
                "unexpected HTTP {status} for {url}"
            ))));
        }
    };
    meta.total = total;
    if status == 200 || meta.validator.is_none() {
        meta.validator = validator;
    }
    write_meta(meta_path, meta);
    ctx.progress.set_length(total);

    let mut body = response;
    let mut buf = vec![0u8; 256 * 1024];
    let mut pos = start;
    loop {
        if ctx.cancel.is_cancelled() {
            let _ = file.sync_all();
            return Err(AttemptError::Fatal(StageError::Cancelled));
        }
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                let _ = file.sync_all();
                return Err(AttemptError::Retry(format!(
                    "transfer broke off after {pos} bytes: {e}"
                )));
            }
        };
        file.write_all(&buf[..n])
            .map_err(|e| AttemptError::Fatal(StageError::io("writing the partial file", e)))?;
        pos += n as u64;
        ctx.progress.set_position(pos);
    }
    file.sync_all()
        .map_err(|e| AttemptError::Fatal(StageError::io("syncing the download", e)))?;
    if let Some(total) = total {
        if pos < total {
            return Err(AttemptError::Retry(format!(
                "transfer ended at byte {pos} of {total}"
            )));
        }
        if pos > total {
            let _ = std::fs::remove_file(part);
            return Err(AttemptError::Retry(format!(
                "server sent {pos} bytes but announced {total}"
            )));
        }
    }
    Ok(pos)
}

fn classify(err: reqwest::Error) -> AttemptError {
    // The causes below reqwest's error: rustls for handshakes and certificates, the resolver's
    // and the socket's I/O errors for the rest.
    let mut tls = false;
    let mut unresolved = false;
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&err);
    while let Some(cause) = source {
        tls |= is_tls(cause);
        let text = cause.to_string();
        unresolved |= text.contains("failed to lookup address")
            || text.contains("Name or service not known")
            || text.contains("dns error");
        source = cause.source();
    }
    let detail = innermost(&err);
    if tls {
        return AttemptError::Fatal(tls_failure(&detail));
    }
    if unresolved {
        return AttemptError::Fatal(StageError::failed_with_hint(
            format!("host not found ({detail})"),
            "check the host name in the URL and this machine's network access",
        ));
    }
    if err.is_builder() {
        return AttemptError::Fatal(StageError::failed_with_hint(
            format!("cannot request this URL: {detail}"),
            "check the URL in the pipeline file (http:// or https://)",
        ));
    }
    if err.is_timeout() {
        return AttemptError::Retry(format!("timed out ({detail})"));
    }
    if err.is_connect() {
        return AttemptError::Retry(format!("connection failed ({detail})"));
    }
    if err.is_request() || err.is_body() {
        return AttemptError::Retry(format!("HTTP protocol error: {detail}"));
    }
    AttemptError::Fatal(StageError::failed(format!("request failed: {detail}")))
}

/// Whether `cause` is a rustls error, possibly inside I/O errors (which hide their inner error
/// from `source()`; hyper-rustls wraps it twice).
fn is_tls(mut cause: &(dyn std::error::Error + 'static)) -> bool {
    loop {
        if cause.is::<rustls::Error>() {
            return true;
        }
        match cause
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
        {
            Some(inner) => cause = inner,
            None => return false,
        }
    }
}

/// The most specific message in an error's chain (reqwest's own says only "error sending
/// request").
fn innermost(err: &(dyn std::error::Error + 'static)) -> String {
    let mut last = err;
    while let Some(next) = last.source() {
        last = next;
    }
    last.to_string()
}

fn tls_failure(e: &dyn std::fmt::Display) -> StageError {
    StageError::failed_with_hint(
        format!("TLS error: {e}"),
        "the secure connection failed (certificate, or not a TLS server); check the URL (http vs https), the system clock and the CA certificates of this machine (Debian: ca-certificates)",
    )
}

/// `bytes START-END/TOTAL` → (START, TOTAL if known).
fn parse_content_range(value: Option<&str>) -> Option<(u64, Option<u64>)> {
    let rest = value?.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let total = if total == "*" {
        None
    } else {
        Some(total.parse().ok()?)
    };
    Some((start.parse().ok()?, total))
}

fn read_meta(path: &Path, url: &str) -> PartMeta {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| PartMeta {
            url: url.to_string(),
            ..PartMeta::default()
        })
}

fn write_meta(path: &Path, meta: &PartMeta) {
    if let Ok(bytes) = serde_json::to_vec(meta) {
        let _ = std::fs::write(path, bytes);
    }
}

fn sleep_unless_cancelled(total: Duration, ctx: &StageContext<'_>) -> Result<(), StageError> {
    let step = Duration::from_millis(50);
    let mut slept = Duration::ZERO;
    while slept < total {
        if ctx.cancel.is_cancelled() {
            return Err(StageError::Cancelled);
        }
        std::thread::sleep(step.min(total - slept));
        slept += step;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_is_parsed() {
        assert_eq!(
            parse_content_range(Some("bytes 100-199/200")),
            Some((100, Some(200)))
        );
        assert_eq!(parse_content_range(Some("bytes 5-9/*")), Some((5, None)));
        assert_eq!(parse_content_range(Some("items 1-2/3")), None);
        assert_eq!(parse_content_range(None), None);
    }

    #[test]
    fn file_names_come_from_the_last_path_segment() {
        assert_eq!(
            file_name_from_url("https://h.org/a/b/model.onnx?x=1").unwrap(),
            "model.onnx"
        );
        assert!(file_name_from_url("https://h.org/").is_err());
        assert!(file_name_from_url("https://h.org").is_err());
    }
}
