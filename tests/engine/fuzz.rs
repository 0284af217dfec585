//! Property-based fuzzing of the untrusted readers, on stable Rust with `proptest`: the pipeline
//! file, tree manifests and run records as they come from a remote, and dataset tables.
//!
//! Each target runs from a fixed seed for a bounded number of cases in the normal test run
//! (`CUSA_PIPE_FUZZ_CASES`, default 256); the README shows the longer run. Properties: no
//! panic, nothing written outside the cache, and every rejection a clear, located error.

use std::path::{Path, PathBuf};

use cusa_pipe::fingerprint::Fingerprint;
use cusa_pipe::remote::{Remote, RemoteSettings, RemoteSource};
use cusa_pipe::store::{RunRecord, Store};
use cusa_stages::dataset::clean::Clean;
use cusa_stages::dataset::formats::{Columns, table};
use cusa_stages::dataset::normal::{OnError, Rules, normalize};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

use crate::support::sha256_hex;

fn cases() -> u32 {
    std::env::var("CUSA_PIPE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// A runner with a fixed seed (a failure reproduces on every machine) and no persistence file.
fn runner(seed: u8) -> TestRunner {
    let config = Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    };
    TestRunner::new_with_rng(
        config,
        TestRng::from_seed(RngAlgorithm::ChaCha, &[seed; 32]),
    )
}

/// Path components an attacker or a careless table would write.
fn component() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9_]{1,8}(\\.[a-z]{1,4})?",
        2 => Just("..".to_string()),
        1 => Just(".".to_string()),
        1 => Just(String::new()),
        1 => Just("é\u{202e}x".to_string()),
        1 => Just("a\0b".to_string()),
        1 => Just("\\..\\x".to_string()),
    ]
}

/// Relative-looking, absolute, or escaping paths (`outside` is an absolute folder to aim at).
fn path_like(outside: String) -> impl Strategy<Value = String> {
    (
        prop::collection::vec(component(), 0..6),
        prop_oneof![Just(""), Just("/"), Just("./")],
        any::<bool>(),
    )
        .prop_map(move |(parts, lead, aim)| {
            let joined = parts.join("/");
            if aim {
                format!("{outside}/{joined}")
            } else {
                format!("{lead}{joined}")
            }
        })
}

/// Every file under `dir` (links not followed).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| !e.file_type().is_dir())
        .map(|e| e.into_path())
        .collect()
}

/// Manifests and records fetched from a `file://` remote go through the real restore and the
/// tree check: whatever they say, nothing appears outside the cache and the remote folders
/// (in particular not in a sibling folder the absolute paths aim at).
#[test]
fn fuzz_remote_manifests_and_records() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let remote_dir = tmp.path().join("remote");
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let store = Store::open(&cache).unwrap();
    let remote = Remote::connect(
        RemoteSettings {
            name: "fuzz".into(),
            url: format!("file://{}", remote_dir.display()),
            read: true,
            write: false,
            options: Default::default(),
            grace: std::time::Duration::from_secs(3600),
            source: RemoteSource::Pipeline,
        },
        Box::new(|_| {}),
    )
    .unwrap();
    let put = |bytes: &[u8]| -> String {
        let d = sha256_hex(bytes);
        let p = remote_dir.join("objects-v1").join(&d[..2]).join(&d[2..]);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
        d
    };
    let payload = put(b"pwned\n");
    let outside_s = outside.display().to_string();
    let entry = (
        path_like(outside_s.clone()),
        prop_oneof![
            4 => Just(payload.clone()),
            1 => "[0-9a-f]{0,70}",
            1 => Just("../../../../etc/passwd".to_string()),
        ],
        any::<bool>(),
    );
    let strategy = (
        prop::collection::vec(entry, 0..6),
        prop_oneof![
            3 => Just(None),
            2 => path_like(outside_s.clone()).prop_map(Some),
            1 => Just(Some("logs-v1/x/y.log".to_string())),
        ],
        any::<bool>(),
        "[0-9a-f]{64}",
    );
    let executed = std::cell::Cell::new(0u32);
    let restored = std::cell::Cell::new(0u32);
    runner(1)
        .run(&strategy, |(entries, log, garbage, fp)| {
            executed.set(executed.get() + 1);
            let entries: Vec<serde_json::Value> = entries
                .into_iter()
                .map(|(path, sha, dir)| {
                    if dir {
                        serde_json::json!({"path": path, "type": "dir"})
                    } else {
                        serde_json::json!({"path": path, "sha256": sha, "size": 6, "type": "file"})
                    }
                })
                .collect();
            let manifest = put(&serde_json::to_vec(&serde_json::json!({"entries": entries})).unwrap());
            let mut record = serde_json::json!({
                "fingerprint": fp, "stage": "s", "ingredients": serde_json::json!({"schema": 2, "kind": "command", "kind_version": 1, "config": {}, "params": {}, "inputs": {}}),
                "output": manifest, "files": 1, "bytes": 6, "started_at": "2026-01-01T00:00:00Z",
                "seconds": 1.0, "log": log, "tool": "fuzz"
            });
            if garbage {
                record["output"] = "../../objects".into();
            }
            let rec_path = remote_dir
                .join("runs-v1")
                .join(&fp[..2])
                .join(format!("{fp}.json"));
            std::fs::create_dir_all(rec_path.parent().unwrap()).unwrap();
            std::fs::write(&rec_path, serde_json::to_vec(&record).unwrap()).unwrap();
            // The remote holds the log a sane record names (the harness writes nowhere else).
            if let Some(l) = record["log"].as_str()
                && cusa_stages::safe_path::relative(l).is_ok()
            {
                let lp = remote_dir.join(l);
                let _ = std::fs::create_dir_all(lp.parent().unwrap());
                let _ = std::fs::write(&lp, b"log");
            }
            let fingerprint = Fingerprint(fp.clone());
            if let Ok(Some((got, _))) = remote.try_restore(&store, &fingerprint) {
                restored.set(restored.get() + 1);
                // A restored record is one whose paths stay inside; its tree must check out.
                let _ = store.check_tree(&got.output);
            }
            // Nothing leaked: every file is in the cache, the remote, or nowhere else.
            for f in files_under(tmp.path()) {
                prop_assert!(
                    f.starts_with(&cache) || f.starts_with(&remote_dir),
                    "{} was written outside the cache",
                    f.display()
                );
            }
            let _ = std::fs::remove_file(&rec_path);
            Ok(())
        })
        .unwrap();
    eprintln!(
        "fuzz_remote_manifests_and_records: {} cases, {} restored",
        executed.get(),
        restored.get()
    );
    assert_eq!(executed.get(), cases());
}

/// Run records as bytes: whatever they hold, reading them never panics, and what is accepted
/// names only sha256 digests and a log under `logs-v1/`.
#[test]
fn fuzz_run_records() {
    let good = serde_json::json!({
        "fingerprint": "a".repeat(64), "stage": "s",
        "ingredients": {"schema": 2, "kind": "command", "kind_version": 1, "config": {}, "params": {}, "inputs": {}},
        "output": "b".repeat(64), "files": 1, "bytes": 6, "started_at": "2026-01-01T00:00:00Z",
        "seconds": 1.0, "log": "logs-v1/s/x.log", "tool": "t"
    })
    .to_string()
    .into_bytes();
    let strategy = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        (
            prop::collection::vec((0..good.len(), any::<u8>()), 1..8),
            Just(good.clone())
        )
            .prop_map(|(edits, mut bytes)| {
                for (at, b) in edits {
                    bytes[at] = b;
                }
                bytes
            }),
    ];
    runner(2)
        .run(&strategy, |bytes| {
            if let Ok(r) = RunRecord::from_untrusted(&bytes) {
                prop_assert!(cusa_stages::safe_path::is_sha256(&r.fingerprint.0));
                prop_assert!(cusa_stages::safe_path::is_sha256(&r.output));
                if let Some(log) = &r.log {
                    prop_assert!(log.starts_with("logs-v1/"));
                    prop_assert!(cusa_stages::safe_path::relative(log).is_ok(), "{log}");
                }
            }
            Ok(())
        })
        .unwrap();
}

/// The pipeline file, edited at random (the quickstart with bytes replaced, removed and
/// inserted), and random `--set`s: loading never panics, and a rejection names the file (or
/// the flag).
#[test]
fn fuzz_pipeline_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let quickstart = std::fs::read(root.join("pipeline.yaml")).unwrap();
    let kinds = cusa_stages::registry();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("pipeline.yaml");
    let alphabet = prop::sample::select(
        b": -{}[]\"'\n#&*!|>%@`$\\{}.0123456789abcdefgh\t\xc3\xa9\xff".to_vec(),
    );
    let edit = (
        0..quickstart.len(),
        0usize..40,
        prop::collection::vec(alphabet, 0..12),
    );
    let set = (
        prop_oneof![
            Just("params.n_train"),
            Just("teacher_text.with.batch_size"),
            Just("dataset.with"),
            Just("no_such.with.x"),
            Just("params"),
            Just(".."),
        ],
        "[ -~]{0,12}",
    );
    let strategy = (prop::collection::vec(edit, 0..4), prop::option::of(set));
    let rejected = std::cell::Cell::new(0u32);
    runner(3)
        .run(&strategy, |(edits, set)| {
            let mut text = quickstart.clone();
            for (at, remove, insert) in edits {
                let at = at.min(text.len());
                let end = (at + remove).min(text.len());
                text.splice(at..end, insert);
            }
            std::fs::write(&file, &text).unwrap();
            let overrides: Vec<cusa_pipe::spec::Override> = set
                .and_then(|(k, v)| format!("{k}={v}").parse().ok())
                .into_iter()
                .collect();
            match cusa_pipe::spec::load(&file, &overrides, &kinds) {
                Ok(_) => {}
                Err(d) => {
                    rejected.set(rejected.get() + 1);
                    prop_assert!(!d.message.trim().is_empty());
                    let shown = d.to_string();
                    prop_assert!(
                        d.file == file || d.file.to_string_lossy().starts_with("--set "),
                        "{shown}"
                    );
                    prop_assert!(!shown.contains("(stage ``)"), "{shown}");
                }
            }
            Ok(())
        })
        .unwrap();
    eprintln!(
        "fuzz_pipeline_files: {} cases, {} rejected",
        cases(),
        rejected.get()
    );
}

/// Dataset tables (CSV) with random rows: reading and validating never panics, every kept
/// image stays below the image root, and no id names two files.
#[test]
fn fuzz_dataset_tables() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    std::fs::create_dir_all(images.join("x")).unwrap();
    for n in ["a.png", "b.png"] {
        std::fs::write(images.join("x").join(n), b"not decoded here").unwrap();
    }
    std::fs::write(tmp.path().join("outside.png"), b"outside").unwrap();
    let csv = tmp.path().join("t.csv");
    let cell = prop_oneof![
        3 => prop::sample::select(vec!["x/a.png", "x/b.png", "../outside.png", "x/../x/a.png"])
            .prop_map(str::to_string),
        1 => path_like(tmp.path().display().to_string()),
        1 => "[ -~]{0,10}",
    ];
    let row = (
        cell,
        "[a-z ,\"]{0,12}",
        prop::sample::select(vec!["1", "2", "3", ""]),
    );
    let strategy = (prop::collection::vec(row, 0..8), any::<bool>());
    let columns = Columns {
        image: "file".into(),
        caption: "caption".into(),
        split: None,
        image_id: Some("id".into()),
        caption_id: None,
        label: None,
    };
    runner(4)
        .run(&strategy, |(rows, skip)| {
            let mut w = csv::Writer::from_path(&csv).unwrap();
            w.write_record(["file", "caption", "id"]).unwrap();
            for (file, caption, id) in &rows {
                w.write_record([file.as_str(), caption.as_str(), id])
                    .unwrap();
            }
            w.flush().unwrap();
            drop(w);
            let Ok(raw) = table(&csv, &columns, "train", None) else {
                return Ok(());
            };
            let mut ids = std::collections::HashMap::new();
            for img in &raw.images {
                prop_assert!(
                    ids.insert(img.id.clone(), img.path.clone()).is_none(),
                    "id {} twice",
                    img.id
                );
            }
            let rules = Rules {
                clean: Clean::Cusa,
                max_words: 32,
                on_error: if skip { OnError::Skip } else { OnError::Fail },
                verify_images: false,
                image_root: Some(&images),
            };
            if let Ok(normal) = normalize(raw, &rules) {
                for img in &normal.images {
                    prop_assert!(
                        cusa_stages::safe_path::relative(&img.raw.path).is_ok(),
                        "{} kept",
                        img.raw.path
                    );
                }
            }
            Ok(())
        })
        .unwrap();
}
