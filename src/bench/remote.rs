//! `cusa-pipe bench remote`: the team cache's push and pull against the AWS CLI, both talking
//! to the same local S3 server (moto's, started here on loopback) in the same run.
//!
//! * many small objects (default 10,000 × 4 KiB): our push of a committed result holding them
//!   (LIST once, uploads 64 at a time, sha256 re-checked, the record last) vs `aws s3 sync DIR
//!   s3://…`; our restore into an empty cache (downloads verified by sha256) vs `aws s3 sync
//!   s3://… DIR`;
//! * one large object (default 2 GiB): multipart push vs `aws s3 cp`, download vs `aws s3 cp`.
//!
//! Every repetition writes to a fresh prefix and restores into an empty store, so neither side
//! skips work. The AWS CLI runs with its defaults (10 concurrent requests, 8 MiB parts), as a
//! user would run it.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use super::{XorShift, best, cores, report, run_quiet};
use crate::fingerprint::{Ingredients, SCHEMA_VERSION};
use crate::remote::{Remote, RemoteSettings, RemoteSource};
use crate::store::{RunRecord, Store};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(python: &Path, port: u16) -> anyhow::Result<Server> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/tests/s3_server.py");
    let mut child = Command::new(python)
        .arg(&script)
        .arg(port.to_string())
        .arg("cache")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} {}", python.display(), script.display()))?;
    let mut out = std::io::BufReader::new(child.stdout.take().expect("piped"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line)?;
    if !line.starts_with("ready") {
        let _ = child.kill();
        bail!(
            "the S3 server did not start (needs `pip install moto[server] boto3` for {})",
            python.display()
        );
    }
    Ok(Server(child))
}

fn settings(endpoint: &str, prefix: &str) -> RemoteSettings {
    let mut options = std::collections::BTreeMap::new();
    for (k, v) in [
        ("endpoint", endpoint.to_string()),
        ("allow_http", "true".into()),
        ("region", "us-east-1".into()),
        ("access_key_id", "testing".into()),
        ("secret_access_key", "testing".into()),
    ] {
        options.insert(k.to_string(), v);
    }
    RemoteSettings {
        name: "bench".into(),
        url: format!("s3://cache/{prefix}"),
        read: true,
        write: true,
        options,
        grace: Duration::from_secs(24 * 3600),
        source: RemoteSource::CommandLine,
    }
}

/// Commits the files of `src` as one result (hard links where possible, so nothing large is
/// copied; the linked files become read-only objects).
fn commit(store: &Store, src: &Path, name: &str) -> anyhow::Result<RunRecord> {
    let staging = store.staging()?;
    let out = staging.out_dir();
    for e in walkdir::WalkDir::new(src).min_depth(1) {
        let e = e?;
        let rel = e.path().strip_prefix(src)?;
        if e.file_type().is_dir() {
            std::fs::create_dir_all(out.join(rel))?;
        } else if !e.file_name().to_string_lossy().starts_with('.') {
            std::fs::hard_link(e.path(), out.join(rel))
                .or_else(|_| std::fs::copy(e.path(), out.join(rel)).map(|_| ()))?;
        }
    }
    let (manifest, digest) = store.commit_tree(&staging)?;
    let ingredients = Ingredients {
        schema: SCHEMA_VERSION,
        kind: "bench".into(),
        kind_version: 1,
        config: serde_json::json!({ "name": name }),
        written: serde_json::json!({ "name": name }),
        params: Default::default(),
        inputs: Default::default(),
    };
    let record = RunRecord {
        fingerprint: ingredients.fingerprint(),
        stage: name.into(),
        ingredients,
        output: digest,
        files: manifest.entries.len(),
        bytes: manifest.size(),
        started_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        seconds: 0.0,
        notes: vec![],
        metrics: Default::default(),
        results: Default::default(),
        log: None,
        tool: "bench".into(),
        ran_on: None,
    };
    store.commit(&staging, &record)?;
    Ok(record)
}

fn small_objects(dir: &Path, n: usize, size: usize) -> anyhow::Result<()> {
    let marker = dir.join(format!(".complete-{n}x{size}"));
    if marker.exists() {
        return Ok(());
    }
    let _ = std::fs::remove_dir_all(dir);
    let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
    let mut buf = vec![0u8; size];
    for i in 0..n {
        let sub = dir.join(format!("d{:03}", i / 1000));
        if i % 1000 == 0 {
            std::fs::create_dir_all(&sub)?;
        }
        rng.fill(&mut buf);
        std::fs::write(sub.join(format!("o{i:06}.bin")), &buf)?;
    }
    std::fs::write(marker, b"")?;
    Ok(())
}

fn aws(aws: &Path, endpoint: &str, args: &[&str]) -> Command {
    let mut c = Command::new(aws);
    c.args(args)
        .args(["--endpoint-url", endpoint, "--only-show-errors"])
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_DEFAULT_REGION", "us-east-1");
    c
}

#[allow(clippy::too_many_arguments)]
pub fn remote(
    dir: &Path,
    python: &Path,
    aws_cli: &Path,
    objects: usize,
    object_size: usize,
    big: &Path,
    big_mib: usize,
    repeat: usize,
    external: Option<&str>,
) -> anyhow::Result<i32> {
    let (_server, endpoint, server_name) = match external {
        Some(e) => (None, e.to_string(), format!("{e} (given; bucket `cache`)")),
        None => {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let server = start_server(python, port)?;
            let e = format!("http://127.0.0.1:{port}");
            (Some(server), e.clone(), format!("moto on {e}"))
        }
    };
    let endpoint = endpoint.as_str();
    let small = dir.join("data/remote-small");
    small_objects(&small, objects, object_size)?;
    let big_dir = dir.join("data/remote-big");
    std::fs::create_dir_all(&big_dir)?;
    let big_link = big_dir.join("big.bin");
    if !big_link.exists() {
        std::fs::hard_link(big, &big_link)
            .or_else(|_| std::fs::copy(big, &big_link).map(|_| ()))?;
    }
    let work = dir.join("remote-work");
    crate::store::remove_tree(&work);
    let source = Store::open(&work.join("source"))?;
    let small_record = commit(&source, &small, "small")?;
    let big_record = commit(&source, &big_dir, "big")?;
    println!(
        "data: {objects} objects × {object_size} B, one {big_mib} MiB object; S3 server: \
         {server_name}; {} cores",
        cores()
    );

    // Prefixes never seen before, even on a server that keeps data between runs.
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let mut n = 0usize;
    let mut fresh = |what: &str| {
        n += 1;
        format!("{what}-{stamp}-{n}")
    };
    let quiet = || -> Box<dyn Fn(&str) + Send + Sync> { Box::new(|w: &str| eprintln!("{w}")) };

    println!("\nbest of {repeat}");
    for (label, record, src, mib) in [
        ("small", &small_record, &small, None),
        ("large", &big_record, &big_dir, Some(big_mib)),
    ] {
        // Ours: push into a fresh prefix, then restore from it into an empty store.
        let mut last_prefix = String::new();
        let push = best(repeat, || {
            last_prefix = fresh(&format!("ours-{label}"));
            let remote = Remote::connect(settings(endpoint, &last_prefix), quiet())?;
            let stats = remote.push_now(&source, record.clone())?;
            if stats.already {
                bail!("the fresh prefix already held the record");
            }
            Ok(())
        })?;
        let pull = best(repeat, || {
            let into = work.join("restore");
            crate::store::remove_tree(&into);
            let local = Store::open(&into)?;
            let remote = Remote::connect(settings(endpoint, &last_prefix), quiet())?;
            match remote.try_restore(&local, &record.fingerprint)? {
                Some(_) => Ok(()),
                None => bail!("nothing to restore"),
            }
        })?;
        // The AWS CLI on the same data.
        let mut aws_prefix = String::new();
        let src_arg = if mib.is_some() {
            big_link.to_string_lossy().into_owned()
        } else {
            src.to_string_lossy().into_owned()
        };
        let aws_push = best(repeat, || {
            aws_prefix = fresh(&format!("aws-{label}"));
            let target = format!("s3://cache/{aws_prefix}");
            if mib.is_some() {
                run_quiet(&mut aws(
                    aws_cli,
                    endpoint,
                    &["s3", "cp", &src_arg, &format!("{target}/big.bin")],
                ))
            } else {
                run_quiet(&mut aws(
                    aws_cli,
                    endpoint,
                    &["s3", "sync", &src_arg, &target],
                ))
            }
        })?;
        let aws_pull = best(repeat, || {
            let into = work.join("aws-restore");
            crate::store::remove_tree(&into);
            std::fs::create_dir_all(&into)?;
            let from = format!("s3://cache/{aws_prefix}");
            if mib.is_some() {
                run_quiet(&mut aws(
                    aws_cli,
                    endpoint,
                    &[
                        "s3",
                        "cp",
                        &format!("{from}/big.bin"),
                        &into.join("big.bin").to_string_lossy(),
                    ],
                ))
            } else {
                run_quiet(&mut aws(
                    aws_cli,
                    endpoint,
                    &["s3", "sync", &from, &into.to_string_lossy()],
                ))
            }
        })?;
        let (count, bytes) = match mib {
            None => (objects, (objects * object_size) as f64),
            Some(m) => (1, (m as f64) * 1048576.0),
        };
        let rate = |d: Duration| {
            let s = d.as_secs_f64();
            format!(
                "{:.0} objects/s, {:.1} MB/s",
                count as f64 / s,
                bytes / 1e6 / s
            )
        };
        let goal = if mib.is_none() {
            "goal ≥ 1.5×"
        } else {
            "goal ≥ 1.0×"
        };
        println!("  {label}:");
        report("push", push, "aws s3", aws_push, goal);
        println!("      ours {}; aws {}", rate(push), rate(aws_push));
        report("pull (restore)", pull, "aws s3", aws_pull, goal);
        println!("      ours {}; aws {}", rate(pull), rate(aws_pull));
    }
    crate::store::remove_tree(&work);
    Ok(0)
}
